"""How ``fold`` folds (:class:`FoldSettings`); which data a run reads is :class:`bnscope.data.choice.DataChoice`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bnscope.data.choice import DataChoice, as_path, settings_class
from bnscope.fold.plan import FoldOptions

__all__ = ["DataChoice", "FoldOptions", "FoldSettings"]


@settings_class
@dataclass(frozen=True)
class FoldSettings:
    """How ``fold_model`` folds: ``output`` (a str or Path; None only with ``dry_run``) and the rest."""

    output: Path | None
    options: FoldOptions = FoldOptions()
    verify: bool = True
    dry_run: bool = False
    force: bool = False
    data: DataChoice = DataChoice()
    atol: float | None = None
    rtol: float | None = None
    providers: tuple[str, ...] = ("cpu",)
    allow_fallback: bool = False

    def __post_init__(self) -> None:
        as_path(self, "output")
