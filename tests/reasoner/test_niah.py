"""`vcflash eval niah`: the builders, the token-insertion shortcut, and a small run end to end with the shipped tiny
model (real encoder path, real memory, the Reasoner with every selection)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hico import VideoChatFlash
from memory import open_store
from vcflash import niah
from vcflash.cli import main
from vcflash.shapes import COLOURS, _overlap


@pytest.fixture(scope="module")
def model() -> VideoChatFlash:
    return VideoChatFlash.from_pretrained("tiny")


def test_builders_are_deterministic_from_the_seed() -> None:
    assert niah.make_haystack(400, 3) == niah.make_haystack(400, 3)
    assert niah.make_haystack(400, 3) != niah.make_haystack(400, 4)
    assert niah.make_case(100, 0.5, 2, 1, seed=3) == niah.make_case(100, 0.5, 2, 1, seed=3)
    assert niah.make_case(100, 0.5, 2, 0, seed=3) != niah.make_case(100, 0.5, 2, 1, seed=3)
    hay = niah.make_haystack(400, 3)
    assert hay.frames == 400 and hay.clips == 100
    assert all(t % 4 == 0 for t in hay.starts)  # no clip straddles two scenes
    assert {s.shape for scene in hay.scenes for s in scene.sprites} == {niah.HAYSTACK_SHAPE}  # never the needles'
    with pytest.raises(ValueError, match="whole number"):
        niah.make_haystack(402, 0)
    with pytest.raises(ValueError, match="depth"):
        niah.make_case(100, 1.5, 1)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_the_needle_sits_at_its_logged_depth_for_exactly_one_clip(depth: float) -> None:
    hay = niah.make_haystack(200, 0)  # 50 clips
    case = niah.make_case(hay.clips, depth, 1, seed=0)
    (needle,) = case.needles
    assert needle.clip == round(depth * 49) and needle.shape == niah.NEEDLE_SHAPE
    assert case.chain[0].question == "What colour is the triangle?" and case.chain[0].answer == needle.colour
    full = niah.insert(hay, case.needles)
    for clip in range(hay.clips):
        same = np.array_equal(full.clip_frames(clip), hay.clip_frames(clip))
        assert same == (clip != needle.clip), clip
    # on screen in each of the clip's 4 frames, in its colour
    changed = np.any(full.clip_frames(needle.clip) != hay.clip_frames(needle.clip), axis=-1)  # [4, H, W]
    assert changed.reshape(4, -1).sum(1).min() > 500
    colour = np.array(COLOURS[needle.colour])
    assert (np.abs(full.clip_frames(needle.clip)[changed] - colour).max(-1) < 2).mean() > 0.9


def test_needles_stand_clear_of_the_shapes_on_screen_as_training_shapes_do() -> None:
    """A needle over a circle of its own colour would merge with it into one blob; training scenes never overlap
    shapes. Crowded scenes may put it over shapes of other colours, drawn on top, rarely."""
    hay = niah.make_haystack(4000, 0)
    hits = []  # per needle: its colour, the shapes it overlaps
    for trial in range(60):
        case = niah.make_case(hay.clips, (trial % 20 + 0.5) / 20, 2 if trial % 3 == 0 else 1, trial, seed=0)
        full = niah.insert(hay, case.needles)
        for n in case.needles:
            scene = full.scenes[full.scene_at(n.clip * 4)]
            (needle,) = [s for s in scene.sprites if s.shape == n.shape]
            others = [s for s in scene.sprites if s is not needle]
            hits.append((n.colour, [s for s in others if _overlap(needle, s, scene.seconds)]))
    assert len(hits) == 40 + 20 * 5
    assert all(s.colour != colour for colour, hit in hits for s in hit)
    assert sum(bool(hit) for _, hit in hits) <= 0.1 * len(hits)


def test_two_hops_chain_the_indicator_to_its_quarter_with_a_decoy_in_each_other() -> None:
    case = niah.make_case(400, 0.5, 2, seed=0)
    indicator, target, *decoys = case.needles
    assert indicator.clip == 200 and indicator.shape == niah.NEEDLE_SHAPE and len(decoys) == 3
    quarter = niah.QUARTERS.index(indicator.colour)
    a, b = niah.quarter(400, quarter)
    assert a <= target.clip < b and target.shape == niah.TARGET_SHAPE

    def quarter_of(clip: int) -> int:
        return next(q for q in range(4) if niah.quarter(400, q)[0] <= clip < niah.quarter(400, q)[1])

    assert sorted(quarter_of(d.clip) for d in decoys) == sorted(set(range(4)) - {quarter})
    assert {n.shape for n in decoys} == {niah.TARGET_SHAPE}
    assert len({n.colour for n in (target, *decoys)}) == 4  # a wrong first hop leads to a wrong colour
    assert [h.answer for h in case.chain] == [indicator.colour, target.colour]
    assert min(abs(x.clip - y.clip) for x in case.needles for y in case.needles if x is not y) > 2


def test_writing_needle_tokens_into_the_haystack_equals_encoding_the_whole_video(model: VideoChatFlash) -> None:
    """The shortcut the runner takes: encode the haystack once, then only the clips the needles fill."""
    hay = niah.make_haystack(48, 1)
    case = niah.make_case(hay.clips, 0.5, 1, seed=1)
    tokens = niah.encode_haystack(model, hay, batch=5)
    shortcut = tokens.copy()
    for clip, row in niah.needle_tokens(model, hay, case, seed=1).items():
        shortcut[clip] = row
    full = niah.encode_haystack(model, niah.insert(hay, case.needles, seed=1), batch=5)
    assert tokens.dtype == np.float16 and tokens.shape == (12, 64, model.config.text.hidden_size)
    np.testing.assert_array_equal(shortcut, full)
    assert not np.array_equal(tokens[case.needles[0].clip], full[case.needles[0].clip])


def test_a_small_run_end_to_end_writes_the_report_and_the_heatmap(tmp_path: Path) -> None:
    """256 and 1,000 frames (64 and 250 clips) under a 128-frame budget (32 clips), 2 depths, the shipped tiny
    model, through the CLI."""
    out, png = tmp_path / "niah.json", tmp_path / "niah.png"
    argv = ["eval", "niah", "--frames", "256,1000", "--depths", "0.25,0.75", "--hops", "1,2", "--two-hop-frames"]
    argv += ["256", "--max-frames", "128", "--model", "tiny", "--json", str(out), "--heatmap", str(png)]
    assert main([*argv, "--threads", "1"]) == 0
    report = json.loads(out.read_text())
    selections = ["uniform", "retrieval", "scan", "index", "oracle"]
    assert report["config"]["selections"] == selections and report["config"]["max_frames"] == 128
    rows = report["rows"]
    assert len(rows) == (2 + 2 + 2) * 5  # 256: 1 and 2 hops; 1000: 1 hop; 2 depths; 5 selections
    for r in rows:
        assert len(r["answers"]) >= 1 and r["ask_s"] > 0 and len(r["answers"]) <= r["hops"]
        assert (r["moment_right"] is None) == (r["selection"] in ("uniform", "oracle"))
    assert all(r["recall"] for r in rows if r["selection"] == "oracle" and r["hops"] == 1)  # it asks around it
    for cell in report["summary"]:
        assert {"frames", "hops", "selection", "n", "answer", "moment", "recall", "answer_if_recalled"} <= set(cell)
        assert {"constant", "top_answer", "top_answer_share"} <= set(cell)
    assert {(c["frames"], c["depth"], c["hops"]) for c in report["cells"]} == {
        (256, 0.25, 1),
        (256, 0.75, 1),
        (256, 0.25, 2),
        (256, 0.75, 2),
        (1000, 0.25, 1),
        (1000, 0.75, 1),
    }
    cost = {c["frames"]: c for c in report["cost"]}
    assert cost[1000]["clips"] == 250 and cost[1000]["token_bytes_per_clip"] == 64 * 128 * 2
    assert cost[1000]["key_bytes_per_clip"] == 2 * 64 * 32 * 4  # the tiny model's 2 KV heads of 32, float32 on a CPU
    assert len(cost[1000]["search_index_s"]) == 2 and len(cost[256]["search_index_s"]) == 4
    # the model's own scores find the needle at least as often as uniform sampling does
    recall = {s: sum(r["recall"] for r in rows if r["hops"] == 1 and r["selection"] == s) for s in selections}
    assert recall["scan"] >= recall["uniform"] and recall["index"] >= recall["uniform"]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 100


def test_the_run_uses_a_redis_memory(model: VideoChatFlash, redis_server, tmp_path: Path) -> None:  # noqa: ANN001
    store = open_store(redis_server.fresh_url(), tmp_path)
    cfg = niah.NiahConfig(frames=(128,), depths=(0.5,), hops=(1,), selections=("uniform", "index"), max_frames=32)
    try:
        report = niah.run(model, cfg, store)
    finally:
        store.close()
    assert [r["selection"] for r in report["rows"]] == ["uniform", "index"]
    assert all(len(r["answers"]) == 1 for r in report["rows"])
    assert store.__class__.__name__ == "RedisStore"


def test_config_errors_name_the_values() -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        niah.NiahConfig(frames=(10,))
    with pytest.raises(ValueError, match="bogus"):
        niah.NiahConfig(selections=("bogus",))
    with pytest.raises(ValueError, match="hops"):
        niah.NiahConfig(hops=(3,))
    with pytest.raises(ValueError, match="max_frames"):
        niah.NiahConfig(max_frames=4096)


def test_a_scan_over_the_cap_is_scored_by_the_key_index(model: VideoChatFlash, tmp_path: Path) -> None:
    """`max_scan_clips`: past it a scan's cost stops growing with the range; the index's scores stand in."""
    from memory import ClipIndex, EmbeddedStore
    from reasoner.engine import AskParams, Reasoner
    from vcflash.serve.settings import ReasonerSettings

    hay = niah.make_haystack(128, 0)  # 32 clips
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    niah.write_stream(store, "cam", niah.encode_haystack(model, hay), {})
    q = niah.question(niah.NEEDLE_SHAPE)

    def picked(reasoner: Reasoner, selection: str, start: float | None = None) -> list[int]:
        (segment,) = reasoner.select(AskParams(["cam"], q, start=start, max_frames=32, selection=selection))
        return [e.clip.seq for e in segment.evidence]

    capped = Reasoner(model, store, ClipIndex(), ReasonerSettings(max_scan_clips=16))
    assert picked(capped, "scan") == picked(capped, "index") and capped.scans_capped == 1
    assert capped.keys.built == 32  # the key index scored the range
    assert picked(capped, "scan", start=64.0) and capped.scans_capped == 1  # 16 clips: within the cap, scanned
    assert capped.keys.built == 32
    free = Reasoner(model, store, ClipIndex(), ReasonerSettings(max_scan_clips=32))
    assert picked(free, "scan") and free.scans_capped == 0 and free.keys.built == 0
    store.close()


def test_a_one_word_model_stands_out_beside_its_baseline() -> None:
    """A model that answers "red" whatever the needle is scores the share of red needles: the summary says so (its
    commonest answer at 100%) and gives that share as the baseline beside the accuracy."""
    expected = ["red", "green", "red", "blue", "red", "yellow", "green", "red"]
    rows = [
        niah.Row(10_000, 0.5, 1, t, "index", answers=["red"], expected=[e], answer_right=e == "red")
        for t, e in enumerate(expected)
    ]
    rows += [
        niah.Row(10_000, 0.5, 1, t, "oracle", answers=[e], expected=[e], answer_right=True)
        for t, e in enumerate(expected)
    ]
    index, oracle = niah.summarize(rows, ("frames", "hops", "selection"))
    assert index["answer"] == index["constant"] == 0.5 and (index["top_answer"], index["top_answer_share"]) == (
        "red",
        1.0,
    )
    assert oracle["answer"] == 1.0 and oracle["constant"] == 0.5 and oracle["top_answer_share"] == 0.5
    two = [niah.Row(10_000, 0.5, 2, 0, "index", answers=["red", "red"], expected=["red", "blue"])]
    assert niah.constant_baseline(two) == 0.0  # no one word answers both hops
    table = niah.format_summary([index, oracle])
    assert "red 100%" in table.splitlines()[1] and "const" in table.splitlines()[0]
