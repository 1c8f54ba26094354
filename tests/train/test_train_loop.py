"""Training is real: the inference prompt, a loss that falls, only the asked-for weights change, LoRA merges to the
same logits, the saved layout is the official one, and an interrupted run resumes where it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hico.train
from hico import VideoChatFlash
from hico.checkpoint import dct_patch_basis, load_model, read_config
from hico.dataset import DataError, FrameCache, read_samples
from hico.lora import load_adapter
from hico.prompt import PromptVideo, build_prompt, time_message
from hico.train import (
    Batcher,
    Muon,
    TrainConfig,
    answer_loss,
    chunk_by_video,
    encode_conversation,
    make_optimizers,
    normalize_answer,
    orthogonalize,
    relevance_loss,
    shared_length,
    shared_prefix_forward,
    train,
)
from tests.train.conftest import conversation, write_lines

QUICK = {"max_steps": 4, "eval_every": 2, "videos_per_step": 2, "lr": 3e-3, "threads": 2}


def config(data: Path, model: Path, out: Path, **kw: object) -> TrainConfig:
    return TrainConfig(data=str(data), model=str(model), out=str(out), **(QUICK | kw))  # type: ignore[arg-type]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def data_loss(model: VideoChatFlash, data: Path) -> float:
    cfg = TrainConfig(data=str(data), model="-", out="-")
    batcher = Batcher(model, cfg, FrameCache(model.config.vision.image_size, 512))
    with torch.no_grad():
        batches = batcher.build(chunk_by_video(read_samples(data), 16), np.random.default_rng(0))
        return float(answer_loss(model, batches))


# -- the sequence ---------------------------------------------------------------------------------------------


def test_the_prompt_is_the_inference_prompt_and_only_answers_are_targets(tiny_base: Path) -> None:
    model = VideoChatFlash.from_pretrained(tiny_base)
    eos = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    video = PromptVideo(16, 16.0)
    turns = [("What colour is the square?", "red"), ("And where does it go?", "To the right.")]
    enc = encode_conversation(model.tokenize, eos, turns, video)
    before, _, after = build_prompt(turns[-1][0], [video], turns[:1])  # what `answer` embeds for the last turn
    assert enc.before == model.tokenize(before)
    prompt = model.tokenize(after)
    assert enc.after[: len(prompt)] == prompt
    assert enc.after[len(prompt) :] == model.tokenize("To the right.") + [eos]
    targets = [enc.after[t] for t in enc.targets]
    # the earlier answer and its <|im_end|>, then the last answer and its <|im_end|>: nothing else
    assert targets == model.tokenize("red") + [eos] + model.tokenize("To the right.") + [eos]


def test_the_training_forward_is_the_inference_forward(tiny_base: Path, data: Path) -> None:
    """Shared-prefix batching gives the logits `VideoChatFlash.logits` gives for each prompt."""
    model = VideoChatFlash.from_pretrained(tiny_base)
    samples = read_samples(data)[:2]  # one video, two questions
    cfg = TrainConfig(data=str(data), model="-", out="-")
    batcher = Batcher(model, cfg, FrameCache(model.config.vision.image_size, 512))
    [batch] = batcher.build([samples], np.random.default_rng(0))
    frames = batcher.cache.get(samples[0])
    tokens = model.encode_clips(model.preprocess(frames.pixels))
    # the time message after the video is the same for both questions: computed once, in the prefix
    time_msg = model.tokenize(time_message(frames.duration_s, len(frames.pixels)))
    assert batch.prefix.shape[1] >= tokens.shape[0] * tokens.shape[1] + len(time_msg)
    with torch.no_grad():
        hidden = shared_prefix_forward(model, batch.prefix, batch.suffix)
        for k, sample in enumerate(samples):
            reference = model.logits(tokens, sample.turns[0][0], duration_s=frames.duration_s)  # [S, V]
            n = reference.shape[0] - batch.prefix.shape[1]  # the prompt's positions after the video
            ours = model.llm.lm_head(hidden[k, :n]).float()
            torch.testing.assert_close(ours, reference[-n:], rtol=1e-4, atol=1e-5)


def test_the_prefix_skips_the_last_layers_outputs(tiny_base: Path, data: Path) -> None:
    """No logits are read at prefix positions, so the last layer computes only the prefix's keys and values: its
    MLP sees the conversations' rows, never the prefix (the earlier layers see both)."""
    model = VideoChatFlash.from_pretrained(tiny_base)
    samples = read_samples(data)[:2]
    batcher = Batcher(
        model, TrainConfig(data=str(data), model="-", out="-"), FrameCache(model.config.vision.image_size, 512)
    )
    [batch] = batcher.build([samples], np.random.default_rng(0))
    seen: dict[int, list[tuple[int, ...]]] = {}
    for i, layer in enumerate(model.llm.model.layers):
        layer.mlp.register_forward_hook(lambda _m, args, _out, i=i: seen.setdefault(i, []).append(args[0].shape))
    with torch.no_grad():
        shared_prefix_forward(model, batch.prefix, batch.suffix)
    last = len(model.llm.model.layers) - 1
    assert seen[last] == [batch.suffix.shape]
    assert all(seen[i] == [batch.prefix.shape, batch.suffix.shape] for i in range(last))


