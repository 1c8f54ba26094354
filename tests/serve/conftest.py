"""Real servers for the platform's tests: a Memory gRPC service behind `create_server` (auth, health, optional TLS),
and certificates made by the tests themselves: a CA, and a server certificate it signs for 127.0.0.1 and localhost.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from memory import EmbeddedStore
from memory.server import SERVICE_NAME, MemoryServicer, delete_unless_active
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.rpc import create_server, set_serving
from vcflash.serve.settings import MemorySettings


@dataclass(frozen=True)
class Served:
    address: str
    token: str


@pytest_asyncio.fixture
async def serve_memory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """`await serve_memory(credentials=None)`: a Memory service on a free loopback port, SERVING, with a token."""
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    servers: list[grpc.aio.Server] = []

    async def start(credentials: grpc.ServerCredentials | None = None) -> Served:
        token = "serve-tests-token-0123456789"
        servicer = MemoryServicer(store, MemorySettings(), functools.partial(delete_unless_active, store, None))
        entry = (pb_grpc.add_MemoryServicer_to_server, servicer, SERVICE_NAME)
        server, port, health = create_server("127.0.0.1:0", [entry], token, 1 << 20, credentials)
        await server.start()
        await set_serving(health, [SERVICE_NAME], True)
        servers.append(server)
        return Served(f"127.0.0.1:{port}", token)

    yield start
    for server in servers:
        await server.stop(0)
    store.close()


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server's certificate, signed by the CA
    key: Path  # the server's private key
    other_ca: Path  # a CA that signed nothing here


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL signing
        builder = builder.add_extension(usage, critical=True)
    else:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_tls_files(directory: Path) -> TlsFiles:
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem", directory / "other-ca.pem")
    files.ca.write_bytes(_pem(_certificate("vcflash test CA", ca_key, "vcflash test CA", ca_key, ca=True)))
    files.other_ca.write_bytes(_pem(_certificate("another CA", other_key, "another CA", other_key, ca=True)))
    files.cert.write_bytes(_pem(_certificate("localhost", server_key, "vcflash test CA", ca_key, ca=False)))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))
