"""int4 state designs, emulated in torch before any kernel is written (issue 37).

Each design stores Adam's two moments in 4 bits a value, rounded stochastically, in the
layout of ``state_precision="int4"`` (first moment: a signed power map, levels
(k/7)^2, blocks of 32 under a bf16-rounded-up scale; second moment: blocks of 128
under an exact scale).  The emulation draws its own random bits, so it follows the
spec's formats, not its bits:

- ``plain m``: adamkit's int4 before 2026-12-06 (``v`` in e4m0: levels 2^-15 .. 1 of the
  block scale; the first moment stored as it is);
- ``two v maps``: ``v`` in e4m0, or, where more than 32 of a block's 128 elements
  (zeros included) lie below 2^-15 of its largest, in ``e4m0sqrt``: the e4m0 code of
  sqrt(v/s), levels 4x apart down to 2^-30 (first built in every kernel and not
  adopted; adamkit's int4 since it normalizes its first moment, with the share taken
  over a block's nonzero elements, see ``docs/lean-memory.md``);
- ``normalized m``: the first moment stored as ``u = m / (sqrt(v_hat) + eps)``, with
  ``v_hat`` the second moment as stored after the same step, and read back as
  ``m = u (sqrt(v_hat) + eps)``: ``u`` is of the order of an update for every element,
  so a block's quiet elements are not crushed by its busy ones (adamkit's int4 since
  2026-12-06 divides by a power of two near sqrt(v_hat) instead);
- ``normalized m, two v maps``;
- ``normalized m, two v maps, any below``: the wide map for every block with *any*
  element below 2^-15 of its largest, int8's rule for its finer map turned round (the
  rule adamkit's int4 did not take: on the panel it raised the direction error).

Two measurements:

- ``streams``: ``benchmarks/wide_range.py``'s decaying gradient streams (no signal),
  Adam lr 1e-4; per design, the weights' deviation from torch.optim.Adam's run (rms,
  relative to how far fp32 moved) and the largest step any element took, in lr;
- ``panel``: ``benchmarks/fidelity.py``'s tasks and schedule, AdamW; per design,
  the update-direction error against an fp32 shadow fed the same gradients (last tenth
  of the steps) and the task's final metric over the shadow's.

    python benchmarks/int4_designs.py                       # both (about 3 minutes, 2 cores)
    python benchmarks/int4_designs.py streams --steps 300   # seconds
"""

from __future__ import annotations

import argparse

import fidelity
import torch
import wide_range

BETAS, EPS = (0.9, 0.999), 1e-8


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    return torch.cat([flat, flat.new_zeros((-flat.numel()) % block)]).view(-1, block)


def _bf16_ceil(s: torch.Tensor) -> torch.Tensor:
    bits = s.view(torch.int32)
    return torch.where(bits & 0xFFFF != 0, (bits + 0x10000) & ~0xFFFF, bits).view(torch.float32)


