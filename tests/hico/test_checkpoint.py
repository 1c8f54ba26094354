"""Checkpoints in the official VideoChat-Flash layout: what the tiny one holds, loading it, and every way
loading can fail (each error must name what is wrong)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hico import VideoChatFlash
from hico.checkpoint import CheckpointError, make_tiny_checkpoint, official_key
from hico.config import DropConfig, VideoChatFlashConfig, preset
from hico.prompt import PromptVideo, build_prompt
from hico.tokenizer import TokenizerLoadError

OFFICIAL_PREFIXES = (
    "model.embed_tokens.",
    "model.layers.",
    "model.norm.",
    "lm_head.",
    "model.vision_tower.vision_tower.encoder.",
    "model.mm_projector.mlp.",
)
VT = "model.vision_tower.vision_tower.encoder."
TOKENIZER_FILES = {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
QUESTION = "What happens in the video?"
# auto_map of every released config.json (checkpoint_configs.md), written out so a change to ours shows.
RELEASED_AUTO_MAP = {
    "AutoConfig": "modeling_videochat_flash.VideoChatFlashQwenConfig",
    "AutoModel": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM",
}


def frames(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 48, 3), dtype=np.uint8)


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors") -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / name, metadata={"format": "pt"})


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny224"), res=224, seed=0)


@pytest.fixture(scope="module")
def ckpt448(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny448"), res=448, seed=0)


@pytest.fixture(scope="module")
def file_weights(ckpt224: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt224 / "model.safetensors")


@pytest.fixture(scope="module")
def model224(ckpt224: Path) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(ckpt224)


@pytest.fixture
def ckpt_copy(ckpt224: Path, tmp_path: Path) -> Path:
    """A private copy of the 224 checkpoint that a test may corrupt."""
    return Path(shutil.copytree(ckpt224, tmp_path / "ckpt"))


def assert_matches_file(model: VideoChatFlash, weights: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert len(state) == len(weights)  # lm_head is in both (tied in the model, stored in the file)
    for name, value in state.items():
        expected = weights[official_key(name)].to(value.dtype)
        assert value.shape == expected.shape, name
        assert torch.equal(value, expected), name


# -- layout ---------------------------------------------------------------------------------------


def test_file_set(ckpt224: Path) -> None:
    names = {p.name for p in ckpt224.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors"} | TOKENIZER_FILES


def test_keys_use_exactly_the_official_prefixes(file_weights: dict[str, torch.Tensor]) -> None:
    keys = list(file_weights)
    unmatched = [k for k in keys if not k.startswith(OFFICIAL_PREFIXES)]
    assert unmatched == []
    for prefix in OFFICIAL_PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert not any("pos_embed" in k for k in keys)  # the sinusoid table is computed, never stored
    assert not any(k.startswith(("vision_tower.", "llm.", "mm_projector.")) for k in keys)  # no internal names
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert "model.mm_projector.mlp.0.weight" in keys and "model.mm_projector.mlp.2.weight" in keys


def test_block_and_layer_counts(file_weights: dict[str, torch.Tensor]) -> None:
    blocks = {int(m[1]) for k in file_weights if (m := re.match(re.escape(VT) + r"blocks\.(\d+)\.", k))}
    layers = {int(m[1]) for k in file_weights if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    assert blocks == {0, 1}
    assert layers == {0, 1, 2, 3}
    # each decoder layer is a full Qwen2 layer, with q/k/v biases and no o_proj bias
    layer0 = {k.removeprefix("model.layers.0.") for k in file_weights if k.startswith("model.layers.0.")}
    assert layer0 == {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
    }
    assert file_weights["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads of 16


def test_vision_attention_has_q_and_v_bias_only(file_weights: dict[str, torch.Tensor]) -> None:
    for b in (0, 1):
        attn = f"{VT}blocks.{b}.attn."
        assert file_weights[attn + "q_bias"].shape == (64,)
        assert file_weights[attn + "v_bias"].shape == (64,)
        assert file_weights[attn + "qkv.weight"].shape == (192, 64)
        assert attn + "k_bias" not in file_weights
        assert attn + "qkv.bias" not in file_weights
    assert not any(k.endswith("k_bias") for k in file_weights)


def test_patch_embed_is_a_1x16x16_conv3d(file_weights: dict[str, torch.Tensor]) -> None:
    assert file_weights[VT + "patch_embed.proj.weight"].shape == (64, 3, 1, 16, 16)
    assert file_weights[VT + "patch_embed.proj.bias"].shape == (64,)


def test_lm_head_stored_and_equal_to_embed_tokens(file_weights: dict[str, torch.Tensor]) -> None:
    assert file_weights["lm_head.weight"].shape == (512, 64)
    assert torch.equal(file_weights["lm_head.weight"], file_weights["model.embed_tokens.weight"])
    assert all(v.dtype == torch.float32 for v in file_weights.values())


def test_random_weights_are_not_trivial(file_weights: dict[str, torch.Tensor]) -> None:
    """init_random_ promises no zero biases and no unit norms, so loading bugs cannot hide."""
    for key, value in file_weights.items():
        assert value.std() > 0, key
        if key.endswith("bias"):
            assert value.abs().max() > 0, key
        if "norm" in key and key.endswith("weight"):
            assert not torch.allclose(value, torch.ones_like(value)), key


@pytest.mark.parametrize(("res", "tower"), [(224, "umt-large"), (448, "umt-hd-large")])
def test_config_json(res: int, tower: str, ckpt224: Path, ckpt448: Path) -> None:
    directory = ckpt224 if res == 224 else ckpt448
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "videochat_flash_qwen"
    assert config["architectures"] == ["VideoChatFlashQwenForCausalLM"]
    assert config["mm_vision_tower"] == tower
    assert config["mm_projector_type"] == "tome16_mlp_hd64"
    assert config["mm_hidden_size"] == 64
    assert config["mm_vision_config"] == {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "patch_size": 16,
        "image_size": res,
    }
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 4, 512)
    assert config["tie_word_embeddings"] is True
    assert config["mm_llm_compress"] is False
    assert VideoChatFlashConfig.from_dict(config) == preset("tiny", image_size=res)


@pytest.mark.parametrize("res", [224, 448])
def test_config_json_carries_the_released_auto_map(res: int, ckpt224: Path, ckpt448: Path) -> None:
    """Tools that read auto_map (AutoConfig, the hub) see the layout of the released files, no remote-code prompt."""
    config = json.loads(((ckpt224 if res == 224 else ckpt448) / "config.json").read_text())
    assert config["auto_map"] == RELEASED_AUTO_MAP


def test_generation_config_json(ckpt224: Path) -> None:
    generation = json.loads((ckpt224 / "generation_config.json").read_text())
    assert generation["repetition_penalty"] == 1.1
    assert generation["eos_token_id"] == [511, 509]
    assert generation["bos_token_id"] == 509


def test_448_checkpoint_differs_only_in_the_tower_resolution(ckpt224: Path, ckpt448: Path) -> None:
    w224, w448 = load_file(ckpt224 / "model.safetensors"), load_file(ckpt448 / "model.safetensors")
    assert w224.keys() == w448.keys()
    assert all(w224[k].shape == w448[k].shape for k in w224)  # no stored position table to resize


def test_bad_resolution(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="336"):
        make_tiny_checkpoint(tmp_path / "x", res=336)
    assert not (tmp_path / "x").exists()


# -- loading ----------------------------------------------------------------------------------------


def test_round_trip_every_parameter_equals_the_file(model224: VideoChatFlash, file_weights) -> None:
    assert_matches_file(model224, file_weights)
    assert model224.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model224.parameters())
    assert not model224.training
    assert model224.config == preset("tiny", image_size=224)
    assert model224.generation.repetition_penalty == 1.1
    assert model224.generation.eos_token_ids == (511, 509)


def test_tied_lm_head_shares_embed_tokens(model224: VideoChatFlash, file_weights) -> None:
    lm_head, embed = model224.llm.lm_head.weight, model224.llm.model.embed_tokens.weight
    assert lm_head.data_ptr() == embed.data_ptr()
    assert torch.equal(lm_head, file_weights["model.embed_tokens.weight"])
    logits = model224.logits(model224.encode_clips(model224.preprocess(frames())), QUESTION, duration_s=4.0)
    assert logits.shape[-1] == 512
    assert torch.isfinite(logits).all()


def test_buffers_are_computed_after_the_meta_build(model224: VideoChatFlash) -> None:
    fresh = VideoChatFlash(preset("tiny", image_size=224))  # built on CPU, buffers from __init__
    loaded = dict(model224.named_buffers())
    for name, value in fresh.named_buffers():
        assert torch.equal(loaded[name], value), name


def test_answer_is_deterministic_and_counts_add_up(model224: VideoChatFlash) -> None:
    video = frames(8)
    a = model224.answer(video, QUESTION, max_new_tokens=2)
    b = model224.answer(video, QUESTION, max_new_tokens=2)
    assert isinstance(a.text, str)
    assert a.token_ids == b.token_ids
    assert 1 <= len(a.token_ids) <= 2
    assert (a.num_frames, a.visual_tokens, a.duration_s) == (8, 2 * 64, 8.0)  # 1 fps assumed for bare frames
    before, after = (model224.tokenize(p) for p in build_prompt(QUESTION, [PromptVideo(8, 8.0)]) if isinstance(p, str))
    assert a.prompt_tokens == len(before) + 128 + len(after)


def test_bf16_load(ckpt224: Path, model224: VideoChatFlash, file_weights) -> None:
    model = VideoChatFlash.from_pretrained(ckpt224, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_matches_file(model, file_weights)  # every tensor is the stored one rounded to bf16
    pixels = model.preprocess(frames())
    tokens16, tokens32 = model.encode_clips(pixels), model224.encode_clips(pixels)
    assert tokens16.dtype == torch.bfloat16 and tokens16.shape == tokens32.shape == (1, 64, 64)
    assert torch.isfinite(tokens16).all()
    torch.testing.assert_close(tokens16.float(), tokens32, atol=0.1, rtol=0.1)
    assert not torch.equal(tokens16.float(), tokens32)  # really computed in bf16
    answer = model.answer(tokens16, QUESTION, duration_s=4.0, max_new_tokens=2)
    assert isinstance(answer.text, str) and 1 <= len(answer.token_ids) <= 2
    logits = model.logits(tokens16, QUESTION, duration_s=4.0)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bf16_stored_checkpoint_loads_as_float32(ckpt_copy: Path, file_weights) -> None:
    """The released checkpoints store bf16; loading them in float32 upcasts exactly."""
    bf16 = {k: v.to(torch.bfloat16) for k, v in file_weights.items()}
    write_weights(ckpt_copy, bf16)
    model = VideoChatFlash.from_pretrained(ckpt_copy, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_matches_file(model, bf16)


def test_same_seed_same_files_other_seed_other_weights(ckpt224: Path, tmp_path: Path) -> None:
    again = make_tiny_checkpoint(tmp_path / "again", res=224, seed=0)
    for name in sorted(p.name for p in ckpt224.iterdir()):
        assert (again / name).read_bytes() == (ckpt224 / name).read_bytes(), name
    other = make_tiny_checkpoint(tmp_path / "other", res=224, seed=1)
    w0, w1 = load_file(ckpt224 / "model.safetensors"), load_file(other / "model.safetensors")
    assert w0.keys() == w1.keys()
    same = [k for k in w0 if torch.equal(w0[k], w1[k])]
    assert same == []
    assert (other / "config.json").read_bytes() == (ckpt224 / "config.json").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (ckpt224 / "tokenizer.json").read_bytes()


def test_loads_without_stored_lm_head(ckpt_copy: Path, file_weights) -> None:
    tensors = dict(file_weights)
    del tensors["lm_head.weight"]
    write_weights(ckpt_copy, tensors)
    model = VideoChatFlash.from_pretrained(ckpt_copy)
    assert_matches_file(model, file_weights)  # lm_head follows embed_tokens
    assert model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr()


def logits_of(model: VideoChatFlash) -> torch.Tensor:
    return model.logits(model.encode_clips(model.preprocess(frames())), QUESTION, duration_s=4.0)


def test_equal_stored_lm_head_loads_silently(ckpt224: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hico.checkpoint")
    VideoChatFlash.from_pretrained(ckpt224)
    assert not [r for r in caplog.records if r.name == "hico.checkpoint"]


def test_a_differing_stored_lm_head_wins_for_both_with_a_warning(
    ckpt_copy: Path, file_weights, model224: VideoChatFlash, caplog: pytest.LogCaptureFixture
) -> None:
    """As transformers 4.40.1 loads the official model (checked on a doctored Qwen2 checkpoint): the tied
    parameter receives embed_tokens, then lm_head, so the stored lm_head is both input and output."""
    tensors = dict(file_weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()
    tensors["lm_head.weight"][7, 3] += 0.5
    write_weights(ckpt_copy, tensors)
    caplog.set_level(logging.WARNING, logger="hico.checkpoint")
    model = VideoChatFlash.from_pretrained(ckpt_copy)
    lines = [r.getMessage() for r in caplog.records if r.name == "hico.checkpoint"]
    assert len(lines) == 1
    assert "lm_head.weight differs from model.embed_tokens.weight" in lines[0]
    assert "max abs difference 0.5" in lines[0]
    assert model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.llm.model.embed_tokens.weight, tensors["lm_head.weight"])
    assert not torch.equal(logits_of(model), logits_of(model224))


def test_stored_lm_head_of_another_shape_is_ignored_with_a_warning(
    ckpt_copy: Path, file_weights, caplog: pytest.LogCaptureFixture
) -> None:
    write_weights(ckpt_copy, dict(file_weights) | {"lm_head.weight": torch.zeros(500, 64)})
    caplog.set_level(logging.WARNING, logger="hico.checkpoint")
    model = VideoChatFlash.from_pretrained(ckpt_copy)
    assert any("[500, 64]" in r.getMessage() for r in caplog.records if r.name == "hico.checkpoint")
    assert torch.equal(model.llm.lm_head.weight, file_weights["model.embed_tokens.weight"])


def test_loads_sharded_checkpoint(ckpt_copy: Path, file_weights) -> None:
    keys = sorted(file_weights)
    shards = {
        "model-00001-of-00002.safetensors": [k for k in keys if k.startswith("model.vision_tower.")],
        "model-00002-of-00002.safetensors": [k for k in keys if not k.startswith("model.vision_tower.")],
    }
    for name, shard_keys in shards.items():
        write_weights(ckpt_copy, {k: file_weights[k] for k in shard_keys}, name)
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in file_weights.values())},
        "weight_map": {k: name for name, shard_keys in shards.items() for k in shard_keys},
    }
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt_copy / "model.safetensors").unlink()
    model = VideoChatFlash.from_pretrained(ckpt_copy)
    assert_matches_file(model, file_weights)


# -- errors -----------------------------------------------------------------------------------------


def test_truncated_safetensors(ckpt_copy: Path) -> None:
    path = ckpt_copy / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointError) as info:
        VideoChatFlash.from_pretrained(ckpt_copy)
    assert str(path) in str(info.value)
    assert "truncated or corrupt" in str(info.value)


def test_zero_byte_safetensors(ckpt_copy: Path) -> None:
    path = ckpt_copy / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        VideoChatFlash.from_pretrained(ckpt_copy)


def test_missing_weights_file(ckpt_copy: Path) -> None:
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        VideoChatFlash.from_pretrained(ckpt_copy)
    assert str(ckpt_copy) in str(info.value) and "model.safetensors" in str(info.value)


def test_missing_config(ckpt_copy: Path) -> None:
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError) as info:
        VideoChatFlash.from_pretrained(ckpt_copy)
    assert str(ckpt_copy) in str(info.value) and "config.json" in str(info.value)


def test_config_not_json(ckpt_copy: Path) -> None:
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt_copy / "config.json"))):
        VideoChatFlash.from_pretrained(ckpt_copy)


def test_llama_config_is_refused(ckpt_copy: Path) -> None:
    path = ckpt_copy / "config.json"
    path.write_text(
        json.dumps(json.loads(path.read_text()) | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(CheckpointError) as info:
        VideoChatFlash.from_pretrained(ckpt_copy)
    message = str(info.value)
    assert str(path) in message
    assert "model_type" in message and "llama" in message and "LlamaForCausalLM" in message


def test_missing_key(ckpt_copy: Path, file_weights) -> None:
    key = "model.layers.2.mlp.up_proj.weight"
    write_weights(ckpt_copy, {k: v for k, v in file_weights.items() if k != key})
    with pytest.raises(CheckpointError) as info:
        VideoChatFlash.from_pretrained(ckpt_copy)
    assert "missing" in str(info.value) and key in str(info.value)
    assert "unexpected" not in str(info.value)


def test_unexpected_key(ckpt_copy: Path, file_weights) -> None:
    key = "model.layers.9.self_attn.q_proj.weight"
    write_weights(ckpt_copy, file_weights | {key: torch.zeros(64, 64)})
    with pytest.raises(CheckpointError) as info:
        VideoChatFlash.from_pretrained(ckpt_copy)
    assert "unexpected" in str(info.value) and key in str(info.value)
    assert "missing" not in str(info.value)


def test_wrong_shape(ckpt_copy: Path, file_weights) -> None:
    key = "model.mm_projector.mlp.2.weight"
    write_weights(ckpt_copy, file_weights | {key: torch.zeros(64, 32)})
    with pytest.raises(CheckpointError) as info:
        VideoChatFlash.from_pretrained(ckpt_copy)
    message = str(info.value)
    assert key in message and "[64, 32]" in message and "[64, 64]" in message


def test_448_weights_under_a_224_config_load(ckpt_copy: Path, ckpt448: Path) -> None:
    """No tensor depends on the resolution, so this is not an error (the position table is computed)."""
    shutil.copy(ckpt448 / "model.safetensors", ckpt_copy / "model.safetensors")
    model = VideoChatFlash.from_pretrained(ckpt_copy)
    assert model.config.vision.image_size == 224
    assert model.vision_tower.pos_embed.shape[-2:] == (4 * 14 * 14, 64)  # 4 frames of a 14 x 14 grid
    assert model.encode_clips(model.preprocess(frames())).shape == (1, 64, 64)


def test_missing_shard(ckpt_copy: Path, file_weights) -> None:
    keys = sorted(file_weights)
    half = len(keys) // 2
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys[:half]}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in keys[half:]}
    write_weights(ckpt_copy, {k: file_weights[k] for k in keys[:half]}, "model-00001-of-00002.safetensors")
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError) as info:
        VideoChatFlash.from_pretrained(ckpt_copy)
    assert "model-00002-of-00002.safetensors" in str(info.value)
    assert "model-00001-of-00002.safetensors" not in str(info.value)
    assert str(ckpt_copy) in str(info.value)


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}'], ids=["not-json", "no-weight-map"])
def test_corrupt_shard_index(ckpt_copy: Path, content: str) -> None:
    index = ckpt_copy / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(CheckpointError, match=re.escape(str(index))):
        VideoChatFlash.from_pretrained(ckpt_copy)


@pytest.mark.parametrize("dtype", ["int8", torch.int64, torch.float64, "float8"])
def test_bad_dtype(ckpt224: Path, dtype: object) -> None:
    with pytest.raises(TypeError, match=re.escape(str(dtype).removeprefix("torch."))):
        VideoChatFlash.from_pretrained(ckpt224, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float16", "fp16", torch.float16])
def test_float16_names(ckpt224: Path, dtype: object) -> None:
    model = VideoChatFlash.from_pretrained(ckpt224, dtype=dtype)
    assert model.dtype == torch.float16


def test_nonexistent_local_path(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        VideoChatFlash.from_pretrained(path)


def test_a_file_is_not_a_checkpoint(ckpt224: Path) -> None:
    path = ckpt224 / "config.json"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        VideoChatFlash.from_pretrained(path)


def test_hub_id_offline_without_cache(tmp_path: Path) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE and HF_HOME at import, so this runs in a fresh interpreter."""
    hub_id = "OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448"
    code = (
        "import sys\n"
        "from hico.checkpoint import CheckpointError\n"
        "from hico import VideoChatFlash\n"
        "try:\n"
        "    VideoChatFlash.from_pretrained(sys.argv[1])\n"
        "except CheckpointError as e:\n"
        "    print(e)\n"
        "    sys.exit(3)\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("TRANSFORMERS_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", code, hub_id], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert hub_id in result.stdout
    assert "HF_HUB_OFFLINE" in result.stdout
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


def test_tokenizer_files_removed(ckpt_copy: Path) -> None:
    for name in TOKENIZER_FILES:
        (ckpt_copy / name).unlink()
    with pytest.raises(TokenizerLoadError, match=re.escape(str(ckpt_copy))):
        VideoChatFlash.from_pretrained(ckpt_copy)


# -- config -----------------------------------------------------------------------------------------


def released_2b_config() -> dict:
    """The shape of VideoChat-Flash-Qwen2_5-2B_res448's config.json (values from the release)."""
    return {
        "architectures": ["VideoChatFlashQwenForCausalLM"],
        "auto_map": RELEASED_AUTO_MAP,
        "model_type": "videochat_flash_qwen",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
        "image_aspect_ratio": "anyres_nopad",
        "mm_hidden_size": 1024,
        "mm_local_num_frames": 4,
        "mm_newline_position": "nothing",
        "mm_patch_merge_type": "spatial_nopad",
        "mm_projector_lr": None,
        "mm_projector_type": "tome16_mlp_hd64",
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "umt-hd-large",
        "mm_llm_compress": False,
        "llm_compress_type": "attention",
        "llm_compress_layer_list": [24],
        "llm_image_token_ratio_list": [1.0, 0.5],
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
        "vision_encode_type": "video_image",
        "frame_aspect_ratio": "square",
        "frame_grid_pinpoints": None,
        "mm_pos_num_frames": 8,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "use_pos_skipping": False,
        "pos_skipping_range": 4096,
    }


def released_1m_config() -> dict:
    """VideoChat-Flash-Qwen2_5-7B-1M_res224's config.json: the 2B's keys with these values."""
    return released_2b_config() | {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000000.0,
        "max_position_embeddings": 1010000,
        "dual_chunk_attention_config": {
            "chunk_size": 262144,
            "local_size": 8192,
            "original_max_position_embeddings": 262144,
        },
        "max_window_layers": 28,
        "tie_word_embeddings": False,
        "mm_vision_tower": "umt-large",
        "llm_compress_layer_list": [8, 16, 24],
        "llm_image_token_ratio_list": [1.0, 0.5, 0.25, 0.125],
    }


def test_released_2b_config() -> None:
    config = VideoChatFlashConfig.from_dict(released_2b_config())
    v, t = config.vision, config.text
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size) == (1024, 23, 16, 448)
    assert (v.intermediate_size, v.patch_size, v.num_frames, v.grid, v.tokens_per_clip) == (4096, 16, 4, 28, 3136)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (1536, 28, 12, 2)
    assert (t.vocab_size, t.intermediate_size, t.head_dim, t.rope_theta) == (151936, 8960, 128, 1e6)
    assert t.tie_word_embeddings is True
    assert config.drop is None
    assert (config.mm_hidden_size, config.tokens_per_clip, config.max_length) == (1024, 64, 32768)
    assert (config.bos_token_id, config.eos_token_id) == (151643, 151645)
    assert config == preset("2b")
    out = config.to_dict()
    assert "mm_vision_config" not in out  # the default UMT-L tower is implied by mm_vision_tower
    assert out["image_aspect_ratio"] == "anyres_nopad"  # keys we do not use are kept
    assert VideoChatFlashConfig.from_dict(out) == config


