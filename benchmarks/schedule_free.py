"""Schedule-free AdamW's lean storage on a task trained close to convergence.

The fidelity panel's ``regression`` task (an MLP fitting a random teacher of its own
shape, full batch, noise-free: the loss falls by orders of magnitude and the gradients
shrink with it), trained by ``adamkit.ScheduleFreeAdamW`` under each storage setting.
Every run has a *shadow*, the ``schedulefree`` package's ``AdamWScheduleFree`` in fp32,
fed the same gradients: for the settings with fp32 weights, the update-direction error
sqrt(sum ||d - d_shadow||^2 / sum ||d_shadow||^2) of the training point y over the last
tenth of the steps and over every step after the 10th, and the median stored v /
shadow v at the end.  Each run's training and held-out loss are taken at the average x
(``optimizer.eval()``), the point schedule-free keeps; torch's AdamW with warm-up and
cosine decay is shown for scale.

    python benchmarks/schedule_free.py             # 3,000 steps (about a minute, 2 cores)
    python benchmarks/schedule_free.py --quick     # 300 steps (CI runs it)
    python benchmarks/schedule_free.py --settings fp32 --isolate   # whose bf16 rounding costs the loss
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

import adamkit
from adamkit.kernels.storage import round_stochastic
from adamkit.precision import cast_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import Regression, train_beside_shadow, v_ratio  # noqa: E402

#: name -> (weights' dtype, ScheduleFreeAdamW options)
SETTINGS = {
    "fp32": (torch.float32, {}),
    "bf16 v": (torch.float32, {"state_precision": "bf16"}),
    "int8 v": (torch.float32, {"state_precision": "int8"}),
    "int4 v": (torch.float32, {"state_precision": "int4"}),
    "bf16 weights (stochastic) + int8 v": (torch.bfloat16, {"rounding": "stochastic", "state_precision": "int8"}),
    "bf16 + 24-bit master + int8 v": (torch.bfloat16, {"master_weights": "24bit", "state_precision": "int8"}),
    "bf16 + fp32 master + fp32 v": (torch.bfloat16, {"master_weights": "fp32", "state_precision": "fp32"}),
}
LR = 1e-2  # schedule-free's rate (its default is 2.5e-3; the task wants more)
WARMUP = 50
ISOLATION_SEEDS = 4


def train(task: Regression, dtype: torch.dtype, options: dict) -> dict:
    import schedulefree

    model = cast_module(task.model(), dtype)
    params = list(model.parameters())
    optimizer = adamkit.ScheduleFreeAdamW(params, lr=LR, warmup_steps=WARMUP, seed=0, **options)
    shadow_params = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    shadow = schedulefree.AdamWScheduleFree(shadow_params, lr=LR, warmup_steps=WARMUP)
    shadow.train()
    directions = train_beside_shadow(task, model, optimizer, shadow_params, shadow)
    ratio = v_ratio(optimizer, params, shadow, shadow_params)
    optimizer.eval()
    result = task.evaluate(model)
    result["direction"], result["direction_all"] = directions.errors() if directions else (math.nan,) * 2
    result["v_ratio"] = ratio
    return result


def adamw_cosine(task: Regression) -> dict:
    model = task.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    warmup_cosine = lambda t: min(1.0, (t + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / task.steps)))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    for step in range(task.steps):
        task.loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return task.evaluate(model)


def _rounded_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` rounded stochastically to bf16 (adamkit's rounding), back in fp32."""
    bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=generator)
    return round_stochastic(x, torch.bfloat16, bits).float()


def rounding_isolated(task: Regression, round_y: bool, round_z: bool, seed: int = 0) -> float:
    """Training MSE at x of schedule-free AdamW written out here in fp32 (the package's
    update order), with y and/or z rounded stochastically to bf16 after every step
    (``seed``: the rounding's random bits)."""
    model = task.model()
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(torch.bfloat16).float())
    zs, vs = [p.detach().clone() for p in params], [torch.zeros_like(p) for p in params]
    generator, weight_sum, lr_max, (beta1, beta2) = torch.Generator().manual_seed(seed), 0.0, -1.0, (0.9, 0.999)
    for k in range(task.steps):
        task.loss(model, k).backward()
        lr = LR * ((k + 1) / WARMUP if k < WARMUP else 1.0)
        lr_max = max(lr, lr_max)
        weight_sum += lr_max**2
        c = lr_max**2 / weight_sum
        with torch.no_grad():
            for p, z, v in zip(params, zs, vs):
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                d = p.grad / (v.div(1 - beta2 ** (k + 1)).sqrt() + 1e-8)
                y = p.lerp(z, c).add_(d, alpha=lr * (beta1 * (1 - c) - 1))
                z.sub_(d, alpha=lr)
                p.copy_(_rounded_to_bf16(y, generator) if round_y else y)
                if round_z:
                    z.copy_(_rounded_to_bf16(z, generator))
                p.grad = None
    with torch.no_grad():
        for p, z in zip(params, zs):
            p.lerp_(z, 1 - 1 / beta1)
    return task.evaluate(model)["train_mse"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 steps instead of 3,000")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument(
        "--isolate", action="store_true", help="also: which sequence's bf16 rounding costs the loss (y, z or both)"
    )
    args = parser.parse_args(argv)
    names = args.settings.split(",")
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    task = Regression(args.quick)
    threads = torch.get_num_threads()
    print(f"regression task, {task.steps} steps, ScheduleFreeAdamW lr {LR}, warm-up {WARMUP}; torch threads {threads}")
    print(
        f"  {'setting':34s} {'train mse':>10s} {'/ fp32':>7s} {'test mse':>10s} {'direction':>10s} {'dir. all':>9s} {'v/fp32':>7s}"
    )
    rows = {name: train(task, *SETTINGS[name]) for name in names}
    anchor = rows.get("fp32", next(iter(rows.values())))["train_mse"]
    for name, r in rows.items():
        print(
            f"  {name:34s} {r['train_mse']:10.3e} {r['train_mse'] / anchor:7.3f} {r['test_mse']:10.3e} "
            f"{r['direction']:10.4f} {r['direction_all']:9.4f} {r['v_ratio']:7.3f}"
        )
    scale = adamw_cosine(task)
    print(
        f"  {'torch AdamW, warm-up + cosine':34s} {scale['train_mse']:10.3e} {scale['train_mse'] / anchor:7.3f} {scale['test_mse']:10.3e}"
    )
    if args.isolate:
        exact = rounding_isolated(task, False, False)
        print(
            "\nbf16 stochastic rounding of one sequence after every step (a plain fp32 loop here): train mse / unrounded"
        )
        print(f"  {'unrounded / adamkit fp32':24s} {exact / anchor:7.3f}")
        for label, flags in (("y only", (True, False)), ("z only", (False, True)), ("y and z", (True, True))):
            ratios = [rounding_isolated(task, *flags, seed=seed) / exact for seed in range(ISOLATION_SEEDS)]
            print(f"  {label:24s} " + " ".join(f"{ratio:7.3f}" for ratio in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
