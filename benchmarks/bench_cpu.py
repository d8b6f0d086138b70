"""CPU step benchmark: adamkit's fused kernel against torch.optim.Adam's three paths.

Every contender is measured in the same process, in interleaved rounds (one step of
each in turn), so drift in the machine's memory bandwidth hits them all alike.
Prints, per case: median ms per step, the ratio to torch's fused kernel, effective
bandwidth (bytes an Adam step must move per param / time) and that as a percentage of
an in-place ``add_`` timed in the same interleaved rounds.

    python benchmarks/bench_cpu.py                 # all cases
    python benchmarks/bench_cpu.py --cases a,b --rounds 30
"""

from __future__ import annotations

import argparse

from adamkit.experiments.bench import CASES, Case, format_case, run_case, versions


def parse_arguments(doc: str, cases: dict[str, Case], argv: list[str] | None) -> tuple[list[Case], int]:
    """``--cases`` and ``--rounds`` of a step benchmark; prints the versions line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(cases), help=f"comma-separated subset of {','.join(cases)}")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per contender")
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(cases)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {','.join(cases)}")
    print(versions() + "\n")
    return [cases[key] for key in args.cases.split(",")], args.rounds


def main(argv: list[str] | None = None) -> None:
    cases, rounds = parse_arguments(__doc__, CASES, argv)
    for case in cases:
        medians, bandwidth = run_case(case, rounds)
        print(format_case(case, medians, bandwidth) + "\n")


if __name__ == "__main__":
    main()
