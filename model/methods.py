"""The registry of mask methods: ``model.method`` in the config -> the class that implements it.

Adding a method is its own folder (a ``model.mask_method.MaskMethod`` subclass) plus one line here. The
detector, the exporter and evaluation look methods up here and never name one. ``"fcos"`` (boxes only)
has no mask method.
"""

from __future__ import annotations

from model.config import ModelConfig
from model.embedmask.method import EmbedMask
from model.mask_method import MaskMethod
from model.meinst.method import MEInst

MASK_METHODS: dict[str, type[MaskMethod]] = {method.name: method for method in (MEInst, EmbedMask)}


def mask_method_class(method: str) -> type[MaskMethod] | None:
    """The class of ``method``; None for plain FCOS."""
    if method == "fcos":
        return None
    if method not in MASK_METHODS:
        raise ValueError(f"unknown method {method!r}; registered: fcos, {', '.join(MASK_METHODS)}")
    return MASK_METHODS[method]


def build_mask_method(cfg: ModelConfig, in_channels: int) -> MaskMethod | None:
    """The mask branch of a detector built from ``cfg`` (None for plain FCOS)."""
    method = mask_method_class(cfg.method)
    return method(cfg, in_channels) if method is not None else None
