"""Checkpoints in the official layout: resolve (local dir or hub id), load, save, and make tiny ones.

A released checkpoint dir holds config.json, generation_config.json, the Qwen tokenizer files and
`model.safetensors` (or shards with `model.safetensors.index.json`) keyed by the official module
tree. Our module tree is flatter; `official_key` maps between the two.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hico.config import TextConfig, VideoChatFlashConfig, VisionConfig, preset
from hico.generation import GenerationSettings
from hico.kernels import choose_kernels, default_dtype, log_kernels
from hico.model import VideoChatFlashModel
from hico.tokenizer import load_tokenizer, train_tiny_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# (our prefix, official prefix), most specific first.
KEY_PREFIXES = (
    ("vision_tower.", "model.vision_tower.vision_tower.encoder."),
    ("mm_projector.", "model.mm_projector."),
    ("llm.model.", "model."),
    ("llm.lm_head.", "lm_head."),
)
# The official InternVideo2 tower holds its ViT one level higher than UMT's (no `.encoder.`).
TOWER_PREFIXES = {
    "umt": KEY_PREFIXES,
    "internvideo2": (("vision_tower.", "model.vision_tower.vision_tower."),) + KEY_PREFIXES[1:],
}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
TINY = "tiny"  # the model name of the shipped tiny model, trained on synthetic shapes scenes
TINY_RANDOM = "tiny-random"  # the model name of a random tiny checkpoint, generated on first use
TINY_WEIGHTS = Path(__file__).parent / "weights" / "tiny"
M = TypeVar("M", bound=VideoChatFlashModel)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""


def official_key(key: str, tower: str = "umt") -> str:
    for ours, theirs in TOWER_PREFIXES[tower]:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(key)


def our_key(key: str, tower: str = "umt") -> str | None:
    for ours, theirs in TOWER_PREFIXES[tower]:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise TypeError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype not in DTYPES.values():
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def resolve_checkpoint(path_or_hub_id: str | os.PathLike[str]) -> Path:
    """A local dir as is; `tiny`, the shipped tiny model; `tiny-random`, a generated random tiny checkpoint;
    otherwise a hub id, downloaded (or found in the HF cache) with huggingface_hub."""
    if str(path_or_hub_id) == TINY:
        return tiny_checkpoint_dir()
    if str(path_or_hub_id) == TINY_RANDOM:
        return random_tiny_checkpoint_dir()
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise CheckpointError(f"{name}: not a checkpoint directory and not a hub id like {DEFAULT_MODEL}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated, disk full: all end the same way for the user
        hint = (
            "HF_HUB_OFFLINE=1 is set and it is not in the local HF cache"
            if os.environ.get("HF_HUB_OFFLINE") == "1"
            else "without network access, set HF_HUB_OFFLINE=1 to use a copy already in the HF cache"
        )
        raise CheckpointError(
            f"cannot get {name} from the Hugging Face hub ({type(e).__name__}: {e}); {hint}, or download "
            "the checkpoint elsewhere and pass its local directory"
        ) from e


def read_config(directory: Path) -> VideoChatFlashConfig:
    path = directory / "config.json"
    try:
        return VideoChatFlashConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory}: no config.json") from e
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r})") from e
        files = [directory / s for s in shards]
    else:
        files = [directory / "model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{directory}: missing weight files {missing}")
    return files


def read_weights(directory: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors under their official names, on `device`, in the stored dtype."""
    with StoredWeights(directory, device) as stored:
        return {key: stored[key] for key in stored}


