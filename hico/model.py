"""VideoChatFlashModel: frames -> 4-frame clips -> 64 tokens each -> Qwen2 with visual dropout -> tokens.

The pipeline, top to bottom: `preprocess` (squash-resize, ImageNet normalisation), `encode_clips`
(the vision tower over each clip: UMT, or InternVideo2 as `mm_vision_tower` says; ToMe merge to 64 tokens,
MLP projector), `embed_prompt` (a `hico.prompt` prompt tokenized piece by piece, visual tokens spliced in
with no separators), and `generate` (prefill with progressive visual dropout, then cached decoding).

Clips are encoded independently, so tokens computed as a stream arrives can be asked about later. The
offline application (video files, `answer`, `chat`) is `hico.chat.VideoChatFlash`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hico.config import DROP_PRESETS, DropConfig, VideoChatFlashConfig
from hico.generation import GenerationSettings, next_token
from hico.internvideo2 import InternVideo2Encoder
from hico.kernels import Kernels
from hico.prompt import PromptVideo, build_prompt
from hico.qwen2 import KVCache, Qwen2ForCausalLM
from hico.video import preprocess_frames
from hico.vision import Projector, UMTEncoder

Compress = DropConfig | str | bool | None
VISION_TOWERS: dict[str, type[UMTEncoder | InternVideo2Encoder]] = {
    "umt": UMTEncoder,
    "internvideo2": InternVideo2Encoder,
}


class VideoChatFlashModel(nn.Module):
    """A checkpoint's modules, tokenizer and generation settings; `hico.checkpoint.load_model` builds one."""

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
        self.vision_tower = VISION_TOWERS[config.vision.tower](config.vision)  # by mm_vision_tower
        self.mm_projector = Projector(config)
        self.llm = Qwen2ForCausalLM(config.text)
        self.kernels = Kernels("conv3d", "origin", "sdpa")  # the modules' defaults; `set_kernels` changes them

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.lm_head.weight.dtype

    def set_kernels(self, kernels: Kernels) -> None:
        """Run the patch embedding and both attentions with these kernels (`hico.kernels.choose_kernels`)."""
        self.vision_tower.set_kernels(kernels.patch_embed, kernels.vision_attention)
        self.llm.set_attention(kernels.llm_attention)
        self.kernels = kernels

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

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one piece of text, tokenized on its own."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; load it with from_pretrained")
        return self.tokenizer(text).input_ids

    def embed_text(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> their input embeddings [..., D]."""
        return self.llm.model.embed_tokens(torch.as_tensor(ids, dtype=torch.long, device=self.device))

    def embed(self, parts: Sequence[list[int] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and visual tokens ([C, 64, D] or [n, D]) in prompt order -> inputs_embeds [1, S, D]
        and the positions [N] of the visual tokens, which are spliced in with no separators."""
        pieces, visual, n = [], [], 0
        for part in parts:
            if isinstance(part, torch.Tensor):
                x = part.reshape(-1, part.shape[-1]).to(self.device, self.dtype)  # clip order = frame order
                visual.append(torch.arange(n, n + len(x), device=self.device))
            else:
                x = self.embed_text(part)
            pieces.append(x)
            n += len(x)
        if n > self.config.max_length:
            raise ValueError(
                f"prompt of {n} tokens ({sum(len(v) for v in visual)} visual) exceeds the model's "
                f"{self.config.max_length}; ask over fewer frames"
            )
        positions = torch.cat(visual) if visual else torch.empty(0, dtype=torch.long, device=self.device)
        return torch.cat(pieces)[None], positions

    def embed_prompt(
        self, prompt: Sequence[str | int], visual: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A `build_prompt` prompt and each video's tokens [C, 64, D] -> `embed`'s (inputs_embeds, positions).
        Each text piece is tokenized on its own, as the official `tokenizer_image_token` splits at `<image>`."""
        return self.embed([visual[p] if isinstance(p, int) else self.tokenize(p) for p in prompt])

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
        video = PromptVideo(len(visual) * self.config.vision.num_frames, duration_s)
        embeds, positions = self.embed_prompt(build_prompt(question, [video], history), [visual])
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
            logits = self.llm(self.embed_text(generated[:, -1:]), cache)[:, -1]
