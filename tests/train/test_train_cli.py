"""`vcflash make-dataset`, `train`, `eval qa` and `ask --adapter` as a user runs them; the training extra stays out of
the inference path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import conversation, write_lines

ROOT = Path(__file__).resolve().parents[2]


def vcflash(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "vcflash.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "shapes"
    run = vcflash(
        "make-dataset", "shapes", str(out), "--videos", "3", "--test-videos", "2", "--seconds", "8", "--fps", "1"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(out / "train.jsonl"), str(out / "test.jsonl")]
    return out


def test_train_then_eval_then_ask_with_the_adapter(shapes: Path, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    run = vcflash(
        "train", str(shapes / "train.jsonl"), "--model", str(tiny_base), "--out", str(out),
        "--eval", str(shapes / "test.jsonl"), "--lora-rank", "4", "--train", "projector,llm",
        "--max-steps", "2", "--eval-every", "1", "--eval-samples", "3", "--videos-per-step", "2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["steps"] == 2 and summary["samples"] > 0 and summary["last_eval"]["step"] == 2
    assert {"eval_loss", "eval_accuracy"} <= summary["last_eval"].keys()
    assert "use it with --model" in run.stderr and (out / "adapter_config.json").is_file()

    table = vcflash(
        "eval", "qa", str(shapes / "test.jsonl"), "--model", str(tiny_base), "--adapter", str(out), "--json"
    )
    assert table.returncode == 0, table.stderr
    record = json.loads(table.stdout)
    rows = {r["category"]: r for r in record["categories"]}
    assert {"colour", "shape", "count", "direction", "presence", "total"} <= rows.keys()
    assert rows["presence"]["chance"] == 0.5 and rows["colour"]["chance"] == 0.25 and rows["count"]["chance"] == 1 / 3
    assert rows["total"]["questions"] == len(record["answers"]) == len((shapes / "test.jsonl").read_text().splitlines())
    text = vcflash("eval", "qa", str(shapes / "test.jsonl"), "--model", str(tiny_base))
    assert text.returncode == 0 and text.stdout.splitlines()[0].split() == [
        "category",
        "questions",
        "right",
        "accuracy",
        "chance",
    ]

    video = json.loads((shapes / "test.jsonl").read_text().splitlines()[0])["video"]
    ask = vcflash(
        "ask",
        str(shapes / video),
        "What colour is the circle?",
        "--model",
        str(tiny_base),
        "--adapter",
        str(out),
        "--json",
        "--max-new-tokens",
        "2",
    )
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout)["new_tokens"] <= 2


@pytest.mark.slow  # compiling takes a minute or two the first time on a machine
def test_train_compiled_with_lora(shapes: Path, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "compiled"
    run = vcflash(
        "train", str(shapes / "train.jsonl"), "--model", str(tiny_base), "--out", str(out), "--compile",
        "--lora-rank", "4", "--merge-lora", "--max-steps", "2", "--eval-every", "2", "--videos-per-step", "2",
        timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "unavailable" not in run.stderr and json.loads(run.stdout)["steps"] == 2
    assert json.loads((out / "training.json").read_text())["config"]["compile"] is True


def test_a_malformed_line_is_one_error_line(tiny_base: Path, tmp_path: Path) -> None:
    data = write_lines(tmp_path / "d.jsonl", [{"video": "a.mp4", "conversations": conversation("Q", "A")}, "{oops"])
    run = vcflash("train", str(data), "--model", str(tiny_base), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"vcflash: error: {data}:2: not a JSON object")
    bad = vcflash("ask", "x.mp4", "Q", "--model", str(tiny_base), "--adapter", str(tmp_path))
    assert bad.returncode == 2 and "not a LoRA adapter directory" in bad.stderr


def test_make_dataset_hard_mines_with_the_model_given(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "hard"
    args = ("make-dataset", "hard", str(out), "--videos", "1", "--test-videos", "1", "--pool-clips", "12")
    missing = vcflash(*args)
    assert missing.returncode == 2 and "make-dataset hard needs --model" in missing.stderr and not out.exists()
    stray = vcflash("make-dataset", "brief", str(out), "--model", str(tiny_base))
    assert stray.returncode == 2 and "--model is for make-dataset hard" in stray.stderr and not out.exists()
    share = vcflash(*args, "--model", str(tiny_base), "--top-share", "0")
    assert share.returncode == 2 and "--top-share in (0, 1]" in share.stderr and not out.exists()
    run = vcflash(*args, "--model", str(tiny_base), "--hard-share", "0.9", "--top-share", "0.02")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(out / "train.jsonl"), str(out / "test.jsonl")]
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert lines and all(line["moments"] and (out / line["video"]).is_file() for line in lines)


def test_inference_does_not_import_the_training_extra() -> None:
    code = "import sys, hico.chat, hico.checkpoint, vcflash.cli, vcflash.evaluate; print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
