"""VideoChatFlash, the offline application: a video file, decoded frames or visual tokens computed earlier,
a question -> the answer, with what it took (frames, tokens, timings)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

import numpy as np
import torch
from tqdm.auto import tqdm

from hico.checkpoint import load_model
from hico.generation import Generated, generate_text
from hico.model import Compress, VideoChatFlashModel
from hico.prompt import PromptVideo, build_prompt
from hico.video import SampledVideo, load_video

VideoInput = str | os.PathLike[str] | SampledVideo | np.ndarray | torch.Tensor


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    num_frames: int
    duration_s: float
    visual_tokens: int  # entering the LLM, before dropout
    prompt_tokens: int  # text + visual
    stop: str = ""  # why generation ended: eos, length, blank or repeat (degenerate output)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: decode_video, encode, prefill, generate


class VideoChatFlash(VideoChatFlashModel):
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike[str],
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        kernels: str = "exact",
        attn_implementation: str | None = None,
    ) -> Self:
        """Load a released checkpoint (hub id or local dir, official layout, safetensors), or `tiny`.

        dtype None: bfloat16 on CUDA, float32 on CPU. kernels: "exact" (the official model's, bit-exact
        with it) or "fast" (see `hico.kernels`).
        """
        return load_model(path_or_hub_id, dtype, device, kernels, attn_implementation, cls=cls)

    def visual_input(
        self,
        video: VideoInput,
        duration_s: float | None,
        max_num_frames: int,
        start_s: float | None,
        end_s: float | None,
        progress: bool,
        timings: dict[str, float],
    ) -> tuple[torch.Tensor, float]:
        """Any accepted video form -> (visual tokens [C, 64, D], duration for the time message).

        Frames and tokens without a duration are taken to be sampled at 1 fps.
        """
        t0 = time.perf_counter()
        if isinstance(video, str | os.PathLike):
            video = load_video(
                video,
                max_num_frames=max_num_frames,
                min_num_frames=min(64, max_num_frames),
                start_s=start_s,
                end_s=end_s,
            )
        if isinstance(video, SampledVideo):
            duration_s = duration_s if duration_s is not None else video.duration_s
            video = video.frames
        timings["decode_video"] = time.perf_counter() - t0
        if isinstance(video, torch.Tensor) and video.is_floating_point():
            if video.ndim != 3 or video.shape[-1] != self.config.text.hidden_size:
                raise ValueError(
                    f"visual tokens must be [clips, {self.config.tokens_per_clip}, "
                    f"{self.config.text.hidden_size}], got {list(video.shape)}"
                )
            tokens = video
        else:
            t0 = time.perf_counter()
            tokens = self.encode_clips(self.preprocess(video), progress=progress)
            timings["encode"] = time.perf_counter() - t0
        num_frames = len(tokens) * self.config.vision.num_frames
        return tokens, float(duration_s if duration_s is not None else num_frames)

    def answer(
        self,
        video: VideoInput,
        question: str,
        history: Sequence[tuple[str, str]] | None = None,
        duration_s: float | None = None,
        *,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        compress: Compress = None,
        max_num_frames: int = 512,
        start_s: float | None = None,
        end_s: float | None = None,
        seed: int | None = None,
        progress: bool = False,
        **generation: float | int | None,
    ) -> Answer:
        """Answer a question about a video file, uint8 frames [T, H, W, 3] or visual tokens [C, 64, D].

        `history` is earlier (question, answer) turns about the same video. `compress` overrides the
        checkpoint's visual dropout. `max_new_tokens` None: generation_config.json's, else 512; degenerate output
        (whitespace or one repeated token) ends early (`hico.generation.Degenerate`). `progress`: bars for
        encoding and generation (on stderr). Extra keywords (temperature, top_p, top_k, repetition_penalty)
        override generation_config.json.
        """
        timings: dict[str, float] = {}
        tokens, duration = self.visual_input(video, duration_s, max_num_frames, start_s, end_s, progress, timings)
        num_frames = len(tokens) * self.config.vision.num_frames
        prompt = build_prompt(question, [PromptVideo(num_frames, duration)], history or ())
        embeds, positions = self.embed_prompt(prompt, [tokens])
        out = Generated()
        pieces = generate_text(
            self,
            embeds,
            positions,
            self.resolve_drop(compress),
            out,
            seed=seed,
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            **generation,
        )
        with tqdm(desc="generating", unit="tok", disable=not progress, leave=False) as bar:
            for _ in pieces:  # run to the end; the text is decoded whole, keeping a trailing partial character
                bar.total = out.max_new_tokens
                bar.update(len(out.ids) - bar.n)
        text = self.tokenizer.decode(out.ids, skip_special_tokens=True).strip()
        return Answer(
            text, out.ids, num_frames, duration, len(positions), embeds.shape[1], out.stop, timings | out.timings
        )

    def chat(
        self,
        video: VideoInput,
        question: str,
        history: Sequence[tuple[str, str]] | None = None,
        duration_s: float | None = None,
        **kwargs: object,
    ) -> str:
        """The answer's text; see `answer` for the arguments."""
        return self.answer(video, question, history, duration_s, **kwargs).text  # type: ignore[arg-type]
