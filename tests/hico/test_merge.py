"""ToMe merge: the official schedule, token counts, sizes and output order."""

import pytest
import torch

from hico.merge import bipartite_soft_matching, merge_clip_tokens, merge_schedule, merge_wavg


def test_schedule_448_and_224() -> None:
    assert merge_schedule(4 * 28 * 28, 64) == [1568, 784, 392, 196, 98, 34]
    assert merge_schedule(4 * 14 * 14, 64) == [392, 196, 98, 34]


@pytest.mark.parametrize("bad", [0, 784, 900])
def test_schedule_rejects_targets_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="merge target"):
        merge_schedule(784, bad)


@pytest.mark.parametrize("tokens", [784, 3136])
def test_clip_merges_to_64_tokens_with_sizes_summing_to_all_patches(tokens: int) -> None:
    x = torch.randn(3, tokens, 64, generator=torch.Generator().manual_seed(0))
    merged, size = merge_clip_tokens(x, 64, num_heads=4)
    assert merged.shape == (3, 64, 64)
    assert size.shape == (3, 64, 1)
    assert torch.equal(size.sum(dim=(1, 2)), torch.full((3,), float(tokens)))
    assert (size >= 1).all()


def test_merge_is_a_size_weighted_average() -> None:
    # Sizes-weighted averages preserve the size-weighted total of every channel.
    x = torch.randn(2, 784, 32, generator=torch.Generator().manual_seed(1))
    merged, size = merge_clip_tokens(x, 64, num_heads=4)
    torch.testing.assert_close((merged * size).sum(1), x.sum(1), rtol=1e-4, atol=1e-3)


def test_one_step_order_and_pairing_by_hand() -> None:
    # Tokens 0..5: sources are even (0, 2, 4), destinations odd (1, 3, 5).
    # Source 4 is identical to destination 1 (best match), source 0 close to 3, source 2 far from all.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -0.2], [0.9, 0.1], [0.0, 1.0], [0.5, -0.5]]])
    merge = bipartite_soft_matching(metric, r=1)
    x = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1) + 10  # values 10..15
    out = merge(x)
    # Unmerged sources first, by descending similarity (0 then 2), then all destinations in order
    # with source 4 (value 14) summed into destination 1 (value 11).
    assert out.flatten().tolist() == [10.0, 12.0, 11.0 + 14.0, 13.0, 15.0]

    avg, size = merge_wavg(merge, x, torch.ones_like(x))
    assert avg.flatten().tolist() == [10.0, 12.0, 12.5, 13.0, 15.0]
    assert size.flatten().tolist() == [1.0, 1.0, 2.0, 1.0, 1.0]


def test_r_is_capped_at_half_and_zero_is_a_no_op() -> None:
    metric = torch.randn(1, 7, 4)
    x = torch.randn(1, 7, 3)
    assert bipartite_soft_matching(metric, 100)(x).shape == (1, 4, 3)  # 7 // 2 = 3 merged
    assert bipartite_soft_matching(metric, 0)(x) is x
