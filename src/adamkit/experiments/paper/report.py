"""The reproduction report: a Markdown page that sets each result beside the paper's, and
the same as JSON."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

import adamkit

from .outcome import Outcome

PAPER = "Kingma & Ba (2015), Adam: A Method for Stochastic Optimization, section 6"


def _json_number(value):
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf / nan
    return value


def write_report(outcomes: Sequence[Outcome], out_dir: Path, *, quick: bool, seconds: float) -> list[Path]:
    """Write ``report.md`` and ``results.json`` into ``out_dir``; returns their paths."""
    mode = "quick mode (--quick: fewer epochs, a coarser rate grid)" if quick else "full mode"
    setting = f"adamkit {adamkit.__version__}, torch {torch.__version__}, Python {platform.python_version()}"
    lines = [
        "# adamkit reproduce: results beside the papers",
        "",
        f"{PAPER}, and the AMSGrad counterexample of Reddi et al. (2018).",
        "",
        "MNIST, IMDB and CIFAR-10 cannot be downloaded here: these runs use data that ships with the "
        "install (scikit-learn's 8x8 digits and a synthetic sparse bag-of-words task), with models "
        "scaled to them.  Each verdict says whether the paper's *qualitative* result (which optimizer "
        "wins) holds on this substitute data, not whether its numbers do.",
        "",
        f"Run in {mode}, {seconds:.0f} s, {setting}.",
        "",
        "| experiment | paper's result holds here? |",
        "|---|---|",
        *(f"| [{o.title}](#{o.name}) | {'yes' if o.holds else '**no**'} |" for o in outcomes),
        "",
    ]
    for o in outcomes:
        lines += [
            f'<a id="{o.name}"></a>',
            f"## {o.title}",
            "",
            f"- **Data and model:** {o.substitute}.",
            f"- **The paper reports:** {o.paper}",
            f"- **We found:** {o.found}",
            f"- **Verdict:** the paper's qualitative result {'holds' if o.holds else '**does not hold**'} on this data.",
            "",
            *(f"![{o.title}]({p.name})" for p in o.files if p.suffix == ".png"),
            "",
            "Data: " + ", ".join(f"[{p.name}]({p.name})" for p in o.files if p.suffix != ".png"),
            "",
        ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    results = out_dir / "results.json"
    payload = {
        "quick": quick,
        "seconds": seconds,
        "setting": setting,
        "experiments": [
            {
                "name": o.name,
                "title": o.title,
                "holds": bool(o.holds),
                "substitute": o.substitute,
                "paper": o.paper,
                "found": o.found,
                "figures": {k: _json_number(v) for k, v in o.figures.items()},
                "files": [p.name for p in o.files],
            }
            for o in outcomes
        ],
    }
    results.write_text(json.dumps(payload, indent=2))
    return [report, results]


__all__ = ["write_report"]
