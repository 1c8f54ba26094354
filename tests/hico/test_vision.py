"""UMT encoder pieces: position table, patch embedding, attention, clip independence."""

import math

import pytest
import torch
import torch.nn.functional as F

from hico.checkpoint import init_random_
from hico.config import preset
from hico.vision import PatchEmbed, UMTEncoder, clip_position_table, sinusoid_table


def test_sinusoid_values_by_hand() -> None:
    table = sinusoid_table(10, 8)
    pos = 7  # dims 4 (sin) and 5 (cos) share the frequency 10000^(-4/8)
    angle = pos / 10000 ** (4 / 8)
    assert math.isclose(table[pos, 4].item(), math.sin(angle), rel_tol=1e-6)
    assert math.isclose(table[pos, 5].item(), math.cos(angle), rel_tol=1e-6)
    assert table[0, 0::2].abs().max() == 0 and torch.all(table[0, 1::2] == 1)


def test_position_table_224_is_the_plain_table_and_448_is_interpolated() -> None:
    v224, v448 = preset("tiny", 224).vision, preset("tiny", 448).vision
    t224 = clip_position_table(v224)
    assert torch.equal(t224, sinusoid_table(4 * 196, 64))
    t448 = clip_position_table(v448)
    assert t448.shape == (4 * 784, 64)
    # Each frame's 14x14 block is resized on its own: frame 1 at 448 is the resize of frame 1 at 224.
    frame1 = t224[196:392].reshape(14, 14, 64).permute(2, 0, 1)[None]
    expected = F.interpolate(frame1, size=(28, 28), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(t448[784:1568], expected.reshape(784, 64))


def test_patch_embed_equals_the_checkpoints_conv3d() -> None:
    cfg = preset("tiny", 224).vision
    embed = PatchEmbed(cfg)
    init_random_(embed, seed=1)
    frames = torch.randn(2, 4, 3, 224, 224)
    ours = embed(frames)
    ref = embed.proj(frames.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)  # [B, C, T, h, w] -> (t, h, w)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_attention_uses_q_and_v_bias_and_no_k_bias() -> None:
    enc = UMTEncoder(preset("tiny", 224).vision)
    init_random_(enc, seed=2)
    attn = enc.blocks[0].attn
    x = torch.randn(1, 10, 64)
    c, h = 64, 4
    q = F.linear(x, attn.qkv.weight[:c], attn.q_bias)
    k = F.linear(x, attn.qkv.weight[c : 2 * c])
    v = F.linear(x, attn.qkv.weight[2 * c :], attn.v_bias)
    q, k, v = (t.reshape(1, 10, h, 16).transpose(1, 2) for t in (q, k, v))
    w = ((q * 16**-0.5) @ k.transpose(-1, -2)).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(1, 10, c))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_clips_are_encoded_independently() -> None:
    enc = UMTEncoder(preset("tiny", 224).vision).eval()
    init_random_(enc, seed=3)
    clips = torch.randn(3, 4, 3, 224, 224)
    with torch.no_grad():
        batched = enc(clips)
        single = torch.cat([enc(clips[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, 4 * 196, 64)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_vision_kernels_agree_in_float32_and_unknown_names_are_refused() -> None:
    enc = UMTEncoder(preset("tiny", 224).vision).eval()
    init_random_(enc, seed=4)
    clips = torch.randn(2, 4, 3, 224, 224)
    with torch.no_grad():
        exact = enc(clips)  # the defaults: Conv3d and the official attention formulation
        enc.set_kernels("conv2d", "sdpa")
        fast = enc(clips)
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patch embedding 'conv1d'"):
        enc.set_kernels("conv1d", "sdpa")
    with pytest.raises(ValueError, match="attention 'flash_v3'"):
        enc.set_kernels("conv3d", "flash_v3")
