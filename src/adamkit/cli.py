"""Command-line interface: ``adamkit <command> ...``.

Commands
--------
``adamkit demo [--out DIR] [--force]``
    Race Adam, AdamW, AMSGrad and SGD on analytic test functions, print the
    results table and write the figures into ``DIR`` (default ``./adamkit-demo``).
``adamkit viz [FUNCTION ...] [--animate] [--steps N] [--out DIR] [--force]``
    Optimizer trajectories over contour plots of test functions, optionally as GIFs.
``adamkit bench [--quick] [--cases a,b,...] [--rounds N] [--device cpu|cuda]``
    The step benchmarks on this machine against torch.optim.Adam, as tables.
``adamkit memory MODEL [--hidden-size N] [--layers N] [--set KEY=VALUE ...] [--time]``
    Bytes per param and GB of weights, gradients and optimizer state for a model (a
    Hugging Face model type built from its config, or ``package.module:factory``)
    under each adamkit setting and under torch.optim, bitsandbytes, torchao and FlashOptim.
``adamkit reproduce [EXPERIMENT ...] [--quick] [--out DIR] [--force]``
    Kingma & Ba's section 6 experiments (and Reddi et al.'s AMSGrad counterexample) on
    bundled data, with figures, curves and a report beside the papers' results.

Exit status: 0 on success (a paper result that does not hold on our data is a result,
not a failure), 1 when a run fails, 2 for bad arguments or a non-empty output directory
without ``--force``, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from adamkit._version import __version__

__all__ = ["main", "build_parser"]

#: Exit status for usage errors (as argparse uses).
EXIT_USAGE = 2
#: Exit status when a command fails while running.
EXIT_FAILURE = 1
#: Exit status after Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130
#: Exit status when stdout was closed by its reader (128 + SIGPIPE, as a shell reports it).
EXIT_BROKEN_PIPE = 141


def _add_out_options(command: argparse.ArgumentParser, default: str, what: str) -> None:
    command.add_argument(
        "--out",
        type=Path,
        default=Path(default),
        metavar="DIR",
        help=f"directory for the {what}, created if missing (default: ./{default})",
    )
    command.add_argument(
        "--force",
        action="store_true",
        help="write into DIR even if it is not empty (files of the same name are overwritten)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="adamkit",
        description="The Adam optimizer family for PyTorch and NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="compare Adam, AdamW, AMSGrad and SGD on test functions and plot them",
        description=(
            "Run Adam (and AdamW, AMSGrad) against SGD on f(x) = (x-2)^2, Rosenbrock and Beale, "
            "print a results table and write quadratic.png, rosenbrock.png and beale.png."
        ),
    )
    _add_out_options(demo, "adamkit-demo", "figures")
    demo.set_defaults(handler=_cmd_demo)

    from adamkit.experiments.functions import OBJECTIVES

    viz = commands.add_parser(
        "viz",
        help="draw optimizer trajectories on test functions over contour plots",
        description=(
            "Run Adam, AdamW, AMSGrad and SGD with momentum on test functions and draw their "
            "trajectories over contour plots (one PNG per function, optionally a GIF)."
        ),
    )
    viz.add_argument(
        "functions",
        nargs="*",
        metavar="FUNCTION",
        help=f"functions to draw (default: all): {', '.join(OBJECTIVES)}",
    )
    viz.add_argument("--animate", action="store_true", help="also write an animated GIF per 2-D function")
    viz.add_argument("--steps", type=_positive_int, metavar="N", help="steps per run (default: per function)")
    _add_out_options(viz, "adamkit-viz", "figures")
    viz.set_defaults(handler=_cmd_viz, known=tuple(OBJECTIVES))

    bench = commands.add_parser(
        "bench",
        help="time the optimizer step against torch.optim.Adam on this machine",
        description=(
            "Time one Adam step of adamkit and of torch.optim.Adam (for-loop, foreach, fused) "
            "in interleaved rounds and print ms, the ratio to torch's fused kernel and effective "
            "bandwidth per case: (a) a few large tensors, (b) many small ones, (c) GPT-2 shapes, "
            "(d) bf16 params."
        ),
    )
    bench.add_argument("--quick", action="store_true", help="cases ten times smaller, 5 rounds (a few seconds)")
    bench.add_argument("--cases", default="a,b,c,d", help="comma-separated subset of a,b,c,d (default: all)")
    bench.add_argument("--rounds", type=_positive_int, metavar="N", help="timed steps per contender (default 20)")
    bench.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where the params live (default: cuda when available, else cpu)",
    )
    bench.set_defaults(handler=_cmd_bench)

    memory = commands.add_parser(
        "memory",
        help="plan a model's training memory under each optimizer setting",
        description=(
            "Print the bytes per param and the GB of weights, gradients and optimizer state, with and "
            "without gradient release, for a model under each adamkit setting and under torch.optim, "
            "bitsandbytes, torchao and FlashOptim.  MODEL is a Hugging Face model type (gpt2, llama, "
            "bert, ...: its config with transformers' defaults, nothing downloaded) or "
            "package.module:factory (a callable returning a torch.nn.Module).  The model is built on "
            "the meta device, so no weights are allocated."
        ),
    )
    memory.add_argument("model", metavar="MODEL", help="a Hugging Face model type, or package.module:factory")
    for flag, key in _CONFIG_FLAGS.items():
        memory.add_argument(f"--{flag}", type=_positive_int, metavar="N", dest=key, help=f"config {key}")
    memory.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="config_items",
        help="any other config attribute (a number, true/false, or text); repeatable",
    )
    memory.add_argument(
        "--time",
        action="store_true",
        help="also time one step of each adamkit setting on this machine (allocates the model)",
    )
    memory.set_defaults(handler=_cmd_memory)

    from adamkit.experiments.paper import EXPERIMENTS

    reproduce = commands.add_parser(
        "reproduce",
        help="rerun the Adam paper's experiments on bundled data and report beside the paper",
        description=(
            "Kingma & Ba (2015) section 6 on data that ships with the install (scikit-learn's digits "
            "instead of MNIST and CIFAR-10, a synthetic sparse bag-of-words task instead of IMDB), plus "
            "Reddi et al.'s AMSGrad counterexample.  Writes PNG figures, the curves as CSV, report.md "
            "and results.json; the report says for each experiment whether the paper's qualitative "
            "result holds here."
        ),
    )
    reproduce.add_argument(
        "experiments",
        nargs="*",
        metavar="EXPERIMENT",
        help=f"experiments to run (default: all): {', '.join(EXPERIMENTS)}",
    )
    reproduce.add_argument("--quick", action="store_true", help="fewer epochs and a coarser grid (under a minute)")
    _add_out_options(reproduce, "adamkit-reproduce", "figures, curves and report")
    reproduce.set_defaults(handler=_cmd_reproduce, known=tuple(EXPERIMENTS))
    return parser


#: --flag -> the Hugging Face config attribute it sets
_CONFIG_FLAGS = {
    "hidden-size": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "intermediate-size": "intermediate_size",
    "vocab-size": "vocab_size",
}


def _config_value(text: str):
    """A --set value: an int, a float, a boolean, or the text."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _error(message: str) -> int:
    print(f"adamkit: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _missing_extra(command: str, modules: Sequence[str], extra: str) -> int | None:
    """Exit status 2, with a message naming the extra to install, when a module the
    command needs is missing; ``None`` when all are there."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return _error(
        f"{command} needs {', '.join(missing)}, which the {extra!r} extra installs: pip install 'adamkit[{extra}]'"
    )


def _output_problem(out: Path, force: bool) -> str | None:
    """Why ``out`` cannot take a command's files (``None`` if it can): checked before the
    command starts, by making the directory and writing a file there."""
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} exists and is not a directory"
    if out.is_dir() and any(out.iterdir()) and not force:
        return f"output directory {str(out)!r} is not empty; use --force to write into it anyway"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        return f"--out {str(out)!r}: cannot write there ({error.strerror or error})"
    return None


def _unknown_names(names: Sequence[str], known: Sequence[str], what: str) -> str | None:
    unknown = [n for n in names if n not in known]
    if unknown:
        return f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}"
    return None


def _cmd_demo(args: argparse.Namespace) -> int:
    if (missing := _missing_extra("adamkit demo", ["matplotlib"], "cli")) is not None:
        return missing
    if problem := _output_problem(args.out, args.force):
        return _error(problem)

    from adamkit.experiments.demo import plot_paths, run_demo  # heavy imports (matplotlib) only here

    run_demo(args.out)
    print()
    print("Figures written:")
    for path in plot_paths(args.out):
        print(f"  {path}")
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    if (missing := _missing_extra("adamkit viz", ["matplotlib", "tqdm"], "cli")) is not None:
        return missing
    functions = args.functions or list(args.known)
    if problem := _unknown_names(functions, args.known, "function") or _output_problem(args.out, args.force):
        return _error(problem)

    from adamkit.experiments.progress import progress
    from adamkit.experiments.viz import VIZ_EXPERIMENTS, run_viz

    animated = sum(VIZ_EXPERIMENTS[f].objective.dim == 2 for f in functions) if args.animate else 0
    with progress(len(functions) + animated, "viz") as tick:
        written = run_viz(functions, args.out, animate=args.animate, steps=args.steps, progress=tick)
    print("Figures written:")
    for path in written:
        print(f"  {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if (missing := _missing_extra("adamkit bench", ["tqdm"], "cli")) is not None:
        return missing
    import torch

    from adamkit.experiments import bench
    from adamkit.experiments.progress import progress

    cases = bench.QUICK_CASES if args.quick else bench.CASES
    keys = args.cases.split(",")
    if problem := _unknown_names(keys, list(cases), "cases"):
        return _error(problem)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: no CUDA device is available")
    contenders = bench.CUDA_CONTENDERS if device == "cuda" else bench.CONTENDERS
    rounds = args.rounds or (5 if args.quick else 20)
    add_elements = 5_000_000 if args.quick else 50_000_000
    print(f"{bench.versions()}, device {device}\n")
    for key in keys:
        case = cases[key]
        with progress(rounds, f"case {key}") as tick:
            medians, bandwidth = bench.run_case(case, rounds, contenders, add_elements, device=device, tick=tick)
        print(bench.format_case(case, medians, bandwidth) + "\n", flush=True)
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    from adamkit import memory

    overrides = {key: getattr(args, key) for key in _CONFIG_FLAGS.values() if getattr(args, key) is not None}
    for item in args.config_items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            return _error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _config_value(value)
    try:
        model = memory.build_model(args.model, overrides)
    except memory.ModelSpecError as error:
        return _error(str(error))
    shapes, frozen = memory.param_shapes(model), memory.param_shapes(model, trainable=False)
    count = sum(math.prod(shape) for shape in shapes)
    if not count:
        return _error(f"model {args.model!r} has no trainable params: there is no optimizer state to plan")
    print(f"{args.model}: {memory.parameter_count_text(count)} trainable params in {len(shapes)} tensors ({count:,})")
    if frozen:
        print(
            f"and {sum(math.prod(shape) for shape in frozen):,} frozen params (weights only) in {len(frozen)} tensors"
        )
    print(
        "bytes per param of weights, gradients and optimizer state on the device; the device's GB in all, and "
        "with gradient release; bytes per param in host memory (offload)\n"
    )
    plans = [memory.plan(shapes, setting, frozen) for setting in memory.settings()]
    print(memory.format_table(plans))
    if args.time:
        needed = max(p.total for p in plans if p.setting.library == "adamkit")
        available = memory.available_bytes()
        if available is not None and needed > available / 2:
            return _error(
                f"--time would allocate up to {needed / memory.GB:.1f} GB for {args.model}, more than half the "
                f"{available / memory.GB:.1f} GB this machine has free; plan without --time, or time a smaller config"
            )
        print("\none step of each setting's adamkit optimizer on this machine (median of 3):")
        for setting in memory.settings():
            if setting.library == "adamkit":
                print(f"  {setting.name:32s} {1e3 * memory.time_step(shapes, setting):9.1f} ms", flush=True)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    if (missing := _missing_extra("adamkit reproduce", ["matplotlib", "sklearn", "tqdm"], "experiments")) is not None:
        return missing
    names = args.experiments or list(args.known)
    if problem := _unknown_names(names, args.known, "experiment") or _output_problem(args.out, args.force):
        return _error(problem)

    from adamkit.experiments.paper import EXPERIMENTS, run_reproduce
    from adamkit.experiments.paper.report import verdict
    from adamkit.experiments.progress import progress

    units = sum(EXPERIMENTS[name].units(args.quick) for name in names)
    with progress(units, "reproduce") as tick:
        outcomes, report = run_reproduce(names, args.out, quick=args.quick, tick=tick)
    width = max(len(o.title) for o in outcomes)
    print(f"{'experiment':{width}s}  paper's result holds here?")
    for o in outcomes:
        print(f"{o.title:{width}s}  {verdict(o.holds, args.quick)}")
    print()
    print(f"Report: {report[0]} (all numbers in {report[1]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        status = args.handler(args)
        sys.stdout.flush()  # (here, where a reader that went away is handled)
        return status
    except KeyboardInterrupt:
        print("adamkit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`adamkit memory gpt2 | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the interpreter's last flush too)
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # a failed run: say what failed, exit 1
        print(f"adamkit {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