def test_the_shared_prefix_stops_where_the_conversations_part_or_at_the_limit() -> None:
    assert shared_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], 10) == 2
    assert shared_length([[1, 2, 3, 4]], 2) == 2  # one conversation: up to the first target's logits
    assert shared_length([[1, 2], [1, 2]], 5) == 2
    assert shared_length([[7], [1]], 5) == 0


def test_a_frozen_tower_runs_once_per_video_and_gives_the_same_tokens(tiny_base: Path, data: Path) -> None:
    """With the tower frozen its output per video is cached (the same values, the projector still trained):
    visiting a video again costs no tower forward."""
    model = VideoChatFlash.from_pretrained(tiny_base)
    samples = read_samples(data)
    calls: list[int] = []
    model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    chunks = chunk_by_video(samples, 16)
    frozen = Batcher(
        model, TrainConfig(data=str(data), model="-", out="-"), FrameCache(model.config.vision.image_size, 512)
    )
    first = frozen.build(chunks, np.random.default_rng(0))
    towered = len(calls)
    again = frozen.build(chunks, np.random.default_rng(0))
    assert len(calls) == towered > 0  # no tower forward the second time
    trained = Batcher(
        model,
        TrainConfig(data=str(data), model="-", out="-", train=("vision", "projector")),
        FrameCache(model.config.vision.image_size, 512),
    )
    reference = trained.build(chunks, np.random.default_rng(0))
    assert len(calls) > towered  # the tower trained: run every time
    for a, b, r in zip(first, again, reference, strict=True):
        assert torch.equal(a.prefix, b.prefix)
        torch.testing.assert_close(a.prefix, r.prefix)
        assert a.prefix.requires_grad  # the projector is trained through the cached features


