"""Regenerate raycluster.schema.json from KubeRay's RayCluster CRD.

    python deploy/kuberay/schema/vendor.py ray.io_rayclusters.yaml v1.7.0 59d663aeec13760646da3db9c1cf8cfe883e30b7

The input is ray-operator/config/crd/bases/ray.io_rayclusters.yaml of the ray-project/kuberay
repository at the given tag and commit. Kept: the openAPIV3Schema of the served storage version
(ray.io/v1), with the `description` texts removed (documentation, not validation: they are most of
the file's size). Nothing else is changed: the test adds kubectl's strict field validation itself.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).with_name("raycluster.schema.json")


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(crd_path: str, tag: str, commit: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    assert crd["spec"]["names"]["kind"] == "RayCluster", crd["spec"]["names"]
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"], "ray.io/v1 must be the served storage version"
    schema = strip(v1["schema"]["openAPIV3Schema"])
    doc = {
        "$comment": (f"openAPIV3Schema of RayCluster ray.io/v1 from ray-project/kuberay {tag} (commit {commit}), "
                     "ray-operator/config/crd/bases/ray.io_rayclusters.yaml, descriptions removed; "
                     "regenerate with deploy/kuberay/schema/vendor.py"),
        "x-kuberay-version": tag,
        **schema,
    }
    OUT.write_text(json.dumps(doc, indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