def test_released_1m_config() -> None:
    config = VideoChatFlashConfig.from_dict(released_1m_config())
    assert (config.text.hidden_size, config.text.rope_theta, config.text.rms_norm_eps) == (3584, 1e7, 1e-5)
    assert config.text.max_position_embeddings == 1010000
    assert config.text.tie_word_embeddings is False
    assert config.vision.image_size == 224
    assert config.to_dict()["auto_map"] == RELEASED_AUTO_MAP


def test_released_config_with_compression_on() -> None:
    config = VideoChatFlashConfig.from_dict(released_2b_config() | {"mm_llm_compress": True})
    assert config.drop == DropConfig("attention", (24,), (1.0, 0.5))
    assert config.drop.counts(1024) == [1024, 512]
    assert VideoChatFlashConfig.from_dict(config.to_dict()) == config


def test_compression_layer_beyond_the_llm() -> None:
    d = released_2b_config() | {"mm_llm_compress": True, "llm_compress_layer_list": [30]}
    with pytest.raises(ValueError, match="30"):
        VideoChatFlashConfig.from_dict(d)


def test_1m_config_model_type_qwen2_is_accepted() -> None:
    config = VideoChatFlashConfig.from_dict(released_2b_config() | {"model_type": "qwen2"})
    assert config == preset("2b")