@pytest.mark.slow  # compiling takes a minute or two the first time on a machine
def test_the_compiled_forward_gives_the_plain_forwards_loss_and_gradients(tiny_base: Path, data: Path) -> None:
    """`--compile`: the same step as without it, for batches of other sizes too (one graph, sizes symbolic)."""
    model = VideoChatFlash.from_pretrained(tiny_base)
    hico.train.set_trainable(model, ("projector", "llm"))
    trained = [p for p in model.parameters() if p.requires_grad]
    samples = read_samples(data)
    batcher = Batcher(
        model, TrainConfig(data=str(data), model="-", out="-"), FrameCache(model.config.vision.image_size, 512)
    )
    reports: list[str] = []
    compiled = hico.train.compiled_forward(reports.append)
    assert compiled is not shared_prefix_forward and not reports
    for per_video in (16, 3, 2, 1):  # suffixes of several row counts (one too) and lengths
        chunks = chunk_by_video(samples, per_video)
        results = []
        for forward in (shared_prefix_forward, compiled):
            model.zero_grad(set_to_none=True)
            loss = answer_loss(model, batcher.build(chunks, np.random.default_rng(0)), forward=forward)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in trained]))
        (plain, plain_grads), (ours, our_grads) = results
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
        for a, b in zip(our_grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_without_a_working_compiler_training_goes_on_uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("Failed to find C++ compiler. Please specify via CXX environment variable.")

    monkeypatch.setattr(torch, "compile", broken)
    reports: list[str] = []
    assert hico.train.compiled_forward(reports.append) is shared_prefix_forward
    assert len(reports) == 1 and "unavailable" in reports[0] and "C++ compiler" in reports[0]


# -- what trains ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "changed", "optimizer"),
    [
        (("projector",), {"model.mm_projector."}, "adamw"),
        (("vision", "projector", "llm"), {"model.", "lm_head."}, "adamw"),
        (
            ("projector", "llm"),
            {"model.mm_projector.", "model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."},
            "muon",
        ),
    ],
)
def test_loss_falls_and_only_the_asked_parts_change(
    tiny_base: Path, data: Path, tmp_path: Path, parts: tuple[str, ...], changed: set[str], optimizer: str
) -> None:
    before = data_loss(VideoChatFlash.from_pretrained(tiny_base), data)
    result = train(config(data, tiny_base, tmp_path / "out", train=parts, max_steps=6, optimizer=optimizer))
    after = data_loss(VideoChatFlash.from_pretrained(tmp_path / "out"), data)
    assert after < before - 0.05, (before, after)
    assert result.steps == 6 and result.samples == 3 * 6 and result.final_loss < before  # 3 epochs of 6 samples
    base, trained = weights(tiny_base), weights(tmp_path / "out")
    assert base.keys() == trained.keys()  # the official names, nothing added
    vision = "model.vision_tower."
    for key, value in base.items():
        should_change = "vision" in parts if key.startswith(vision) else any(key.startswith(c) for c in changed)
        if key.startswith("model.mm_projector."):
            should_change = "projector" in parts
        if should_change:
            assert not torch.equal(value, trained[key]), f"{key} did not train"
        else:
            assert torch.equal(value, trained[key]), f"{key} changed although frozen"


def test_the_relevance_loss_teaches_the_key_index_the_moments(
    tiny_base: Path, videos: list[Path], tmp_path: Path
) -> None:
    """Lines with `moments` train the scoring layer's query and keys to rank the clips that answer first: the
    relevance loss falls, the answer loss is still trained, and evaluation reports the key index's top-1."""
    lines = [
        {"video": str(v), "moments": [[0, 3]], "conversations": conversation("What is there at the start?", "a circle")}
        for v in videos  # 8, 12 and 16 s at 1 fps: 2-4 clips, the first one without the square
    ]
    data = write_lines(tmp_path / "d.jsonl", lines)

    def losses(model_dir: Path) -> tuple[float, float]:
        model = VideoChatFlash.from_pretrained(model_dir)
        cache = FrameCache(model.config.vision.image_size, 512)
        batcher = Batcher(model, TrainConfig(data=str(data), model="-", out="-"), cache)
        with torch.no_grad():
            batches = batcher.build(chunk_by_video(read_samples(data), 16), np.random.default_rng(0))
            assert [b.moments for b in batches] == [[("What is there at the start?", [0])]] * 3
            return float(relevance_loss(model, batches, 2)), float(answer_loss(model, batches))

    before = losses(tiny_base)
    result = train(
        config(data, tiny_base, tmp_path / "out", eval_data=str(data), relevance=10.0, max_steps=8, eval_every=8)
    )
    after = losses(tmp_path / "out")
    assert after[0] < before[0] - 0.1 and after[1] < before[1], (before, after)
    assert {"train_relevance_loss", "eval_moment_top1"} <= result.evals[-1].keys()
    with pytest.raises(ValueError, match="relevance is a loss weight"):
        config(data, tiny_base, tmp_path / "x", relevance=-1.0)


