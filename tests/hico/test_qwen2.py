"""The Qwen2 decoder: parity with transformers, KV-cache decoding, progressive visual dropout."""

from collections.abc import Iterator

import pytest
import torch
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2ForCausalLM

from hico.checkpoint import init_random_
from hico.config import DropConfig, preset
from hico.drop import keep_visual, uniform_keep
from hico.qwen2 import KVCache, Qwen2ForCausalLM, RotaryEmbedding

CFG = preset("tiny").text
SPAN = torch.arange(5, 45)  # 40 visual tokens after 5 text tokens
SEQ = 60  # 5 text + 40 visual + 15 text


@pytest.fixture(scope="module")
def llm() -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM(CFG)
    init_random_(model, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def embeds(llm: Qwen2ForCausalLM) -> torch.Tensor:
    ids = torch.randint(0, CFG.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(3))
    return llm.model.embed_tokens(ids).detach()


def test_logits_match_transformers_qwen2(llm: Qwen2ForCausalLM) -> None:
    hf_cfg = Qwen2Config(
        vocab_size=CFG.vocab_size,
        hidden_size=CFG.hidden_size,
        intermediate_size=CFG.intermediate_size,
        num_hidden_layers=CFG.num_hidden_layers,
        num_attention_heads=CFG.num_attention_heads,
        num_key_value_heads=CFG.num_key_value_heads,
        rms_norm_eps=CFG.rms_norm_eps,
        rope_theta=CFG.rope_theta,
        max_position_embeddings=CFG.max_position_embeddings,
        tie_word_embeddings=True,
    )
    hf = HFQwen2ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(llm.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, CFG.vocab_size, (1, 33), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = llm(llm.model.embed_tokens(ids), last_only=False)
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_eager_and_sdpa_agree(llm: Qwen2ForCausalLM, embeds: torch.Tensor) -> None:
    with torch.no_grad():
        sdpa = llm(embeds, last_only=False)
        llm.set_attention("eager")
        try:
            eager = llm(embeds, last_only=False)
        finally:
            llm.set_attention("sdpa")
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown attention implementation 'bogus'"):
        llm.set_attention("bogus")


def greedy_cached(llm: Qwen2ForCausalLM, embeds: torch.Tensor, n: int, drop: DropConfig | None) -> list[int]:
    cache = KVCache(CFG.num_hidden_layers, reserve=n)
    tokens = []
    with torch.no_grad():
        logits = llm(embeds, cache, SPAN, drop)
        for _ in range(n):
            tokens.append(int(logits[0, -1].argmax()))
            logits = llm(llm.model.embed_tokens(torch.tensor([[tokens[-1]]])), cache)
    return tokens


def greedy_full(llm: Qwen2ForCausalLM, embeds: torch.Tensor, n: int, drop: DropConfig | None) -> list[int]:
    """No cache: every step re-runs the whole sequence."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            extra = llm.model.embed_tokens(torch.tensor([tokens], dtype=torch.long))
            logits = llm(torch.cat([embeds, extra], dim=1), None, SPAN, drop)
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize(
    "drop", [None, DropConfig("uniform", (1, 3), (1.0, 0.5, 0.25))], ids=["no-drop", "uniform-drop"]
)
def test_cached_greedy_decoding_equals_full_forward(
    llm: Qwen2ForCausalLM, embeds: torch.Tensor, drop: DropConfig | None
) -> None:
    # Uniform survivors do not depend on the query, so a full forward over prompt + answer drops
    # the same tokens as the cached prefill: any cache-length or position bug shows up here.
    assert greedy_cached(llm, embeds, 8, drop) == greedy_full(llm, embeds, 8, drop)


@pytest.fixture
def recorded_positions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[int]]]:
    calls: list[list[int]] = []
    original = RotaryEmbedding.forward

    def record(self: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(positions.tolist())
        return original(self, positions, dtype)

    monkeypatch.setattr(RotaryEmbedding, "forward", record)
    yield calls


@pytest.mark.parametrize("kind", ["uniform", "attention", "uniform0_attention", "uniform1_attention"])
def test_kept_counts_cache_lengths_and_positions(
    llm: Qwen2ForCausalLM, embeds: torch.Tensor, kind: str, recorded_positions: list[list[int]]
) -> None:
    drop = DropConfig(kind, (1, 2, 3), (1.0, 0.75, 0.5, 0.25))
    cache = KVCache(CFG.num_hidden_layers, reserve=2)
    with torch.no_grad():
        llm(embeds, cache, SPAN, drop)
    # int(40 * r) visual tokens survive each stage: 40 -> 30 -> 20 -> 10.
    assert cache.lengths == [SEQ, SEQ - 10, SEQ - 20, SEQ - 30]
    # Positions restart contiguously after every drop.
    assert recorded_positions == [list(range(n)) for n in (SEQ, SEQ - 10, SEQ - 20, SEQ - 30)]

    recorded_positions.clear()
    with torch.no_grad():
        llm(llm.model.embed_tokens(torch.tensor([[7]])), cache)
    # A decoded token continues each layer at its own cached length.
    assert recorded_positions == [[SEQ], [SEQ - 10], [SEQ - 20], [SEQ - 30]]
    assert cache.lengths == [SEQ + 1, SEQ - 9, SEQ - 19, SEQ - 29]


def test_attention_drop_keeps_the_most_attended_tokens_in_order(
    llm: Qwen2ForCausalLM, embeds: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept: list[torch.Tensor] = []
    import hico.qwen2 as q

    original = q.keep_visual
    monkeypatch.setattr(q, "keep_visual", lambda h, v, idx: (kept.append(idx), original(h, v, idx))[1])
    with torch.no_grad():
        llm(embeds, KVCache(CFG.num_hidden_layers), SPAN, DropConfig("uniform0_attention", (1, 2), (1.0, 0.5, 0.25)))
    uniform, attention = kept
    assert torch.equal(uniform, torch.linspace(0, 39, 20, dtype=torch.long))
    assert len(attention) == 10 and torch.equal(attention, attention.sort().values)
    assert attention.max() < 20  # indices into the 20 survivors of stage 0
    assert not torch.equal(attention, uniform_keep(20, 10))  # ranked, not spaced


def test_uniform_keep_is_integer_linspace() -> None:
    assert uniform_keep(10, 4).tolist() == [0, 3, 6, 9]
    assert uniform_keep(7, 3).tolist() == torch.linspace(0, 6, 3, dtype=torch.long).tolist() == [0, 3, 6]
    assert torch.equal(uniform_keep(1024, 768), torch.linspace(0, 1023, 768, dtype=torch.long))


def test_drop_config_validation() -> None:
    assert [DropConfig("uniform1_attention", (1, 2, 3), (1, 0.5, 0.25, 0.1)).stage_type(s) for s in range(3)] == [
        "uniform",
        "uniform",
        "attention",
    ]
    assert DropConfig.from_spec("uniform0_attention:4,18:1,0.75,0.25") == DropConfig()
    assert DropConfig().counts(8192) == [8192, 6144, 2048]
    for bad, match in [
        (lambda: DropConfig("random", (1,), (1.0, 0.5)), "drop type"),
        (lambda: DropConfig("uniform", (1, 2), (1.0, 0.5)), "one ratio per drop layer"),
        (lambda: DropConfig("uniform", (1,), (0.9, 0.5)), "first ratio must be 1.0"),
        (lambda: DropConfig("uniform", (1, 2), (1.0, 0.5, 0.75)), "non-increasing"),
        (lambda: DropConfig("uniform", (2, 1), (1.0, 0.5, 0.25)), "increasing"),
        (lambda: DropConfig.from_spec("uniform:1"), "TYPE:LAYERS:RATIOS"),
        (lambda: DropConfig().check_depth(4), "out of range for an LLM of 4 layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_cache_continues_only_one_token_at_a_time(llm: Qwen2ForCausalLM, embeds: torch.Tensor) -> None:
    cache = KVCache(CFG.num_hidden_layers)
    with torch.no_grad():
        llm(embeds, cache)
        with pytest.raises(ValueError, match="one token at a time"):
            llm(embeds[:, :2], cache)


def test_keep_visual_across_two_segments_keeps_every_text_token() -> None:
    h = torch.arange(12.0).reshape(1, 12, 1)
    visual = torch.tensor([2, 3, 4, 7, 8, 9])  # two cameras; text (labels) at 0, 1, 5, 6, 10, 11
    new_h, new_visual = keep_visual(h, visual, torch.tensor([0, 2, 4]))  # keep positions 2, 4, 8
    assert new_h.flatten().tolist() == [0, 1, 2, 4, 5, 6, 8, 10, 11]
    assert new_visual.tolist() == [2, 3, 6]
