"""The container images, the compose stack and the KubeRay manifest against the current code,
without a container tool or a cluster: the settings each image and the compose service start `serve`
with must load, and `serve` must agree to start with them on 0.0.0.0 in a fresh /data (no keys yet),
which it refuses when the API would be open to anyone. Prometheus must be able to read /metrics once
keys are required. The KubeRay manifest is validated against the Kubernetes schemas
(kubernetes-validate, strict) and KubeRay's RayCluster CRD (vendored in deploy/kuberay/schema/), every
object it refers to must be in it, and its shell commands are run with stand-ins for `ray` and
`genserve`."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from genserve.config.load import load_config
from genserve.server.security.auth import bind_refusal
from genserve.server.security.keys import KeyStore

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))


def dockerfile(path: Path) -> tuple[dict[str, str], list[str]]:
    """(ENV variables, the arguments of `genserve` the image runs by default) of a Dockerfile: its
    CMD after ENTRYPOINT ["genserve"], or its CMD without the leading "genserve" where there is no
    ENTRYPOINT."""
    text = re.sub(r"\\\n", " ", path.read_text())  # join continued lines
    env: dict[str, str] = {}
    cmd: list[str] = []
    entrypoint: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line[4:])))
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
        elif line.startswith("ENTRYPOINT "):
            entrypoint = json.loads(line[11:])
    argv = entrypoint + cmd
    assert argv[0] == "genserve", f"{path.name} does not run genserve by default: {argv}"
    return env, argv[1:]


def build_args(path: Path) -> dict[str, str]:
    """The default of each ARG of a Dockerfile, ${NAME} references expanded."""
    out: dict[str, str] = {}
    for m in re.finditer(r"^ARG (\w+)(?:=(\S+))?$", path.read_text(), re.M):
        if m.group(2) is not None:
            out[m.group(1)] = re.sub(r"\$\{(\w+)\}", lambda r: out[r.group(1)], m.group(2).strip('"'))
    return out


def starts(cmd: list[str], env: dict[str, str], tmp_path: Path) -> str | None:
    """What `genserve serve` would answer to ``cmd`` under ``env`` in an empty data dir: None if it starts."""
    assert cmd[0] == "serve"
    host = cmd[cmd.index("--host") + 1]
    config = load_config(None, env=env).with_overrides(data_dir=tmp_path / "data")
    keys = KeyStore(config.server.data_dir)
    try:
        return bind_refusal(host, keys, config.access, "--insecure" in cmd)
    finally:
        keys.close()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_each_image_starts_with_keys_required(path, tmp_path):
    env, cmd = dockerfile(path)
    assert cmd[:3] == ["serve", "--host", "0.0.0.0"] and "--insecure" not in cmd
    assert starts(cmd, env, tmp_path) is None
    config = load_config(None, env=env)
    assert config.access.auth.required is True and str(config.server.data_dir) == "/data"


def test_the_compose_service_starts_and_prometheus_can_read_metrics(tmp_path):
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    svc = compose["services"]["genserve"]
    image_env, _ = dockerfile(ROOT / "deploy" / "docker" / svc["build"]["dockerfile"].split("/")[-1])
    env = {**image_env, **{k: str(v) for k, v in svc["environment"].items()}}
    assert starts(svc["command"], env, tmp_path) is None
    config = load_config(None, env=env)
    assert config.results.store == "s3" and config.results.endpoint_url == "http://minio:9000"
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "genserve"]
    assert job["static_configs"][0]["targets"] == ["genserve:8000"] and job["metrics_path"] == "/metrics"
    assert job["authorization"]["credentials"] == config.access.auth.metrics_token


# ---- KubeRay ----------------------------------------------------------------------------------------

KUBERAY = ROOT / "deploy" / "kuberay" / "raycluster.yaml"
CRD_SCHEMA = ROOT / "deploy" / "kuberay" / "schema" / "raycluster.schema.json"
RAY_DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile.ray"
# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships that we check against.
KUBERNETES_VERSIONS = ("1.30", "1.37")
OVERWRITE = "ray.io/overwrite-container-cmd"


def kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]


def the(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def groups(cluster: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head group and each worker group."""
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def strict(schema):
    """kubectl's strict field validation (its default since Kubernetes 1.27) over a CRD schema: an
    object schema with properties refuses any other field unless it says otherwise."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator():
    import jsonschema

    schema = json.loads(CRD_SCHEMA.read_text())
    return jsonschema.Draft7Validator(strict(schema))


def test_the_core_objects_and_pod_templates_are_valid_kubernetes():
    import kubernetes_validate as kv  # a test dependency (pyproject.toml): ships the schemas, offline
    docs = kuberay_docs()
    assert {d["kind"] for d in docs} == {"Secret", "ConfigMap", "PersistentVolumeClaim", "RayCluster", "Service"}
    # Each group's pod template as the PodTemplate the operator turns into pods.
    templates = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"genserve-{name}"},
                  "template": g["template"]} for name, g in groups(the(docs, "RayCluster"))]
    for version in KUBERNETES_VERSIONS:
        for doc in [d for d in docs if d["kind"] != "RayCluster"] + templates:
            kv.validate(doc, version, strict=True)  # raises kubernetes_validate.ValidationError
    # The check bites: a misplaced field and a wrongly typed one are refused.
    bad = json.loads(json.dumps(templates[0]))
    bad["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)
    bad = json.loads(json.dumps(the(docs, "PersistentVolumeClaim")))
    bad["spec"]["accessModes"] = "ReadWriteOnce"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_raycluster_is_valid_against_the_kuberay_crd():
    import jsonschema

    validator = crd_validator()
    cluster = the(kuberay_docs(), "RayCluster")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(cluster)]
    assert errors == []
    # The vendored schema is the real one, made strict: unknown fields and wrong types are refused.
    for path, value in ((("spec", "rayVersions"), "2.60.0"), (("spec", "workerGroupSpecs", 0, "maxReplicas"), "16"),
                        (("spec", "autoscalerOptions", "upscalingMode"), "Eager")):
        bad = json.loads(json.dumps(cluster))
        node = bad
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)
    # What the operator checks before it creates anything (ValidateRayClusterSpec, v1.7.0).
    for name, g in groups(cluster)[1:]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name


def test_every_object_the_manifest_refers_to_is_defined_in_it():
    docs = kuberay_docs()
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    cluster = the(docs, "RayCluster")
    refs: set[tuple[str, str]] = set()
    keys: dict[str, set[str]] = {}  # ConfigMap -> the keys mounted from it
    for _, g in groups(cluster):
        pod = g["template"]["spec"]
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                refs.add(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
            if "configMap" in v:
                refs.add(("ConfigMap", v["configMap"]["name"]))
            if "secret" in v:
                refs.add(("Secret", v["secret"]["secretName"]))
        for c in pod["containers"] + pod.get("initContainers", []):
            for e in c.get("envFrom", []):
                if "secretRef" in e:
                    refs.add(("Secret", e["secretRef"]["name"]))
                if "configMapRef" in e:
                    refs.add(("ConfigMap", e["configMapRef"]["name"]))
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                if "secretKeyRef" in src:
                    refs.add(("Secret", src["secretKeyRef"]["name"]))
                if "configMapKeyRef" in src:
                    refs.add(("ConfigMap", src["configMapKeyRef"]["name"]))
                    keys.setdefault(src["configMapKeyRef"]["name"], set()).add(src["configMapKeyRef"]["key"])
    assert ("PersistentVolumeClaim", "genserve-data") in refs and ("Secret", "genserve-s3") in refs
    assert refs - defined == set()
    for name, wanted in keys.items():
        [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
        assert wanted <= set(cm["data"])
    secret = the(docs, "Secret")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    # The client Service selects the head pod by the labels KubeRay gives it, on a port the head
    # container declares, and takes no name the operator creates itself (it would block the head Service).
    svc = the(docs, "Service")
    assert svc["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in head["ports"]}
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in named or port["targetPort"] in named.values()
    assert svc["metadata"]["name"] != f"{cluster['metadata']['name']}-head-svc"


def container_script(container: dict) -> str:
    """The shell script a Ray container runs: command ["/bin/bash", "-lc", "--"] plus one argument."""
    assert container["command"][:2] == ["/bin/bash", "-lc"], container["command"]
    [script] = container["args"]
    return script


def fake_tools(tmp_path: Path, ray_exit: int = 0) -> tuple[Path, Path]:
    """Stand-ins for `ray` and `genserve` that log their arguments; `ray start` without --block
    takes a moment and only then marks the head as up (as the real one returns once the GCS and the
    raylet are up); `genserve` notes whether the head was up when it started."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(
        "#!/bin/bash\n"
        f'{{ printf "ray"; printf " [%s]" "$@"; echo; }} >> {log}\n'
        f'case " $* " in *" --block "*) exit 0;; esac\n'
        f"sleep 0.3; [ {ray_exit} = 0 ] && touch {tmp_path}/head-up\n"
        f"exit {ray_exit}\n")
    (bin_dir / "genserve").write_text(
        "#!/bin/bash\n"
        f'{{ printf "genserve"; printf " [%s]" "$@"; [ -e {tmp_path}/head-up ] && printf " head-up"; echo; }} >> {log}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir, log


def run_script(script: str, bin_dir: Path, gen_cmd: str, timeout: float = 8) -> subprocess.CompletedProcess:
    """Run a container's script as its pod would, with KubeRay's variable set. `bash -c`, not the
    pod's `-lc`: a login shell here would read this machine's /etc/profile, which resets PATH."""
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KUBERAY_GEN_RAY_START_CMD": gen_cmd, "HOME": str(bin_dir)}
    return subprocess.run(["/bin/bash", "-c", "--", script], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=bin_dir)


# What KubeRay v1.7.0 puts in KUBERAY_GEN_RAY_START_CMD for this head group (convertParamMap: sorted
# flags, --block always added) and for a worker of the gpu group (a JSON value shows the quoting).
HEAD_GEN = ("ray start --head  --block  --dashboard-agent-listen-port=52365  --dashboard-host=0.0.0.0 "
            " --memory=8589934592  --metrics-export-port=8080  --no-monitor  --num-cpus=0  --num-gpus=0 ")
WORKER_GEN = ("ray start  --address=genserve-head-svc.default.svc.cluster.local:6379  --block "
              " --metrics-export-port=8080  --num-gpus=1  --resources='{\"genserve_device\": 1}' ")


def test_kuberay_leaves_the_commands_alone_and_the_head_starts_ray_before_the_server(tmp_path):
    cluster = the(kuberay_docs(), "RayCluster")
    # Without the annotation KubeRay combines a command of ours with its own `ray start`.
    assert cluster["metadata"].get("annotations", {}).get(OVERWRITE) == "true"
    for name, g in groups(cluster):
        # The annotation covers every group: one without a command would run the image's CMD.
        script = container_script(g["template"]["spec"]["containers"][0])
        assert re.search(r"\$\{?KUBERAY_GEN_RAY_START_CMD\b", script), name
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    script = container_script(head)
    assert not re.search(r"\bsleep\b", script), "a fixed sleep races the head"

    bin_dir, log = fake_tools(tmp_path)
    r = run_script(script, bin_dir, HEAD_GEN)
    calls = log.read_text().splitlines()
    assert r.returncode == 0, r.stderr
    assert len(calls) == 2 and calls[0].startswith("ray [start] [--head]") and "[--block]" not in calls[0]
    assert "[--no-monitor]" in calls[0] and "[--num-gpus=0]" in calls[0]  # KubeRay's flags are kept
    # The server started once `ray start` had returned with the head up, with the mounted config.
    assert calls[1].startswith("genserve [serve]") and calls[1].endswith(" head-up")
    config_path = re.search(r"\[--config\] \[(\S+)\]", calls[1]).group(1)
    mounts = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}
    config_volume = [v for v in cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
                     if v["name"] == "config"][0]
    assert config_path == f"{mounts['config']}/genserve.toml" and config_volume["configMap"]["name"] == "genserve-config"

    # A head that fails to start stops the container: no server without a cluster.
    (tmp_path / "failing").mkdir()
    bin_dir, log = fake_tools(tmp_path / "failing", ray_exit=1)
    r = run_script(script, bin_dir, HEAD_GEN)
    assert r.returncode != 0 and not any(c.startswith("genserve") for c in log.read_text().splitlines())


