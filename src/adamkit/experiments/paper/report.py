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


#: what a quick run says where its result differs from the paper's
NOT_SHOWN_QUICK = "not shown by this quick run"


def verdict(holds: bool, quick: bool) -> str:
    """Whether the paper's result holds here, as a short answer: a quick run's runs are
    too short to show several results, so where one does not show it that is no finding."""
    if holds:
        return "yes"
    return NOT_SHOWN_QUICK if quick else "no"


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
        *(
            [
                "",
                f"A quick run is too short for several of these results: where it does not show one, the "
                f"verdict says '{NOT_SHOWN_QUICK}', which is no finding; `adamkit reproduce` without "
                "--quick measures every verdict.",
            ]
            if quick
            else []
        ),
        "",
        "| experiment | paper's result holds here? |",
        "|---|---|",
        *(f"| [{o.title}](#{o.name}) | {_bold_unless_yes(verdict(o.holds, quick))} |" for o in outcomes),
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
            f"- **Verdict:** the paper's qualitative result {_verdict_sentence(o.holds, quick)}.",
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


def _bold_unless_yes(word: str) -> str:
    """A verdict for the table: bold where it is not a plain yes."""
    return word if word == "yes" else f"**{word}**"


#: each :func:`verdict` as the report's sentence ends it
_VERDICT_SENTENCES = {
    "yes": "holds on this data",
    "no": "**does not hold** on this data",
    NOT_SHOWN_QUICK: "is not shown by this quick run (too short to judge)",
}


def _verdict_sentence(holds: bool, quick: bool) -> str:
    return _VERDICT_SENTENCES[verdict(holds, quick)]


__all__ = ["NOT_SHOWN_QUICK", "verdict", "write_report"]
