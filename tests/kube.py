"""What kubelet does for a pod, done on one machine: volumes laid out, the command line built, probes checked.

Tests and benchmarks use it to run the real server exactly as deploy/'s manifests say. Container paths (mount
paths, and the image's own files) are mapped to host folders; every path in args, env and ConfigMap JSON that
starts with one is rewritten to it. Ports the manifest declares are mapped to free ports on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ROOT, free_port

DEPLOY = ROOT / "deploy"
SERVING = health_pb2.HealthCheckResponse.SERVING


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    for doc in docs:
        if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    raise AssertionError(f"no {kind} {name or ''} in the manifests")


# ---- kubelet's AtomicWriter: <dir>/..<timestamp>/files, ..data -> that, and one symlink per key into ..data ----


def atomic_write(folder: Path, files: Mapping[str, bytes], mode: int = 0o644) -> None:
    """Lay out (or swap) a ConfigMap/Secret volume the way kubelet does, in one atomic rename of `..data`."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / f"..{datetime.now().strftime('%Y_%m_%d_%H_%M_%S.%f')}{secrets.token_hex(3)}"
    stamp.mkdir()
    for key, content in files.items():
        (stamp / key).write_bytes(content)
        (stamp / key).chmod(mode)
    data = folder / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    tmp = folder / "..data_tmp"
    os.symlink(stamp.name, tmp)
    os.replace(tmp, data)
    for key in files:
        link = folder / key
        if not link.is_symlink():
            os.symlink(f"..data/{key}", link)
    for entry in folder.iterdir():  # keys that left the ConfigMap
        if not entry.name.startswith("..") and entry.is_symlink() and entry.name not in files:
            entry.unlink()
    if old is not None:
        for child in (folder / old).iterdir():
            child.unlink()
        (folder / old).rmdir()


@dataclass
class Pod:
    """One container of a pod spec, run as kubelet would: `argv` and `env` for the server, `ports` for probes."""

    root: Path
    container: dict[str, Any]
    pod_spec: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)  # container path → host folder
    ports: dict[int | str, int] = field(default_factory=dict)  # declared port (number or name) → host port
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def host(self, path: str) -> str:
        """A container path as the host sees it (unchanged when no mount or image path covers it)."""
        for prefix in sorted(self.paths, key=len, reverse=True):
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return str(self.paths[prefix]) + path[len(prefix.rstrip("/")) :]
        return path

    def rewrite_json(self, text: str) -> str:
        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            return self.host(node) if isinstance(node, str) and node.startswith("/") else node

        return json.dumps(walk(json.loads(text)), indent=2)

    def mount(self, name: str) -> Path:
        """The host folder of the volume mounted under `name`."""
        for m in self.container.get("volumeMounts", []):
            if m["name"] == name:
                return self.paths[m["mountPath"]]
        raise KeyError(name)

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod_spec.get("volumes", []) if v["name"] == name)

    def probe(self, kind: str) -> bool:
        return check_probe(self.container[kind], self.ports)

    def probe_result(self, kind: str) -> tuple[bool, bool]:
        return probe_result(self.container[kind], self.ports)


def pod(
    root: Path,
    pod_spec: dict[str, Any],
    config_maps: Mapping[str, Mapping[str, str]],
    secrets_data: Mapping[str, Mapping[str, bytes]],
    image_paths: Mapping[str, Path],
    substitutions: Mapping[str, str] | None = None,
    container: str | None = None,
) -> Pod:
    """Lay out every volume of one container under `root`, then build its command line and environment.

    `image_paths` maps files the image holds (e.g. /opt/hotserve/lib) to the host; `substitutions` are template
    values such as KServe's {{.Name}}. PVC and emptyDir volumes are empty folders for the test to fill.
    """
    spec = next(c for c in pod_spec["containers"] if container is None or c["name"] == container)
    found = Pod(root, spec, pod_spec, paths=dict(image_paths))
    for m in spec.get("volumeMounts", []):
        assert "subPath" not in m, f"{m['name']}: a subPath mount never sees ConfigMap or Secret updates"
        found.paths[m["mountPath"]] = root / "volumes" / m["name"]
    for m in spec.get("volumeMounts", []):
        volume, where = found.volume(m["name"]), found.paths[m["mountPath"]]
        if "configMap" in volume:
            data = config_maps[volume["configMap"]["name"]]
            files = {k: found.rewrite_json(v).encode() if k.endswith(".json") else v.encode() for k, v in data.items()}
            atomic_write(where, files, volume["configMap"].get("defaultMode", 0o644))
        elif "secret" in volume:
            secret = volume["secret"]
            atomic_write(where, secrets_data[secret["secretName"]], secret.get("defaultMode", 0o644))
        else:
            assert {"persistentVolumeClaim", "emptyDir"} & set(volume), f"volume {m['name']}: unexpected type"
            where.mkdir(parents=True, exist_ok=True)
    for port in spec.get("ports", []):
        host_port = free_port()
        found.ports[port["containerPort"]] = host_port
        if "name" in port:
            found.ports[port["name"]] = host_port
    found.argv = [_arg(found, a, substitutions or {}) for a in spec.get("args", [])]
    for item in spec.get("env", []):
        if "value" in item:
            found.env[item["name"]] = found.host(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            found.env[item["name"]] = secrets_data[ref["name"]][ref["key"]].decode()
    return found


PORT_FLAGS = ("--port", "--rest_port")


def _arg(found: Pod, arg: str, substitutions: Mapping[str, str]) -> str:
    for key, value in substitutions.items():
        arg = arg.replace(key, value)
    flag, eq, value = arg.partition("=")
    if not eq:
        return arg
    if flag in PORT_FLAGS:
        number = int(value)
        if number not in found.ports:  # a port the server opens but the manifest does not list (probes may use it)
            found.ports[number] = free_port()
        return f"{flag}={found.ports[number]}"
    return f"{flag}={found.host(value)}" if value.startswith("/") else arg


def check_probe(spec: dict[str, Any], ports: Mapping[int | str, int]) -> bool:
    """One probe attempt as kubelet makes it: success or failure, with the probe's timeout (default 1 s)."""
    return probe_result(spec, ports)[0]


def probe_result(spec: dict[str, Any], ports: Mapping[int | str, int]) -> tuple[bool, bool]:
    """(success, whether the server answered at all): a refused connection fails a probe too."""
    timeout = float(spec.get("timeoutSeconds", 1))
    if "grpc" in spec:
        with grpc.insecure_channel(f"127.0.0.1:{ports[spec['grpc']['port']]}") as channel:
            request = health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", ""))
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status
                return status == SERVING, True
            except grpc.RpcError as exc:
                return False, exc.code() != grpc.StatusCode.UNAVAILABLE
    if "httpGet" in spec:
        get = spec["httpGet"]
        url = f"http://127.0.0.1:{ports[get['port']]}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return 200 <= response.status < 400, True
        except urllib.error.HTTPError as exc:
            return 200 <= exc.code < 400, True
        except OSError:
            return False, False
    if "tcpSocket" in spec:
        try:
            socket.create_connection(("127.0.0.1", ports[spec["tcpSocket"]["port"]]), timeout).close()
            return True, True
        except OSError:
            return False, False
    raise AssertionError(f"unknown probe {spec}")
