"""A model's first-call costs, paid before a user waits on them (the reasoner runs this before it serves)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from hico.generation import Generated, generate_text
from hico.model import VideoChatFlashModel
from hico.prompt import PromptVideo, build_prompt
from hico.relevance import block_scores, clip_keys, default_layer, key_block, question_query

WARM_UP_WORDS = (4, 16, 64)  # question lengths (words) a warm-up runs: short, typical, long


def warm_up_model(model: VideoChatFlashModel, words: Iterable[int] = WARM_UP_WORDS) -> float:
    """Pay a model's first-call costs before a user waits on them; returns the seconds taken.

    On a GPU the first call of each kernel and shape loads code and picks algorithms (cuBLAS, SDPA), which made the
    first Search of a run 5-7x its median (BENCHMARKS.md). This runs what Ask and Search run, on blank input: the key
    index's question query at a few question lengths and one clip's keys, and a prompt around one blank clip
    decoded for two tokens. Nothing is read from or written to memory."""
    t0 = time.perf_counter()
    layer, d = default_layer(model.config.text), model.config.text.hidden_size
    clip = torch.zeros(1, model.config.tokens_per_clip, d)
    with torch.inference_mode():
        block = key_block(clip_keys(model, clip, layer), model.dtype)  # as the key index holds a stream's keys
        for n in words:
            block_scores(question_query(model, " ".join(["what"] * n), layer), block, clip.shape[1])
        before, _, after = build_prompt("What happens?", [PromptVideo(model.config.vision.num_frames, 4.0)])
        embeds, visual = model.embed([model.tokenize(before), clip[0], model.tokenize(after)])
        for _ in generate_text(model, embeds, visual, None, Generated(), max_new_tokens=2, do_sample=False):
            pass
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - t0
