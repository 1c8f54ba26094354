"""Fine-tuning: the inference prompt with the answer appended, loss on the answer tokens, and a resumable loop.

A step takes a few videos and up to `questions_per_video` conversations about each: every video is sampled
(`hico.dataset.sample_video`, the sampler `VideoChatFlash.answer` uses) and encoded once, its 64 tokens per clip
spliced into each conversation exactly where `build_prompt` puts them at inference (same template, same time
message, same tokenization piece by piece), and the loss is the cross-entropy of each answer's tokens and the
`<|im_end|>` that ends it. Nothing else is trained on: not the system prompt, not the question, not the video.

What trains is chosen by part (`vision`, `projector`, `llm`), which is how the paper's stages differ (stage 1:
projector; stages 2-3: all three; stage 4: vision and projector); `lora_rank` puts LoRA adapters on the LLM
instead of training it in full (`hico.lora`). AdamW trains them, or with `optimizer="muon"` Muon the weight matrices
and AdamW the rest (`make_optimizers`). On a GPU the frozen weights stay in the load dtype (bf16) while
trained ones are kept in float32 under autocast, with gradient checkpointing per transformer block.

Every `eval_every` steps the loop measures the held-out loss and exact-match accuracy and writes
`OUT/last/` (trained tensors, optimizer, schedule, random state), which `resume=True` continues from; the
batches are a pure function of the seed and the step, so a resumed run takes the same path. At the end `OUT`
is a checkpoint in the official layout (LoRA merged on request), or a LoRA adapter directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from hico.chat import VideoChatFlash
from hico.checkpoint import as_dtype, load_model, resolve_checkpoint, save_checkpoint
from hico.dataset import (
    VIDEO_ERRORS,
    BytesLRU,
    DataError,
    FrameCache,
    Frames,
    Sample,
    bad_video_line,
    check_videos,
    read_samples,
)
from hico.pixels import normalize
from hico.prompt import ASSISTANT, END, PromptVideo, build_prompt
from hico.qwen2 import decoder_layer
from hico.relevance import block_scores, clip_keys, default_layer, key_block, question_query

log = logging.getLogger(__name__)

PARTS = ("vision", "projector", "llm")
MODULES = {"vision": "vision_tower", "projector": "mm_projector", "llm": "llm"}
IM_END = "<|im_end|>"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
# what a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = (
    "data",
    "model",
    "train",
    "lora_rank",
    "videos_per_step",
    "questions_per_video",
    "max_frames",
    "seed",
    "optimizer",
)
OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    data: str | tuple[str, ...]  # JSON lines (LLaVA / VideoChat-Flash format); several files are mixed
    model: str  # base checkpoint: dir, hub id or `tiny`
    out: str
    eval_data: str | None = None
    data_root: str | None = None  # video paths are relative to this (default: each file's directory)
    train: tuple[str, ...] = ("projector", "llm")
    lora_rank: int = 0  # > 0: LoRA on the LLM instead of training it in full
    lora_alpha: float | None = None  # default 2 * rank
    lora_dropout: float = 0.0
    merge_lora: bool = False  # write merged weights instead of an adapter
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 1e-4
    vision_lr: float | None = None  # default lr
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # or "muon" for the hidden matrices (`make_optimizers`)
    warmup: float = 0.03  # fraction of the steps
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    videos_per_step: int = 4
    questions_per_video: int = 16
    max_frames: int = 512  # frame budget per video, as `vcflash ask --max-frames`
    anchors: float = 0.0  # chance of the wall-clock span in the time message (the live ask-live prompt)
    relevance: float = 0.0  # weight of the relevance loss on samples with `moments` (0: off)
    eval_every: int = 200  # steps between evaluations and resumable checkpoints
    eval_samples: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    kernels: str | None = None  # hico.kernels; None: "fast" in float32 (same math, faster), else "exact"
    gradient_checkpointing: bool | None = None  # None: on for CUDA
    clip_grad: float = 1.0
    seed: int = 0
    resume: bool = False
    bad_videos: str = "skip"  # or "fail"
    cache_bytes: int = 2 << 30  # decoded frames kept in memory
    frame_cache: str | None = None  # a directory keeping decoded frames for later runs (`FrameCache`)
    compile: bool = False  # the LLM's training forward through torch.compile (`compiled_forward`)
    threads: int | None = None

    def __post_init__(self) -> None:
        self.train = tuple(self.train)
        unknown = set(self.train) - set(PARTS)
        if unknown or not self.train:
            raise ValueError(f"--train takes parts from {PARTS}, got {list(self.train)}")
        if self.lora_rank and "llm" not in self.train:
            raise ValueError("--lora-rank puts adapters on the LLM: include llm in --train")
        if self.lora_rank < 0 or self.videos_per_step < 1 or self.questions_per_video < 1:
            raise ValueError("lora_rank >= 0, videos_per_step >= 1 and questions_per_video >= 1")
        if self.max_frames < 4 or self.max_frames % 4:
            raise ValueError(f"max_frames must be a positive multiple of 4, got {self.max_frames}")
        if not 0.0 <= self.anchors <= 1.0:
            raise ValueError(f"anchors is a probability, got {self.anchors}")
        if not (math.isfinite(self.relevance) and self.relevance >= 0):
            raise ValueError(f"relevance is a loss weight >= 0, got {self.relevance}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.bad_videos not in ("skip", "fail"):
            raise ValueError(f"bad_videos must be skip or fail, got {self.bad_videos!r}")
        if self.eval_every < 1 or self.epochs <= 0 or self.lr <= 0:
            raise ValueError("eval_every >= 1, epochs > 0 and lr > 0")


@dataclass
class TrainResult:
    out: Path
    steps: int
    samples: int
    seconds: float
    samples_per_s: float
    peak_memory_gb: float
    final_loss: float
    evals: list[dict[str, float]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# -- sequences --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One conversation as the model reads it: text ids before the video, the video, text ids after it (the
    inference prompt of the last turn, then its answer and <|im_end|>), and which of the `after` ids are
    targets (index into `after`)."""

    before: list[int]
    after: list[int]
    targets: list[int]


