"""deploy/ (issue 11): every manifest validates, says what the README says, and runs: the server is started from the
Deployment's and the ServingRuntime's own args, with volumes laid out as kubelet would, and each declared probe is
checked the way kubelet checks it.
"""

from __future__ import annotations

import ast
import copy
import functools
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import kube
import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from harness import ROOT, ServerProcess

from engine import encrypt
from engine.cache import parse_size

K8S = kube.DEPLOY / "kubernetes"
KSERVE = kube.DEPLOY / "kserve"
CRDS = Path(__file__).resolve().parent / "kserve"  # KServe's CRDs (Apache-2.0), see kserve/README.md
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
IMAGE_PATHS = {"/opt/hotserve/lib": ROOT / "build"}  # the image's sample loader is the one `make setup` builds


def _server_constant(name: str) -> float:
    """engine/server.py's constant, read from its source: importing the server here clashes with tritonclient."""
    tree = ast.parse((ROOT / "engine" / "server.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return float(ast.literal_eval(node.value))
    raise AssertionError(f"no {name} in engine/server.py")


SHUTDOWN_GRACE_SECONDS = _server_constant("SHUTDOWN_GRACE_SECONDS")


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/kubernetes"
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def kubernetes_validate(tmp_path: Path, docs: list[dict[str, Any]], name: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run([str(VALIDATE), "--strict", str(path)], capture_output=True, text=True, timeout=120)


# ---- validation ----


@pytest.mark.parametrize("folder", ["base", "overlays/vision"])
def test_kubernetes_manifests_validate_strictly(tmp_path: Path, folder: str) -> None:
    docs = kustomize(K8S / folder)
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    done = kubernetes_validate(tmp_path, docs, folder.replace("/", "-"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(docs), done.stdout
    files = [f for f in sorted((K8S / "base").glob("*.yaml")) if f.name != "kustomization.yaml"]
    plain = [d for f in files for d in kube.documents(f)]
    assert kubernetes_validate(tmp_path, plain, "plain").returncode == 0  # `kubectl apply -f` on the files works too


def test_kubernetes_validate_catches_a_misspelt_field(tmp_path: Path) -> None:
    deployment = copy.deepcopy(kube.find(kustomize(K8S / "base"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 9000}}
    done = kubernetes_validate(tmp_path, [deployment], "typo")
    assert done.returncode != 0 and "readinesProbe" in done.stdout + done.stderr


def strict(schema: Any) -> Any:
    """The apiserver's strict field validation: an object schema with properties accepts no other field."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_schema(kind: str, version: str) -> dict[str, Any]:
    plural = {"ServingRuntime": "servingruntimes", "ClusterServingRuntime": "clusterservingruntimes",
              "InferenceService": "inferenceservices"}[kind]  # fmt: skip
    crd = kube.documents(CRDS / f"serving.kserve.io_{plural}.yaml")[0]
    assert crd["spec"]["names"]["kind"] == kind
    found = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return strict(found["schema"]["openAPIV3Schema"])


def kserve_docs() -> list[dict[str, Any]]:
    return [d for f in sorted(KSERVE.glob("*.yaml")) for d in kube.documents(f)]


@pytest.mark.parametrize("kind", ["ServingRuntime", "ClusterServingRuntime", "InferenceService"])
def test_kserve_manifests_validate_against_the_crds(kind: str) -> None:
    doc = kube.find(kserve_docs(), kind)
    # OpenAPI v3's schema objects are JSON Schema draft 4 plus keywords (nullable, x-kubernetes-…) it ignores
    validator = jsonschema.Draft4Validator(crd_schema(kind, doc["apiVersion"].split("/")[1]))
    validator.validate(doc)
    broken = copy.deepcopy(doc)
    broken["spec"]["protocolVersion" if kind != "InferenceService" else "predictorr"] = "v2"
    with pytest.raises(jsonschema.ValidationError):  # the strict schema does catch a misspelt field
        validator.validate(broken)


def test_serving_runtime_replaces_kserves_ovms_runtime() -> None:
    ovms = kube.documents(CRDS / "kserve-openvino.yaml")[0]["spec"]
    runtimes = [kube.find(kserve_docs(), k)["spec"] for k in ("ServingRuntime", "ClusterServingRuntime")]
    assert runtimes[0] == runtimes[1]
    ours = runtimes[0]
    container = ours["containers"][0]
    assert container["name"] == ovms["containers"][0]["name"] == "kserve-container"
    for arg in ("--model_name={{.Name}}", "--model_path=/mnt/models", "--port=9000"):
        assert arg in container["args"] and arg in ovms["containers"][0]["args"]
    formats = {f["name"]: f for f in ours["supportedModelFormats"]}
    assert formats["openvino"]["priority"] == 1 and formats["onnx"]["autoSelect"]
    assert {"v2", "grpc-v2"} <= set(ours["protocolVersions"])
    assert [p["name"] for p in container["ports"]] == ["h2c"]  # Knative's name for a gRPC port
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["securityContext"] == ovms["containers"][0]["securityContext"]
    assert ours["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    service = kube.find(kserve_docs(), "InferenceService")["spec"]["predictor"]
    assert service["model"]["runtime"] == "kserve-hotserve"
    assert "grpc" in service["model"]["ports"][0]["name"]  # RawDeployment: the port's name must contain grpc
    assert service["terminationGracePeriodSeconds"] > _drain(container["args"]) + SHUTDOWN_GRACE_SECONDS


def _drain(args: list[str]) -> float:
    return float(next(a.split("=", 1)[1] for a in args if a.startswith("--drain_seconds=")))


def test_deployment_says_what_the_readme_says() -> None:
    docs = kustomize(K8S / "base")
    deployment, service = kube.find(docs, "Deployment"), kube.find(docs, "Service")
    pod = deployment["spec"]["template"]
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 9000, "service": ""}
    assert "livenessProbe" in container and "startupProbe" in container  # liveness waits for start-up to pass
    assert spec["terminationGracePeriodSeconds"] > _drain(container["args"]) + SHUTDOWN_GRACE_SECONDS
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 5000
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "configMap" in volumes["config"] and volumes["models"]["persistentVolumeClaim"]["readOnly"]
    assert "emptyDir" in volumes["cache"] and "secret" in volumes["loader-key"]
    limit = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--cache_size_limit="))
    assert parse_size(limit) < parse_size(volumes["cache"]["emptyDir"]["sizeLimit"].removesuffix("i")), (
        "the cache must stay below its volume's size limit, or kubelet evicts the pod"
    )
    assert service["spec"]["ports"][0]["name"] == "grpc" and service["spec"]["ports"][0]["port"] == 9000
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    pdb = kube.find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


# ---- the manifests are executable truth ----


class ProbeLog:
    """Probes one kind every few ms from before the server listens; (sent, answered, success, reached) per attempt."""

    def __init__(self, pod: kube.Pod, kind: str) -> None:
        self.results: list[tuple[float, float, bool, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pod, kind), daemon=True)
        self._thread.start()

    def _run(self, pod: kube.Pod, kind: str) -> None:
        while not self._stop.is_set():
            sent = time.time()
            ok, reached = pod.probe_result(kind)
            self.results.append((sent, time.time(), ok, reached))
            time.sleep(0.005)

    def stop(self) -> list[tuple[float, float, bool, bool]]:
        self._stop.set()
        self._thread.join(10)
        return self.results


def infer(address: str, model: str, name: str, shape: list[int]) -> np.ndarray:
    client = grpcclient.InferenceServerClient(address)
    x = grpcclient.InferInput(name, shape, "FP32")
    x.set_data_from_numpy(np.zeros(shape, np.float32))
    try:
        return client.infer(model, [x], client_timeout=30).as_numpy(client.get_model_metadata(model).outputs[0].name)
    finally:
        client.close()


def test_deployment_runs_as_declared(tmp_path: Path, build: Path) -> None:
    docs = kustomize(K8S / "base")
    config_map = kube.find(docs, "ConfigMap", "hotserve-config")
    key = encrypt.keygen(tmp_path / "aes.key")
    spec = kube.find(docs, "Deployment")["spec"]["template"]["spec"]
    pod = kube.pod(
        tmp_path / "pod", spec, {"hotserve-config": config_map["data"]},
        {"hotserve-loader-key": {"aes.key": key.read_bytes()}}, IMAGE_PATHS,
    )  # fmt: skip
    models = pod.mount("models")
    # ~100 MB of weights: the initial load takes long enough to see the probes fail before it is done
    modelgen.mlp(models / "dummy" / "1", widths=(1024, 4096, 4096, 1024))
    modelgen.add_const(tmp_path / "plain" / "1", delta=2.0)
    encrypt.encrypt_dir(key, tmp_path / "plain" / "1", models / "dummy-encrypted" / "1")
    assert (pod.mount("config") / "..data").is_symlink()  # laid out as kubelet does
    probes = {kind: ProbeLog(pod, kind) for kind in ("startupProbe", "readinessProbe")}
    server = ServerProcess(pod.argv, tmp_path / "server.log", pod.env)
    try:
        server.wait_ready()
        ready_at = logged_at(server, "Server ready")
        time.sleep(0.1)  # a few probes after the load too
        for kind, log in probes.items():
            results = log.stop()
            before = [(ok, reached) for _, answered, ok, reached in results if answered < ready_at]
            after = [ok for sent, _, ok, _ in results if sent > ready_at + 0.05]
            assert not any(ok for ok, _ in before), f"{kind} passed before the initial load was done"
            assert any(reached for _, reached in before), f"{kind}: the server never answered during its load"
            assert after and all(after), f"{kind} failed after the load"
        assert pod.probe("livenessProbe")
        assert f"Model cache is enabled: {pod.mount('cache')}" in server.log
        assert infer(server.address, "dummy", "input", [1, 1024]).shape == (1, 1024)
        assert infer(server.address, "dummy-encrypted", "b", [1, 10]).tolist() == [[2.0] * 10]
        # kubelet's view of a terminating pod: not ready at once, still alive, gone before the grace period ends
        server.signal(signal.SIGTERM)
        server.wait_for("health is NOT_SERVING")
        assert not pod.probe("readinessProbe")
        assert pod.probe("livenessProbe")
        assert infer(server.address, "dummy-encrypted", "b", [1, 10]).tolist() == [[2.0] * 10]
        server.signal(signal.SIGTERM)
        assert server.proc.wait(spec["terminationGracePeriodSeconds"]) == 0
    finally:
        for log in probes.values():
            log.stop()
        server.stop()


def logged_at(server: ServerProcess, needle: str) -> float:
    from datetime import datetime

    found = server.wait_for(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]\[[^]]*\]\[[^]]*\]\[[^]]*\] " + needle)
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()


@pytest.mark.parametrize("layout", ["version-folder", "bare-ir", "bare-onnx"])
def test_serving_runtime_serves_what_the_storage_initializer_lays_out(tmp_path: Path, layout: str) -> None:
    """KServe copies storageUri into /mnt/models: a folder with 1/, the files of a model folder, or a single file."""
    runtime = kube.find(kserve_docs(), "ServingRuntime")
    # what KServe adds to the runtime's container: the storage initializer's emptyDir at /mnt/models
    volume = "kserve-provision-location"
    spec = {"containers": runtime["spec"]["containers"], "volumes": [{"name": volume, "emptyDir": {}}]}
    spec["containers"][0]["volumeMounts"] = [{"name": volume, "mountPath": "/mnt/models", "readOnly": True}]
    pod = kube.pod(tmp_path / "pod", spec, {}, {}, IMAGE_PATHS, {"{{.Name}}": "dummy"})
    mnt = pod.mount(volume)
    if layout == "version-folder":
        modelgen.add_const(mnt / "1", delta=3.0)
    elif layout == "bare-ir":
        modelgen.add_const(mnt, delta=3.0)
    else:
        modelgen.onnx_add_const(mnt, delta=3.0)
    probes = ProbeLog(pod, "startupProbe")
    server = ServerProcess(pod.argv, tmp_path / "server.log", pod.env)
    try:
        server.wait_ready()
        ready_at = logged_at(server, "Server ready")
        time.sleep(0.1)
        results = probes.stop()
        assert not any(ok for _, answered, ok, _ in results if answered < ready_at), "passed before the load"
        assert all(ok for sent, _, ok, _ in results if sent > ready_at + 0.05) and results[-1][2]
        assert infer(server.address, "dummy", "b", [1, 10]).tolist() == [[3.0] * 10]
        if layout != "version-folder":
            assert f"No version folder in {mnt}: serving the model files in it as version 1" in server.log
        server.signal(signal.SIGTERM)
        server.wait_for("health is NOT_SERVING")
        assert not pod.probe("startupProbe")  # /v2/health/ready is 503 while draining
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
    finally:
        probes.stop()
        server.stop()