class StoredWeights(Mapping[str, torch.Tensor]):
    """The tensors of a checkpoint's safetensors files under their official names, each read from the file
    (mmap'd by safetensors) when it is looked up, on `device` in the stored dtype, and not kept: loading
    copies them into the parameters one at a time, so the whole checkpoint is never held twice."""

    def __init__(self, directory: Path, device: torch.device | str = "cpu") -> None:
        self._stack = ExitStack()
        self._where: dict[str, tuple[Path, Any]] = {}
        self._device = str(device)
        try:
            for file in weight_files(directory):
                try:
                    f = self._stack.enter_context(safe_open(file, framework="pt", device=self._device))
                    self._where |= {key: (file, f) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{file}: unreadable safetensors file, truncated or corrupt? ({e})") from e
        except BaseException:
            self._stack.close()
            raise

    def __getitem__(self, key: str) -> torch.Tensor:
        file, _ = self._where[key]
        try:
            # A handle of its own: the tensor is a view of the file's mapping, which a long-lived handle would keep
            # whole in the resident set as the tensors are read; this one is unmapped when the tensor is dropped.
            with safe_open(file, framework="pt", device=self._device) as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file, truncated or corrupt? ({e})") from e

    def shape(self, key: str) -> torch.Size:
        file, f = self._where[key]
        try:
            return torch.Size(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file, truncated or corrupt? ({e})") from e

    def __contains__(self, key: object) -> bool:  # Mapping's would read the tensor
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __enter__(self) -> StoredWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def check_weights(model: VideoChatFlashModel, weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map our state_dict names to the official names to fill them from; raise naming every missing,
    unexpected or misshapen tensor. Of `weights` (a dict or `StoredWeights`) only the tied embedding
    pair is read; the other shapes come from the file headers."""
    tower = model.config.vision.tower
    expected = {official_key(k, tower): (k, v.shape) for k, v in model.state_dict().items()}
    optional = set()
    source = {key: key for key in weights}
    if model.config.text.tie_word_embeddings:
        # The released 2B stores lm_head.weight although it is tied to embed_tokens (the two are equal there).
        expected.pop("lm_head.weight")
        optional.add("lm_head.weight")
        pair = {k: weights[k] for k in ("lm_head.weight", "model.embed_tokens.weight") if k in weights}
        if (embedding := tied_embedding(pair)) is not None:
            winner = next(k for k, v in pair.items() if v is embedding)
            source["model.embed_tokens.weight"] = winner
        del pair, embedding
    shape_of = weights.shape if isinstance(weights, StoredWeights) else (lambda k: weights[k].shape)
    missing = sorted(set(expected) - set(source))
    unexpected = sorted(set(source) - set(expected) - optional)
    wrong = sorted(
        f"{k}: checkpoint {list(found)} vs model {list(shape)}"
        for k, (_, shape) in expected.items()
        if k in source and (found := shape_of(source[k])) != shape
    )
    if missing or unexpected or wrong:
        parts = [
            f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        ]
        raise CheckpointError("weights do not fit the config: " + "; ".join(parts))
    return {ours: source[k] for k, (ours, _) in expected.items()}


def tied_embedding(weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The one tensor a tied model uses as embed_tokens and lm_head. The official loading (transformers 4.40.1
    `from_pretrained`, run by us on a doctored checkpoint) copies each stored tensor into the shared parameter
    in module order, lm_head last: a stored lm_head.weight wins for both. Silent when the two are equal (the
    released 2B); a warning naming the largest difference when they are not; a misshapen one is ignored."""
    lm_head, embed = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
    if lm_head is None or embed is None:
        return embed if lm_head is None else lm_head
    if lm_head.shape != embed.shape:
        log.warning(
            "tie_word_embeddings is set and the stored lm_head.weight %s has another shape than "
            "model.embed_tokens.weight %s; it is ignored",
            list(lm_head.shape),
            list(embed.shape),
        )
        return embed
    if torch.equal(lm_head, embed):
        return embed
    diff = max(  # in row blocks, so a 150k-row bf16 table is never copied whole to float32
        (lm_head[i : i + 4096].float() - embed[i : i + 4096].float()).abs().max().item()
        for i in range(0, embed.shape[0], 4096)
    )
    log.warning(
        "tie_word_embeddings is set but the stored lm_head.weight differs from model.embed_tokens.weight "
        "(max abs difference %.6g); as the official loading does, lm_head.weight is used for both the input "
        "embedding and the output projection. Set tie_word_embeddings false to keep them apart",
        diff,
    )
    return lm_head


def load_model(
    path_or_hub_id: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    kernels: str = "exact",
    attn_implementation: str | None = None,
    cls: type[M] = VideoChatFlashModel,
) -> M:
    """Build a `cls` on the meta device and fill it straight from the safetensors files.

    dtype None: bfloat16 on CUDA (as the official model), float32 elsewhere. `kernels` "exact" (official
    kernels, bit-exact with the official model) or "fast" (see `hico.kernels`); `attn_implementation`
    overrides the LLM attention. Each kernel choice is logged once, here.
    """
    device = torch.device(device)
    dtype = default_dtype(device) if dtype is None else as_dtype(dtype)
    choice = choose_kernels(device, dtype, has_flash_attn(), kernels, attn_implementation)
    directory = resolve_checkpoint(path_or_hub_id)
    config = read_config(directory)
    tokenizer = load_tokenizer(directory)
    generation = GenerationSettings.from_file(directory / "generation_config.json")
    if not generation.eos_token_ids:
        generation = generation.override(eos_token_ids=(tokenizer.eos_token_id,))
    with torch.device("meta"):
        model = cls(config, tokenizer, generation).to(dtype)
    with StoredWeights(directory, device) as stored:
        sources = check_weights(model, stored)
        model.to_empty(device=device)
        model.llm.tie_weights()  # to_empty gives every module its own fresh tensors
        targets = model.state_dict()  # views of the parameters and buffers; tied lm_head follows embed
        with torch.no_grad():
            for ours, key in sources.items():  # one tensor at a time: peak ~ model + largest tensor
                targets[ours].copy_(stored[key])
        del targets
    model.init_buffers()
    model.set_kernels(choice)
    log.info("loaded %s (%s, %s)", directory, dtype, device)
    log_kernels(choice, kernels, device, dtype)
    return model.eval()


def has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def save_checkpoint(model: VideoChatFlashModel, directory: str | os.PathLike[str]) -> Path:
    """Write weights (official names, one file) and config.json; tokenizer files are written separately."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tower = model.config.vision.tower
    tensors = {official_key(k, tower): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.text.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()  # stored untied, like the released 2B
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict() | {"torch_dtype": str(model.dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int) -> None:
    """Random weights that exercise every parameter: no zero biases, no unit norms."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight") or re.search(r"norm\d?\.weight$|layernorm\.weight$", name):
            p.copy_(1 + 0.1 * noise)
        elif p.ndim == 1:
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.02 * noise)


def dct_patch_basis(channels: int, patch: int, gain: float = 0.5) -> torch.Tensor:
    """[channels, 3, patch, patch] filters: the 2-D DCT-II basis of a patch (unit norm, times `gain`), lowest
    frequencies first, each frequency once per colour channel. The first three read a patch's mean red, green and
    blue; the next ones where inside it the light and dark lie, as a JPEG block does."""
    n = torch.arange(patch, dtype=torch.float64)
    cos = torch.stack([torch.cos(torch.pi * (n + 0.5) * k / patch) for k in range(patch)])  # [k, n]
    freqs = sorted(((u, v) for u in range(patch) for v in range(patch)), key=lambda f: (f[0] + f[1], f))
    out = torch.zeros(channels, 3, patch, patch, dtype=torch.float64)
    for i in range(channels):
        u, v = freqs[(i // 3) % len(freqs)]
        basis = torch.outer(cos[u], cos[v])
        out[i, i % 3] = gain * basis / basis.norm()
    return out.float()


LAYER_STD = 0.08  # the tiny LLM's decoder layers start here (`init_for_training_`); the shipped tiny began at 0.02


@torch.no_grad()
def init_for_training_(model: VideoChatFlashModel, seed: int, layer_std: float = LAYER_STD) -> None:
    """Weights to train from scratch: norms 1, biases 0, matrices N(0, 0.02) (Qwen's initializer_range) but the LLM
    decoder layers' N(0, `layer_std`) (below), and the
    patch embedding a DCT basis (`dct_patch_basis`), so from the first step a visual token says what colour its
    patch is and where its edges are, outweighs the fixed position table, and token merging groups patches by
    content (a shape classifier trained through the tower on 16 one-shape clips a step: 68% at 150 steps from
    it, 62% from noise; 95% at 350). (`init_random_`'s noisy norms and biases exercise every parameter for
    parity tests; trained from, they leave the visual tokens nearly alike.)

    0.02 suits Qwen's 1,536-wide layers; in the tiny LLM's 128-wide ones it leaves attention nearly uniform and
    slow to learn which visual tokens a question names. 0.08 (about 1/sqrt(128)) bound colour to shape in half the
    stage-1 steps (README, Fine-tuning); the draws are the same, only scaled."""
    if not (math.isfinite(layer_std) and layer_std > 0):
        raise ValueError(f"layer_std must be a positive number, got {layer_std}")
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.ndim == 1:
            p.fill_(1.0 if re.search(r"norm\d?\.weight$|layernorm\.weight$", name) else 0.0)
        else:
            std = layer_std if name.startswith("llm.model.layers.") else 0.02
            p.copy_(std * torch.randn(p.shape, generator=gen))
    proj = model.vision_tower.patch_embed.proj.weight  # [C, 3, 1, P, P]
    proj.copy_(dct_patch_basis(proj.shape[0], proj.shape[-1]).view_as(proj))


def shapes_config(heads: int = 4, kv_heads: int = 2) -> VideoChatFlashConfig:
    """The shape of the shipped `tiny` model: 4 decoder layers 128 wide with a 1,024-token vocabulary that holds
    the shapes questions' words whole, and a 4-block UMT tower 128 wide at 112 px (7 x 7 patches a frame, merged
    to the usual 16), which costs a ninth of 224 px to train on CPU. A few MB.

    `heads` / `kv_heads` split the same 128-wide attention otherwise (8 / 4: heads of 16; the weights' shapes, and
    so a seed's starting weights, stay the same)."""
    width = 128
    if heads < 1 or width % heads or kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"{heads} heads / {kv_heads} key-value heads: the heads must divide {width}, the key-value heads the heads"
        )
    text = TextConfig(
        vocab_size=1024,
        hidden_size=width,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    vision = VisionConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=112
    )
    return VideoChatFlashConfig(text=text, vision=vision, mm_hidden_size=128, bos_token_id=1021, eos_token_id=1023)


def make_tiny_checkpoint(
    directory: str | os.PathLike[str],
    res: int = 224,
    seed: int = 0,
    config: VideoChatFlashConfig | None = None,
    corpus: Iterable[str] = (),
    greedy: bool = False,
    for_training: bool = False,
    tower: str = "umt",
    layer_std: float = LAYER_STD,
) -> Path:
    """A random tiny model in the exact official layout, with a trained byte-level BPE tokenizer.

    Everything runs offline in seconds on it; its answers are noise. `tower` "internvideo2" gives the tiny
    model with a 2-block InternVideo2 tower (224 px only) in that variant's layout (`preset("tiny-internvideo2")`).
    `config` replaces the tiny preset (then `res` and `tower` are its own), `corpus` adds lines to the
    tokenizer's training text, `greedy` writes a generation_config.json for greedy answers without a repetition
    penalty, and `for_training` initialises the weights to train from (`init_for_training_`, the LLM layers at
    `layer_std`). All three make the base `vcflash train` turns into the shipped `tiny`:
    `vcflash make-tiny-checkpoint DIR --preset shapes`.
    """
    if config is None and tower == "internvideo2":
        if res != 224:
            raise ValueError(f"the InternVideo2 tower runs at 224 px only, got res {res}")
        config = preset("tiny-internvideo2")
    elif config is None:
        if tower != "umt":
            raise ValueError(f"unknown tower {tower!r}; choose umt or internvideo2")
        if res not in (224, 448):
            raise ValueError(f"res must be 224 or 448, got {res}")
        config = preset("tiny", image_size=res)
    model = VideoChatFlashModel(config)
    if for_training:
        init_for_training_(model, seed, layer_std)
    else:
        init_random_(model, seed)
    directory = save_checkpoint(model, directory)
    train_tiny_tokenizer(directory, vocab_size=config.text.vocab_size, extra_corpus=corpus)
    bos, eos = config.bos_token_id, config.eos_token_id
    generation: dict[str, object] = {
        "bos_token_id": bos,
        "do_sample": True,
        "eos_token_id": [eos, bos],
        "pad_token_id": bos,
        "repetition_penalty": 1.1,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
    }
    if greedy:
        generation = {"bos_token_id": bos, "do_sample": False, "eos_token_id": [eos, bos], "max_new_tokens": 32}
        generation |= {"pad_token_id": bos}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory


def tiny_checkpoint_dir() -> Path:
    """The checkpoint the model name `tiny` stands for: the tiny model trained on synthetic shapes scenes that
    ships with the package (`hico/weights/tiny`), so it answers questions about them, offline and at once. A
    checkout without them (a partial copy) falls back to the random tiny checkpoint, as `tiny-random`."""
    if not (TINY_WEIGHTS / "model.safetensors").is_file():
        log.warning("the trained tiny model is missing (%s): using a random tiny checkpoint", TINY_WEIGHTS)
        return random_tiny_checkpoint_dir()
    return TINY_WEIGHTS


def random_tiny_checkpoint_dir(res: int = 224) -> Path:
    """The random tiny checkpoint that `tiny-random` stands for, made on first use under $VCFLASH_CACHE
    (default ~/.cache/vcflash)."""
    root = Path(os.environ.get("VCFLASH_CACHE", Path.home() / ".cache" / "vcflash"))
    directory = root / f"tiny-{res}"
    if not (directory / "generation_config.json").is_file():  # written last
        make_tiny_checkpoint(directory, res=res)
    return directory
