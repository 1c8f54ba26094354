"""deploy/k8s: every overlay renders with `kubectl kustomize`, every manifest validates against the Kubernetes schemas
(`kubernetes-validate`, offline), and the manifests agree with the code: the ports the CLI listens on, the settings
it reads, the health service it serves, and the Secret keys the README tells operators to create.

Each overlay is rendered twice: as shipped, and with its Redis choice flipped (the in-cluster Redis added to or
removed from its `bases`, as the README says to do), so both memory choices are checked on both placements."""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("single-gpu-node", "gpu-pools")
IN_CLUSTER_REDIS = "  - ../../redis-in-cluster"
# .ci/run installs Debian's kubernetes-client where no kubectl is present (kubectl 1.20, kustomize v2.0.3: the
# oldest the files must render with); $KUBECTL picks another binary.
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")
SCHEMA_VERSIONS = ("1.27.0", None)  # native gRPC probes are GA from 1.27; None: the newest schemas bundled
SECRET = "vcflash-secrets"
OTHER_SECRETS = re.compile(r"PASSWORD|AUTH")  # variables of other images (Redis) that hold secrets


def secret_settings() -> set[str]:
    """The settings the code keeps out of reprs (`field(repr=False)`): the token, the Fernet key, the Redis URL."""
    from dataclasses import fields
    from typing import get_type_hints

    from vcflash.serve.settings import PREFIX, Settings

    sections = get_type_hints(Settings).values()
    return {PREFIX + f.name.upper() for section in sections for f in fields(section) if not f.repr}


def is_secret(name: str) -> bool:
    return name in secret_settings() or bool(OTHER_SECRETS.search(name))


def variant_names() -> list[str]:
    return [f"{o}{flip}" for o in OVERLAYS for flip in ("", "+flipped-redis")]


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Overlay (and its Redis-flipped twin) -> the rendered manifests."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client; .ci/run installs it)")
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    out = {}
    for overlay in OVERLAYS:
        out[overlay] = render(K8S / "overlays" / overlay)
        kustomization = copy / "overlays" / overlay / "kustomization.yaml"
        lines = kustomization.read_text().splitlines()
        flipped = [line for line in lines if not line.startswith(IN_CLUSTER_REDIS)]
        if flipped == lines:  # no in-cluster Redis yet: add it after the base
            at = lines.index("  - ../../base") + 1
            flipped = [*lines[:at], IN_CLUSTER_REDIS, *lines[at:]]
        kustomization.write_text("\n".join(flipped) + "\n")
        out[f"{overlay}+flipped-redis"] = render(kustomization.parent)
    return out


