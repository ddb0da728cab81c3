"""deploy/k8s: each overlay renders to valid Kubernetes objects with the properties deploy/README.md promises.

No kustomize binary is needed: `render` below does what `kubectl kustomize` does for the features
these manifests use (resources, images, strategic-merge and JSON6902 patches) and refuses any other.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from detserve.server.cli import build_parser, engine_config, server_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes these manifests support: `preStop: sleep` is on by default from 1.30.
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = ["gpu", "cpu"]
# Not the bare overlay name as a test id: tests/conftest.py skips tests with a `gpu` keyword on CPU.
OVERLAY_IDS = [f"{overlay}-overlay" for overlay in OVERLAYS]
overlays = pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)

# Strategic merge: these lists merge item by item on a key; every other list is replaced whole.
MERGE_KEYS = {"containers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort"}


def strategic_merge(base, patch, field: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v, k) if k in base else v for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key, merged = MERGE_KEYS[field], list(base)
        for item in patch:
            at = next((i for i, old in enumerate(merged) if old[key] == item[key]), None)
            if at is None:
                merged.append(item)
            else:
                merged[at] = strategic_merge(merged[at], item)
        return merged
    return patch


def json6902(doc: dict, operations: list[dict]) -> dict:
    for operation in operations:
        assert operation["op"] == "add", f"render supports only `add` JSON patches, not {operation['op']!r}"
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), operation["value"])
        else:
            node[last] = operation["value"]
    return doc


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize directory`, for resources, images (newName/newTag) and patches."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - {"apiVersion", "kind", "resources", "images", "patches"}
    assert not unsupported, f"render does not support {unsupported}: extend it or use a supported field"
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
        hits = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == (target["kind"], target["name"])]
        assert hits, f"{directory / patch['path']} patches nothing"
        for i in hits:
            docs[i] = json6902(docs[i], body) if isinstance(body, list) else strategic_merge(docs[i], body)
    for image in spec.get("images", []):
        for doc in docs:
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                name = container["image"].split(":")[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


@functools.cache
def rendered(overlay: str) -> list[dict]:
    return render(K8S / "overlays" / overlay)


def one(overlay: str, kind: str) -> dict:
    [doc] = [d for d in rendered(overlay) if d["kind"] == kind]
    return doc


def pod_spec(overlay: str) -> dict:
    return one(overlay, "Deployment")["spec"]["template"]["spec"]


def container(overlay: str) -> dict:
    [server] = pod_spec(overlay)["containers"]
    return server


def expanded_args(overlay: str) -> list[str]:
    """The container's args with $(VAR) filled in from the ConfigMap, as the kubelet does."""
    data = one(overlay, "ConfigMap")["data"]
    return [re.sub(r"\$\((\w+)\)", lambda m: data.get(m[1], m[0]), arg) for arg in container(overlay)["args"]]


