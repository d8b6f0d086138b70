"""What one reproduced experiment leaves behind, and the yardsticks for its verdict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

#: "as fast as" in the paper's claims: within this factor of the other's mean cost
AS_FAST_AS = 1.25
#: "by a large margin": at most this fraction of the other's mean cost
LARGE_MARGIN = 0.8

Tick = Callable[[str], None]


@dataclass
class Outcome:
    """One experiment's result set beside the paper's.

    ``paper`` says what the paper reports, ``found`` what we measured, and ``holds``
    whether the paper's qualitative result (which optimizer wins) holds on our data.
    """

    name: str
    title: str
    substitute: str  # the data (and model) we used instead of the paper's
    paper: str
    found: str
    holds: bool
    files: list[Path] = field(default_factory=list)
    figures: dict[str, float | str | bool | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.holds = bool(self.holds)  # verdicts computed from numpy comparisons are numpy bools


class PaperExperiment(Protocol):
    """An experiment ``adamkit reproduce`` can run."""

    name: str
    title: str

    def units(self, quick: bool) -> int:
        """How many training runs ``run`` makes (for the progress bar)."""

    def run(self, out_dir: Path, quick: bool, tick: Tick) -> Outcome:
        """Run, write figures and curves into ``out_dir``, calling ``tick`` after each run."""


__all__ = ["AS_FAST_AS", "LARGE_MARGIN", "Outcome", "PaperExperiment", "Tick"]
