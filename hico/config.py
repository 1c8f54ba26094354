"""Model configuration: the released checkpoints' config.json, read into typed dataclasses.

The official code hard-codes the vision tower (UMT-L) and reads the LLM and projector settings
from config.json. We keep both in one place: `VideoChatFlashConfig.from_dict` understands the
released files, and the optional `mm_vision_config` key describes a non-default (e.g. tiny) tower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Self

SUPPORTED_ARCHITECTURES = ("VideoChatFlashQwenForCausalLM",)
SUPPORTED_MODEL_TYPES = ("videochat_flash_qwen", "qwen2")  # the 1M checkpoint still says "qwen2"
DROP_TYPES = ("uniform", "attention", "uniform0_attention", "uniform1_attention")
# Every released config.json names the remote code here; ours carry it too, so tools see the real layout.
AUTO_MAP = {
    "AutoConfig": "modeling_videochat_flash.VideoChatFlashQwenConfig",
    "AutoModel": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM",
}
# Keys the official code (or its evaluation code) acts on that we implement at the released value only:
# key -> (accepted values, what we do). A config with another value is refused, never silently run as
# if it had the released one. An absent key means the released value.
FIXED_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "rope_scaling": ((None,), "plain RoPE, as the released configs (null); the NIAH eval's yarn is not implemented"),
    "mm_local_num_frames": ((4,), "4-frame clips, the UMT tower's position table"),
    "vision_encode_type": (("video_image",), "the video_image encoding"),
    "mm_patch_merge_type": (("spatial_nopad",), "spatial_nopad (visual tokens flattened, no newline tokens)"),
    "mm_newline_position": (("nothing",), "no newline or frame-separator tokens"),
    "mm_vision_select_feature": (("patch",), "patch features"),
    "frame_aspect_ratio": (("square",), "frames squashed to a square"),
    "frame_grid_pinpoints": ((None,), "no frame grid"),
    "use_sliding_window": ((False,), "full attention"),
    "use_pos_skipping": ((False,), "contiguous positions"),
    "mm_use_im_start_end": ((False,), "no image start/end tokens"),
    "mm_use_im_patch_token": ((False,), "no image patch tokens"),
    "hidden_act": (("silu",), "SiLU"),
}


# mm_vision_tower names -> our tower kinds, matched in the official builder's order (internvideo2 before umt).
TOWER_KINDS = ("internvideo2", "umt")


@dataclass(frozen=True)
class VisionConfig:
    """The video encoder. Defaults are UMT-L as built by the official code (23 of 24 blocks);
    `internvideo2_1b()` gives the InternVideo2-1B tower of the other released variant."""

    tower: str = "umt"  # "umt" (hico.vision) or "internvideo2" (hico.internvideo2), from mm_vision_tower
    hidden_size: int = 1024
    num_hidden_layers: int = 23  # blocks actually built: depth 24 with select_layer -2
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 16
    image_size: int = 448
    num_frames: int = 4  # frames per clip, attended jointly (mm_local_num_frames)
    layer_norm_eps: float = 1e-6
    final_layer_norm_eps: float = 1e-12
    pretrain_image_size: int = 224  # UMT: the sinusoid table is built for this grid, then interpolated

    def __post_init__(self) -> None:
        if self.tower not in TOWER_KINDS:
            raise ValueError(f"unknown vision tower {self.tower!r}; choose from {TOWER_KINDS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size or self.pretrain_image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} and pretrain_image_size {self.pretrain_image_size} "
                f"must be multiples of patch_size {self.patch_size}"
            )

    @classmethod
    def internvideo2_1b(cls, **changes: Any) -> Self:
        """InternVideo2-1B as the official code builds it: 39 of 40 blocks (select layer -2), width 1408, 16 heads,
        MLP int(1408·48/11) = 6144, patch 14 at 224 px (16x16 per frame), RMSNorm eps 1e-6; no final norm."""
        return cls(
            **{
                "tower": "internvideo2",
                "hidden_size": 1408,
                "num_hidden_layers": 39,
                "num_attention_heads": 16,
                "intermediate_size": 6144,
                "patch_size": 14,
                "image_size": 224,
            }
            | changes
        )

    @classmethod
    def for_tower(cls, mm_vision_tower: str, **changes: Any) -> Self:
        """The tower a config.json's `mm_vision_tower` names, as the official builder picks it: "internvideo2"
        (224 px), else "umt-hd" (448 px), else "umt" (224 px)."""
        if "internvideo2" in mm_vision_tower:
            return cls.internvideo2_1b(**changes)
        if "umt" in mm_vision_tower:
            return cls(**{"image_size": 448 if "umt-hd" in mm_vision_tower else 224} | changes)
        raise ValueError(
            f"unsupported mm_vision_tower {mm_vision_tower!r}: only the UMT and InternVideo2 towers are implemented"
        )

    @property
    def mm_vision_tower(self) -> str:
        """The config.json name of this tower."""
        if self.tower == "internvideo2":
            return "internvideo2"
        return "umt-hd-large" if self.image_size == 448 else "umt-large"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid**2

    @property
    def tokens_per_clip(self) -> int:
        return self.num_frames * self.tokens_per_frame


@dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder. Field names are the ones in config.json."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class DropConfig:
    """Progressive visual dropout inside the LLM (the official `mm_llm_compress` keys).

    After decoder layer `l - 1` for each `l` in `layers` (stage s = its index), the visual tokens go
    from int(N * ratios[s]) to int(N * ratios[s + 1]), N being the visual tokens in the prompt.
    `type` picks how: "uniform" (evenly spaced), "attention" (top-k attention from the last prompt
    token, scored with layer l's norm and q/k), or "uniform{k}_attention" (uniform for stages <= k).
    """

    type: str = "uniform0_attention"
    layers: tuple[int, ...] = (4, 18)
    ratios: tuple[float, ...] = (1.0, 0.75, 0.25)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "ratios", tuple(float(x) for x in self.ratios))
        if self.type not in DROP_TYPES:
            raise ValueError(f"drop type {self.type!r} is not one of {DROP_TYPES}")
        if len(self.ratios) != len(self.layers) + 1:
            raise ValueError(
                f"need one ratio per drop layer plus the starting 1.0: layers {list(self.layers)}, "
                f"ratios {list(self.ratios)}"
            )
        if self.ratios and self.ratios[0] != 1.0:
            raise ValueError(f"the first ratio must be 1.0 (all visual tokens), got {self.ratios[0]}")
        if any(b > a for a, b in zip(self.ratios, self.ratios[1:], strict=False)) or min(self.ratios) < 0:
            raise ValueError(f"ratios must be non-increasing and >= 0, got {list(self.ratios)}")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)) or (
            self.layers and self.layers[0] < 1
        ):
            raise ValueError(f"drop layers must be increasing and >= 1, got {list(self.layers)}")

    @classmethod
    def from_spec(cls, spec: str) -> Self:
        """Parse 'TYPE:LAYERS:RATIOS', e.g. 'uniform0_attention:4,18:1,0.75,0.25' (CLI and API form)."""
        try:
            kind, layers, ratios = spec.split(":")
            return cls(kind, tuple(int(x) for x in layers.split(",")), tuple(float(x) for x in ratios.split(",")))
        except ValueError as e:
            raise ValueError(f"bad dropout spec {spec!r} (expected TYPE:LAYERS:RATIOS): {e}") from e

    def stage_type(self, stage: int) -> str:
        """'uniform' or 'attention' for a stage (index into `layers`)."""
        if self.type == "uniform0_attention":
            return "uniform" if stage == 0 else "attention"
        if self.type == "uniform1_attention":
            return "uniform" if stage <= 1 else "attention"
        return self.type

    def counts(self, num_visual: int) -> list[int]:
        """Visual tokens alive before each stage and after the last: int(N * ratio), as the official."""
        return [int(num_visual * r) for r in self.ratios]

    def check_depth(self, num_layers: int) -> None:
        if self.layers and self.layers[-1] >= num_layers:
            raise ValueError(
                f"drop layer {self.layers[-1]} is out of range for an LLM of {num_layers} layers "
                f"(allowed 1..{num_layers - 1})"
            )


# The model card's recommendation; the released configs ship with compression off.
DROP_PRESETS: dict[str, DropConfig | None] = {
    "off": None,
    "recommended": DropConfig("uniform0_attention", (4, 18), (1.0, 0.75, 0.25)),
}


@dataclass(frozen=True)
class VideoChatFlashConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    mm_hidden_size: int = 1024
    tokens_per_frame: int = 16  # ToMe target: 16 tokens per frame, 64 per 4-frame clip
    drop: DropConfig | None = None
    max_length: int = 32768  # tokenizer_model_max_length
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # other keys, kept

    def __post_init__(self) -> None:
        if self.mm_hidden_size != self.vision.hidden_size:
            raise ValueError(f"mm_hidden_size {self.mm_hidden_size} != vision hidden_size {self.vision.hidden_size}")
        if self.drop is not None:
            self.drop.check_depth(self.text.num_hidden_layers)
        if self.tokens_per_clip >= self.vision.tokens_per_clip:
            raise ValueError(
                f"merge target {self.tokens_per_clip} must be below the {self.vision.tokens_per_clip} tokens a clip has"
            )

    @property
    def tokens_per_clip(self) -> int:
        return self.tokens_per_frame * self.vision.num_frames

    # -- config.json ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Read a released (or generated) config.json; raise ValueError naming what is wrong."""
        arch = (d.get("architectures") or [None])[0]
        if arch not in SUPPORTED_ARCHITECTURES or d.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"not a VideoChat-Flash checkpoint: architectures={d.get('architectures')}, "
                f"model_type={d.get('model_type')!r} (expected {SUPPORTED_ARCHITECTURES[0]} with "
                f"model_type in {SUPPORTED_MODEL_TYPES})"
            )
        if d.get("mm_projector_type", "tome16_mlp_hd64") != "tome16_mlp_hd64":
            raise ValueError(f"unsupported mm_projector_type {d['mm_projector_type']!r}")
        tower = str(d.get("mm_vision_tower", ""))
        VisionConfig.for_tower(tower)  # refuses an unknown tower first, naming it
        if d.get("mm_vision_select_layer", -2) != -2 and "mm_vision_config" not in d:
            raise ValueError("only mm_vision_select_layer -2 is supported for the released towers")
        for key, (accepted, meaning) in FIXED_KEYS.items():
            if key in d and not any(d[key] == a and type(d[key]) is type(a) for a in accepted):
                raise ValueError(
                    f"unsupported {key} {d[key]!r}: only {' or '.join(map(repr, accepted))} is implemented ({meaning})"
                )

        vision = VisionConfig.for_tower(
            tower, **{"num_frames": int(d.get("mm_local_num_frames", 4))} | d.get("mm_vision_config", {})
        )
        text_keys = TextConfig.__dataclass_fields__.keys()
        text = TextConfig(**{k: d[k] for k in text_keys if k in d})
        drop = None
        if d.get("mm_llm_compress", False):
            drop = DropConfig(
                d.get("llm_compress_type", "attention"),
                tuple(d.get("llm_compress_layer_list", (8, 16, 24))),
                tuple(d.get("llm_image_token_ratio_list", (1.0, 0.5, 0.25, 0.125))),
            )
        eos = d.get("eos_token_id")
        return cls(
            text=text,
            vision=vision,
            mm_hidden_size=int(d.get("mm_hidden_size", vision.hidden_size)),
            drop=drop,
            max_length=int(d.get("tokenizer_model_max_length", 32768)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            extra=d,
        )

    def to_dict(self) -> dict[str, Any]:
        """config.json in the official layout (plus `mm_vision_config` when the tower is not a released one)."""
        d: dict[str, Any] = {
            **self.extra,
            "architectures": [SUPPORTED_ARCHITECTURES[0]],
            "model_type": "videochat_flash_qwen",
            "auto_map": self.extra.get("auto_map", AUTO_MAP),
            **asdict(self.text),
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "mm_vision_tower": self.vision.mm_vision_tower,
            "mm_hidden_size": self.mm_hidden_size,
            "mm_vision_select_layer": -2,
            "mm_projector_type": "tome16_mlp_hd64",
            "mm_local_num_frames": self.vision.num_frames,
            # In every released config.json, and read by the official code (ToMe; a version check at encoding):
            "mm_pos_num_frames": self.extra.get("mm_pos_num_frames", 8),
            "transformers_version": self.extra.get("transformers_version", "4.40.1"),
            "mm_patch_merge_type": "spatial_nopad",
            "mm_newline_position": "nothing",
            "vision_encode_type": "video_image",
            "mm_llm_compress": self.drop is not None,
            "llm_compress_type": self.drop.type if self.drop else "attention",
            "llm_compress_layer_list": list(self.drop.layers) if self.drop else [24],
            "llm_image_token_ratio_list": list(self.drop.ratios) if self.drop else [1.0, 0.5],
            "tokenizer_model_max_length": self.max_length,
            "tokenizer_padding_side": "right",
        }
        default = VisionConfig.for_tower(self.vision.mm_vision_tower, num_frames=self.vision.num_frames)
        if self.vision != default:
            d["mm_vision_config"] = {
                k: getattr(self.vision, k)
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "intermediate_size",
                    "patch_size",
                    "image_size",
                )
            }
        return d

    def with_drop(self, drop: DropConfig | None) -> Self:
        return replace(self, drop=drop)


