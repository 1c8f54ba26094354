"""VideoChatFlash: frames -> 4-frame clips -> 64 tokens each -> Qwen2 with visual dropout -> answer.

The pipeline, top to bottom: `preprocess` (squash-resize, ImageNet normalisation), `encode_clips`
(UMT over each clip, ToMe merge to 64 tokens, MLP projector), `prompt_ids` (the official chat
template and time message), `embed` (visual tokens spliced in place of `<image>`, no separators),
and `generate` (prefill with progressive visual dropout, then cached decoding).

Clips are encoded independently, so tokens computed as a stream arrives can be asked about later:
every entry point takes a video file, decoded frames, or visual tokens computed earlier.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Self

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hico.config import DROP_PRESETS, DropConfig, VideoChatFlashConfig
from hico.generation import GenerationSettings, next_token
from hico.qwen2 import KVCache, Qwen2ForCausalLM
from hico.video import SampledVideo, load_video, preprocess_frames
from hico.vision import Projector, UMTEncoder

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"

VideoInput = str | os.PathLike[str] | SampledVideo | np.ndarray | torch.Tensor
Compress = DropConfig | str | bool | None


def time_message(duration_s: float, num_frames: int) -> str:
    """The official 'short' time message the model was trained with."""
    return f"The video lasts for {duration_s:.2f} seconds, and {num_frames} frames are uniformly sampled from it."


def chat_prompt(question: str, time_msg: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The qwen_2 ChatML conversation; the video and its time message open the first user turn."""
    turns = [*history, (question, None)]
    text = SYSTEM_PROMPT
    for i, (q, a) in enumerate(turns):
        content = f"{IMAGE_PLACEHOLDER}\n{time_msg} {q}" if i == 0 else q
        text += f"{USER}{content}{END}{ASSISTANT}"
        if a is not None:
            text += f"{a}{END}"
    return text


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    num_frames: int
    duration_s: float
    visual_tokens: int  # entering the LLM, before dropout
    prompt_tokens: int  # text + visual
    timings: dict[str, float] = field(default_factory=dict)  # seconds: decode_video, encode, prefill, generate


