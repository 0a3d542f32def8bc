"""deploy/grafana/genserve-dashboard.json: importable structure, and every query names real metrics."""
import json
import re
from pathlib import Path

from genserve.server.observe.metrics import METRIC_NAMES

DASH = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "genserve-dashboard.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def base_name(name: str) -> str:
    for s in SUFFIXES:
        if name.endswith(s) and name[: -len(s)] in METRIC_NAMES:
            return name[: -len(s)]
    return name


def test_grafana_dashboard_is_importable_and_uses_our_metrics():
    d = json.loads(DASH.read_text())
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    [ds_input] = d["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS" and ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    used = set()
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh") and 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        for y in range(g["y"], g["y"] + g["h"]):  # panels must not overlap
            for x in range(g["x"], g["x"] + g["w"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
        assert p["type"] in ("timeseries", "stat", "table") and p["title"]
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs))
        for t in p["targets"]:
            expr = t["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            for name in re.findall(r"genserve_[a-z0-9_]+", expr):
                assert base_name(name) in METRIC_NAMES, (p["title"], name)
                used.add(base_name(name))
    assert set(METRIC_NAMES) == used  # every metric we expose has a panel
    [var] = d["templating"]["list"]
    assert var["name"] == "model" and "genserve_jobs_total" in var["query"]["query"]