def test_list_eos_takes_the_first() -> None:
    config = VideoChatFlashConfig.from_dict(released_2b_config() | {"eos_token_id": [151645, 151643]})
    assert config.eos_token_id == 151645


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"mm_projector_type": "mlp2x_gelu"}, ["mm_projector_type", "mlp2x_gelu"]),
        ({"mm_vision_tower": "siglip-so400m-patch14-384"}, ["mm_vision_tower", "siglip", "UMT and InternVideo2"]),
        ({"mm_vision_tower": "internvideo2"}, ["mm_hidden_size 1024", "1408"]),  # a UMT config naming the other tower
        ({"model_type": "llama"}, ["model_type", "llama"]),
        ({"architectures": ["Qwen2ForCausalLM"]}, ["architectures", "Qwen2ForCausalLM"]),
        ({"mm_vision_select_layer": -1}, ["mm_vision_select_layer", "-2"]),
        ({"hidden_size": 1000}, ["hidden_size 1000", "num_attention_heads 12"]),
    ],
)
def test_unsupported_configs(change: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        VideoChatFlashConfig.from_dict(released_2b_config() | change)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "supported"),
    [
        ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, "None"),
        ("mm_local_num_frames", 8, "4"),
        ("mm_local_num_frames", 4.0, "4"),
        ("vision_encode_type", "image", "'video_image'"),
        ("mm_patch_merge_type", "unpad", "'spatial_nopad'"),
        ("mm_newline_position", "grid", "'nothing'"),
        ("mm_vision_select_feature", "cls_patch", "'patch'"),
        ("frame_aspect_ratio", "anyres", "'square'"),
        ("frame_grid_pinpoints", [[448, 448]], "None"),
        ("use_sliding_window", True, "False"),
        ("use_pos_skipping", True, "False"),
        ("mm_use_im_start_end", True, "False"),
        ("mm_use_im_patch_token", True, "False"),
        ("hidden_act", "gelu", "'silu'"),
    ],
)
def test_settings_we_do_not_implement_are_refused(key: str, value: object, supported: str) -> None:
    """Config keys the official code acts on are run at the released value or refused, never ignored."""
    with pytest.raises(ValueError) as info:
        VideoChatFlashConfig.from_dict(released_2b_config() | {key: value})
    assert f"unsupported {key} {value!r}: only {supported} is implemented" in str(info.value)


def test_checkpoint_with_rope_scaling_is_refused_at_load(ckpt_copy: Path) -> None:
    path = ckpt_copy / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"rope_scaling": {"type": "yarn", "factor": 4.0}}))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported rope_scaling .*yarn.*plain RoPE"):
        VideoChatFlash.from_pretrained(ckpt_copy)


def test_missing_architectures_is_refused() -> None:
    d = released_2b_config()
    del d["architectures"]
    with pytest.raises(ValueError, match="architectures"):
        VideoChatFlashConfig.from_dict(d)


@pytest.mark.parametrize("res", [224, 448])
def test_tiny_preset_round_trip(res: int) -> None:
    config = preset("tiny", image_size=res)
    d = config.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON
    back = VideoChatFlashConfig.from_dict(d)
    assert back == config
    assert back.vision.image_size == res and back.vision.num_hidden_layers == 2
    assert back.to_dict() == d
