"""hico: a clean-room VideoChat-Flash (HiCo) that loads the released checkpoints.

Names load on first use, so torch-free parts (`hico.pixels`, `hico.prompt`) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hico.chat import Answer, VideoChatFlash
    from hico.config import DropConfig, VideoChatFlashConfig

_MODULES = {
    "Answer": "hico.chat",
    "DropConfig": "hico.config",
    "VideoChatFlash": "hico.chat",
    "VideoChatFlashConfig": "hico.config",
}
__all__ = ["Answer", "DropConfig", "VideoChatFlash", "VideoChatFlashConfig"]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'hico' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
