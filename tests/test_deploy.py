"""Cluster files: cluster.yaml (Ray cluster launcher), deploy/*.yaml (KubeRay), Dockerfile.

Static checks only: no network, no cluster. cluster.yaml is validated with the launcher's own JSON
schema and `validate_config`; the KubeRay manifests with a checker of the fields KubeRay needs and
that training and serving rely on (shared volume on every node, same image everywhere).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "deploy" / "rayjob-train-all.yaml"
RAYSERVICE = ROOT / "deploy" / "rayservice.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SHARED_CLAIM, SHARED_PATH = "tocoad-shared", "/shared"  # RayJob: checkpoints + artifacts
ARTIFACTS_CLAIM, ARTIFACTS_PATH = "tocoad-artifacts", "/artifacts"  # RayService
CLUSTER_SHARED = "/mnt/shared"  # cluster.yaml: EFS on every node


def _load(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- KubeRay manifest checker


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _claim_mounts(pod_spec: dict) -> dict[str, tuple[str, bool]]:
    """{claimName: (mountPath, readOnly)} over the pod's containers' volumeMounts backed by a PVC."""
    claims = {
        v["name"]: v["persistentVolumeClaim"].get("claimName")
        for v in pod_spec.get("volumes") or []
        if isinstance(v, dict) and "name" in v and isinstance(v.get("persistentVolumeClaim"), dict)
    }
    out = {}
    for c in pod_spec.get("containers") or []:
        for m in c.get("volumeMounts") or []:
            if m.get("name") in claims:
                out[claims[m["name"]]] = (m.get("mountPath"), bool(m.get("readOnly", False)))
    return out


def _check_pod_template(where: str, template: Any, problems: list[str]) -> dict:
    spec = _get(template, "spec")
    containers = _get(template, "spec.containers")
    if not isinstance(containers, list) or not containers:
        problems.append(f"{where}.template.spec.containers must be a non-empty list")
        return {}
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name"):
            problems.append(f"{where}.template.spec.containers[{i}].name is missing")
        if not isinstance(c, dict) or not isinstance(c.get("image"), str) or not c["image"]:
            problems.append(f"{where}.template.spec.containers[{i}].image is missing")
    return spec if isinstance(spec, dict) else {}


def check_kuberay_manifest(doc: Any, shared_claim: str, shared_path: str) -> list[str]:
    """Problems with a RayJob / RayService manifest (empty list: fine).

    Checks the fields KubeRay v1 requires and that the PVC ``shared_claim`` is mounted at
    ``shared_path`` in the head and in every worker group.
    """
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["manifest is not a mapping"]
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    kind = doc.get("kind")
    if kind not in ("RayJob", "RayService"):
        problems.append(f"kind must be RayJob or RayService, got {kind!r}")
    name = _get(doc, "metadata.name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name or ""):
        problems.append(f"metadata.name must be a DNS-1123 label, got {name!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec is missing"]

    if kind == "RayJob":
        entry = spec.get("entrypoint")
        if not isinstance(entry, str) or "tocoad train-all" not in entry:
            problems.append(f"spec.entrypoint must run `tocoad train-all`, got {entry!r}")
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append("spec.shutdownAfterJobFinishes must be true (the GPU cluster would stay up)")
        ttl = spec.get("ttlSecondsAfterFinished")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
            problems.append(f"spec.ttlSecondsAfterFinished must be an integer >= 0, got {ttl!r}")
        cluster_key = "rayClusterSpec"
    elif kind == "RayService":
        cfg = spec.get("serveConfigV2")
        try:
            serve_cfg = yaml.safe_load(cfg) if isinstance(cfg, str) else None
        except yaml.YAMLError as e:
            serve_cfg = None
            problems.append(f"spec.serveConfigV2 is not valid YAML: {e}")
        apps = serve_cfg.get("applications") if isinstance(serve_cfg, dict) else None
        if not isinstance(apps, list) or not apps:
            problems.append("spec.serveConfigV2 must be a YAML string with a non-empty `applications` list")
        else:
            paths = [a.get("import_path") if isinstance(a, dict) else None for a in apps]
            if any(p != "serve.app:build" for p in paths):
                problems.append(f"serveConfigV2 applications[].import_path must be serve.app:build, got {paths}")
        cluster_key = "rayClusterConfig"
    else:
        return problems

    cluster = spec.get(cluster_key)
    if not isinstance(cluster, dict):
        return problems + [f"spec.{cluster_key} is missing"]
    if not isinstance(cluster.get("rayVersion"), str):
        problems.append(f"spec.{cluster_key}.rayVersion must be a string (quote it)")

    head = cluster.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"spec.{cluster_key}.headGroupSpec is missing")
    else:
        pod = _check_pod_template(f"spec.{cluster_key}.headGroupSpec", head.get("template"), problems)
        if pod and _claim_mounts(pod).get(shared_claim, (None,))[0] != shared_path:
            problems.append(f"head: PVC {shared_claim} is not mounted at {shared_path}")

    groups = cluster.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        problems.append(f"spec.{cluster_key}.workerGroupSpecs must be a non-empty list")
        groups = []
    names = []
    for i, g in enumerate(groups):
        where = f"spec.{cluster_key}.workerGroupSpecs[{i}]"
        if not isinstance(g, dict):
            problems.append(f"{where} is not a mapping")
            continue
        if not isinstance(g.get("groupName"), str) or not g["groupName"]:
            problems.append(f"{where}.groupName is missing")
        names.append(g.get("groupName"))
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            problems.append(f"{where}: need integers 0 <= minReplicas <= maxReplicas, got {lo!r}, {hi!r}")
        elif "replicas" in g and not (isinstance(g["replicas"], int) and lo <= g["replicas"] <= hi):
            problems.append(f"{where}: replicas {g['replicas']!r} outside [{lo}, {hi}]")
        pod = _check_pod_template(where, g.get("template"), problems)
        if pod and _claim_mounts(pod).get(shared_claim, (None,))[0] != shared_path:
            problems.append(f"worker group {g.get('groupName')!r}: PVC {shared_claim} is not mounted at {shared_path}")
    if len(set(names)) != len(names):
        problems.append(f"duplicate worker groupName in {names}")
    return problems


def _images(doc: dict) -> set[str]:
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return {c["image"] for t in templates for c in t["spec"]["containers"]}


# ---------------------------------------------------------------- (b) KubeRay manifests


def test_rayjob_manifest_is_valid():
    doc = _load(RAYJOB)
    assert check_kuberay_manifest(doc, SHARED_CLAIM, SHARED_PATH) == []
    assert doc["kind"] == "RayJob"


def test_rayservice_manifest_is_valid():
    doc = _load(RAYSERVICE)
    assert check_kuberay_manifest(doc, ARTIFACTS_CLAIM, ARTIFACTS_PATH) == []
    assert doc["kind"] == "RayService"
    assert (ROOT / "serve" / "app.py").is_file() and "\ndef build(" in (ROOT / "serve" / "app.py").read_text(), \
        "serveConfigV2 imports serve.app:build, which serve/app.py must define"


def test_rayservice_probes_use_the_service_health_routes():
    import re

    doc = _load(RAYSERVICE)
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert head["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    routes = set(re.findall(r'@app\.get\("([^"]+)"', (ROOT / "serve" / "app.py").read_text()))
    assert {"/readyz", "/healthz"} <= routes


def test_rayjob_training_setup():
    doc = _load(RAYJOB)
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster.get("enableInTreeAutoscaling") is True, "GPU workers can only scale from 0 with the autoscaler on"
    head = cluster["headGroupSpec"]
    assert str(head.get("rayStartParams", {}).get("num-cpus")) == "0", "head must have num-cpus 0 (no training there)"
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if any(int(str((_get(c, "resources.limits") or {}).get("nvidia.com/gpu", 0))) > 0
               for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no worker group has an nvidia.com/gpu limit"
    assert any(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in gpu_groups), \
        "the GPU worker group must autoscale from 0 (minReplicas 0, maxReplicas >= 1)"
    # read-only data volume at /data on every pod that may read it
    for where, pod in [("head", head["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]
    ]:
        mounts = _claim_mounts(pod)
        data = [(p, ro) for p, ro in mounts.values() if p == "/data"]
        assert data == [("/data", True)], f"{where}: need a read-only data PVC at /data, got {mounts}"
    # the entrypoint reads /data and writes artifacts and checkpoints to the shared volume
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["tocoad", "train-all"], args
    opt = {a: b for a, b in zip(args, args[1:]) if a.startswith("--") and a != "--set"}
    sets = dict(b.split("=", 1) for a, b in zip(args, args[1:]) if a == "--set")
    assert opt.get("--data", "").startswith("/data/"), f"--data must be on the data volume: {opt}"
    assert opt.get("--out", "").startswith(SHARED_PATH + "/"), f"--out must be on the shared volume: {opt}"
    assert sets.get("distributed.storage_path", "").startswith(SHARED_PATH + "/"), \
        f"distributed.storage_path must be on the shared volume: {sets}"
    assert sets.get("distributed.use_gpu") == "true", sets
    cfg = opt.get("--config", "")
    local = ROOT / cfg.removeprefix("/app/")
    assert local.is_file(), f"--config {cfg} is not in the image (no {local.relative_to(ROOT)} in the repo)"


def test_rayjob_entrypoint_parses_with_the_cli():
    """Once `tocoad train-all` exists: the entrypoint's flags parse and its --set keys are config keys."""
    from tocoad_ray.cli import build_parser
    from tocoad_ray.config import load_config

    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    if "train-all" not in sub.choices:
        pytest.skip("tocoad train-all is not in the CLI yet")
    args = shlex.split(_load(RAYJOB)["spec"]["entrypoint"])
    ns = ap.parse_args(args[1:])  # SystemExit (a failure) on an unknown flag
    ov = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in getattr(ns, "set", None) or [])}
    load_config(ROOT / ns.config.removeprefix("/app/"), ov)  # ConfigError on an unknown key or bad value


