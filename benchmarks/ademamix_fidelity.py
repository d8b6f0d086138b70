"""AdEMAMix's quantized states on a task trained close to convergence, beside bitsandbytes.

The fidelity panel's ``regression`` task (an MLP fitting a random teacher of its own
shape, full batch, noise-free, so the gradients shrink by orders of magnitude), trained
by ``adamkit.AdEMAMix`` with int8 and int4 states (all three moments) and by
bitsandbytes' ``AdEMAMix8bit`` (on the CPU; ``min_8bit_size=0``, so that no tensor falls
back to 32 bits).  Every run has an fp32 ``adamkit.AdEMAMix`` shadow fed the same
gradients: the update-direction error over the last tenth of the steps and over every
step after the 10th, and the final training and held-out losses against the fp32 run.

    python benchmarks/ademamix_fidelity.py            # 3,000 steps (about a minute, 2 cores)
    python benchmarks/ademamix_fidelity.py --quick    # 300 steps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import adamkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import Regression, train_beside_shadow  # noqa: E402

#: AdEMAMix's hyperparameters for every run: beta3 0.999 with warm-ups, as the paper
#: advises for a large beta3 (the task is short)
HYPERPARAMETERS = {"lr": 1e-3, "betas": (0.9, 0.999), "alpha": 5.0, "weight_decay": 0.0}
BETA3, WARMUP = 0.999, 500


def _adamkit(params, precision: str | None):
    return adamkit.AdEMAMix(
        params, beta3=BETA3, alpha_warmup=WARMUP, beta3_warmup=WARMUP, state_precision=precision, seed=0,
        **HYPERPARAMETERS,
    )  # fmt: skip


def _bitsandbytes(params, _):
    import bitsandbytes

    betas = (*HYPERPARAMETERS["betas"], BETA3)
    options = {k: v for k, v in HYPERPARAMETERS.items() if k != "betas"}
    return bitsandbytes.optim.AdEMAMix8bit(
        params, betas=betas, t_alpha=WARMUP, t_beta3=WARMUP, min_8bit_size=0, **options
    )


#: name -> (optimizer factory, its argument)
SETTINGS = {
    "adamkit fp32": (_adamkit, None),
    "adamkit int8": (_adamkit, "int8"),
    "adamkit int4": (_adamkit, "int4"),
    "bitsandbytes 8-bit": (_bitsandbytes, None),
}


def run(task: Regression, name: str) -> dict:
    make, argument = SETTINGS[name]
    model = task.model()
    shadow_params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    shadow = _adamkit(shadow_params, None)
    optimizer = make(list(model.parameters()), argument)
    directions = train_beside_shadow(task, model, optimizer, shadow_params, shadow)
    result = task.evaluate(model)
    result["direction"], result["direction_all"] = directions.errors()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 steps instead of 3,000")
    args = parser.parse_args(argv)
    task = Regression(args.quick)
    names = list(SETTINGS)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or fails to load: not a contender
        names.remove("bitsandbytes 8-bit")
    print(f"regression task, {task.steps} steps, AdEMAMix {HYPERPARAMETERS}, beta3 {BETA3}, warm-ups {WARMUP}")
    print(f"  {'setting':20s} {'train mse':>10s} {'/ fp32':>7s} {'test mse':>10s} {'direction':>10s} {'dir. all':>9s}")
    rows = {name: run(task, name) for name in names}
    anchor = rows["adamkit fp32"]["train_mse"]
    for name, r in rows.items():
        print(
            f"  {name:20s} {r['train_mse']:10.3e} {r['train_mse'] / anchor:7.3f} {r['test_mse']:10.3e} "
            f"{r['direction']:10.4f} {r['direction_all']:9.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
