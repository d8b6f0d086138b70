"""``adamkit reproduce``: the experiments of Kingma & Ba (2015, section 6) on data that ships
with the install, and Reddi et al.'s (2018) AMSGrad counterexample.

Each experiment writes PNG figures and its curves as CSV into the output directory;
``report.md`` sets every result beside the paper's and says whether the paper's
qualitative result holds here, ``results.json`` holds the same.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from .amsgrad import AMSGradCounterexample
from .bias_correction import BiasCorrectionSweep
from .comparisons import COMPARISONS
from .outcome import Outcome, PaperExperiment, Tick
from .report import write_report

#: every experiment, in the paper's order, by name
EXPERIMENTS: dict[str, PaperExperiment] = {
    **{c.name: c for c in COMPARISONS},
    "bias_correction": BiasCorrectionSweep(),
    "amsgrad": AMSGradCounterexample(),
}


def run_reproduce(
    names: Sequence[str], out_dir: Path, *, quick: bool = False, tick: Tick = lambda label: None
) -> tuple[list[Outcome], list[Path]]:
    """Run the named experiments, write their files and the report into ``out_dir``;
    returns the outcomes and the report's paths."""
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiments {unknown}; choose from {list(EXPERIMENTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    outcomes = [EXPERIMENTS[name].run(out_dir, quick, tick) for name in names]
    return outcomes, write_report(outcomes, out_dir, quick=quick, seconds=time.perf_counter() - start)


__all__ = ["EXPERIMENTS", "Outcome", "run_reproduce"]
