"""TLS and mutual TLS for both ports, with certificates re-read when their files change.

The files are checked (stat) at every new connection's handshake: gRPC asks its fetcher, the REST server's
SSLContext asks its SNI callback. A changed set of files is loaded and verified before it is used; a half-written
rotation keeps the previous certificate and is retried at the next handshake. Connections already open keep
the certificate they were made with.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("hotserve.tls")


class TlsError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file and the flag."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate signed by this CA

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


@dataclass(frozen=True)
class Material:
    """The PEM bytes of one consistent set of files."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None


def load(files: TlsFiles) -> Material:
    """Read and check the files: PEM certificates, an unencrypted PEM key that matches the certificate."""
    cert, key = _read(files.cert, "--tls_cert"), _read(files.key, "--tls_key")
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError:
        raise TlsError(f"--tls_cert {files.cert}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise TlsError(f"--tls_key {files.key}: not an unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise TlsError(f"--tls_key {files.key}: does not match the certificate in --tls_cert {files.cert}")
    ca = None
    if files.client_ca is not None:
        ca = _read(files.client_ca, "--tls_client_ca")
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise TlsError(f"--tls_client_ca {files.client_ca}: not a PEM certificate") from None
    return Material(cert, key, ca)


def _stamp(files: TlsFiles) -> tuple[tuple[int, int, int, int], ...]:
    """What changes when a file is rewritten or replaced (cert-manager swaps a symlink)."""
    stamps = []
    for path in files.paths():
        try:
            st = path.stat()
        except OSError:
            stamps.append((0, 0, 0, 0))
            continue
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamps)


class Certificates:
    """The current Material of a TlsFiles, reloaded when the files change; serves both gRPC and REST."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._stamp = _stamp(files)
        self.material = load(files)  # TlsError at start-up: the server does not start
        self.generation = 0
        self._grpc_generation = 0  # the material gRPC's credentials were last handed
        self._failed_stamp: tuple[tuple[int, int, int, int], ...] | None = None
        try:
            self._context = self._ssl_context(self.material)
        except ssl.SSLError as exc:  # e.g. a key OpenSSL refuses as too small: a start-up error naming the files
            raise TlsError(f"--tls_cert {files.cert} / --tls_key {files.key}: {exc.reason or exc}") from None

    def refresh(self) -> bool:
        """Reload if the files changed; True when new material is in use. Cheap when nothing changed (stat only)."""
        stamp = _stamp(self.files)
        with self._lock:
            if stamp == self._stamp or stamp == self._failed_stamp:
                return False
            try:
                material = load(self.files)
                context = self._ssl_context(material)
            except (TlsError, ssl.SSLError) as exc:
                self._failed_stamp = stamp  # said once per state of the files; the old certificate stays
                log.warning("TLS files changed but cannot be used (keeping the previous certificate): %s", exc)
                return False
            self._stamp, self._failed_stamp = stamp, None
            self.material, self._context = material, context
            self.generation += 1
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return True

    # ---- gRPC ----
    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(self.material),
            self._fetch,
            require_client_authentication=self.files.client_ca is not None,
        )

    @staticmethod
    def _grpc_config(material: Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.client_ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before every new connection's handshake."""
        try:
            self.refresh()
        except Exception:  # never let a reload bug break the handshake thread
            log.exception("TLS reload failed")
            return None
        with self._lock:  # a REST handshake may have done the reload: gRPC still needs the new material
            if self._grpc_generation == self.generation:
                return None
            self._grpc_generation = self.generation
            material = self.material
        return self._grpc_config(material)

    # ---- REST ----
    def ssl_context(self) -> ssl.SSLContext:
        """The context for the REST server: its SNI callback swaps in the current context at every handshake."""
        base = self._ssl_context(self.material)
        base.sni_callback = self._on_hello
        return base

    def _on_hello(self, sock: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        try:
            self.refresh()
        except Exception:
            log.exception("TLS reload failed")
        sock.context = self._context

    def _ssl_context(self, material: Material) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        context.load_cert_chain(self.files.cert, self.files.key)  # SSLError when a rotation is half-written
        if material.client_ca is not None:
            context.load_verify_locations(cadata=material.client_ca.decode("ascii", "replace"))
            context.verify_mode = ssl.CERT_REQUIRED
        return context
