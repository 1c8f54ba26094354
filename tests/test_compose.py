"""compose.yaml: valid against the compose spec, and the deployment the README promises."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent


def test_compose_file_validates_against_the_compose_spec() -> None:
    tool = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.fail("check-jsonschema is not installed (pip install -e '.[test]')")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_gpus_healthchecks_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "encoder", "reasoner", "ingest"}
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    for name in ("encoder", "reasoner"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert services[name]["environment"]["VCFLASH_DEVICE"] == "cuda"
    for name, service in services.items():
        assert "healthcheck" in service, name
        if name != "redis":
            assert service["healthcheck"]["test"][1:3] == ["vcflash", "health"]
            assert all(k.startswith("VCFLASH_") for k in service["environment"]), name  # settings only via env
            assert service["environment"]["VCFLASH_REDIS_URL"] == "redis://redis:6379/0"
    assert services["ingest"]["environment"]["VCFLASH_ENCODER_ADDRESS"] == "encoder:50052"
    assert services["ingest"]["environment"]["VCFLASH_REASONER_ADDRESS"] == "reasoner:50053"  # the console's chat
    for dockerfile in ("docker/Dockerfile.gpu", "docker/Dockerfile.ingest"):
        assert (ROOT / dockerfile).is_file()


def test_compose_sets_only_known_settings_and_ingest_carries_no_torch() -> None:
    from vcflash.serve.settings import variables

    known = {name for name, _ in variables()}
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("VCFLASH_")} - known
        assert not unknown, (name, unknown)
    ingest = (ROOT / "docker/Dockerfile.ingest").read_text()
    assert "torch" not in ingest.replace("no torch", "") and "[model]" not in ingest
