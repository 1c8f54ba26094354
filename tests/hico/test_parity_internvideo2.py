"""The InternVideo2-1B variant (VideoChat-Flash-Qwen2_5-7B_InternVideo2-1B): its layout, its config, and parity
with the official code on golden values it produced (tests/data/parity/README.md, "InternVideo2 golden values").

The official model ran on CPU, in float32 and in bfloat16, on the tiny checkpoint `model_internvideo2/`. One
change was made to it: the official tower hard-codes flash-attn (`use_flash_attn=True`, a CUDA-only half
precision kernel), so the harness built it with `use_flash_attn=False`, which runs the same tower's own
plain attention branch (q/k RMSNorm, q·scale @ kᵀ, softmax, @ v in the model dtype) instead. That is the
"origin" kernel our "exact" set picks on CPU; flash-attn parity needs a GPU (README, "Fidelity").
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hico import VideoChatFlash
from hico.checkpoint import CheckpointError, check_weights, official_key
from hico.config import DropConfig, VideoChatFlashConfig, VisionConfig
from hico.internvideo2 import InternVideo2Encoder
from hico.kernels import Kernels
from hico.merge import merge_clip_tokens
from hico.model import VideoChatFlashModel
from hico.tokenizer import train_tiny_tokenizer
from tests.hico.test_parity_bf16 import load_bitwise_goldens
from vcflash.cli import main as cli_main

DATA = Path(__file__).parent.parent / "data" / "parity"
KINDS = ["noise", "scene"]
MODES = ["nodrop", "attention", "uniform0_attention"]
DROP = {"nodrop": None} | {m: DropConfig(m, (1, 2, 3), (1.0, 0.75, 0.5, 0.25)) for m in MODES[1:]}
TOL = {"rtol": 1e-4, "atol": 1e-5}
VT = "model.vision_tower.vision_tower."  # the InternVideo2 prefix: no `.encoder.` level, unlike UMT


def golden(name: str, bitwise: bool) -> dict[str, torch.Tensor]:
    """A golden file; `bitwise` skips unless this CPU runs the kernel ISA it was made on."""
    path = DATA / f"{name}.safetensors"
    return load_bitwise_goldens(path) if bitwise else load_file(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("parity_internvideo2") / "ckpt"
    shutil.copytree(DATA / "model_internvideo2", directory)
    train_tiny_tokenizer(directory, vocab_size=512)  # the official run needed none: ids were given
    return directory


@pytest.fixture(scope="module")
def fp32(checkpoint: Path) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def bf16(checkpoint: Path) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(checkpoint, dtype=torch.bfloat16)


def pixels(model: VideoChatFlash, g: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    return model.preprocess(g[f"frames_{kind}"].numpy())  # [8, 3, 224, 224]


def prompt(
    model: VideoChatFlash, g: dict[str, torch.Tensor], tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = g["input_ids"].tolist()
    cut = ids.index(-200)
    return model.embed([ids[:cut], tokens, ids[cut + 1 :]])


def greedy(model: VideoChatFlash, g: dict[str, torch.Tensor], tokens: torch.Tensor, kind: str, mode: str) -> list[int]:
    embeds, span = prompt(model, g, tokens)
    settings = model.generation.override(max_new_tokens=len(g[f"generated_{kind}_{mode}"]))
    return list(model.generate(embeds, span, settings, DROP[mode]))


# -- the checkpoint layout --------------------------------------------------------------------------


def test_tiny_checkpoint_has_the_released_layout(tmp_path: Path) -> None:
    """`vcflash make-tiny-checkpoint --tower internvideo2` writes what the parity checkpoint holds (which the
    official code loaded strictly): the InternVideo2 key set, config.json with auto_map, and it runs."""
    assert cli_main(["make-tiny-checkpoint", str(tmp_path / "ckpt"), "--tower", "internvideo2"]) == 0
    made = load_file(tmp_path / "ckpt" / "model.safetensors")
    parity = load_file(DATA / "model_internvideo2" / "model.safetensors")
    assert {k: v.shape for k, v in made.items()} == {k: v.shape for k, v in parity.items()}
    vision = sorted(k.removeprefix(VT) for k in made if k.startswith(VT))
    assert len(vision) == 5 + 2 * 13 and not any(k.startswith("encoder.") for k in vision)
    assert made[VT + "patch_embed.proj.weight"].shape == (64, 3, 1, 14, 14)
    assert made[VT + "pos_embed"].shape == (1, 1 + 4 * 16 * 16, 64)  # cls + 4 frames of 16 x 16
    assert made[VT + "img_pos_embed"].shape == (1, 1 + 16 * 16, 64)
    config = VideoChatFlash.from_pretrained(tmp_path / "ckpt").config
    assert config.extra["auto_map"]["AutoModel"] == "modeling_videochat_flash.VideoChatFlashQwenForCausalLM"
    assert config.extra["mm_vision_tower"] == "internvideo2" and config.vision.tower == "internvideo2"


def test_internvideo2_runs_at_224_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["make-tiny-checkpoint", str(tmp_path / "x"), "--tower", "internvideo2", "--res", "448"]) != 0
    assert "224 px only" in capsys.readouterr().err


def test_encoder_is_the_internvideo2_tower(fp32: VideoChatFlash) -> None:
    assert isinstance(fp32.vision_tower, InternVideo2Encoder)
    assert fp32.kernels == Kernels("conv3d", "origin", "sdpa")
    assert fp32.config.vision.tokens_per_clip == 1024 and fp32.config.tokens_per_clip == 64
    with pytest.raises(ValueError, match="clips of 4 frames"):
        fp32.vision_tower(torch.zeros(1, 1, 3, 224, 224))


# -- float32: close on any CPU, bit for bit on the goldens' one ---------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_float32_tower_merge_projector_and_texts(kind: str, fp32: VideoChatFlash) -> None:
    g = golden("golden_internvideo2", bitwise=False)
    x = pixels(fp32, g, kind)
    if kind == "noise":
        assert torch.equal(x[0], g["pixel_values_noise_f0"])  # the official processor, bit for bit
    with torch.no_grad():
        torch.testing.assert_close(fp32.vision_tower(x.reshape(2, 4, 3, 224, 224)), g[f"vision_out_{kind}"], **TOL)
    # Merge from the official features: each stage starts from the official input (ToMe's argmax margins).
    merged, size = merge_clip_tokens(g[f"vision_out_{kind}"], 64, num_heads=4)
    torch.testing.assert_close(merged, g[f"merged_{kind}"], **TOL)
    assert torch.equal(size, g[f"merged_size_{kind}"])
    tokens = fp32.encode_clips(x)
    torch.testing.assert_close(tokens, g[f"tokens_{kind}"], **TOL)
    for mode in MODES:
        embeds, span = prompt(fp32, g, g[f"tokens_{kind}"])
        with torch.no_grad():
            last = fp32.llm(embeds, None, span, DROP[mode])[0, -1]
        torch.testing.assert_close(last, g[f"logits_last_{kind}_{mode}"], **TOL)
        assert greedy(fp32, g, g[f"tokens_{kind}"], kind, mode) == g[f"generated_{kind}_{mode}"].tolist(), mode


@pytest.mark.parametrize("kind", KINDS)
def test_float32_exact_kernels_are_bitwise_official(kind: str, fp32: VideoChatFlash) -> None:
    g = golden("golden_internvideo2", bitwise=True)
    x = pixels(fp32, g, kind)
    with torch.no_grad():
        assert torch.equal(fp32.vision_tower(x.reshape(2, 4, 3, 224, 224)), g[f"vision_out_{kind}"])
    tokens = fp32.encode_clips(x)
    assert torch.equal(tokens, g[f"tokens_{kind}"])
    embeds, span = prompt(fp32, g, tokens)
    for mode in MODES:
        with torch.no_grad():  # the whole prefill, as the official forward computes it
            logits = fp32.llm(embeds, None, span, DROP[mode], last_only=False)[0]
        assert torch.equal(logits[-1], g[f"logits_last_{kind}_{mode}"]), mode
        if f"logits_{kind}_{mode}" in g:
            assert torch.equal(logits, g[f"logits_{kind}_{mode}"])
        assert greedy(fp32, g, tokens, kind, mode) == g[f"generated_{kind}_{mode}"].tolist(), mode


# -- bfloat16: bit for bit with the exact kernels ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_visual_tokens_are_bitwise_official(kind: str, bf16: VideoChatFlash) -> None:
    g = golden("golden_bf16_internvideo2", bitwise=True)
    x = pixels(bf16, g, kind)
    with torch.no_grad():
        assert torch.equal(bf16.vision_tower(x.reshape(2, 4, 3, 224, 224).to(torch.bfloat16)), g[f"vision_out_{kind}"])
    tokens = bf16.encode_clips(x)
    assert tokens.dtype == torch.bfloat16
    assert torch.equal(tokens, g[f"tokens_{kind}"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_greedy_texts_are_official(kind: str, mode: str, bf16: VideoChatFlash) -> None:
    g = golden("golden_bf16_internvideo2", bitwise=True)
    tokens = bf16.encode_clips(pixels(bf16, g, kind))
    embeds, span = prompt(bf16, g, tokens)
    with torch.no_grad():
        last = bf16.llm(embeds, None, span, DROP[mode])[0, -1]
    assert torch.equal(last, g[f"logits_last_{kind}_{mode}"])
    assert greedy(bf16, g, tokens, kind, mode) == g[f"generated_{kind}_{mode}"].tolist()


def test_fast_kernels_run_and_stay_close_in_float32(checkpoint: Path) -> None:
    fast = VideoChatFlash.from_pretrained(checkpoint, kernels="fast")
    assert fast.kernels == Kernels("conv2d", "sdpa", "sdpa")
    g = golden("golden_internvideo2", bitwise=False)
    with torch.no_grad():
        features = fast.vision_tower(pixels(fast, g, "scene").reshape(2, 4, 3, 224, 224))
    torch.testing.assert_close(features, g["vision_out_scene"], **TOL)


# -- the released checkpoint: config and every key and shape, on the meta device ---------------------


def released_internvideo2_config() -> dict:
    """VideoChat-Flash-Qwen2_5-7B_InternVideo2-1B's config.json: the lines seen in the release (mm_vision_tower,
    select layer, model_type, heads, layers, kv heads, auto_map) and the Qwen2.5-7B-Instruct sizes
    (checkpoint_configs.md, section 5)."""
    return {
        "architectures": ["VideoChatFlashQwenForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_videochat_flash.VideoChatFlashQwenConfig",
            "AutoModel": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM",
        },
        "model_type": "videochat_flash_qwen",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": 152064,
        "mm_hidden_size": 1408,
        "mm_local_num_frames": 4,
        "mm_newline_position": "nothing",
        "mm_patch_merge_type": "spatial_nopad",
        "mm_projector_type": "tome16_mlp_hd64",
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "internvideo2",
        "mm_llm_compress": False,
        "llm_compress_type": "attention",
        "llm_compress_layer_list": [8, 16, 24],
        "llm_image_token_ratio_list": [1.0, 0.5, 0.25, 0.125],
        "tokenizer_model_max_length": 32768,
        "vision_encode_type": "video_image",
        "frame_aspect_ratio": "square",
        "frame_grid_pinpoints": None,
    }


def released_internvideo2_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of the released checkpoint and its shape, written out from internvideo2_tower.md. The parity
    harness built the official model at this size on the meta device (`make_goldens.py keys-internvideo2`) and
    found exactly these 855 keys and shapes, 8,620,852,736 parameters."""
    d, f, v, kv, c, m = 3584, 18944, 152064, 4 * 128, 1408, 6144
    keys: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    keys["lm_head.weight"] = (v, d)
    for i in range(28):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        keys |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,)}
        keys |= {p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,)}
        keys |= {p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,)}
        keys |= {p + "self_attn.o_proj.weight": (d, d)}
        keys |= {
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    keys |= {VT + "cls_token": (1, 1, c), VT + "pos_embed": (1, 1025, c), VT + "img_pos_embed": (1, 257, c)}
    keys |= {VT + "patch_embed.proj.weight": (c, 3, 1, 14, 14), VT + "patch_embed.proj.bias": (c,)}
    for i in range(39):
        p = f"{VT}blocks.{i}."
        keys |= {p + "norm1.weight": (c,), p + "attn.qkv.weight": (3 * c, c)}
        keys |= {p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,)}
        keys |= {p + "attn.q_norm.weight": (c,), p + "attn.k_norm.weight": (c,), p + "ls1.weight": (c,)}
        keys |= {p + "norm2.weight": (c,), p + "mlp.fc1.weight": (m, c), p + "mlp.fc1.bias": (m,)}
        keys |= {p + "mlp.fc2.weight": (c, m), p + "mlp.fc2.bias": (c,), p + "ls2.weight": (c,)}
    keys |= {"model.mm_projector.mlp.0.weight": (d, c), "model.mm_projector.mlp.0.bias": (d,)}
    keys |= {"model.mm_projector.mlp.2.weight": (d, d), "model.mm_projector.mlp.2.bias": (d,)}
    return keys