def test_lora_merged_equals_base_plus_adapter_and_layout_is_official(
    tiny_base: Path, data: Path, tmp_path: Path
) -> None:
    kw = {"train": ("projector", "llm"), "lora_rank": 4, "lr": 1e-2}
    train(config(data, tiny_base, tmp_path / "adapter", **kw))
    train(config(data, tiny_base, tmp_path / "merged", merge_lora=True, **kw))
    adapter = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any("mm_projector" in k for k in saved)  # projector rides along
    assert not any("vision_tower" in k for k in saved)

    merged = tmp_path / "merged"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"):
        assert (merged / name).is_file(), name
    assert weights(merged).keys() == weights(tiny_base).keys()
    assert read_config(merged) == read_config(tiny_base)
    for key, value in weights(tiny_base).items():
        if key.startswith("model.vision_tower.") or "norm" in key or "embed_tokens" in key or "lm_head" in key:
            assert torch.equal(value, weights(merged)[key]), key  # LoRA and the projector only

    frames = np.random.default_rng(1).integers(0, 256, (8, 48, 64, 3), dtype=np.uint8)
    base_plus_adapter = load_adapter(VideoChatFlash.from_pretrained(tiny_base), adapter, merge=False)
    model = base_plus_adapter.base_model.model  # the VideoChatFlash inside, adapters unmerged and active
    with torch.no_grad():
        tokens = model.encode_clips(model.preprocess(frames))
        unmerged = model.logits(tokens, "What colour is it?", duration_s=8.0)
    loaded = VideoChatFlash.from_pretrained(merged)
    reference = loaded.logits(loaded.encode_clips(loaded.preprocess(frames)), "What colour is it?", duration_s=8.0)
    torch.testing.assert_close(unmerged, reference, rtol=1e-4, atol=1e-4)
    # --adapter at load time merges it: the same model again
    applied = load_adapter(VideoChatFlash.from_pretrained(tiny_base), adapter)
    again = applied.logits(applied.encode_clips(applied.preprocess(frames)), "What colour is it?", duration_s=8.0)
    torch.testing.assert_close(again, reference, rtol=1e-4, atol=1e-4)
    assert not any("lora" in k for k in applied.state_dict())


# -- bad input and interruptions ------------------------------------------------------------------------------


