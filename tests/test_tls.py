"""TLS and mutual TLS on both ports (issue 10) with the real clients: tritonclient, ovmsclient, urllib over https;
client certificates required and checked; certificates rotated in place while a client keeps sending requests."""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import modelgen
import numpy as np
import ovmsclient
import pytest
import tritonclient.grpc as grpcclient
from certs import CA, Pair
from conftest import model_entry
from harness import free_port
from tritonclient.utils import InferenceServerException

X = np.arange(10, dtype=np.float32).reshape(1, 10)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    modelgen.add_const(tmp_path / "models" / "dummy" / "1", delta=1.0)
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_config_list": [model_entry("dummy", tmp_path / "models" / "dummy")]}))
    return path


def triton_infer(address: str, root: Path, client: Pair | None = None) -> np.ndarray:
    kwargs = {"private_key": str(client.key), "certificate_chain": str(client.cert)} if client else {}
    triton = grpcclient.InferenceServerClient(address, ssl=True, root_certificates=str(root), **kwargs)
    try:
        tensor = grpcclient.InferInput("b", [1, 10], "FP32")
        tensor.set_data_from_numpy(X)
        return triton.infer("dummy", [tensor], client_timeout=10).as_numpy("a")
    finally:
        triton.close()


def rest_infer(url: str, root: Path, client: Pair | None = None) -> np.ndarray:
    context = ssl.create_default_context(cafile=str(root))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    body = {"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 10], "data": X.ravel().tolist()}]}
    request = urllib.request.Request(f"{url}/v2/models/dummy/infer", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return np.array(json.loads(response.read())["outputs"][0]["data"], np.float32).reshape(1, 10)


def test_tls_with_tritonclient_ovmsclient_and_https(tmp_path: Path, config: Path, serve) -> None:  # type: ignore[no-untyped-def]
    ca = CA(tmp_path / "pki")
    server_pair = ca.issue("server")
    port = free_port()
    server = serve(config, "--tls_cert", str(server_pair.cert), "--tls_key", str(server_pair.key),
                   "--rest_port", str(port))  # fmt: skip
    assert "(TLS)" in server.log
    np.testing.assert_allclose(triton_infer(server.address, ca.cert), X + 1)
    ovms = ovmsclient.make_grpc_client(server.address, tls_config={"server_cert_path": str(ca.cert)})
    np.testing.assert_allclose(ovms.predict({"b": X}, "dummy"), X + 1)
    np.testing.assert_allclose(rest_infer(f"https://127.0.0.1:{port}", ca.cert), X + 1)
    plain = grpcclient.InferenceServerClient(server.address)  # plaintext to a TLS port: refused
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=5)


def test_mtls_requires_a_client_certificate_from_the_ca(tmp_path: Path, config: Path, serve) -> None:  # type: ignore[no-untyped-def]
    ca, other = CA(tmp_path / "pki"), CA(tmp_path / "other", "another CA")
    server_pair, client, stranger = ca.issue("server"), ca.issue("client", server=False), other.issue("x", False)
    port = free_port()
    server = serve(config, "--tls_cert", str(server_pair.cert), "--tls_key", str(server_pair.key),
                   "--tls_client_ca", str(ca.cert), "--rest_port", str(port))  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    np.testing.assert_allclose(triton_infer(server.address, ca.cert, client), X + 1)
    np.testing.assert_allclose(rest_infer(url, ca.cert, client), X + 1)
    tls = {"server_cert_path": str(ca.cert), "client_cert_path": str(client.cert), "client_key_path": str(client.key)}
    np.testing.assert_allclose(ovmsclient.make_grpc_client(server.address, tls_config=tls).predict({"b": X}, "dummy"),
                               X + 1)  # fmt: skip
    for who in (None, stranger):  # no certificate; one signed by another CA
        with pytest.raises(InferenceServerException):
            triton_infer(server.address, ca.cert, who)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            rest_infer(url, ca.cert, who)
    np.testing.assert_allclose(triton_infer(server.address, ca.cert, client), X + 1)  # still serving


def _replace(pair: Pair, new: Pair) -> None:
    """As cert-manager does: new files renamed over the old ones (key first, so one moment mismatches)."""
    for src, dst in ((new.key, pair.key), (new.cert, pair.cert)):
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)