def test_released_config() -> None:
    config = VideoChatFlashConfig.from_dict(released_internvideo2_config())
    assert config.vision == VisionConfig.internvideo2_1b()
    v = config.vision
    assert (v.tower, v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == ("internvideo2", 1408, 39, 16)
    assert (v.intermediate_size, v.patch_size, v.image_size, v.grid, v.tokens_per_clip) == (6144, 14, 224, 16, 1024)
    assert (config.mm_hidden_size, config.tokens_per_clip, config.text.hidden_size) == (1408, 64, 3584)
    out = config.to_dict()
    assert out["mm_vision_tower"] == "internvideo2" and "mm_vision_config" not in out
    assert VideoChatFlashConfig.from_dict(out) == config
    # before the "support transformers 4.57" commit the release said model_type qwen2
    assert VideoChatFlashConfig.from_dict(released_internvideo2_config() | {"model_type": "qwen2"}) == config


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"mm_hidden_size": 1024}, ["mm_hidden_size 1024", "1408"]),
        ({"mm_vision_select_layer": -1}, ["mm_vision_select_layer", "-2"]),
        ({"mm_local_num_frames": 8}, ["mm_local_num_frames 8"]),
        ({"mm_vision_tower": "internvideo2-6b-siglip"}, None),  # the official builder takes it as internvideo2
    ],
)
def test_released_config_changes(change: dict, words: list[str] | None) -> None:
    if words is None:
        assert VideoChatFlashConfig.from_dict(released_internvideo2_config() | change).vision.tower == "internvideo2"
        return
    with pytest.raises(ValueError) as info:
        VideoChatFlashConfig.from_dict(released_internvideo2_config() | change)
    for word in words:
        assert word in str(info.value)