def encode_conversation(
    tokenize: Callable[[str], list[int]], eos: int, turns: Sequence[tuple[str, str]], video: PromptVideo
) -> Encoded:
    """The ids of `build_prompt(last question, [video], history=earlier turns)` followed by the last answer.

    The prompt pieces are tokenized exactly as at inference. Earlier answers sit inside the `after` piece; they
    are targets when tokenizing them apart gives the same ids as the piece tokenized whole (it does for answers
    that start and end with a word or punctuation: the Qwen pre-tokenizer splits at the newline before them and
    the special token after them), and are context only otherwise.
    """
    *history, (question, answer) = turns
    before, _, after = build_prompt(question, [video], history)
    assert isinstance(before, str) and isinstance(after, str)
    ids = tokenize(after)
    targets: list[int] = []
    if history:
        chunks, spans, pos = [], [], 0
        for _, a in history:
            start = after.index(ASSISTANT + a + END, pos) + len(ASSISTANT)
            chunks.append(after[pos:start])
            spans.append(len(chunks))
            chunks.append(a)
            pos = start + len(a)
        chunks.append(after[pos:])
        pieces = [tokenize(c) for c in chunks]
        if sum(pieces, []) == ids:
            offset = 0
            for i, piece in enumerate(pieces):
                if i in spans:
                    targets += range(offset, offset + len(piece) + 1)  # the answer and the <|im_end|> after it
                offset += len(piece)
        else:
            log.warning("an earlier answer does not tokenize apart from its context; it is context only")
    answer_ids = tokenize(answer) + [eos]
    targets += range(len(ids), len(ids) + len(answer_ids))
    return Encoded(tokenize(before), ids + answer_ids, targets)


def prompt_video(num_frames: int, duration_s: float, rng: np.random.Generator, anchors: float) -> PromptVideo:
    """The time message's video; with probability `anchors` it also states a wall-clock span, as ask-live does."""
    span = None
    if anchors and rng.random() < anchors:
        start = float(rng.integers(1_600_000_000, 1_900_000_000))
        span = (start, start + duration_s)
    return PromptVideo(num_frames, duration_s, wall_span=span)


# -- the model's parts ------------------------------------------------------------------------------------------


def set_trainable(model: VideoChatFlash, parts: Sequence[str]) -> None:
    model.requires_grad_(False)
    for part in parts:
        getattr(model, MODULES[part]).requires_grad_(True)


def enable_gradient_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block in the backward pass instead of keeping its activations.

    The blocks' `forward` is wrapped on the instances, so module names and weights are untouched."""
    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner: Callable[..., torch.Tensor] = inner, **kwargs: Any) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]