def test_the_worker_runs_kuberays_ray_start_verbatim(tmp_path):
    cluster = the(kuberay_docs(), "RayCluster")
    [(_, gpu)] = groups(cluster)[1:]
    script = container_script(gpu["template"]["spec"]["containers"][0])
    assert not re.search(r"\bsleep\b", script)
    bin_dir, log = fake_tools(tmp_path)
    r = run_script(script, bin_dir, WORKER_GEN)
    assert r.returncode == 0, r.stderr
    [call] = log.read_text().splitlines()  # with --block: the container lives as long as the node
    assert call == ("ray [start] [--address=genserve-head-svc.default.svc.cluster.local:6379] [--block] "
                    "[--metrics-export-port=8080] [--num-gpus=1] [--resources={\"genserve_device\": 1}]")


def test_ray_python_and_torch_versions_agree_everywhere():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    import ray
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    args = build_args(RAY_DOCKERFILE)
    ray_version = args["RAY_VERSION"]
    cluster = the(kuberay_docs(), "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray_version
    # The version genserve declares for clusters, and the one its tests run with (same minor release).
    [req] = [Requirement(r) for r in pyproject["optional-dependencies"]["cluster"] if Requirement(r).name == "ray"]
    assert Version(ray_version) in req.specifier
    assert Version(ray_version).release[:2] == Version(ray.__version__).release[:2], (
        f"tests run Ray {ray.__version__}: move Dockerfile.ray's RAY_VERSION and the RayCluster's rayVersion")
    # A rayproject/ray base of that version, with a Python genserve supports.
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-\w+", args["BASE"])
    assert m and m.group(1) == ray_version
    assert f"3.{m.group(2)}" in SpecifierSet(pyproject["requires-python"])
    # One image for every Ray container (the autoscaler sidecar defaults to the head's).
    assert {g["template"]["spec"]["containers"][0]["image"] for _, g in groups(cluster)} == {"genserve:ray"}
    # The same torch as the other images and the Makefile.
    torch = {p.name: build_args(p)["TORCH_SPEC"] for p in DOCKERFILES}
    make = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert set(torch.values()) == {make}, torch


def test_the_configmap_config_loads_and_fits_the_cluster(tmp_path):
    docs = kuberay_docs()
    cluster = the(docs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    [gpu] = cluster["spec"]["workerGroupSpecs"]
    worker = gpu["template"]["spec"]["containers"][0]
    path = tmp_path / "genserve.toml"
    path.write_text(the(docs, "ConfigMap")["data"]["genserve.toml"])
    image_env, _ = dockerfile(RAY_DOCKERFILE)
    env = {**image_env, **{e["name"]: e["value"] for e in head.get("env", [])}}
    config = load_config(path, env=env)
    # The server runs on the head: it joins the cluster it is a node of.
    assert config.cluster.provider == "ray" and config.cluster.address == "auto"
    assert config.cluster.device_resource == "GPU" and "nvidia.com/gpu" in worker["resources"]["limits"]
    assert config.results.store == "s3"
    assert all(m.source.startswith("s3://") for m in config.models.values()) and config.models
    # Autoscaling within the worker group's bounds, one GPU per pod, starting where the group starts.
    assert gpu["minReplicas"] <= config.autoscale.min_devices == gpu["replicas"]
    assert config.autoscale.max_devices == gpu["maxReplicas"]
    assert config.autoscale.scale_down_delay_s < cluster["spec"]["autoscalerOptions"]["idleTimeoutSeconds"]
    assert config.cluster.cpus_per_worker <= int(worker["resources"]["limits"]["cpu"])
    assert config.cluster.model_cache in {m["mountPath"] for m in worker["volumeMounts"]}
    # State on the persistent volume; keys required on 0.0.0.0, so `serve` agrees to start.
    data = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}["data"]
    assert str(config.server.data_dir).startswith(data + "/")
    argv = ["serve", "--host", "0.0.0.0"]
    assert starts(argv, env, tmp_path) is None and config.access.auth.required is True
