"""The Adam family's fused CPU steps against adamkit's fused AdamW step (the anchor), and
torch.optim's fastest path for each variant, measured in the same process in interleaved
rounds (see ``adamkit.experiments.bench``).  The goal: every variant within 1.1x of AdamW
(AdEMAMix, which moves a third moment, 36 bytes an element against 28: within 36/28 x 1.1).
StableAdamW and cautious AdamW also run with one pre-pass window for the whole group, to
show what running the pre-pass window by window (in cache) saves.

    python benchmarks/bench_family.py                 # case (a): 50M fp32 params in 50 tensors
    python benchmarks/bench_family.py --cases a,c --rounds 30
"""

from __future__ import annotations

import torch
from bench_cpu import parse_arguments

import adamkit
from adamkit.experiments.bench import CASES, format_case, run_case, state_bytes_per_param
from adamkit.kernels import cpu

ANCHOR = "adamkit AdamW"


def one_window(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` with its fused CPU buckets built for a single pre-pass window (the
    whole group), as before StableAdamW's clipping and a cautious update's count ran
    window by window: the pre-pass's cache reuse, measured in the same rounds."""
    default = cpu.layout.PRE_PASS_WINDOW
    cpu.layout.PRE_PASS_WINDOW = 2**62
    try:
        optimizer.step()  # the buckets (and their windows) are built by the first step
    finally:
        cpu.layout.PRE_PASS_WINDOW = default
    return optimizer


CONTENDERS = {
    ANCHOR: lambda ps: adamkit.AdamW(ps, backend="cpu"),
    "adamkit AdaMax": lambda ps: adamkit.AdaMax(ps, backend="cpu"),
    "adamkit NAdam": lambda ps: adamkit.NAdam(ps, backend="cpu"),
    "adamkit RAdam": lambda ps: adamkit.RAdam(ps, backend="cpu"),
    "adamkit ADOPT": lambda ps: adamkit.ADOPT(ps, backend="cpu"),
    "adamkit StableAdamW": lambda ps: adamkit.StableAdamW(ps, backend="cpu"),
    "adamkit AdEMAMix": lambda ps: adamkit.AdEMAMix(ps, backend="cpu"),
    "adamkit ScheduleFreeAdamW": lambda ps: adamkit.ScheduleFreeAdamW(ps, backend="cpu"),
    "adamkit AdamW cautious": lambda ps: adamkit.AdamW(ps, backend="cpu", cautious=True),
    "adamkit StableAdamW, one window": lambda ps: one_window(adamkit.StableAdamW(ps, backend="cpu")),
    "adamkit AdamW cautious, one window": lambda ps: one_window(adamkit.AdamW(ps, backend="cpu", cautious=True)),
    # torch.optim has no fused NAdam or RAdam on the CPU: foreach is its fastest path
    "torch NAdam": lambda ps: torch.optim.NAdam(ps, foreach=True),
    "torch RAdam": lambda ps: torch.optim.RAdam(ps, foreach=True),
    # ADOPT is not in torch.optim: adamkit's own foreach path stands for the usual one
    "adamkit ADOPT foreach": lambda ps: adamkit.ADOPT(ps, backend="foreach"),
    # AdEMAMix is not in torch.optim either; foreach was its default path before the fused kernels ran it
    "adamkit AdEMAMix foreach": lambda ps: adamkit.AdEMAMix(ps, backend="foreach"),
    "adamkit ScheduleFreeAdamW foreach": lambda ps: adamkit.ScheduleFreeAdamW(ps, backend="foreach"),
    # cautious updates elsewhere run per tensor (heavyball, optimi): adamkit's foreach path does too
    "adamkit AdamW cautious foreach": lambda ps: adamkit.AdamW(ps, backend="foreach", cautious=True),
}
try:  # optimi's StableAdamW (foreach), where it is installed
    import optimi

    CONTENDERS["optimi StableAdamW"] = lambda ps: optimi.StableAdamW(ps, lr=1e-3, foreach=True)
except ImportError:
    pass
try:  # the schedulefree package's AdamWScheduleFree (foreach), in train mode, where it is installed
    import schedulefree

    def _training(optimizer):
        optimizer.train()
        return optimizer

    CONTENDERS["schedulefree AdamWScheduleFree"] = lambda ps: _training(
        schedulefree.AdamWScheduleFree(ps, lr=1e-3, foreach=True)
    )
except ImportError:
    pass


def main(argv: list[str] | None = None) -> None:
    cases, rounds = parse_arguments(__doc__, CASES, argv or ["--cases", "a"])
    for case in cases:
        held = {name: state_bytes_per_param(case, make) for name, make in CONTENDERS.items()}
        medians, bandwidth = run_case(case, rounds, CONTENDERS)
        print(format_case(case, medians, bandwidth, anchor=ANCHOR, state_bytes=held) + "\n")


if __name__ == "__main__":
    main()