def tower_features(model: VideoChatFlash, pixels: torch.Tensor, grad: bool, batch: int = 8) -> torch.Tensor:
    """pixels [T, 3, S, S] -> the vision tower's output per clip [T // 4, N, C], with grad only when `grad`."""
    f, s = model.config.vision.num_frames, model.config.vision.image_size
    if pixels.ndim != 4 or pixels.shape[0] % f or pixels.shape[1:] != (3, s, s):
        raise ValueError(f"expected pixels [T, 3, {s}, {s}] with T a multiple of {f}, got {list(pixels.shape)}")
    clips = pixels.reshape(-1, f, 3, s, s).to(model.device, model.dtype)  # [C, 4, 3, S, S]
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad):
        return torch.cat([model.vision_tower(clips[i : i + batch]) for i in range(0, len(clips), batch)])


def visual_tokens(model: VideoChatFlash, pixels: torch.Tensor, parts: Sequence[str], batch: int = 8) -> torch.Tensor:
    """pixels [T, 3, S, S] -> [T // 4, 64, D], with grad through the parts being trained (as encode_clips does
    at inference, clip by clip)."""
    return project(model, tower_features(model, pixels, "vision" in parts, batch), parts)


def project(model: VideoChatFlash, features: torch.Tensor, parts: Sequence[str]) -> torch.Tensor:
    """The tower's output [C, N, C_v] -> visual tokens [C, 64, D] (merge + projector), with grad when trained."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool({"vision", "projector"} & set(parts))):
        return model.mm_projector(features)


# -- batches ----------------------------------------------------------------------------------------------------


def chunk_by_video(samples: Sequence[Sample], per_video: int) -> list[list[Sample]]:
    """Samples grouped by video (and range), in pieces of at most `per_video`, in first-seen order."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.video_key, []).append(s)
    return [g[i : i + per_video] for g in groups.values() for i in range(0, len(g), per_video)]


def step_chunks(chunks: list[list[Sample]], step: int, per_step: int, seed: int) -> list[list[Sample]]:
    """The chunks of step `step`: each epoch is a permutation drawn from (seed, epoch)."""
    steps_per_epoch = math.ceil(len(chunks) / per_step)
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(chunks))
    return [chunks[j] for j in order[i * per_step : (i + 1) * per_step]]