def render(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    result = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert docs, f"kubectl kustomize {path} rendered nothing"
    return docs


def has_in_cluster_redis(docs: list[dict[str, Any]]) -> bool:
    return any(d["kind"] == "StatefulSet" and d["metadata"]["name"] == "vcflash-redis" for d in docs)


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def is_vcflash(container: dict[str, Any]) -> bool:
    return container["image"].split("/")[-1].startswith(("vcflash-gpu", "vcflash-ingest"))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions, or a Service's plain map) against a pod's labels."""
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    wanted = {**plain, **selector.get("matchLabels", {})}
    if any(labels.get(k) != v for k, v in wanted.items()):
        return False
    for e in selector.get("matchExpressions", []):
        value, op = labels.get(e["key"]), e["operator"]
        if (op == "In" and value not in e["values"]) or (op == "NotIn" and value in e["values"]):
            return False
        if (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


def selected(docs: list[dict[str, Any]], selector: dict[str, Any]) -> list[dict[str, Any]]:
    assert selector, "an empty selector selects everything"
    return [w for w in workloads(docs) if selects(selector, w["spec"]["template"]["metadata"].get("labels", {}))]


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "16Gi", "12gb" is not one) as a number."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env; a Secret's key gives a
    stand-in value that passes the settings' checks (a token of 32 characters)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: envFrom other than a ConfigMap: {source}"
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = {"redis-url": "redis://:pw@vcflash-redis:6379/0"}.get(ref["key"], "x" * 32)
    return env


def cli_settings(container: dict[str, Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str]:
    """(Settings, command) exactly as `vcflash <args>` in this container would build them."""
    from vcflash.cli import build_parser, service_settings

    args: argparse.Namespace = build_parser().parse_args([str(a) for a in container["args"]])
    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.startswith("VCFLASH_")]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return service_settings(args), args.command


@pytest.mark.parametrize("variant", variant_names())
def test_every_manifest_validates_against_the_kubernetes_schemas(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    errors = []
    for doc in renders[variant]:
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version or latest_version(), strict=True)
            except Exception as e:  # ValidationError, or no schema for the kind
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version or 'latest'}): {e}")
    assert not errors, "\n\n".join(errors)


def test_the_schema_check_would_catch_a_mistake(renders: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    encoder = find(renders["gpu-pools"], "Deployment", "vcflash-encoder")
    kubernetes_validate.validate(encoder, "1.27.0", strict=True)
    broken = yaml.safe_load(yaml.safe_dump(encoder).replace("grpc:", "grcp:"))  # a misspelt probe
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.27.0", strict=True)


@pytest.mark.parametrize("variant", variant_names())
def test_every_container_has_probes_limits_and_a_locked_down_security_context(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = renders[variant]
    assert {w["metadata"]["name"] for w in workloads(docs)} >= {"vcflash-encoder", "vcflash-reasoner", "vcflash-ingest"}
    for w in workloads(docs):
        spec, where = pod_spec(w), f"{w['kind']}/{w['metadata']['name']}"
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec.get("enableServiceLinks") is False, where  # else Services inject VCFLASH_<NAME>_PORT=tcp://...
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True and pod_security.get("runAsUser", 0) > 0, where
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert not claims & set(volumes), where
        for v in volumes.values():
            sources = set(v) - {"name"}
            assert len(sources) == 1, f"{where}: volume {v['name']} has {sorted(sources)}"  # a patch left two
            if "emptyDir" in v:
                assert v["emptyDir"].get("sizeLimit"), f"{where}: emptyDir {v['name']} has no sizeLimit"
        for c in containers(w):
            at = f"{where} container {c['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{at}: no {probe}"
            resources = c.get("resources", {})
            for kind in ("cpu", "memory"):
                request, limit = resources.get("requests", {}).get(kind), resources.get("limits", {}).get(kind)
                assert request and limit, f"{at}: {kind} request and limit"
                assert quantity(request) <= quantity(limit), f"{at}: {kind} request above its limit"
            security = c.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, at
            assert security.get("readOnlyRootFilesystem") is True, at
            assert security.get("capabilities", {}).get("drop") == ["ALL"], at
            assert not security.get("capabilities", {}).get("add") and not security.get("privileged"), at
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, f"{at}: mounts unknown {mount['name']}"
            gpu = c["image"].split("/")[-1].startswith("vcflash-gpu")
            gpus = (resources.get("requests", {}).get("nvidia.com/gpu"), resources["limits"].get("nvidia.com/gpu"))
            assert gpus == (("1", "1") if gpu else (None, None)), f"{at}: nvidia.com/gpu {gpus}"


def test_the_services_implement_grpc_health_which_the_probes_call() -> None:
    """Native gRPC probes call grpc.health.v1.Health/Check with no token: every service registers it, and the
    bearer-token check lets it through."""
    from vcflash.serve import rpc

    assert "add_HealthServicer_to_server" in inspect.getsource(rpc.create_server)
    assert any(m.startswith("/grpc.health.v1.Health/") for m in rpc.OPEN_METHODS)


@pytest.mark.parametrize("variant", variant_names())
def test_ports_match_what_the_cli_listens_on(
    renders: dict[str, list[dict[str, Any]]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vcflash.cli import SERVICE_PORTS

    docs = renders[variant]
    seen = set()
    for w in workloads(docs):
        for c in [c for c in containers(w) if is_vcflash(c)]:
            at = f"{w['metadata']['name']} container {c['name']}"
            settings, command = cli_settings(c, container_env(docs, c), monkeypatch)  # also checks every value
            seen.add(command)
            server = settings.server
            grpc_port = int(server.address.rpartition(":")[2])
            assert server.host == "0.0.0.0", f"{at}: listens on {server.host}, which probes and peers cannot reach"
            assert (grpc_port, server.metrics_port) == SERVICE_PORTS[command], at  # the documented defaults
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["grpc"] == grpc_port and ports["metrics"] == server.metrics_port, at
            if command == "ingest":
                assert ports["http"] == server.http_port, at
            assert set(ports) <= {"grpc", "metrics", "http"}, at
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe].get("grpc", {}).get("port") == grpc_port, f"{at}: {probe} is not gRPC on {grpc_port}"
            annotations = w["spec"]["template"]["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/scrape") == "true", at
            assert annotations.get("prometheus.io/port") == str(server.metrics_port), at
            assert annotations.get("prometheus.io/path") == "/metrics", at
            data = [m for m in c.get("volumeMounts", []) if m["mountPath"] == str(server.data_dir)]
            assert data, f"{at}: VCFLASH_DATA_DIR {server.data_dir} is not a mounted volume (root fs is read-only)"
            if command == "ingest":  # the encoder (and the reasoner its web console asks) it dials: their Services
                link = settings.link
                for target, peer in ((link.encoder_address, "encoder"), (link.reasoner_address, "reasoner")):
                    match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
                    assert match, f"{at}: VCFLASH_{peer.upper()}_ADDRESS {target} is not dns:///<service>:<port>"
                    service = find(docs, "Service", match[1])
                    assert service["spec"].get("clusterIP") == "None", "client-side balancing needs a headless Service"
                    assert int(match[2]) in [p["port"] for p in service["spec"]["ports"]]
                    pods = selected(docs, service["spec"]["selector"])
                    behind = [x["args"][0] for pod in pods for x in containers(pod)]
                    assert behind == [peer], f"{target} reaches {behind}"
    assert seen == {"ingest", "encoder", "reasoner"}


@pytest.mark.parametrize("variant", variant_names())
def test_env_names_are_settings_the_code_reads(renders: dict[str, list[dict[str, Any]]], variant: str) -> None:
    from vcflash.serve.settings import variables

    known = {name for name, _ in variables()}
    docs = renders[variant]
    for w in workloads(docs):
        for c in containers(w):
            names = set(container_env(docs, c))
            if is_vcflash(c):
                unknown = names - known
                assert not unknown, f"{w['metadata']['name']}: not settings of vcflash/serve/settings.py: {unknown}"
            else:
                assert not {n for n in names if n.startswith("VCFLASH_")}, w["metadata"]["name"]


def readme_secret_keys() -> dict[str, set[str]]:
    """The Secret keys the README's Kubernetes section creates, per Redis choice (from its `kubectl create secret`
    commands: the first for the in-cluster Redis, the second for an external one)."""
    section = README.split("## Kubernetes", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"kubectl -n vcflash create secret generic " + SECRET + r"(?:[^\n]*\\\n)*[^\n]*", section)
    assert len(commands) == 2, f"the README should show two `create secret` commands, found {len(commands)}"
    keys = [set(re.findall(r"--from-literal=([a-z-]+)=", c)) for c in commands]
    return {"in-cluster": keys[0], "external": keys[1]}


README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("variant", variant_names())
def test_secrets_come_from_the_documented_secret_never_from_the_repo(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = renders[variant]
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret in the manifests: its data would be in git"
    used = set()
    for w in workloads(docs):
        for c in containers(w):
            for item in c.get("env", []):
                if is_secret(item["name"]):
                    ref = item.get("valueFrom", {}).get("secretKeyRef")
                    assert ref, f"{w['metadata']['name']}: {item['name']} must come from a Secret"
                    assert ref["name"] == SECRET and not ref.get("optional"), item
                    used.add(ref["key"])
            assert not [i for i in c.get("envFrom", []) if "secretRef" in i], "secrets by key only"
    for cm in [d for d in docs if d["kind"] == "ConfigMap"]:
        assert not [k for k in cm.get("data", {}) if is_secret(k)], cm["metadata"]["name"]
    documented = readme_secret_keys()["in-cluster" if has_in_cluster_redis(docs) else "external"]
    assert used == documented, f"the manifests read {sorted(used)}, the README creates {sorted(documented)}"


def test_no_file_in_deploy_holds_a_secret() -> None:
    for path in [p for p in K8S.rglob("*") if p.is_file()]:
        text = path.read_text()
        assert path.suffix == ".yaml", f"{path}: only kustomize YAML belongs here (env files would hold secrets)"
        assert not re.search(r"^kind:\s*Secret\b|stringData:|secretGenerator:", text, re.M), path
        assert not re.search(r"redis://:[^@$<\s]+@", text), f"{path}: a Redis password"


@pytest.mark.parametrize("variant", variant_names())
def test_services_budgets_and_policies_select_pods_that_exist(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = renders[variant]
    for s in [d for d in docs if d["kind"] == "Service"]:
        name = s["metadata"]["name"]
        pods = selected(docs, s["spec"].get("selector", {}))
        assert pods, f"Service {name} selects no pod"
        assert s["spec"].get("clusterIP") == "None", f"Service {name}: headless, so dns:/// sees every pod"
        for port in s["spec"]["ports"]:
            for w in pods:
                container_ports = [p for c in containers(w) for p in c.get("ports", [])]
                target = port.get("targetPort", port["port"])
                key = "name" if isinstance(target, str) else "containerPort"
                assert [p for p in container_ports if p.get(key) == target], f"Service {name}: no port {target}"
    for sts in [w for w in workloads(docs) if w["kind"] == "StatefulSet"]:
        governing = find(docs, "Service", sts["spec"]["serviceName"])
        assert sts in selected(docs, governing["spec"]["selector"]), sts["metadata"]["name"]
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for b in budgets:
        assert len(selected(docs, b["spec"]["selector"])) == 1, f"PDB {b['metadata']['name']}"
    covered = {selected(docs, b["spec"]["selector"])[0]["metadata"]["name"] for b in budgets}
    assert covered == {"vcflash-encoder", "vcflash-reasoner", "vcflash-ingest"}
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    for name, p in policies.items():
        pods = selected(docs, p["spec"]["podSelector"])
        assert pods, f"NetworkPolicy {name} selects no pod"
        open_ports = {int(c["containerPort"]) for w in pods for x in containers(w) for c in x.get("ports", [])}
        for rule in p["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert selected(docs, peer["podSelector"]), f"NetworkPolicy {name}: a peer that is no pod"
            for port in rule.get("ports", []):
                if port.get("protocol", "TCP") == "TCP":
                    assert port["port"] in open_ports, f"NetworkPolicy {name}: port {port['port']} is not served"
    # Only ingest reaches the encoder's gRPC; every vcflash service reaches Redis.
    rules = policies["vcflash-encoder"]["spec"]["ingress"]
    to_grpc = [r for r in rules if {"port": 50052, "protocol": "TCP"} in r["ports"]]
    assert len(to_grpc) == 1 and len(to_grpc[0].get("from", [])) == 1, "the encoder's gRPC is open to others"
    assert [w["metadata"]["name"] for w in selected(docs, to_grpc[0]["from"][0]["podSelector"])] == ["vcflash-ingest"]
    # ingest reaches the reasoner's gRPC (the web console's chat) by a rule of its own, not only as a client
    rules = policies["vcflash-reasoner"]["spec"]["ingress"]
    from_ingest = [
        r
        for r in rules
        if {"port": 50053, "protocol": "TCP"} in r["ports"]
        and [w["metadata"]["name"] for p in r.get("from", []) for w in selected(docs, p["podSelector"])]
        == ["vcflash-ingest"]
    ]
    assert len(from_ingest) == 1, "ingest cannot reach the reasoner's gRPC"
    if has_in_cluster_redis(docs):
        peers = selected(docs, policies["vcflash-redis"]["spec"]["ingress"][0]["from"][0]["podSelector"])
        assert {w["metadata"]["name"] for w in peers} == {"vcflash-encoder", "vcflash-reasoner", "vcflash-ingest"}


@pytest.mark.parametrize("variant", variant_names())
def test_each_ingest_pod_is_the_shard_of_its_ordinal(
    renders: dict[str, list[dict[str, Any]]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shard comes from the pod name's ordinal and the shard count is the replicas: pod i of N owns the streams
    hashing to i, and a pod past N (replicas raised alone) refuses to start."""
    from ingest.shards import resolve_shard

    docs = renders[variant]
    ingest = find(docs, "StatefulSet", "vcflash-ingest")
    replicas, name = ingest["spec"]["replicas"], ingest["metadata"]["name"]
    assert replicas == 1  # the default; README "Sharded ingest" says how to scale
    (container,) = [c for c in containers(ingest) if is_vcflash(c)]
    settings, _ = cli_settings(container, container_env(docs, container), monkeypatch)
    assert (settings.ingest.ingest_shard, settings.ingest.ingest_shards) == ("auto", replicas)
    for ordinal in range(replicas):
        shard = resolve_shard(settings.ingest.ingest_shard, settings.ingest.ingest_shards, f"{name}-{ordinal}")
        assert (shard.index, shard.count) == (ordinal, replicas)
    with pytest.raises(ValueError, match="VCFLASH_INGEST_SHARDS"):
        resolve_shard(settings.ingest.ingest_shard, settings.ingest.ingest_shards, f"{name}-{replicas}")


