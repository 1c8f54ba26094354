"""hico: a clean-room VideoChat-Flash (HiCo) that loads the released checkpoints."""

from hico.config import DropConfig, VideoChatFlashConfig
from hico.model import Answer, VideoChatFlash

__all__ = ["Answer", "DropConfig", "VideoChatFlash", "VideoChatFlashConfig"]