def shared_length(sequences: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading ids all `sequences` share, at most `limit`."""
    n = 0
    while n < limit and all(n < len(s) and s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


@dataclass
class VideoBatch:
    """One video's part of a step: the shared prefix (system prompt, user turn opening, visual tokens, and what
    follows them in every conversation) and each conversation's suffix (the rest: question, answer), right-padded;
    targets as (row, suffix position)."""

    prefix: torch.Tensor  # [1, P, D]
    suffix: torch.Tensor  # [K, S, D]
    positions: torch.Tensor  # [N, 2]: the suffix position whose logits predict each target
    targets: torch.Tensor  # [N]
    tokens: torch.Tensor  # [C, T, D]: the video's visual tokens
    moments: list[tuple[str, list[int]]] = field(default_factory=list)  # (question, the clips that answer it)

    @property
    def rows(self) -> int:
        return self.suffix.shape[0]


class Batcher:
    """Turns chunks of samples into `VideoBatch`es, one per video."""

    def __init__(self, model: VideoChatFlash, cfg: TrainConfig, cache: FrameCache) -> None:
        self.model, self.cfg, self.cache = model, cfg, cache
        # a frozen tower's output per video: each video runs through it once per run, not once per visit (about a
        # fifth of a stage-1 step of the tiny recipe on CPU)
        self.features = BytesLRU(cfg.cache_bytes // 2)
        self.eos = model.tokenizer.convert_tokens_to_ids(IM_END)
        self.bad: dict[str, str] = {}  # video -> report line

    def frames(self, sample: Sample, users: list[str]) -> Frames | None:
        try:
            return self.cache.get(sample)
        except VIDEO_ERRORS as e:
            line = bad_video_line(sample.video, f"cannot be decoded ({e})", users)
            if self.cfg.bad_videos == "fail":
                raise DataError(line) from e
            if str(sample.video) not in self.bad:
                log.warning("skipping %s", line)
                self.bad[str(sample.video)] = line
            return None

    def visual_tokens(self, key: tuple, frames: Frames) -> torch.Tensor:
        parts = self.cfg.train

        def frozen() -> torch.Tensor:
            return tower_features(self.model, torch.from_numpy(normalize(frames.pixels)), grad=False).detach()

        if "vision" in parts:
            return visual_tokens(self.model, torch.from_numpy(normalize(frames.pixels)), parts)
        return project(self.model, self.features.get(key, frozen), parts)

    def build(self, chunks: Sequence[Sequence[Sample]], rng: np.random.Generator) -> list[VideoBatch]:
        model, out = self.model, []
        for chunk in chunks:
            frames = self.frames(chunk[0], [s.where for s in chunk])
            if frames is None:
                continue
            tokens = self.visual_tokens(chunk[0].video_key, frames)  # [C, 64, D]
            encoded = []
            for sample in chunk:
                video = prompt_video(len(frames.pixels), frames.duration_s, rng, self.cfg.anchors)
                encoded.append(encode_conversation(model.tokenize, self.eos, sample.turns, video))
            # `before` is the system prompt and the opening of the first user turn: the same for every sample. So,
            # most often, is the time message after the video: it joins the prefix too, up to the first position
            # whose logits are a target's.
            first = min(t for e in encoded for t in e.targets) - 1
            common = shared_length([e.after for e in encoded], first)
            prefix, _ = model.embed([encoded[0].before, tokens, encoded[0].after[:common]])  # [1, P, D]
            afters = [e.after[common:] for e in encoded]
            length = max(len(a) for a in afters)
            suffix = torch.stack([F.pad(model.embed_text(a), (0, 0, 0, length - len(a))) for a in afters])
            # the logits one position earlier predict each target
            rows = [(k, t - 1 - common) for k, e in enumerate(encoded) for t in e.targets]
            targets = [e.after[t] for e in encoded for t in e.targets]
            clip = model.config.vision.num_frames
            moments = [(s.turns[-1][0], frames.clips_within(s.moments, clip)) for s in chunk if s.moments]
            device = model.device
            out.append(
                VideoBatch(
                    prefix,
                    suffix,
                    torch.tensor(rows, device=device),
                    torch.tensor(targets, device=device),
                    tokens,
                    [(q, clips) for q, clips in moments if 0 < len(clips) < len(tokens)],  # a choice to learn
                )
            )
        return out


def prefetch(cache: FrameCache, chunks: Sequence[Sequence[Sample]]) -> None:
    """Decode the videos of `chunks` into `cache`; a video that fails is left for `Batcher.frames` to report."""
    for chunk in chunks:
        with contextlib.suppress(*VIDEO_ERRORS):
            cache.get(chunk[0])


def shared_prefix_forward(
    model: VideoChatFlash, prefix: torch.Tensor, suffix: torch.Tensor, checkpoint: bool = False
) -> torch.Tensor:
    """Final hidden states [K, S, D] of K sequences that share a prefix [1, P, D] and go on with suffix [K, S, D].

    The inference decoder (same modules, RoPE positions 0..P+S-1, no visual dropout), with the prefix computed
    once rather than K times: the video is in the prefix, so a step costs one pass over a video's tokens per
    video, not one per question. Right padding of the suffixes needs no mask: no real position sees a pad."""
    llm = model.llm.model
    p, s = prefix.shape[1], suffix.shape[1]
    rope_p = llm.rotary_emb(torch.arange(p, device=prefix.device), prefix.dtype)
    rope_s = llm.rotary_emb(torch.arange(p, p + s, device=prefix.device), prefix.dtype)
    hp, hs = prefix, suffix
    last = len(llm.layers) - 1
    for i, layer in enumerate(llm.layers):

        def run(
            hp: torch.Tensor, hs: torch.Tensor, layer: nn.Module = layer, outputs: bool = i < last
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # no logits are read at prefix positions: the last layer needs only the prefix's keys and values
            hp, k, v = decoder_layer(layer, hp, *rope_p, None, outputs)
            hs, _, _ = decoder_layer(layer, hs, *rope_s, (k, v))
            return hp, hs

        if checkpoint and torch.is_grad_enabled():
            hp, hs = torch.utils.checkpoint.checkpoint(run, hp, hs, use_reentrant=False)
        else:
            hp, hs = run(hp, hs)
    return llm.norm(hs)


def compiled_forward(report: Callable[[str], None]) -> Callable[..., torch.Tensor]:
    """`shared_prefix_forward` through torch.compile, or as it is where compiling cannot work here (no C++
    compiler, say), which is reported. Sizes are symbolic, so the prefix and suffix lengths, which change every
    step, reuse one graph; fusing the small element-wise operations of the tiny recipe's step makes it ~1.3x
    cheaper on a CPU, for a compile of about a minute the first time on a machine (torch caches it)."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(2))  # what compiling needs, in seconds
    except Exception as e:  # any failure of the toolchain means: train without it
        why = next(iter(str(e).splitlines()), "")[:200]
        report(f"torch.compile is unavailable here ({type(e).__name__}: {why}); training without it")
        return shared_prefix_forward
    compiled = torch.compile(shared_prefix_forward, dynamic=True)

    def forward(
        model: VideoChatFlash, prefix: torch.Tensor, suffix: torch.Tensor, checkpoint: bool = False
    ) -> torch.Tensor:
        # one graph for any number of conversations, one included: torch would otherwise specialise a size of 1 and
        # compile a second graph (about a minute here) the first time a video has a single conversation in a step
        torch._dynamo.decorators.mark_unbacked(suffix, 0)
        return compiled(model, prefix, suffix, checkpoint)

    return forward