@pytest.mark.parametrize("variant", variant_names())
def test_redis_in_cluster_keeps_an_append_only_file_or_the_url_points_outside(
    renders: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = renders[variant]
    shipped_in_cluster = variant in ("single-gpu-node", "gpu-pools+flipped-redis")
    assert has_in_cluster_redis(docs) == shipped_in_cluster
    if not shipped_in_cluster:
        assert not [d for d in docs if "redis" in d["metadata"]["name"]]
        return
    redis = find(docs, "StatefulSet", "vcflash-redis")
    c = containers(redis)[0]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"  # expanded by the kubelet from the Secret
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = quantity(args[args.index("--maxmemory") + 1].replace("gb", "Gi"))
    assert maxmemory < quantity(c["resources"]["limits"]["memory"]), "Redis would be OOM-killed before it is full"
    assert [m for m in c["volumeMounts"] if m["mountPath"] == "/data"][0]["name"] == "data"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # The README's redis-url names this Service and its port.
    service = find(docs, "Service", "vcflash-redis")
    assert f"@{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0" in README


def test_placement_of_each_overlay(renders: dict[str, list[dict[str, Any]]]) -> None:
    pools = renders["gpu-pools"]
    for kind, name in (("Deployment", "encoder"), ("StatefulSet", "reasoner")):
        spec = pod_spec(find(pools, kind, f"vcflash-{name}"))
        assert spec["nodeSelector"] == {"vcflash.io/gpu-pool": name}
        tolerated = {(t["key"], t.get("value")) for t in spec["tolerations"]}
        assert {("vcflash.io/gpu-pool", name), ("nvidia.com/gpu", None)} <= tolerated
    assert "nodeSelector" not in pod_spec(find(pools, "StatefulSet", "vcflash-ingest"))  # off the GPU pools
    single = renders["single-gpu-node"]
    encoder, reasoner = find(single, "Deployment", "vcflash-encoder"), find(single, "StatefulSet", "vcflash-reasoner")
    term = pod_spec(reasoner)["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert selected(single, term["labelSelector"]) == [encoder]
    claims = [
        {v["name"]: v for v in pod_spec(w)["volumes"]}["models"]["persistentVolumeClaim"] for w in (encoder, reasoner)
    ]
    assert claims[0] == claims[1]
    find(single, "PersistentVolumeClaim", claims[0]["claimName"])


def test_readme_gives_the_commands() -> None:
    section = README.split("## Kubernetes", 1)[1].split("\n## ", 1)[0]
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in section
        assert (K8S / "overlays" / overlay / "kustomization.yaml").is_file()
    assert "kubectl create namespace vcflash" in section
    assert "estimate" in section and "BENCHMARKS.md" in section


@pytest.mark.parametrize("variant", variant_names())
def test_each_reasoner_pod_evaluates_the_alerts_of_its_ordinal(
    renders: dict[str, list[dict[str, Any]]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alerts are owned per stream by exactly one reasoner: pod i of the StatefulSet's N replicas is alert shard i of
    N (VCFLASH_REASONER_SHARDS = replicas in every overlay), and a pod past N refuses to start."""
    from ingest.shards import resolve_shard

    docs = renders[variant]
    reasoner = find(docs, "StatefulSet", "vcflash-reasoner")
    replicas, name = reasoner["spec"]["replicas"], reasoner["metadata"]["name"]
    (container,) = [c for c in containers(reasoner) if is_vcflash(c)]
    settings, _ = cli_settings(container, container_env(docs, container), monkeypatch)
    r = settings.reasoner
    assert (r.reasoner_shard, r.reasoner_shards) == ("auto", replicas)
    owners = {resolve_shard(r.reasoner_shard, replicas, f"{name}-{i}", role="reasoner").index for i in range(replicas)}
    assert owners == set(range(replicas))
    with pytest.raises(ValueError, match="VCFLASH_REASONER_SHARDS is"):
        resolve_shard(r.reasoner_shard, replicas, f"{name}-{replicas}", role="reasoner")