def test_released_keys_and_shapes_are_accepted_on_the_meta_device() -> None:
    config = VideoChatFlashConfig.from_dict(released_internvideo2_config())
    with torch.device("meta"):
        model = VideoChatFlashModel(config).to(torch.bfloat16)
        stored = {k: torch.empty(shape, dtype=torch.bfloat16) for k, shape in released_internvideo2_keys().items()}
    assert len(stored) == 855 and sum(t.numel() for t in stored.values()) == 8_620_852_736
    sources = check_weights(model, stored)
    assert sorted(sources.values()) == sorted(stored)  # every stored tensor is used, none is missing
    assert sum(p.numel() for p in model.parameters()) == 8_620_852_736
    assert official_key("vision_tower.blocks.38.ls2.weight", "internvideo2") == VT + "blocks.38.ls2.weight"
    # UMT's prefix (with `.encoder.`) is not this checkpoint's
    umt_named = {k.replace(VT, VT + "encoder.") if k.startswith(VT) else k: t for k, t in stored.items()}
    with pytest.raises(CheckpointError, match=r"missing \(512\).*unexpected \(512\)"):
        check_weights(model, umt_named)
    # one block short (the official select layer -2 builds 39 of 40)
    short = {k: t for k, t in stored.items() if ".blocks.38." not in k}
    with pytest.raises(CheckpointError, match=r"missing \(13\): model\.vision_tower\.vision_tower\.blocks\.38\."):
        check_weights(model, short)
