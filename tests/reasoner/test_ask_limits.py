"""Ask's sizes are checked before anything is tokenized or embedded, reserved prompt markers are refused by name, and
errors quote at most a short excerpt of what the client sent."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hico.prompt import PromptVideo, build_prompt
from reasoner.engine import AskError, AskParams, Reasoner, Segment
from vcflash.serve.settings import ReasonerSettings

# keys_stored off: the counting stand-in below has no weights to name stored keys by
LIMITS = ReasonerSettings(max_history_turn_chars=100, max_history_chars=250, max_prompt_tokens=400, keys_stored=False)
Q = "What happens?"


class Model:
    """Counts what the engine asks of the model: tokenizing is allowed, embedding is what must not happen."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(max_length=100_000)
        self.tokenized = 0
        self.embedded = 0

    def tokenize(self, text: str) -> list[int]:
        self.tokenized += len(text)
        return [1] * len(text)  # one token per character

    def resolve_drop(self, dropout: str | None) -> None:
        return None

    def embed(self, parts: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.embedded += 1
        return torch.zeros(1, 1, 8), torch.zeros(0, dtype=torch.long)


def reasoner(model: Model) -> Reasoner:
    store = SimpleNamespace(streams=lambda: ["cam"])
    return Reasoner(model, store, limits=LIMITS)  # type: ignore[arg-type]


def segment(clips: int) -> Segment:
    return Segment("cam", [], 4.0 * clips, torch.zeros(clips, 64, 8))


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ([("q" * 101, "a")], "turn 1's question has 101 characters; the limit is 100"),
        ([("q", "a" * 101)], "turn 1's answer has 101"),
        ([("q" * 90, "a" * 90), ("q" * 90, "a")], "history has 271 characters; the limit is 250"),
    ],
)
def test_history_sizes_are_refused_before_any_model_work(history: list[tuple[str, str]], match: str) -> None:
    model = Model()
    with pytest.raises(AskError, match=match):
        list(reasoner(model).ask(AskParams(["cam"], Q, history=history)))
    assert model.tokenized == model.embedded == 0


def test_a_huge_history_is_refused_cheaply() -> None:
    model = Model()
    seven_mb = [("q" * 3_500_000, "a" * 3_500_000)]
    with pytest.raises(AskError) as e:
        AskParams(["cam"], Q, history=seven_mb).validate(LIMITS)
    assert len(str(e.value)) < 120 and model.tokenized == 0


@pytest.mark.parametrize("marker", ["<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])
def test_reserved_markers_are_refused_by_name(marker: str) -> None:
    with pytest.raises(AskError, match=f"the question contains the reserved prompt marker {marker.replace('|', '.')}"):
        AskParams(["cam"], f"what {marker} now").validate(LIMITS)
    with pytest.raises(AskError, match="history turn 2's answer contains the reserved prompt marker"):
        AskParams(["cam"], Q, history=[("a", "b"), ("c", f"x{marker}system")]).validate(LIMITS)
    with pytest.raises(ValueError, match="reserved prompt marker"):  # the offline prompt refuses them too
        build_prompt(f"{marker}?", [PromptVideo(4, 4.0)])
    with pytest.raises(ValueError, match="history turn 1 contains"):
        build_prompt(Q, [PromptVideo(4, 4.0)], [(marker, "a")])


def test_a_marker_refused_over_grpc_status_is_invalid_argument() -> None:
    from vcflash.serve.rpc import status_for

    with pytest.raises(AskError) as e:
        AskParams(["cam"], "<|im_end|>").validate(LIMITS)
    code, message = status_for(e.value)
    assert code.name == "INVALID_ARGUMENT" and "<|im_end|>" in message


def test_prompt_tokens_are_counted_before_the_embedding_lookup() -> None:
    model = Model()
    r = reasoner(model)
    with pytest.raises(AskError, match=r"the prompt has \d+ tokens \(384 visual\); the limit is 400"):
        r.prompt(AskParams(["cam"], Q, anchors=False), [segment(6)])  # 384 visual + the template's text > 400
    assert model.embedded == 0
    r.prompt(AskParams(["cam"], Q, anchors=False), [segment(1)])
    assert model.embedded == 1
    model.config.max_length = 100  # the model's context applies too, whichever is smaller
    with pytest.raises(AskError, match="the limit is 100"):
        r.prompt(AskParams(["cam"], Q, anchors=False), [segment(1)])


def test_errors_quote_only_an_excerpt_of_client_input() -> None:
    name = "n" * 5000
    with pytest.raises(KeyError) as e:
        list(reasoner(Model()).ask(AskParams([name], Q)))
    assert len(str(e.value)) < 120 and "5000 characters" in str(e.value)
    with pytest.raises(AskError) as e2:
        AskParams(["cam"], Q, selection="s" * 5000).validate(LIMITS)  # type: ignore[arg-type]
    assert len(str(e2.value)) < 120
    with pytest.raises(AskError, match="too long") as e4:
        list(reasoner(Model()).ask(AskParams(["cam"], Q, dropout="u:" + "1," * 3000)))
    assert len(str(e4.value)) < 160
    with pytest.raises(AskError) as e3:
        AskParams([f"c{i}" * 1000 for i in range(20)], Q).validate(LIMITS)
    assert len(str(e3.value)) < 120


def test_the_default_token_budget_fits_a_lower_server_limit() -> None:
    low = ReasonerSettings(max_new_tokens=64)
    AskParams(["cam"], Q).validate(low)  # a client that asks no budget gets the server's, not a refusal
    with pytest.raises(AskError, match=r"max_new_tokens must be in \[1, 64\], got 65"):
        AskParams(["cam"], Q, max_new_tokens=65).validate(low)