def answer_loss(
    model: VideoChatFlash,
    batches: Sequence[VideoBatch],
    checkpoint: bool = False,
    forward: Callable[..., torch.Tensor] = shared_prefix_forward,
) -> torch.Tensor:
    """Mean cross-entropy over every answer token of the step; the vocabulary projection runs on those only."""
    total, count = None, 0
    for b in batches:
        h = forward(model, b.prefix, b.suffix, checkpoint)  # [K, S, D]
        logits = model.llm.lm_head(h[b.positions[:, 0], b.positions[:, 1]]).float()  # [N, V]
        loss = F.cross_entropy(logits, b.targets, reduction="sum")
        total = loss if total is None else total + loss
        count += len(b.targets)
    assert total is not None
    return total / count


def moment_scores(model: VideoChatFlash, batch: VideoBatch, layer: int, grad: bool) -> list[torch.Tensor]:
    """For each of the batch's questions with moments, the key index's relevance of each of the video's clips
    (`hico.relevance`: keys of each clip in its fixed short context, the question's query, one softmax over all the
    video's key tokens, summed per clip), float32 [C]: what Ask's `index` selection ranks clips by."""
    if not batch.moments:
        return []
    keys = clip_keys(model, batch.tokens, layer, grad=grad)  # [C, Hkv, T, hd]
    block = key_block(keys)
    t = keys.shape[2]
    return [block_scores(question_query(model, q, layer, grad=grad), block, t, grad) for q, _ in batch.moments]


def relevance_loss(model: VideoChatFlash, batches: Sequence[VideoBatch], layer: int) -> torch.Tensor | None:
    """Mean over the step's questions with moments of -log(the relevance mass on the clips that answer them): it
    teaches the scoring layer's query and keys to find the moment among the video's other clips, which is the
    ranking long-memory Asks select by. None when no question of the step has moments."""
    losses = []
    for b in batches:
        for scores, (_, clips) in zip(moment_scores(model, b, layer, grad=True), b.moments, strict=True):
            losses.append(-torch.log(scores[clips].sum().clamp_min(1e-12)))
    return torch.stack(losses).mean() if losses else None


# -- evaluation -------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, no surrounding space or final full stop, one space between words, no leading 'the'."""
    text = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!")
    return text.removeprefix("the ").strip()


@torch.no_grad()
def answer_samples(
    model: VideoChatFlash,
    samples: Sequence[Sample],
    max_frames: int = 512,
    max_new_tokens: int = 64,
    cache: FrameCache | None = None,
    progress: bool = False,
) -> list[str | None]:
    """Greedy answers to each sample's last question (earlier turns as history), each video encoded once: the
    frames, tokens and prompt of `VideoChatFlash.answer(video_path, ...)`. None where the video is unusable."""
    cache = cache or FrameCache(model.config.vision.image_size, max_frames, 1 << 28)
    answers: list[str | None] = [None] * len(samples)
    index = {id(s): i for i, s in enumerate(samples)}
    groups = chunk_by_video(samples, len(samples) or 1)
    was_training = model.training
    model.eval()
    try:
        for group in tqdm(groups, desc="answering", unit="video", disable=not progress):
            try:
                frames = cache.get(group[0])
            except VIDEO_ERRORS as e:
                log.warning("%s", bad_video_line(group[0].video, f"cannot be decoded ({e})", [s.where for s in group]))
                continue
            tokens = model.encode_clips(model.preprocess(frames.pixels))
            for s in group:
                *history, (question, _) = s.turns
                out = model.answer(
                    tokens, question, history, frames.duration_s, max_new_tokens=max_new_tokens, do_sample=False
                )
                answers[index[id(s)]] = out.text
    finally:
        model.train(was_training)
    return answers


