"""`bench/gpu.sh`, the one script a lent GPU runs, at tiny sizes on the CPU (`SMOKE=1`): a GPU comes for minutes,
so a part that broke since its last run (as `bench_train.py lora` once did) must fail here, not there."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("lora", "scan", "model", "fast")


def records_of(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_every_part_of_the_gpu_run_runs_and_prints_its_numbers(tmp_path: Path) -> None:
    env = os.environ | {"SMOKE": "1", "OUT": str(tmp_path), "PY": sys.executable}
    run = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    for part in PARTS:
        log = (tmp_path / f"{part}.log").read_text()
        assert f"== {part}: exit 0" in log, log[-3000:]
        assert records_of(tmp_path / f"{part}.log"), log[-3000:]
    lora = [r for r in records_of(tmp_path / "lora.log") if r.get("what") == "lora"]
    assert [(r["frames"], r["questions"]) for r in lora] == [(8, 4)]
    assert lora[0]["step_s"] > 0 and lora[0]["trained_m"] > 0
    scan = [r for r in records_of(tmp_path / "scan.log") if "frames" in r]
    assert [r["clips"] for r in scan] == [128]
    assert 0 < scan[0]["search_ms_median"] and 0 < scan[0]["scan_s"]
    assert scan[0]["key_bytes_per_clip"] == 16_384  # the tiny model: 2 kv heads x 32 x 64 tokens, float32
    assert "| encoder, batch 2 clips |" in run.stdout and "| prefill 64 frames" in run.stdout