def test_certificate_rotated_while_a_client_streams(tmp_path: Path, config: Path, serve) -> None:  # type: ignore[no-untyped-def]
    old_ca, new_ca = CA(tmp_path / "old", "old CA"), CA(tmp_path / "new", "new CA")
    live = old_ca.issue("server")
    port = free_port()
    server = serve(config, "--tls_cert", str(live.cert), "--tls_key", str(live.key), "--rest_port", str(port))
    url = f"https://127.0.0.1:{port}"
    streamer = grpcclient.InferenceServerClient(server.address, ssl=True, root_certificates=str(old_ca.cert))
    tensor = grpcclient.InferInput("b", [1, 10], "FP32")
    tensor.set_data_from_numpy(X)
    streamer.infer("dummy", [tensor])  # connected with the old certificate
    stop, done, failures = threading.Event(), [0], []

    def stream() -> None:
        while not stop.is_set():
            try:
                np.testing.assert_allclose(streamer.infer("dummy", [tensor], client_timeout=10).as_numpy("a"), X + 1)
                done[0] += 1
            except Exception as exc:  # any failure of the in-flight connection fails the test
                failures.append(exc)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        time.sleep(0.3)
        _replace(live, new_ca.issue("rotated"))
        deadline = time.monotonic() + 20
        while True:  # a new connection gets the new certificate (checked at its handshake)
            try:
                np.testing.assert_allclose(triton_infer(server.address, new_ca.cert), X + 1)
                np.testing.assert_allclose(rest_infer(url, new_ca.cert), X + 1)
                break
            except (InferenceServerException, urllib.error.URLError, ssl.SSLError):
                assert time.monotonic() < deadline, server.log[-2000:]
                time.sleep(0.2)
        before = done[0]
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]
    assert done[0] > before > 0  # the old connection kept serving through and after the rotation
    with pytest.raises(InferenceServerException):
        triton_infer(server.address, old_ca.cert)  # new connections no longer get the old certificate
    assert "TLS certificate reloaded" in server.log


@pytest.mark.parametrize(
    "problem", ["missing cert", "garbage key", "key of another cert", "missing client CA", "key OpenSSL refuses"]
)
def test_bad_tls_files_fail_start_up_naming_the_file(tmp_path: Path, config: Path, serve, problem: str) -> None:  # type: ignore[no-untyped-def]
    ca = CA(tmp_path / "pki")
    pair, other = ca.issue("server"), ca.issue("other")
    cert, key, client_ca = pair.cert, pair.key, None
    if problem == "missing cert":
        cert = tmp_path / "nope.pem"
    elif problem == "garbage key":
        key.write_text("not a key")
    elif problem == "key of another cert":
        key = other.key
    elif problem == "key OpenSSL refuses":  # cryptography reads an RSA-1024 pair; OpenSSL's security level does not
        cert, key = _weak_pair(tmp_path)
    else:
        client_ca = tmp_path / "no-ca.pem"
    args = ["--tls_cert", str(cert), "--tls_key", str(key)]
    if client_ca is not None:
        args += ["--tls_client_ca", str(client_ca)]
    server = serve(config, *args, ready=False)
    assert server.proc.wait(30) == 1
    named = {"missing cert": cert, "garbage key": key, "key of another cert": key, "missing client CA": client_ca,
             "key OpenSSL refuses": key}  # fmt: skip
    assert str(named[problem]) in server.log and "Cannot start with TLS" in server.log, server.log
    assert "Traceback" not in server.log


def _weak_pair(folder: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))  # fmt: skip
    cert_path, key_path = folder / "weak.pem", folder / "weak.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


def test_rotation_seen_first_by_a_rest_handshake_reaches_grpc_too(tmp_path: Path, config: Path, serve) -> None:  # type: ignore[no-untyped-def]
    old_ca, new_ca = CA(tmp_path / "old", "old CA"), CA(tmp_path / "new", "new CA")
    live = old_ca.issue("server")
    port = free_port()
    server = serve(config, "--tls_cert", str(live.cert), "--tls_key", str(live.key), "--rest_port", str(port))
    url = f"https://127.0.0.1:{port}"
    np.testing.assert_allclose(triton_infer(server.address, old_ca.cert), X + 1)
    _replace(live, new_ca.issue("rotated"))
    deadline = time.monotonic() + 20
    while True:  # REST's handshake is the first to see the new files (a Kubernetes https probe, say)
        try:
            np.testing.assert_allclose(rest_infer(url, new_ca.cert), X + 1)
            break
        except (urllib.error.URLError, ssl.SSLError):
            assert time.monotonic() < deadline, server.log[-2000:]
            time.sleep(0.1)
    np.testing.assert_allclose(triton_infer(server.address, new_ca.cert), X + 1)  # the next gRPC handshake too
