"""A real Redis Cluster on loopback for the memory tests: N masters (and a replica each, if asked) as redis-server
subprocesses in a temporary directory, joined by `redis-cli --cluster create`.

Each node gets two free ports, its client port and its cluster bus port (`--cluster-port`; the default, port +
10000, may be taken or past 65535). Nothing here touches a Redis the tests did not start.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.cluster import RedisCluster

from tests.conftest import RedisServer, free_port


class TlsFiles(NamedTuple):
    ca: Path
    cert: Path  # for 127.0.0.1, as server and as client: the nodes authenticate each other on the cluster bus
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and the one certificate every node uses, as a server and as a client of the others on the cluster
    bus, with the extensions a strict verifier wants."""
    ca_key, node_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    now = datetime.datetime.now(datetime.UTC)

    def cert(name: str, key: ec.EllipticCurvePrivateKey, *extensions: tuple[x509.ExtensionType, bool]) -> bytes:
        builder = x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        builder = builder.issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        builder = builder.public_key(key.public_key()).serial_number(x509.random_serial_number())
        builder = builder.not_valid_before(now - datetime.timedelta(minutes=5))
        builder = builder.not_valid_after(now + datetime.timedelta(days=1))
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
        builder = builder.add_extension(aki, critical=False)
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    files = TlsFiles(directory / "ca.pem", directory / "node.pem", directory / "node-key.pem")
    signing = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # certs and CRLs
    files.ca.write_bytes(
        cert("test CA", ca_key, (x509.BasicConstraints(ca=True, path_length=None), True), (signing, True))
    )
    address = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    both = x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH, x509.OID_CLIENT_AUTH])
    files.cert.write_bytes(cert("node", node_key, (address, False), (both, False)))
    files.key.write_bytes(
        node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


class ClusterNode(RedisServer):
    """One node of the cluster: a RedisServer that starts with cluster mode on and its own bus port; its
    nodes.conf (and append-only file, if any) let it start again with its place in the cluster (and its data)."""

    def __init__(self, directory: Path, appendonly: bool = True, tls: TlsFiles | None = None) -> None:
        super().__init__(directory, appendonly)
        self.bus_port = free_port()
        self.tls = tls  # clients, the cluster bus and replication over TLS

    def start(self) -> None:
        log = self.directory / "redis.log"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)]
        if self.tls:
            args[:2] = ["--port", "0", "--tls-port", str(self.port), "--tls-cluster", "yes", "--tls-replication", "yes"]
            args += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            args += ["--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--logfile", str(log)]
        args += [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-port",
            str(self.bus_port),
        ]
        args += ["--cluster-node-timeout", "1000"]  # failures noticed in about a second
        self.proc = subprocess.Popen(["redis-server", *args])
        client = self.client()
        try:
            deadline = time.monotonic() + 10
            while not self._ping(client):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.02)
        finally:
            client.close()

    def client(self) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)} if self.tls else {}
        return redis.Redis("127.0.0.1", self.port, socket_connect_timeout=0.5, socket_timeout=2, **tls)

    def info(self, section: str) -> dict:
        with self.client() as client:
            return client.info(section)

    def cluster_info(self) -> dict[str, str]:
        with self.client() as client:
            return client.execute_command("CLUSTER INFO")  # parsed by redis-py


class RedisClusterServer:
    """`masters` masters with `replicas` replicas each, all on 127.0.0.1."""

    def __init__(
        self, directory: Path, masters: int = 3, replicas: int = 0, appendonly: bool = True, tls: TlsFiles | None = None
    ) -> None:
        self.nodes = [ClusterNode(directory / f"node{i}", appendonly, tls) for i in range(masters * (1 + replicas))]
        self.replicas = replicas
        self.tls = tls

    @property
    def url(self) -> str:
        """A URL naming the first node: the client learns the others from it."""
        if self.tls:
            return f"rediss://127.0.0.1:{self.nodes[0].port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            for attempt in range(3):
                try:
                    node.start()
                    break
                except RuntimeError as e:
                    if "Address already in use" not in str(e) or attempt == 2:
                        raise
                    # a port picked free in __init__ was taken before the node bound it (another test's server, or
                    # an outgoing connection's ephemeral port): before the cluster is made, fresh ones do as well
                    node.port, node.bus_port = free_port(), free_port()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        tls = ["--tls", "--cacert", str(self.tls.ca)] if self.tls else []
        subprocess.run(
            ["redis-cli", *tls, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas)]
            + ["--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every running node says cluster_state:ok and every replica has synced with its master."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = [n.cluster_info().get("cluster_state") for n in self.running()]
            synced = all(n.info("replication").get("master_link_status", "up") == "up" for n in self.running())
            if all(s == "ok" for s in states) and synced:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster not ok after {timeout_s} s: {states}, replicas synced: {synced}")
            time.sleep(0.05)

    def running(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.proc is not None]

    def masters(self) -> list[ClusterNode]:
        return [n for n in self.running() if n.info("replication")["role"] == "master"]

    def node_of(self, key: str) -> ClusterNode:
        """The master serving `key`'s slot now, as redis-py's cluster client sees it."""
        with RedisCluster.from_url(self.url) as client:
            port = client.get_node_from_key(key).port
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def cluster(
    directory: Path, masters: int = 3, replicas: int = 0, tls: TlsFiles | None = None
) -> Iterator[RedisClusterServer]:
    """A started cluster, stopped on exit; skips the test where redis-server or redis-cli is missing."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not on PATH: the cluster backend needs a real cluster")
    server = RedisClusterServer(directory, masters, replicas, tls=tls)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """One 3-master cluster for the session; tests keep apart by key prefix."""
    with cluster(tmp_path_factory.mktemp("redis-cluster")) as server:
        yield server
