"""The released UMT checkpoints, key for key: each one's tensor names and shapes are accepted by our loader for
its config, with the model built on the meta device (no weights needed; the tensors are zero-strided views).

The key set is the one of the 7B-1M `model.safetensors.index.json` (checkpoint_configs.md, section 4), with
each checkpoint's LLM sizes. Sources: 2B@448 and 7B-1M@224 configs are copies of the released files; the 7B@224
and 7B@448 configs are inferred (Qwen2-7B-Instruct sizes, the 1M's key set; no copy of their files was found).
The InternVideo2-1B variant is in test_parity_internvideo2.py.
"""

import pytest
import torch

from hico.checkpoint import check_weights
from hico.config import VideoChatFlashConfig
from hico.model import VideoChatFlashModel

VT = "model.vision_tower.vision_tower.encoder."
AUTO_MAP = {
    "AutoConfig": "modeling_videochat_flash.VideoChatFlashQwenConfig",
    "AutoModel": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM",
}
MM = {
    "architectures": ["VideoChatFlashQwenForCausalLM"],
    "auto_map": AUTO_MAP,
    "mm_hidden_size": 1024,
    "mm_local_num_frames": 4,
    "mm_pos_num_frames": 8,
    "mm_projector_type": "tome16_mlp_hd64",
    "mm_vision_select_layer": -2,
    "mm_newline_position": "nothing",
    "mm_patch_merge_type": "spatial_nopad",
    "vision_encode_type": "video_image",
    "rope_scaling": None,
    "use_sliding_window": False,
    "tokenizer_model_max_length": 32768,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN2_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
RELEASED = {
    "2B_res448": MM
    | {
        "model_type": "videochat_flash_qwen",
        "mm_vision_tower": "umt-hd-large",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "7B_res224": MM | QWEN2_7B | {"model_type": "videochat_flash_qwen", "mm_vision_tower": "umt-large"},
    "7B_res448": MM | QWEN2_7B | {"model_type": "videochat_flash_qwen", "mm_vision_tower": "umt-hd-large"},
    "7B-1M_res224": MM
    | QWEN2_7B
    | {
        "model_type": "qwen2",
        "mm_vision_tower": "umt-large",
        "rope_theta": 10000000.0,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 1010000,
    },
}
# All parameters, lm_head counted (2B: stored although tied). 7B-1M: the HF API's BF16 count; 2B: its 4.14 GB file.
PARAMETERS = {"2B_res448": 2_071_502_336, "7B_res224": 7_922_617_856, "7B_res448": 7_922_617_856}
PARAMETERS["7B-1M_res224"] = 7_922_617_856


def released_keys(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a released UMT checkpoint (the 1M index's pattern)."""
    d, f, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    keys: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    keys["lm_head.weight"] = (v, d)
    for i in range(layers):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        keys |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,)}
        keys |= {p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,)}
        keys |= {p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,)}
        keys |= {p + "self_attn.o_proj.weight": (d, d), p + "mlp.gate_proj.weight": (f, d)}
        keys |= {p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
    c = 1024
    keys |= {VT + "patch_embed.proj.weight": (c, 3, 1, 16, 16), VT + "patch_embed.proj.bias": (c,)}
    for i in range(23):
        p = f"{VT}blocks.{i}."
        keys |= {p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "attn.qkv.weight": (3 * c, c)}
        keys |= {p + "attn.q_bias": (c,), p + "attn.v_bias": (c,)}
        keys |= {p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,)}
        keys |= {p + "norm2.weight": (c,), p + "norm2.bias": (c,), p + "mlp.fc1.weight": (4 * c, c)}
        keys |= {p + "mlp.fc1.bias": (4 * c,), p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)}
    keys |= {VT + "vision_layernorm.weight": (c,), VT + "vision_layernorm.bias": (c,)}
    keys |= {"model.mm_projector.mlp.0.weight": (d, c), "model.mm_projector.mlp.0.bias": (d,)}
    keys |= {"model.mm_projector.mlp.2.weight": (d, d), "model.mm_projector.mlp.2.bias": (d,)}
    return keys


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_keys_and_shapes_are_accepted_on_the_meta_device(name: str) -> None:
    cfg = RELEASED[name]
    config = VideoChatFlashConfig.from_dict(cfg)
    assert config.vision.image_size == (448 if "448" in name else 224)
    with torch.device("meta"):
        model = VideoChatFlashModel(config).to(torch.bfloat16)
    zero = torch.zeros((), dtype=torch.bfloat16)
    stored = {k: zero.expand(shape) for k, shape in released_keys(cfg).items()}  # no memory; equal tied pair
    assert len(stored) == 646 and sum(t.numel() for t in stored.values()) == PARAMETERS[name]
    sources = check_weights(model, stored)
    used = set(sources.values())
    assert used == set(stored) - ({"lm_head.weight"} if config.text.tie_word_embeddings else set())
    assert len(sources) == len(model.state_dict()) - config.text.tie_word_embeddings  # lm_head follows embed