def preset(name: str, image_size: int = 448) -> VideoChatFlashConfig:
    """Named model shapes: real sizes for benchmarks with random weights, and the tiny test model."""
    vision = VisionConfig(image_size=image_size)
    if name == "2b":  # Qwen2.5-1.5B + UMT-L (VideoChat-Flash-Qwen2_5-2B_res448)
        return VideoChatFlashConfig(text=TextConfig(), vision=vision)
    if name == "7b":  # Qwen2-7B + UMT-L (VideoChat-Flash-Qwen2-7B_res448)
        text = TextConfig(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        )
        return VideoChatFlashConfig(text=text, vision=vision)
    if name == "tiny-internvideo2":  # the tiny model with a 2-block InternVideo2 tower (patch 14, 1024 tokens a clip)
        tiny = preset("tiny")
        vision = VisionConfig.internvideo2_1b(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
        return replace(tiny, vision=vision)
    if name == "tiny":  # seconds on a laptop CPU; answers are noise
        text = TextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        tiny_vision = VisionConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=image_size,
        )
        return VideoChatFlashConfig(
            text=text, vision=tiny_vision, mm_hidden_size=64, bos_token_id=509, eos_token_id=511
        )
    raise ValueError(f"unknown preset {name!r}; choose 2b, 7b, tiny or tiny-internvideo2")