def power_map(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """int4's first moment: signed levels (k/7)^2 of a bf16-ceiled absmax, blocks of 32."""
    rows = _blocks(x, 32)
    scale = _bf16_ceil(rows.abs().amax(1, keepdim=True)).clamp_min(1e-38)
    r = rows.abs() / scale
    low = torch.floor(7 * r.sqrt()).clamp(max=7)
    low = low - (r < (low / 7) ** 2).float()
    below, above = (low / 7) ** 2, ((low + 1) / 7) ** 2
    up = (r - below) > torch.rand(r.shape, generator=generator) * (above - below)
    k = (low + (up & (low < 7)).float()).clamp(0, 7)
    return (rows.sign() * scale * (k / 7) ** 2).reshape(-1)[: x.numel()].view_as(x)


def _e4m0(r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """e4m0 levels 2^-15 .. 1 of r in [0, 1], rounded stochastically on r's fp32 bits."""
    bits = r.contiguous().view(torch.int32).long() + (torch.randint(0, 1 << 16, r.shape, generator=generator) << 7)
    code = ((bits >> 23) - 112).clamp(0, 15)
    return ((code + 112) << 23).int().view(torch.float32)


def second_moment(v: torch.Tensor, generator: torch.Generator, wide_rule: str | None) -> torch.Tensor:
    """v in int4's layout: e4m0, or with a ``wide_rule`` ("quarter": more than 32 of the
    block's 128 below e4m0's floor; "any": one is enough) the root map for such blocks."""
    rows = _blocks(v, 128)
    scale = rows.amax(1, keepdim=True).clamp_min(1e-38)
    r = rows / scale
    stored = _e4m0(r, generator)
    if wide_rule is not None:
        below = r < 2.0**-15
        wide = below.sum(1, keepdim=True) > 32 if wide_rule == "quarter" else below.any(1, keepdim=True)
        stored = torch.where(wide, _e4m0(r.sqrt(), generator) ** 2, stored)
    return (stored * scale).reshape(-1)[: v.numel()].view_as(v)


#: per design: (first moment normalized, the rule for the wide v map or None)
DESIGNS = {
    "plain m": (False, None),
    "two v maps": (False, "quarter"),
    "normalized m": (True, None),
    "normalized m, two v maps": (True, "quarter"),
    "normalized m, two v maps, any below": (True, "any"),
}


class EmulatedAdamW(torch.optim.Optimizer):
    """AdamW whose moments are stored as ``design`` says (see the module's docstring)."""

    def __init__(self, params, design: str, lr: float, weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.normalized, self.wide_rule = DESIGNS[design]
        self.generator = torch.Generator().manual_seed(seed)
        self.largest_step = 0.0  # in lr, over every step

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                t, g = state["t"], p.grad.float()
                m = state["m"] * (state["v"].sqrt() + EPS) if self.normalized else state["m"]
                m = BETAS[0] * m + (1 - BETAS[0]) * g
                v = BETAS[1] * state["v"] + (1 - BETAS[1]) * g * g
                update = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
                p.mul_(1 - lr * group["weight_decay"]).sub_(lr * update)
                self.largest_step = max(self.largest_step, float(update.abs().max()))
                state["v"] = second_moment(v, self.generator, self.wide_rule)
                stored = m / (state["v"].sqrt() + EPS) if self.normalized else m
                state["m"] = power_map(stored, self.generator)


def streams(steps: int, elements: int) -> None:
    print(f"\nstreams: {elements:,} elements, {steps:,} steps, Adam lr {wide_range.LR:g}")
    width = max(len(d) for d in DESIGNS)
    print(f"  {'stream':8s} " + "  ".join(f"{d:>{width}s}" for d in DESIGNS))
    print(f"  {'':8s} " + "  ".join(f"{'deviation, largest step':>{width}s}" for _ in DESIGNS))
    for stream in ("D=2", "D=3", "D=4", "mixture"):
        start = torch.randn(elements, generator=torch.Generator().manual_seed(1))
        exact = torch.nn.Parameter(start.clone())
        oracle = torch.optim.Adam([exact], lr=wide_range.LR)
        params = {d: torch.nn.Parameter(start.clone()) for d in DESIGNS}
        optimizers = {d: EmulatedAdamW([params[d]], d, wide_range.LR) for d in DESIGNS}
        for grad in wide_range.gradients(stream, elements, steps):
            exact.grad = grad.clone()
            oracle.step()
            for d, p in params.items():
                p.grad = grad.clone()
                optimizers[d].step()
        moved = (exact.detach() - start).double().square().mean().sqrt()
        cells = []
        for d, p in params.items():
            deviation = ((p.detach() - exact.detach()).double().square().mean().sqrt() / moved).item()
            cells.append(f"{deviation:>15.3f}, {optimizers[d].largest_step:>5.1f} lr")
        print(f"  {stream:8s} " + "  ".join(f"{c:>{width}s}" for c in cells), flush=True)


def _trained(task, design: str | None) -> tuple[float, float]:
    """(direction error over the last tenth, final metric) of a run from seed 0 with
    ``design``, or with torch.optim.AdamW where it is None, under the panel's warm-up and
    cosine schedule, beside an fp32 shadow fed the same gradients."""
    torch.manual_seed(0)
    model = task.model()
    params = list(model.parameters())
    if design is None:
        optimizer = torch.optim.AdamW(params, lr=task.lr, weight_decay=task.weight_decay)
    else:
        optimizer = EmulatedAdamW(params, design, task.lr, task.weight_decay)
    shadow_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    shadow = torch.optim.AdamW(shadow_params, lr=task.lr, weight_decay=task.weight_decay)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, fidelity.warmup_cosine(task.steps)) for o in (optimizer, shadow)]
    directions = fidelity.train_beside_shadow(task, model, optimizer, shadow_params, shadow, schedules)
    return directions.errors()[0], task.evaluate(model)[task.metric]


def panel(tasks: list[str], quick: bool) -> None:
    for name in tasks:
        task = fidelity.TASKS[name](quick)
        print(f"\n{task.name}: {task.steps} steps, AdamW lr {task.lr:g} (warm-up and cosine, as the panel)")
        print(f"  {'design':36s} {'direction':>9s} {task.metric + ' / fp32':>16s}")
        anchor = _trained(task, None)[1]
        for design in DESIGNS:
            direction, metric = _trained(task, design)
            print(f"  {design:36s} {direction:9.3f} {metric / anchor:16.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("streams", "panel", "both"), default="both")
    parser.add_argument("--steps", type=int, default=2000, help="stream steps")
    parser.add_argument("--elements", type=int, default=16384)
    parser.add_argument("--tasks", default=",".join(fidelity.TASKS))
    parser.add_argument("--quick", action="store_true", help="the panel's tiny tasks")
    args = parser.parse_args(argv)
    if args.what in ("streams", "both"):
        streams(args.steps, args.elements)
    if args.what in ("panel", "both"):
        panel(args.tasks.split(","), args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
