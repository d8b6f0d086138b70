"""Step time of this working tree's adamkit against another revision's, in one process.

Both versions are imported side by side (the other revision from a temporary git
worktree, as the package ``adamkit_at_REV``) and stepped in interleaved rounds with
torch's fused Adam, each on its own copy of the same params and gradients, so the
machine's drift hits all three alike.  Prints the median ms per step and the ratios.

    python benchmarks/ab_revision.py HEAD~1                # cases a and b
    python benchmarks/ab_revision.py 1567344 --cases b --rounds 60
    python benchmarks/ab_revision.py HEAD~1 --state-precision int8   # adamkit's quantized states
    python benchmarks/ab_revision.py HEAD~1 --master-weights 24bit   # bf16 params over split masters
    python benchmarks/ab_revision.py HEAD~1 --cautious               # the cautious update's two passes
    python benchmarks/ab_revision.py HEAD~1 --backend foreach        # a torch path instead of the fused kernel
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import adamkit

CASES = {
    "a": (50, 1_000_000),
    "b": (2000, 5000),
    "tiny": (2000, 50),
}


def load_revision(revision: str, folder: Path):
    """The adamkit package of ``revision``, imported as ``adamkit_at_<revision>``."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(folder), revision], check=True)
    name = "adamkit_at_" + "".join(c if c.isalnum() else "_" for c in revision)
    package = folder / "src" / "adamkit"
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def optimizer(library, count: int, size: int, **options):
    """Adam over ``count`` tensors of ``size``: torch's fused one (fp32), or ``library``'s
    with ``options`` (bf16 params under ``master_weights``)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if options.get("master_weights") and library is not torch else torch.float32
    params = [torch.zeros(size, dtype=dtype, requires_grad=True) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(size).to(dtype)
    opt = (
        torch.optim.Adam(params, lr=1e-3, fused=True) if library is torch else library.Adam(params, lr=1e-3, **options)
    )
    for _ in range(3):  # compiled, state allocated
        opt.step()
    return opt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--cases", default="a,b", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per contender")
    parser.add_argument("--state-precision", help="adamkit's state_precision for both revisions (e.g. int8)")
    parser.add_argument("--master-weights", help="bf16 params with adamkit's master_weights (fp32 or 24bit)")
    parser.add_argument("--cautious", action="store_true", help="adamkit's cautious update for both revisions")
    parser.add_argument("--backend", help="adamkit's backend for both revisions (default: the device's)")
    args = parser.parse_args(argv)
    options = {"state_precision": args.state_precision} if args.state_precision else {}
    if args.master_weights:
        options["master_weights"] = args.master_weights
    if args.cautious:
        options["cautious"] = True
    if args.backend:
        options["backend"] = args.backend
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "tree"
        try:
            other = load_revision(args.revision, folder)
            print(
                f"torch {torch.__version__}, threads {torch.get_num_threads()}; this tree against {args.revision}"
                + (f", adamkit with {options}" if options else "")
                + "\n"
            )
            for key in args.cases.split(","):
                count, size = CASES[key]
                contenders = {
                    args.revision: optimizer(other, count, size, **options),
                    "this tree": optimizer(adamkit, count, size, **options),
                    "torch fused": optimizer(torch, count, size),
                }
                times = {name: [] for name in contenders}
                for _ in range(args.rounds):
                    for name, opt in contenders.items():
                        start = time.perf_counter()
                        opt.step()
                        times[name].append(time.perf_counter() - start)
                medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                fused = medians["torch fused"]
                elements = (
                    f"bf16 elements over {args.master_weights} masters (torch fused: fp32, the drift's anchor)"
                    if args.master_weights
                    else "fp32 elements"
                )
                print(f"({key}) {count} tensors of {size:,} {elements}, median of {args.rounds} rounds")
                for name, ms in medians.items():
                    print(f"  {name:14s} {ms:8.2f} ms  {ms / fused:5.3f}x torch fused")
                change = medians["this tree"] / medians[args.revision] - 1
                print(f"  this tree against {args.revision}: {100 * change:+.1f} %\n")
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(folder)], check=False)


if __name__ == "__main__":
    main()
