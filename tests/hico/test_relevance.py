"""The windowed relevance scan: the same attention text-guided dropout ranks by, batched over windows."""

import pytest
import torch

import hico.qwen2
from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from hico.config import DropConfig, TextConfig
from hico.prompt import PromptVideo, build_prompt
from hico.relevance import (
    WindowPrompt,
    block_scores,
    clip_keys,
    clip_scores,
    default_layer,
    key_block,
    key_scores,
    question_query,
    scan,
    scan_clips,
    window_starts,
)

QUESTION = "When does the red square reach the middle?"
CLIPS = 2  # per window
FRAMES = 4 * CLIPS


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def clips(model: VideoChatFlash) -> torch.Tensor:
    """Stand-in clip tokens [7, 64, D] on the scale of real ones (fp16, as memory stores them)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(7, 64, model.config.text.hidden_size, generator=g) * 0.05).half().float()


def dropout_scores(model: VideoChatFlash, window: torch.Tensor, layer: int, monkeypatch: pytest.MonkeyPatch):
    """The scores text-guided dropout ranks by at `layer`, over the official prompt for this window."""
    seen: list[torch.Tensor] = []
    keep = hico.qwen2.attention_keep

    def spy(scores: torch.Tensor, k: int) -> torch.Tensor:
        seen.append(scores.clone())
        return keep(scores, k)

    monkeypatch.setattr(hico.qwen2, "attention_keep", spy)
    embeds, visual = model.embed_prompt(build_prompt(QUESTION, [PromptVideo(FRAMES, 8.0)]), [window])
    with torch.inference_mode():
        model.llm(embeds, visual=visual, drop=DropConfig("attention", (layer,), (1.0, 0.5)))
    monkeypatch.undo()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_scan_scores_equal_dropout_attention(
    model: VideoChatFlash, clips: torch.Tensor, layer: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    windows = torch.stack([clips[0:2], clips[2:4], clips[4:6]])  # [3, 2, 64, D]
    prompt = WindowPrompt.build(model, QUESTION, FRAMES, 8.0)
    one_by_one = scan(model, windows.flatten(1, 2), prompt, layer, batch_size=1)
    batched = scan(model, windows.flatten(1, 2), prompt, layer, batch_size=3)
    assert one_by_one.shape == batched.shape == (3, CLIPS * 64) and one_by_one.dtype == torch.float32
    for w in range(3):
        expected = dropout_scores(model, windows[w], layer, monkeypatch)
        torch.testing.assert_close(one_by_one[w], expected.float(), rtol=0, atol=0)  # the same computation
        torch.testing.assert_close(batched[w], expected.float(), rtol=1e-5, atol=1e-7)  # batched GEMMs may round
    assert (one_by_one > 0).all() and (one_by_one.sum(1) < 1).all()  # a share of the attention; text takes the rest


def test_clip_scores_windows_and_layer() -> None:
    assert window_starts(10, 4) == [0, 4, 6] and window_starts(8, 4) == [0, 4] and window_starts(3, 4) == [0]
    assert window_starts(4, 4) == [0]
    t = torch.arange(12.0).reshape(2, 6)
    assert clip_scores(t, 3).tolist() == [[3.0, 12.0], [21.0, 30.0]]
    with pytest.raises(ValueError, match="whole number"):
        clip_scores(t, 4)

    def text(n: int) -> TextConfig:
        return TextConfig(num_hidden_layers=n)

    assert default_layer(text(28)) == 18 and default_layer(text(4)) == 2 and default_layer(text(2)) == 1
    assert default_layer(text(1)) == 0


def test_scan_clips_covers_every_clip_with_full_windows(model: VideoChatFlash, clips: torch.Tensor) -> None:
    loads: list[tuple[int, int]] = []

    def load(a: int, b: int) -> torch.Tensor:
        loads.append((a, b))
        return clips[a:b].half()  # as memory gives them

    scores = scan_clips(model, 7, load, QUESTION, window=CLIPS, layer=2, batch_size=2, duration_s=8.0)
    assert scores.shape == (7,) and torch.isfinite(scores).all()
    assert sorted(loads) == [(0, 2), (2, 4), (4, 6), (5, 7)]  # the last window ends at the newest clip
    prompt = WindowPrompt.build(model, QUESTION, FRAMES, 8.0)
    direct = clip_scores(scan(model, torch.stack([clips[5:7]]).flatten(1, 2), prompt, 2), 64)[0]
    torch.testing.assert_close(scores[6], direct[1], rtol=1e-5, atol=1e-7)  # clip 6: only in the last window
    first = clip_scores(scan(model, clips[0:2].flatten(0, 1)[None], prompt, 2), 64)[0]
    torch.testing.assert_close(scores[:2], first, rtol=1e-5, atol=1e-7)
    few = scan_clips(model, 1, load, QUESTION, window=CLIPS)  # fewer clips than a window: one short window
    assert few.shape == (1,) and torch.isfinite(few).all()
    assert scan_clips(model, 0, load, QUESTION).shape == (0,)
    with pytest.raises(ValueError, match="out of range"):
        scan_clips(model, 2, load, QUESTION, layer=4)


@pytest.mark.parametrize("layer", [1, 3])
def test_clip_keys_are_the_keys_of_the_one_clip_prompt(model: VideoChatFlash, clips: torch.Tensor, layer: int) -> None:
    """Keys computed once per clip equal what the official prompt for that clip computes at the layer (attention is
    causal: the clip's tokens see only the text before them), whatever the question."""
    llm = model.llm.model
    block = llm.layers[layer]
    alone = clip_keys(model, clips[3:4], layer)
    together = clip_keys(model, clips, layer, batch_size=4)
    cfg = model.config.text
    assert together.shape == (7, cfg.num_key_value_heads, 64, cfg.hidden_size // cfg.num_attention_heads)
    for question in (QUESTION, "What is on the left?"):
        embeds, visual = model.embed_prompt(build_prompt(question, [PromptVideo(4, 4.0)]), [clips[3:4]])
        with torch.inference_mode():
            h, cos, sin = llm.hidden_at(embeds, layer)
            keys = block.self_attn.keys(block.input_layernorm(h), cos, sin)[0][:, visual]
        torch.testing.assert_close(alone[0], keys, rtol=0, atol=0)
        torch.testing.assert_close(together[3], keys, rtol=1e-5, atol=1e-6)


def test_key_scores_are_head_mean_attention_over_every_clip(model: VideoChatFlash, clips: torch.Tensor) -> None:
    keys = clip_keys(model, clips, 2)
    query = question_query(model, QUESTION, 2)
    cfg = model.config.text
    assert query.shape == (cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)
    scores = key_scores(query, keys, chunk=3)
    # as Qwen2Attention.last_token_attention: kv heads repeated per query head, softmax over every token, head-mean
    k = keys.permute(1, 0, 2, 3).flatten(1, 2).repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, 0)
    w = ((query[:, None] @ k.transpose(-1, -2))[:, 0] / k.shape[-1] ** 0.5).softmax(-1).mean(0)
    torch.testing.assert_close(scores, w.reshape(7, 64).sum(-1), rtol=1e-5, atol=1e-7)
    assert scores.shape == (7,) and float(scores.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(key_scores(query, keys[[2, 5]]).argsort(), scores[[2, 5]].argsort())
    assert key_scores(query, keys[:0]).shape == (0,)


def test_the_key_index_score_is_differentiable_on_request(model: VideoChatFlash, clips: torch.Tensor) -> None:
    """With `grad` (the relevance loss of training) the same numbers, and gradients reach the visual tokens and the
    layers up to the scoring layer's query and key projections; without it, inference tensors."""
    layer = 2
    tokens = clips.clone().requires_grad_()
    keys = clip_keys(model, tokens, layer, grad=True)
    query = question_query(model, QUESTION, layer, grad=True)
    scores = block_scores(query, key_block(keys), 64, grad=True)
    plain = block_scores(question_query(model, QUESTION, layer), key_block(clip_keys(model, clips, layer)), 64)
    torch.testing.assert_close(scores.detach(), plain, rtol=0, atol=0)
    assert clip_keys(model, clips, layer).is_inference() and not keys.is_inference()
    model.zero_grad()
    (-scores[3].log()).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    attn = model.llm.model.layers[layer].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
    assert model.llm.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert attn.v_proj.weight.grad is None and attn.o_proj.weight.grad is None  # past the score: untouched
    assert all(p.grad is None for p in model.llm.model.layers[layer + 1].parameters())
    model.zero_grad()