def flag(args: list[str], name: str) -> str | None:
    return next((arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}=")), None)


@overlays
def test_overlay_renders_valid_kubernetes_objects(overlay):
    docs = rendered(overlay)
    expected = {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert {d["kind"] for d in docs} == expected | ({"PersistentVolumeClaim"} if overlay == "gpu" else set())
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@overlays
def test_container_args_are_a_valid_detserve_serve_command(overlay):
    server = container(overlay)
    assert server["envFrom"] == [{"configMapRef": {"name": one(overlay, "ConfigMap")["metadata"]["name"]}}]
    args = expanded_args(overlay)
    assert not [arg for arg in args if "$(" in arg], "a $(VAR) in args that the ConfigMap does not set"
    engine_config(build_parser().parse_args(["serve", *args]))  # exits on an unknown flag or bad value
    server_config(build_parser().parse_args(["serve", *args]))
    assert flag(args, "--host") == "0.0.0.0"
    assert flag(args, "--port") == "8000"


@overlays
def test_probes_poll_readiness_and_liveness_on_port_8000(overlay):
    # /health turns 503 while loading and draining (take no traffic); /live only when the engine died
    # (restart), so a pod draining for longer than the liveness budget is not killed mid-drain.
    server = container(overlay)
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    paths = {"startupProbe": "/health", "readinessProbe": "/health", "livenessProbe": "/live"}
    for probe, path in paths.items():
        get = server[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == 8000


@pytest.mark.parametrize("overlay, load_seconds", [("gpu", 600), ("cpu", 120)], ids=OVERLAY_IDS)
def test_startup_probe_waits_out_the_model_load(overlay, load_seconds):
    probe = container(overlay)["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= load_seconds


@overlays
def test_grace_period_outlasts_pre_stop_and_drain(overlay, monkeypatch):
    for name, value in one(overlay, "ConfigMap")["data"].items():
        monkeypatch.setenv(name, value)
    drain = server_config(build_parser().parse_args(["serve", *expanded_args(overlay)])).drain_timeout
    pre_stop = container(overlay)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod_spec(overlay)["terminationGracePeriodSeconds"] > pre_stop + drain


def test_only_the_gpu_overlay_requests_a_gpu():
    gpu = container("gpu")["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu.product" in pod_spec("gpu")["nodeSelector"]  # one GPU type: one fingerprint
    cpu = container("cpu")["resources"]
    assert "nvidia.com/gpu" not in {**cpu["requests"], **cpu["limits"]}


@overlays
def test_pod_runs_as_the_image_user_with_a_read_only_root_filesystem(overlay):
    image_users = set(re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    pod, server = pod_spec(overlay), container(overlay)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {str(pod["securityContext"]["runAsUser"])} == image_users
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    tmp = next(mount for mount in server["volumeMounts"] if mount["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


@overlays
def test_torch_threads_are_pinned_to_the_cpu_request(overlay):
    # torch's thread count is part of system_fingerprint; left to default it follows the node's size.
    data = one(overlay, "ConfigMap")["data"]
    assert data["OMP_NUM_THREADS"] == container(overlay)["resources"]["requests"]["cpu"]


@overlays
def test_api_key_comes_from_an_optional_secret_that_is_not_committed(overlay):
    env = {var["name"]: var for var in container(overlay)["env"]}
    assert env["DETSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert all(doc["kind"] != "Secret" for doc in rendered(overlay))


@overlays
def test_hpa_scales_the_deployment_on_queue_depth(overlay):
    deployment, hpa = one(overlay, "Deployment"), one(overlay, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    [metric] = hpa["spec"]["metrics"]
    # The adapter's name for detserve:num_requests_waiting: custom metric names cannot hold a colon.
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "detserve_num_requests_waiting"
    assert "replicas" not in deployment["spec"]  # else every apply resets what the HPA chose


@overlays
def test_service_and_disruption_budget_select_the_pods(overlay):
    deployment = one(overlay, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service, pdb = one(overlay, "Service")["spec"], one(overlay, "PodDisruptionBudget")["spec"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["selector"], pdb["selector"]["matchLabels"]):
        assert selector and selector.items() <= labels.items()
    ports = {port["name"]: port["containerPort"] for port in container(overlay)["ports"]}
    [port] = service["ports"]
    assert port["port"] == 8000 and ports.get(port["targetPort"], port["targetPort"]) == 8000


def test_gpu_overlay_serves_its_model_from_the_read_only_volume():
    assert container("gpu")["image"] == "detserve:gpu"
    model = flag(expanded_args("gpu"), "--model")
    [mount] = [m for m in container("gpu")["volumeMounts"] if model.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod_spec("gpu")["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == one("gpu", "PersistentVolumeClaim")["metadata"]["name"]


def test_cpu_overlay_serves_the_model_baked_into_its_image():
    assert container("cpu")["image"] == "detserve:cpu"
    assert flag(expanded_args("cpu"), "--model") is None
    assert flag(expanded_args("cpu"), "--device") == "cpu"


def _rank_command(template: dict) -> tuple[dict[str, str], list[str]]:
    """(the torchrun variables set, the `detserve serve` arguments) of a LeaderWorkerSet pod's `sh -c`."""
    [server] = template["spec"]["containers"]
    assert server["command"] == ["sh", "-c"]
    words = server["args"][0].split()
    exec_at = words.index("exec")
    assert words[exec_at + 1 : exec_at + 3] == ["detserve", "serve"]
    return dict(word.split("=", 1) for word in words[:exec_at]), words[exec_at + 3 :]


def test_the_leaderworkerset_starts_one_rank_per_pod_of_one_tensor_parallel_group():
    """deploy/k8s/multi-node: the leader and its workers run the same engine flags, with the group's
    size as --tensor-parallel-size and the torchrun variables from LeaderWorkerSet's own."""
    [lws] = yaml.safe_load_all((K8S / "multi-node" / "leaderworkerset.yaml").read_text())
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader_env, leader_args = _rank_command(template["leaderTemplate"])
    worker_env, worker_args = _rank_command(template["workerTemplate"])
    assert leader_env == worker_env == {"RANK": "$LWS_WORKER_INDEX", "WORLD_SIZE": "$LWS_GROUP_SIZE", "LOCAL_RANK": "0",
                                        "MASTER_ADDR": "$LWS_LEADER_ADDRESS", "MASTER_PORT": "29500"}
    configs = [engine_config(build_parser().parse_args(["serve", *args])) for args in (leader_args, worker_args)]
    assert configs[0] == configs[1] and configs[0].tensor_parallel_size == template["size"]
    assert configs[0].invariant_splits % configs[0].tensor_parallel_size == 0
    [leader] = template["leaderTemplate"]["spec"]["containers"]
    assert leader["livenessProbe"]["httpGet"]["path"] == "/live"
    assert 29500 in [port["containerPort"] for port in leader["ports"]]