def test_bad_videos_are_skipped_or_fail_never_silently(tiny_base: Path, videos: list[Path], tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(videos[0].read_bytes()[:600])  # a truncated file
    lines = [{"video": str(v), "conversations": conversation("Q?", "red")} for v in videos]
    lines.insert(1, {"video": str(tmp_path / "gone.mp4"), "conversations": conversation("Q?", "red")})
    lines.append({"video": str(corrupt), "conversations": conversation("Q?", "red")})
    data = write_lines(tmp_path / "d.jsonl", lines)
    said: list[str] = []
    result = train(config(data, tiny_base, tmp_path / "out", max_steps=2), report=said.append)
    assert result.steps == 2
    skipped = "\n".join(result.skipped)
    assert f"{data}:2" in skipped and "gone.mp4" in skipped and f"{data}:5" in skipped, skipped
    assert any("skipping a bad video" in line and f"{data}:2" in line for line in said)
    recorded = json.loads((tmp_path / "out" / "training.json").read_text())["skipped"]
    assert len(recorded) == 2
    with pytest.raises(DataError, match=f"{data}:2"):
        train(config(data, tiny_base, tmp_path / "out2", bad_videos="fail"))


def test_several_data_files_are_mixed_each_relative_to_its_own_directory(videos: list[Path], tmp_path: Path) -> None:
    """`vcflash train A.jsonl B.jsonl`: one pool of samples; a relative video path resolves under its own file's
    directory, and a bad line is named by its own file."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    for d, vs in ((a_dir, videos[:2]), (b_dir, videos[2:3])):
        (d / "videos").mkdir(parents=True)
        for v in vs:
            (d / "videos" / v.name).symlink_to(v)
    a = write_lines(
        a_dir / "train.jsonl",
        [{"video": f"videos/{v.name}", "conversations": conversation("Q?", "red")} for v in videos[:2]],
    )
    b_lines = [{"video": f"videos/{videos[2].name}", "conversations": conversation("Q?", "blue")}]
    b = write_lines(
        b_dir / "train.jsonl", b_lines + [{"video": "videos/gone.mp4", "conversations": conversation("Q?", "no")}]
    )
    samples, _, bad = hico.train.load_data(
        TrainConfig(data=(str(a), str(b)), model="-", out="-"), report=lambda _: None
    )
    assert [s.video for s in samples] == [a_dir / "videos" / v.name for v in videos[:2]] + [
        b_dir / "videos" / videos[2].name
    ]
    assert len(bad) == 1 and f"{b}:2" in bad[0], bad
    # a file given twice counts twice: each of its videos' conversations twice, still in one chunk per video
    twice, _, _ = hico.train.load_data(TrainConfig(data=(str(a), str(b), str(b)), model="-", out="-"), lambda _: None)
    assert len(twice) == len(samples) + 1
    chunks = hico.train.chunk_by_video(twice, 8)
    assert [len(c) for c in chunks] == [1, 1, 2] and chunks[2][0] == chunks[2][1] == samples[2]
    empty = write_lines(tmp_path / "e.jsonl", [b_lines[0] | {"video": "nope.mp4"}])
    with pytest.raises(DataError, match=f"{empty}, {empty}: no usable samples"):
        hico.train.load_data(TrainConfig(data=(str(empty), str(empty)), model="-", out="-"), report=lambda _: None)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_interrupted_run_resumes_from_its_last_checkpoint(
    tiny_base: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    kw = {"max_steps": 5, "eval_every": 2, "anchors": 0.5, "optimizer": optimizer}
    whole = train(config(data, tiny_base, tmp_path / "whole", **kw))

    calls = {"n": 0}
    real = hico.train.answer_loss

    def dies_in_step_four(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a kill in the middle of step 4: step 2's checkpoint is the last
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hico.train, "answer_loss", dies_in_step_four)
    with pytest.raises(KeyboardInterrupt):  # the cut run keeps its frames on disk, its resumed run reads them there
        train(config(data, tiny_base, tmp_path / "cut", frame_cache=str(tmp_path / "frames"), **kw))
    monkeypatch.setattr(hico.train, "answer_loss", real)
    assert len(list((tmp_path / "frames").glob("*.npz"))) == 3  # the three videos
    state = torch.load(tmp_path / "cut" / "last" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2  # lost at most one eval interval

    with pytest.raises(ValueError, match="pass --resume"):
        train(config(data, tiny_base, tmp_path / "cut", **kw))
    with pytest.raises(ValueError, match="different run.*lora_rank"):
        train(config(data, tiny_base, tmp_path / "cut", resume=True, lora_rank=2, **kw))
    with pytest.raises(ValueError, match="different run.*optimizer"):
        other = "adamw" if optimizer == "muon" else "muon"
        train(config(data, tiny_base, tmp_path / "cut", resume=True, **(kw | {"optimizer": other})))
    said: list[str] = []
    resumed = train(
        config(data, tiny_base, tmp_path / "cut", resume=True, frame_cache=str(tmp_path / "frames"), **kw),
        report=said.append,
    )
    assert any("resuming" in line and "step 2" in line for line in said)
    assert resumed.steps == whole.steps == 5
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


# -- the optimizers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(384, 128), (64, 128), (128, 128)])
def test_orthogonalize_gives_about_the_nearest_semi_orthogonal_matrix(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
    o = orthogonalize(g)
    assert o.shape == g.shape
    s, s_g = torch.linalg.svdvals(o), torch.linalg.svdvals(g)  # both descending: the iteration keeps the order
    kept = s[s_g > 0.003 * s_g[0]]  # five steps lift any direction above 0.3% of the largest to about unit size
    assert len(kept) >= len(s) - 1 and 0.6 < kept.min() and kept.max() < 1.25
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.flatten(), dim=0) > 0.97


def test_a_muon_step_moves_each_weight_by_adamws_amount_along_the_orthogonalised_gradient() -> None:
    """An update's root mean square is about 0.2 x lr, AdamW's usual size, whatever the matrix's shape: --lr means
    the same with either optimizer."""
    lr = 1e-2
    for shape in [(384, 128), (64, 128)]:
        w = torch.nn.Parameter(torch.zeros(shape))
        w.grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        Muon([w], lr=lr).step()
        rms = float(w.detach().pow(2).mean().sqrt())
        assert 0.15 * lr < rms < 0.23 * lr, (shape, rms)
        assert (
            torch.nn.functional.cosine_similarity(-w.detach().flatten(), orthogonalize(w.grad).flatten(), dim=0) > 0.999
        )


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_base: Path) -> None:
    model = load_model(tiny_base, "float32", "cpu", cls=VideoChatFlash)
    hico.train.set_trainable(model, ("vision", "projector", "llm"))
    vision = {id(p) for p in model.vision_tower.parameters()}
    named = [(n, p, 1e-4 if id(p) in vision else 2e-3) for n, p in model.named_parameters()]
    adamw, muon = make_optimizers(named, "muon")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    rest = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert matrices | rest == set(names.values()) and not matrices & rest
    assert {"llm.model.layers.0.mlp.down_proj.weight", "mm_projector.mlp.0.weight"} <= matrices
    assert {"vision_tower.blocks.0.attn.qkv.weight"} <= matrices
    assert {"llm.model.embed_tokens.weight", "llm.model.layers.0.self_attn.q_proj.bias"} <= rest
    assert {"vision_tower.patch_embed.proj.weight", "llm.model.norm.weight"} <= rest
    assert all(model.get_parameter(n).ndim == 2 for n in matrices)
    for o in (adamw, muon):  # each tensor keeps its own rate
        assert {(g["lr"], id(p) in vision) for g in o.param_groups for p in g["params"]} == {
            (2e-3, False),
            (1e-4, True),
        }
    (only,) = make_optimizers(named)
    assert isinstance(only, torch.optim.AdamW) and sum(len(g["params"]) for g in only.param_groups) == len(named)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(data="-", model="-", out="-", optimizer="sgd")


def test_normalize_answer() -> None:
    assert normalize_answer("  The Red circle. ") == normalize_answer("red circle") == "red circle"
    assert normalize_answer("Yes!") == "yes" and normalize_answer("3") == "3"


def test_a_patch_embedding_to_train_from_reads_colour_and_layout() -> None:
    """The DCT start of the tower: per colour channel an orthonormal basis, lowest frequency first, so the first
    three filters give a patch's mean red, green and blue and a flat patch excites nothing else."""
    basis = dct_patch_basis(96, 16)  # [C, 3, P, P]
    assert basis.shape == (96, 3, 16, 16)
    for c in range(3):
        rows = basis[c::3, c].flatten(1)  # this channel's filters
        assert torch.allclose(rows @ rows.T, 0.25 * torch.eye(len(rows)), atol=1e-5)
        assert basis[c::3, [k for k in range(3) if k != c]].abs().max() == 0
    flat = torch.zeros(3, 16, 16)
    flat[0] = 1.0  # a red patch
    response = (basis * flat).sum((1, 2, 3))
    assert response[0] == pytest.approx(0.5 * 16) and response[1:].abs().max() < 1e-5


def test_the_llm_layers_start_at_their_own_scale_with_the_same_draws() -> None:
    """`layer_std` scales the LLM decoder layers' matrices and nothing else; the random draws stay the same, so
    two bases differ by exactly that factor (what the README's comparison of 0.02 and 0.08 relies on)."""
    from hico.checkpoint import init_for_training_, shapes_config
    from hico.model import VideoChatFlashModel

    a, b = VideoChatFlashModel(shapes_config()), VideoChatFlashModel(shapes_config())
    init_for_training_(a, seed=3, layer_std=0.02)
    init_for_training_(b, seed=3)  # the default, 0.08
    wa, wb = dict(a.named_parameters()), dict(b.named_parameters())
    scaled = {n for n in wa if not torch.equal(wa[n], wb[n])}
    assert scaled == {n for n, p in wa.items() if n.startswith("llm.model.layers.") and p.ndim == 2}
    for n in scaled:
        torch.testing.assert_close(wb[n], 4 * wa[n], rtol=1e-6, atol=0)
    assert 0.075 < float(wb["llm.model.layers.0.mlp.up_proj.weight"].std()) < 0.085
    from hico.checkpoint import LAYER_STD
    from vcflash.cli import build_parser

    cli = build_parser().parse_args(["make-tiny-checkpoint", "base", "--preset", "shapes"])
    assert cli.layer_std is None and LAYER_STD == 0.08  # the CLI leaves the default to hico.checkpoint


@pytest.mark.parametrize("std", [0.0, -0.08, float("nan")])
def test_a_start_scale_that_is_not_positive_is_refused(std: float) -> None:
    from hico.checkpoint import init_for_training_, shapes_config
    from hico.model import VideoChatFlashModel

    with pytest.raises(ValueError, match="layer_std must be a positive number"):
        init_for_training_(VideoChatFlashModel(shapes_config()), seed=0, layer_std=std)


def test_the_base_options_without_the_shapes_preset_are_refused(tmp_path: Path) -> None:
    from vcflash.cli import main

    assert main(["make-tiny-checkpoint", str(tmp_path / "x"), "--layer-std", "0.08"]) == 2
    assert main(["make-tiny-checkpoint", str(tmp_path / "x"), "--heads", "8,4"]) == 2
    assert not (tmp_path / "x").exists()


def test_the_shapes_base_splits_its_attention_in_more_heads_with_the_same_weights(tmp_path: Path) -> None:
    """`--heads 8,4` changes only how the 128-wide attention is split (README Fine-tuning: the 8-head runs): the
    config says 8 / 4 and every tensor equals the default base's of the same seed."""
    from vcflash.cli import main

    assert main(["make-tiny-checkpoint", str(tmp_path / "h4"), "--preset", "shapes"]) == 0
    assert main(["make-tiny-checkpoint", str(tmp_path / "h8"), "--preset", "shapes", "--heads", "8,4"]) == 0
    h4, h8 = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("h4", "h8"))
    assert (h4["num_attention_heads"], h4["num_key_value_heads"]) == (4, 2)
    assert (h8["num_attention_heads"], h8["num_key_value_heads"]) == (8, 4)
    assert {k: v for k, v in h4.items() if "heads" not in k} == {k: v for k, v in h8.items() if "heads" not in k}
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("h4", "h8"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("heads", ["8", "8,4,2", "6,2", "8,3"])
def test_a_head_split_that_does_not_fit_is_refused(tmp_path: Path, heads: str) -> None:
    from vcflash.cli import main

    assert main(["make-tiny-checkpoint", str(tmp_path / "x"), "--preset", "shapes", "--heads", heads]) == 2
    assert not (tmp_path / "x").exists()