class VideoChatFlash(nn.Module):
    def __init__(
        self,
        config: VideoChatFlashConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        generation: GenerationSettings | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.generation = generation or GenerationSettings(eos_token_ids=(config.eos_token_id or 0,))
        self.vision_tower = UMTEncoder(config.vision)
        self.mm_projector = Projector(config)
        self.llm = Qwen2ForCausalLM(config.text)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike[str],
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        attn_implementation: str | None = None,
    ) -> Self:
        """Load a released checkpoint (hub id or local dir, official layout, safetensors)."""
        from hico.checkpoint import load_model

        return load_model(path_or_hub_id, dtype=dtype, device=device, attn_implementation=attn_implementation)

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.lm_head.weight.dtype

    def init_buffers(self) -> None:
        """Recompute the derived tables (position table, RoPE frequencies) after a meta-device build."""
        self.vision_tower.init_buffers()
        self.llm.model.rotary_emb.init_buffers()

    # -- vision ----------------------------------------------------------------------------------

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] -> float32 pixels [T, 3, S, S]."""
        return preprocess_frames(frames, self.config.vision.image_size)

    @torch.inference_mode()
    def encode_clips(self, pixels: torch.Tensor, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
        """pixels [T, 3, S, S] (T a multiple of 4) -> visual tokens [T // 4, 64, D] in LLM space.

        Each clip is encoded on its own (batching only groups them), so the result of a clip does not
        depend on its neighbours: the streaming service can encode clips as they arrive.
        """
        f, s = self.config.vision.num_frames, self.config.vision.image_size
        if pixels.ndim != 4 or pixels.shape[0] % f or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"expected pixels [T, 3, {s}, {s}] with T a multiple of {f}, got {list(pixels.shape)}")
        clips = pixels.reshape(-1, f, 3, s, s)  # [C, 4, 3, S, S]
        out = []
        for i in tqdm(range(0, len(clips), batch_size), desc="encoding clips", unit="batch", disable=not progress):
            x = clips[i : i + batch_size].to(self.device, self.dtype)
            out.append(self.mm_projector(self.vision_tower(x)))  # [b, 64, D]
        return torch.cat(out)

    # -- prompt ----------------------------------------------------------------------------------

    def prompt_ids(
        self, question: str, num_frames: int, duration_s: float, history: Sequence[tuple[str, str]] = ()
    ) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual tokens. Each side is tokenized on its own, as the
        official `tokenizer_image_token` splits the prompt at `<image>`."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; load it with from_pretrained")
        if not question.strip():
            raise ValueError("the question is empty")
        text = chat_prompt(question, time_message(duration_s, num_frames), history)
        before, after = text.split(IMAGE_PLACEHOLDER)
        return self.tokenizer(before).input_ids, self.tokenizer(after).input_ids

    def embed(self, parts: Sequence[list[int] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and visual tokens ([C, 64, D] or [n, D]) in prompt order -> inputs_embeds [1, S, D]
        and the positions [N] of the visual tokens, which are spliced in with no separators."""
        table = self.llm.model.embed_tokens
        pieces, visual, n = [], [], 0
        for part in parts:
            if isinstance(part, torch.Tensor):
                x = part.reshape(-1, part.shape[-1]).to(self.device, self.dtype)  # clip order = frame order
                visual.append(torch.arange(n, n + len(x), device=self.device))
            else:
                x = table(torch.tensor(part, dtype=torch.long, device=self.device))
            pieces.append(x)
            n += len(x)
        if n > self.config.max_length:
            raise ValueError(
                f"prompt of {n} tokens ({sum(len(v) for v in visual)} visual) exceeds the model's "
                f"{self.config.max_length}; ask over fewer frames"
            )
        positions = torch.cat(visual) if visual else torch.empty(0, dtype=torch.long, device=self.device)
        return torch.cat(pieces)[None], positions

    def resolve_drop(self, compress: Compress) -> DropConfig | None:
        """None: the checkpoint's setting; False or 'off': none; True or 'recommended': the model card's
        uniform0_attention [4, 18] [1, 0.75, 0.25]; a 'TYPE:LAYERS:RATIOS' spec or a DropConfig."""
        if compress is None:
            return self.config.drop
        if compress is False:
            return None
        if compress is True:
            compress = "recommended"
        if isinstance(compress, str):
            compress = DROP_PRESETS[compress] if compress in DROP_PRESETS else DropConfig.from_spec(compress)
        if compress is not None:
            compress.check_depth(self.config.text.num_hidden_layers)
        return compress

    # -- language --------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(
        self,
        visual: torch.Tensor,
        question: str,
        *,
        duration_s: float,
        history: Sequence[tuple[str, str]] = (),
        compress: Compress = None,
    ) -> torch.Tensor:
        """Prefill logits [S', V] (S' counts the tokens left after dropout) for a question over tokens."""
        before, after = self.prompt_ids(question, 4 * len(visual), duration_s, history)
        embeds, positions = self.embed([before, visual, after])
        return self.llm(embeds, visual=positions, drop=self.resolve_drop(compress), last_only=False)[0]

    @torch.inference_mode()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        visual: torch.Tensor | None,
        settings: GenerationSettings,
        drop: DropConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield new token ids: one prefill (with dropout), then one cached step per token."""
        cache = KVCache(self.config.text.num_hidden_layers, reserve=settings.max_new_tokens)
        processors = settings.processors()
        generated = torch.empty(1, 0, dtype=torch.long, device=self.device)
        logits = self.llm(inputs_embeds, cache, visual, drop)[:, -1]
        for _ in range(settings.max_new_tokens):
            token = next_token(logits, generated, settings, processors, generator)
            yield token
            if token in settings.eos_token_ids:
                return
            generated = torch.cat([generated, generated.new_tensor([[token]])], dim=1)
            logits = self.llm(self.llm.model.embed_tokens(generated[:, -1:]), cache)[:, -1]

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
        checkpoint's visual dropout. Extra keywords (temperature, top_p, top_k, repetition_penalty)
        override generation_config.json.
        """
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; load it with from_pretrained")
        timings: dict[str, float] = {}
        tokens, duration = self.visual_input(video, duration_s, max_num_frames, start_s, end_s, progress, timings)
        ids_before, ids_after = self.prompt_ids(question, len(tokens) * 4, duration, history or ())
        embeds, positions = self.embed([ids_before, tokens, ids_after])
        settings = self.generation.override(do_sample=do_sample, max_new_tokens=max_new_tokens, **generation)
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        t0 = time.perf_counter()
        stream = self.generate(embeds, positions, settings, self.resolve_drop(compress), generator)
        ids = [next(stream)]  # the prefill and the first token
        timings["prefill"] = time.perf_counter() - t0
        ids.extend(stream)
        timings["generate"] = time.perf_counter() - t0
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Answer(text, ids, len(tokens) * 4, duration, len(positions), embeds.shape[1], timings)

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