def _mutations():
    def drop(path):
        def f(doc):
            *parents, last = path
            d = doc
            for p in parents:
                d = d[p]
            del d[last]
        return f

    def setv(path, value):
        def f(doc):
            *parents, last = path
            d = doc
            for p in parents:
                d = d[p]
            d[last] = value
        return f

    rc, w0 = ["spec", "rayClusterSpec"], ["spec", "rayClusterSpec", "workerGroupSpecs", 0]
    head_c = rc + ["headGroupSpec", "template", "spec", "containers"]
    return {
        "no metadata.name": (drop(["metadata", "name"]), "metadata.name"),
        "wrong apiVersion": (setv(["apiVersion"], "ray.io/v1alpha1"), "apiVersion"),
        "no entrypoint": (drop(["spec", "entrypoint"]), "entrypoint"),
        "no shutdown": (drop(["spec", "shutdownAfterJobFinishes"]), "shutdownAfterJobFinishes"),
        "no cluster spec": (drop(rc), "rayClusterSpec"),
        "no head containers": (setv(head_c, []), "containers"),
        "no head image": (drop(head_c + [0, "image"]), "image"),
        "no worker groupName": (drop(w0 + ["groupName"]), "groupName"),
        "min > max": (setv(w0 + ["minReplicas"], 99), "minReplicas"),
        "no worker image": (drop(w0 + ["template", "spec", "containers", 0, "image"]), "image"),
        "worker without shared volume": (drop(w0 + ["template", "spec", "containers", 0, "volumeMounts"]), SHARED_CLAIM),
        "head without shared volume": (setv(rc + ["headGroupSpec", "template", "spec", "volumes"], []), SHARED_CLAIM),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_checker_rejects_broken_rayjob(case):
    mutate, expect = _mutations()[case]
    doc = copy.deepcopy(_load(RAYJOB))
    mutate(doc)
    problems = check_kuberay_manifest(doc, SHARED_CLAIM, SHARED_PATH)
    assert problems, f"checker accepted a RayJob with {case}"
    assert any(expect in p for p in problems), f"{case}: no problem mentions {expect!r}: {problems}"


@pytest.mark.parametrize("case", ["import_path", "bad yaml", "no cluster"])
def test_checker_rejects_broken_rayservice(case):
    doc = copy.deepcopy(_load(RAYSERVICE))
    if case == "import_path":
        doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("serve.app:build", "serve.app:nope")
    elif case == "bad yaml":
        doc["spec"]["serveConfigV2"] = "applications: [unclosed"
    else:
        del doc["spec"]["rayClusterConfig"]
    assert check_kuberay_manifest(doc, ARTIFACTS_CLAIM, ARTIFACTS_PATH), f"checker accepted a RayService with {case}"


# ---------------------------------------------------------------- (a) cluster launcher config


def _ray_schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"the ray wheel ships no launcher schema at {path}"
    return json.loads(path.read_text())


def test_cluster_yaml_validates_against_ray_schema():
    import jsonschema

    jsonschema.validate(_load(CLUSTER), _ray_schema())


def test_cluster_yaml_passes_ray_validate_config():
    """What `ray up` does before launching: fill the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load(CLUSTER)))


def test_schema_rejects_broken_cluster_yaml():
    import jsonschema

    schema = _ray_schema()
    for mutate in (
        lambda c: c.update(unknown_top_level_key=1),
        lambda c: c["available_node_types"]["gpu_worker"].pop("resources"),
        lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),
    ):
        c = _load(CLUSTER)
        mutate(c)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(c, schema)


def test_cluster_yaml_trains_on_gpu_workers_from_zero():
    c = _load(CLUSTER)
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head should take no tasks (CPU: 0)"
    workers = {k: v for k, v in types.items() if k != c["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu, f"no worker node type with GPU resources in {list(workers)}"
    for name, t in gpu.items():
        assert t.get("min_workers", 0) == 0, f"{name}: GPU workers must autoscale from 0"
        assert t.get("max_workers", 0) >= 1, f"{name}: max_workers must allow at least one GPU node"
        assert t["resources"].get("CPU", 0) >= 1, f"{name}: Ray Train workers need CPUs too"
    assert any(v["resources"].get("GPU", 0) == 0 and v["resources"].get("CPU", 0) > 0 for v in workers.values()), \
        "the serving CPU workers are gone"
    total = sum(v.get("max_workers", 0) for v in workers.values())
    assert c["max_workers"] >= total, f"cluster max_workers {c['max_workers']} caps the node types' sum {total}"


def test_cluster_yaml_mounts_shared_storage_on_every_node():
    c = _load(CLUSTER)
    # host side: mounted before docker starts (initialization_commands run on the host of every node)
    init = " ".join(c.get("initialization_commands") or [])
    assert re.search(rf"\bmount\b[^;&|]*\s{re.escape(CLUSTER_SHARED)}\b", init), \
        f"initialization_commands do not mount anything at {CLUSTER_SHARED}: {init!r}"
    for name, t in c["available_node_types"].items():
        assert "initialization_commands" not in t, f"{name} overrides the shared mount's initialization_commands"
    # container side: the same path inside every container
    opts = " ".join(c["docker"].get("run_options") or [])
    assert f"-v {CLUSTER_SHARED}:{CLUSTER_SHARED}" in opts, f"docker run_options do not bind {CLUSTER_SHARED}: {opts!r}"
    # the documented training command writes checkpoints and artifacts there
    header = "".join(line for line in CLUSTER.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "ray up cluster.yaml" in header and "tocoad train-all" in header, "usage comments are missing"
    m = re.search(r"distributed\.storage_path=(\S+)", header)
    assert m and m.group(1).startswith(CLUSTER_SHARED + "/"), "storage_path in the usage comment is not shared"
    m = re.search(r"--out\s+(\S+)", header)
    assert m and m.group(1).startswith(CLUSTER_SHARED + "/"), "--out in the usage comment is not shared"


# ---------------------------------------------------------------- (c) one image everywhere


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text()
    text = re.sub(r"\\\n", " ", text)  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_on_ray_gpu_image_with_gpu_extra():
    assert DOCKERFILE.is_file(), "Dockerfile is missing"
    ins = _dockerfile_instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) == 1, f"expected one FROM, got {froms}"
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", froms[0])
    assert m, f"FROM must be a rayproject/ray GPU image, got {froms[0]!r}"
    for doc in (_load(RAYJOB), _load(RAYSERVICE)):
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
        assert cluster["rayVersion"] == m.group(1), f"{doc['kind']} rayVersion {cluster['rayVersion']} != image {m.group(1)}"
    assert any(op == "COPY" and rest.split()[-1].rstrip("/") == "/app" for op, rest in ins), "no COPY into /app"
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert re.search(r"pip install\b[^&;]*-e\s+[\"']?/app\[gpu\]", runs), f"no `pip install -e /app[gpu]` in {runs!r}"
    assert ("WORKDIR", "/app") in ins, "WORKDIR must be /app (relative config paths in jobs)"
    ignore = (ROOT / ".dockerignore").read_text().split()
    for p in (".venv", ".git"):
        assert p in ignore, f".dockerignore does not exclude {p}"


def test_all_cluster_files_use_the_same_image():
    images = {"RayJob": _images(_load(RAYJOB)), "RayService": _images(_load(RAYSERVICE))}
    images["cluster.yaml"] = {_load(CLUSTER)["docker"]["image"]}
    every = set().union(*images.values())
    assert len(every) == 1, f"different images: {images}"
    (image,) = every
    assert re.fullmatch(r"[\w.\-/:]+:[\w.\-]+", image) and not image.endswith(":latest"), f"pin a tag: {image}"
    assert f"docker build -t {image} ." in DOCKERFILE.read_text(), f"the Dockerfile does not say how to build {image}"
