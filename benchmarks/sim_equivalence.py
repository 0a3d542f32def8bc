"""Did a change alter what the engine decides? Every shipped scenario (with its [[compare]]
variants) and benchmarks/sim_1m.toml, run through the simulator; the summaries (wall times left
out) are written as JSON. The simulator is deterministic per seed, so two runs of unchanged
behaviour give identical files.

    .venv/bin/python benchmarks/sim_equivalence.py --out before.json      # on the old code
    .venv/bin/python benchmarks/sim_equivalence.py --out after.json       # on the new code
    .venv/bin/python benchmarks/sim_equivalence.py --compare before.json after.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summaries(root: Path) -> dict[str, dict]:
    from genserve.sim import report
    from genserve.sim.driver import simulate
    from genserve.sim.scenario import load_scenario, variant

    out = {}
    for path in sorted(root.glob("scenarios/*/scenario.toml")) + [root / "benchmarks" / "sim_1m.toml"]:
        base = load_scenario(path)
        for name, sc in [("base", base)] + [(n, variant(base, o)) for n, o in base.compare]:
            x = report.summarize(simulate(sc))
            x.pop("wall_s", None)
            out[f"{path.parent.name}/{path.name}:{name}"] = x
            print(f"{path.parent.name}: {name}: {x['requests']:,} requests", file=sys.stderr)
    return out


def compare(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="write the summaries here")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two summary files")
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose scenarios to run")
    a = ap.parse_args()
    if a.compare:
        before, after = (json.loads(Path(p).read_text()) for p in a.compare)
        diff = compare(before, after)
        print(f"{len(before)} runs before, {len(after)} after; {len(diff)} differ" + "".join(f"\n  {k}" for k in diff))
        return 1 if diff else 0
    result = summaries(Path(a.root))
    text = json.dumps(result, indent=1, sort_keys=True, default=str)
    if a.out:
        Path(a.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
