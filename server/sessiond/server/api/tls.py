"""TLS and mTLS on the listening port, with certificates reloaded without a restart.

gRPC's dynamic SSL server credentials call a fetcher before every new TLS handshake;
it returns a new certificate configuration or None (keep the current one). The
fetcher here only hands over a configuration prepared earlier, so the handshake path
never reads files: `check()` (every `reload_seconds`, and on SIGHUP) looks at the
files' stat signature, loads changed files, verifies that the key matches the
certificate, and queues the new configuration. Open connections keep the
certificate they were established with; new connections get the new one.

A half-written or mismatched pair is refused with a warning and the previous
certificate stays in use until the files change again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sessiond.server.config import TlsSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Material:
    cert: bytes
    key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)],
                                                         root_certificates=self.client_ca)


def _signature(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def load_material(s: TlsSettings) -> Material:
    """Read and check the files; ValueError says what is wrong (never file contents)."""
    cert_pem, key_pem = Path(s.cert).read_bytes(), Path(s.key).read_bytes()
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise ValueError(f"{s.cert}: no PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{s.key}: not an unencrypted PEM private key ({exc})") from None
    if chain[0].public_key() != key.public_key():
        raise ValueError(f"{s.key} does not match the certificate in {s.cert}")
    ca_pem = None
    if s.client_ca:
        ca_pem = Path(s.client_ca).read_bytes()
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise ValueError(f"{s.client_ca}: no PEM certificate ({exc})") from None
    return Material(cert_pem, key_pem, ca_pem)


class CertReloader:
    """Server credentials for `settings` whose certificate follows the files."""

    def __init__(self, settings: TlsSettings) -> None:
        settings.validate()
        self.settings = settings
        self._paths = [p for p in (settings.cert, settings.key, settings.client_ca) if p]
        self._seen = self._signatures()
        self.material = load_material(settings)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()
        self.reloads = 0

    def _signatures(self) -> list[tuple[int, int, int] | None]:
        out: list[tuple[int, int, int] | None] = []
        for p in self._paths:
            try:
                out.append(_signature(p))
            except OSError:
                out.append(None)
        return out

    def credentials(self) -> grpc.ServerCredentials:
        # The fetcher may return None ("no change"), which the stubs do not admit.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)
        return grpc.dynamic_ssl_server_credentials(
            self.material.configuration(), fetch,
            require_client_authentication=bool(self.settings.client_ca))

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core threads before each handshake: no I/O here.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def check(self, force: bool = False) -> bool:
        """Load the files if they changed (or `force`); True when a new certificate
        was queued for the next handshakes."""
        seen = self._signatures()
        if not force and seen == self._seen:
            return False
        self._seen = seen
        try:
            material = load_material(self.settings)
        except (OSError, ValueError) as exc:
            log.warning("TLS files not reloaded, the previous certificate stays: %s", exc)
            return False
        if material == self.material:
            return False
        with self._lock:
            self.material = material
            self._pending = material.configuration()
        self.reloads += 1
        log.info("TLS certificate reloaded from %s (new connections use it)",
                 self.settings.cert)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_seconds)
            await asyncio.to_thread(self.check)