# -- checkpoints ------------------------------------------------------------------------------------------------


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_state(directory: Path, model: nn.Module, optimizers, schedulers, step: int, cfg: TrainConfig, extra) -> None:
    """OUT/last/: written aside, then swapped in, so a run killed while saving keeps the previous one."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_tensors(model), tmp / "trainable.safetensors")
    torch.save(
        {
            "step": step,
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "torch_rng": torch.get_rng_state(),
            "config": asdict(cfg),
            **extra,
        },
        tmp / "trainer_state.pt",
    )
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_state(directory: Path, model: nn.Module, optimizers, schedulers, cfg: TrainConfig) -> dict[str, Any]:
    state = torch.load(directory / "trainer_state.pt", weights_only=False)
    saved = state["config"]
    diff = [
        f"{k}: {saved.get(k)!r} then, {getattr(cfg, k)!r} now"
        for k in RESUME_KEYS
        if _plain(saved.get(k)) != _plain(getattr(cfg, k))
    ]
    if diff:
        raise ValueError(f"{directory} was written by a different run; cannot resume ({'; '.join(diff)})")
    tensors = load_file(directory / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(tensors))
    if missing:
        raise ValueError(f"{directory}: trainable tensors missing: {missing[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    for o, saved_o in zip(optimizers, state["optimizers"], strict=True):
        o.load_state_dict(saved_o)
    for s, saved_s in zip(schedulers, state["schedulers"], strict=True):
        s.load_state_dict(saved_s)
    torch.set_rng_state(state["torch_rng"])
    return state


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def copy_side_files(base: Path, out: Path) -> None:
    """Tokenizer and generation settings of the base, unchanged: the trained model speaks the same tokens."""
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)


# -- the loop ---------------------------------------------------------------------------------------------------


def schedule(total: int, warmup: float, min_ratio: float) -> Callable[[int], float]:
    warm = max(1, round(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `update` (U V^T of its SVD), roughly: Newton-Schulz iterations with
    Muon's quintic coefficients, which push every singular value into ~[0.7, 1.2] in five steps. float32, since
    torch.optim.Muon's bfloat16 products cost 16x more on a CPU (0.55 s against 0.035 s a tiny-recipe step)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update / (update.norm() + 1e-7)  # (rows, cols), spectral norm <= 1
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024) for 2-D weights: Nesterov momentum, orthogonalised, scaled by 0.2 * sqrt(max dim)
    so its updates have AdamW's size and take AdamW's learning rate (Liu et al., 2025, "Muon is scalable")."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = orthogonalize(p.grad.lerp(buf, group["momentum"]))  # Nesterov
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))


def make_optimizers(
    named: Iterable[tuple[str, nn.Parameter, float]], optimizer: str = "adamw", weight_decay: float = 0.0
) -> list[torch.optim.Optimizer]:
    """AdamW for every (name, tensor, learning rate); with `optimizer="muon"`, `Muon` takes the hidden matrices (the
    2-D weights between the input embeddings and the output heads) at the same rates, and AdamW keeps what Muon is
    not for: embeddings, heads, norms, biases and convolutions."""
    hidden, rest = [], []
    for name, p, lr in named:
        is_matrix = optimizer == "muon" and p.ndim == 2 and "embed" not in name and "head" not in name
        (hidden if is_matrix else rest).append((p, lr))

    def groups(params: list[tuple[nn.Parameter, float]]) -> list[dict]:
        rates = dict.fromkeys(lr for _, lr in params)  # in order of first use
        return [{"params": [p for p, r in params if r == lr], "lr": lr} for lr in rates]

    return [
        *([torch.optim.AdamW(groups(rest), weight_decay=weight_decay)] if rest else []),
        *([Muon(groups(hidden), weight_decay=weight_decay)] if hidden else []),
    ]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def load_data(cfg: TrainConfig, report: Callable[[str], None]) -> tuple[list[Sample], list[Sample], list[str]]:
    files = [cfg.data] if isinstance(cfg.data, str | os.PathLike) else list(cfg.data)
    samples, bad = check_videos([s for f in files for s in read_samples(f, cfg.data_root)], cfg.bad_videos)
    eval_samples: list[Sample] = []
    if cfg.eval_data:
        eval_samples, bad_eval = check_videos(read_samples(cfg.eval_data, cfg.data_root), cfg.bad_videos)
        bad += bad_eval
    for line in bad:
        report(f"skipping a bad video: {line}")
    if not samples:
        raise DataError(f"{', '.join(map(str, files))}: no usable samples")
    return samples, eval_samples, bad


def train(cfg: TrainConfig, report: Callable[[str], None] = log.info, progress: bool = False) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data`; see the module docstring."""
    from hico.lora import add_lora, merge_lora, save_adapter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    last = out / "last"
    if last.exists() and not cfg.resume:
        raise ValueError(f"{out} holds a checkpoint of an earlier run ({last}); pass --resume or choose another --out")
    torch.manual_seed(cfg.seed)
    samples, eval_samples, skipped = load_data(cfg, report)
    base = resolve_checkpoint(cfg.model)
    device = torch.device(cfg.device)
    kernels = cfg.kernels or ("fast" if as_dtype(cfg.dtype) == torch.float32 else "exact")
    model = load_model(base, cfg.dtype, device, kernels=kernels, cls=VideoChatFlash)
    autocast = (
        torch.autocast(device.type, dtype=model.dtype) if model.dtype != torch.float32 else contextlib.nullcontext()
    )
    set_trainable(model, cfg.train)
    peft_model = None
    if cfg.lora_rank:
        full = tuple(p for p in cfg.train if p != "llm")
        peft_model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, full, str(cfg.model))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trained tensors in float32, whatever the load dtype
    checkpointing = bool(cfg.gradient_checkpointing or (cfg.gradient_checkpointing is None and device.type == "cuda"))
    if checkpointing:
        enable_gradient_checkpointing(model.vision_tower.blocks)  # the LLM layers: in shared_prefix_forward

    trained = [p for p in model.parameters() if p.requires_grad]
    vision_ids = {id(p) for p in model.vision_tower.parameters()}
    optimizers = make_optimizers(
        [
            (n, p, (cfg.vision_lr or cfg.lr) if id(p) in vision_ids else cfg.lr)
            for n, p in model.named_parameters()
            if p.requires_grad
        ],
        cfg.optimizer,
        cfg.weight_decay,
    )
    chunks = chunk_by_video(samples, cfg.questions_per_video)
    steps_per_epoch = math.ceil(len(chunks) / cfg.videos_per_step)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    factor = schedule(total, cfg.warmup, cfg.min_lr_ratio)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]

    step, evals, seen = 0, [], 0
    if cfg.resume and (last / "trainer_state.pt").is_file():
        state = load_state(last, model, optimizers, schedulers, cfg)
        step, evals, seen = state["step"], state.get("evals", []), state.get("samples", 0)
        report(f"resuming {last} at step {step} of {total}")
    elif cfg.resume:
        report(f"no checkpoint in {last}: starting from step 0")
    n_trained = sum(p.numel() for p in trained)
    report(
        f"{len(samples)} samples in {len(chunks)} video chunks, {total} steps ({steps_per_epoch} per epoch); "
        f"training {'+'.join(cfg.train)}{f' (LoRA rank {cfg.lora_rank})' if cfg.lora_rank else ''}: "
        f"{n_trained / 1e6:.2f}M parameters"
    )

    size = model.config.vision.image_size
    cache = FrameCache(size, cfg.max_frames, cfg.cache_bytes, cfg.frame_cache)
    batcher = Batcher(model, cfg, cache)
    eval_cache = FrameCache(size, cfg.max_frames, cfg.cache_bytes // 4, cfg.frame_cache)
    held_out = eval_samples[:: max(1, len(eval_samples) // cfg.eval_samples)][: cfg.eval_samples]  # spread out
    model.train()
    layer = default_layer(model.config.text)  # the scoring layer the key index ranks by, hence the one trained
    forward = compiled_forward(report) if cfg.compile else shared_prefix_forward
    t0, start_seen = time.perf_counter(), seen
    recent: list[float] = []
    recent_relevance: list[float] = []
    loss_value = float("nan")
    bar = tqdm(total=total, initial=step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    # decoding a video the first time it is met is about 40% of a tiny-recipe step in the first epoch: a thread
    # decodes the next step's videos while this one trains (PyAV and torch release the GIL)
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder:
        upcoming = step_chunks(chunks, step, cfg.videos_per_step, cfg.seed)
        ahead = decoder.submit(prefetch, cache, upcoming)
        while step < total:
            rng = np.random.default_rng([cfg.seed, 1, step])
            current = upcoming
            ahead.result()  # this step's videos, decoded while the last one trained
            if step + 1 < total:
                upcoming = step_chunks(chunks, step + 1, cfg.videos_per_step, cfg.seed)
                ahead = decoder.submit(prefetch, cache, upcoming)
            with autocast:
                batches = batcher.build(current, rng)
                loss = answer_loss(model, batches, checkpointing, forward) if batches else None
                relevance = relevance_loss(model, batches, layer) if loss is not None and cfg.relevance else None
            if loss is not None:
                loss_value = float(loss.detach())  # the answer loss, comparable with and without relevance
                recent = (recent + [loss_value])[-20:]
                if relevance is not None:
                    recent_relevance = (recent_relevance + [float(relevance.detach())])[-20:]
                    loss = loss + cfg.relevance * relevance
                n = sum(b.rows for b in batches)
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(trained, cfg.clip_grad)
                for o in optimizers:
                    o.step()
                seen += n
            for s in schedulers:
                s.step()
            step += 1
            bar.update(1)
            bar.set_postfix(
                loss=f"{np.mean(recent):.4f}" if recent else "-", lr=f"{schedulers[0].get_last_lr()[0]:.2e}"
            )
            if step % cfg.eval_every == 0 or step == total:
                record: dict[str, float] = {"step": step, "train_loss": float(np.mean(recent)) if recent else math.nan}
                if recent_relevance:
                    record["train_relevance_loss"] = float(np.mean(recent_relevance))
                if held_out:
                    record |= evaluate(model, cfg, batcher, held_out, eval_cache, autocast, layer)
                evals.append(record)
                report(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                save_state(last, model, optimizers, schedulers, step, cfg, {"evals": evals, "samples": seen})
    bar.close()
    seconds = time.perf_counter() - t0

    # -- export
    if peft_model is not None and not cfg.merge_lora:
        save_adapter(peft_model, out)
        report(f"wrote the LoRA adapter to {out}: use it with --model {cfg.model} --adapter {out}")
    else:
        final = merge_lora(peft_model) if peft_model is not None else model
        final.to(as_dtype(cfg.dtype))  # the trained float32 tensors back to the dtype the model was loaded in
        save_checkpoint(final, out)
        copy_side_files(base, out)
        report(f"wrote the checkpoint to {out}")
    (out / "training.json").write_text(
        json.dumps({"config": asdict(cfg), "evals": evals, "skipped": skipped + list(batcher.bad.values())}, indent=2)
        + "\n"
    )
    done = seen - start_seen
    return TrainResult(
        out=out,
        steps=step,
        samples=seen,
        seconds=seconds,
        samples_per_s=done / seconds if seconds else 0.0,
        peak_memory_gb=peak_memory_gb(device),
        final_loss=loss_value,
        evals=evals,
        skipped=skipped + list(batcher.bad.values()),
    )


@torch.no_grad()
def evaluate(
    model: VideoChatFlash,
    cfg: TrainConfig,
    batcher: Batcher,
    samples: Sequence[Sample],
    cache: FrameCache,
    autocast: contextlib.AbstractContextManager,
    layer: int,
) -> dict[str, float]:
    """Held-out loss (answer tokens) and exact-match accuracy of greedy answers; for questions with moments, how
    often the key index ranks a clip that answers it first among the video's clips (`eval_moment_top1`)."""
    model.eval()
    losses, weights, top1 = [], [], []
    rng = np.random.default_rng([cfg.seed, 2])
    with autocast:
        for chunk in chunk_by_video(samples, cfg.questions_per_video):
            batches = batcher.build([chunk], rng)
            if batches:
                losses.append(float(answer_loss(model, batches)))
                weights.append(len(batches[0].targets))
                scored = moment_scores(model, batches[0], layer, grad=False)
                moments = batches[0].moments
                top1 += [int(sc.argmax()) in clips for sc, (_, clips) in zip(scored, moments, strict=True)]
        answers = answer_samples(model, samples, cfg.max_frames, cache=cache)
    right: dict[str, list[bool]] = {}
    for a, s in zip(answers, samples, strict=True):
        if a is not None:
            ok = normalize_answer(a) == normalize_answer(s.turns[-1][1])
            right.setdefault("eval_accuracy", []).append(ok)
            if "category" in s.extra:  # the shapes data set's question kinds
                right.setdefault(f"eval_{s.extra['category']}", []).append(ok)
    model.train()
    loss = {"eval_loss": float(np.average(losses, weights=weights)) if losses else math.nan}
    moments = {"eval_moment_top1": float(np.mean(top1))} if top1 else {}
    return loss | moments | {k: float(np.mean(v)) for k, v in right.items()}
