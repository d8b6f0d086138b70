"""Fidelity panel: does each lean setting train like fp32 AdamW, all the way to the end?

Three tasks, each trained from the same initialisation on the same data order by every
setting:

* ``regression``: a 2-hidden-layer MLP fitting a random teacher network of the same
  shape (noise-free targets), full batch, to near interpolation: the task where a
  second moment that stops following its shrinking gradients shows.
* ``digits``: an MLP classifying scikit-learn's bundled 8x8 digits (1,797 images),
  mini-batches; held-out accuracy and loss.
* ``charlm``: a small byte-level transformer language model on Python's
  standard-library source (``train_storage.py``'s model, narrower); held-out loss.

Settings: fp32 AdamW (torch.optim, the anchor), adamkit's int8 and int4 states, bf16
weights with each rounding (16-bit moments) and with fp32 or int8 moments, and, where
they import, bitsandbytes' and torchao's 8-/4-bit AdamW (on the CPU both keep small
tensors in full precision by default: reported, and also run with that fallback off).

Every setting has a *shadow* torch.optim.AdamW fed the same gradients.  For adamkit
settings: at the end, the median of stored v / shadow v, and the share of stored
second-moment bytes that the last step left unchanged, a quantized code counting as
unchanged only where its block's scale is too (a frozen moment leaves all of them; a
block decaying as a whole keeps its codes while its exact scale moves).
For settings with fp32 weights (whose step is the update itself): the *update-direction
error* against the shadow, sqrt(sum ||d - d_shadow||^2 / sum ||d_shadow||^2) over the
steps of a window, d and d_shadow the two optimizers' weight changes in the same step
(``direction``: the last tenth of the steps, near convergence; ``direction all``: every
step after the first 10).

    python benchmarks/fidelity.py                 # every task, every setting (about 5 minutes, 2 cores)
    python benchmarks/fidelity.py --quick         # tiny versions (seconds; CI runs it)
    python benchmarks/fidelity.py --tasks regression --out DIR   # curves.png and results.csv in DIR
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import sysconfig
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

import adamkit
from adamkit.memory import tensor_bytes
from adamkit.precision import cast_module
from adamkit.state import moment_value

# ---------------------------------------------------------------------------- settings


@dataclass
class Setting:
    name: str
    dtype: torch.dtype = torch.float32
    options: dict = field(default_factory=dict)
    #: "adamkit", "torch", or an anchor's name
    library: str = "adamkit"


def settings() -> list[Setting]:
    found = [
        Setting("fp32 AdamW (torch)", library="torch"),
        Setting("int8", options={"state_precision": "int8"}),
        Setting("int4", options={"state_precision": "int4"}),
        Setting("bf16, nearest", torch.bfloat16),
        Setting("bf16, kahan", torch.bfloat16, {"rounding": "kahan"}),
        Setting("bf16, stochastic", torch.bfloat16, {"rounding": "stochastic"}),
        Setting("bf16, kahan, fp32 states", torch.bfloat16, {"rounding": "kahan", "state_precision": "fp32"}),
        Setting("bf16, kahan, int8", torch.bfloat16, {"rounding": "kahan", "state_precision": "int8"}),
        Setting(
            "bf16, master fp32, fp32 states", torch.bfloat16, {"master_weights": "fp32", "state_precision": "fp32"}
        ),
        Setting("bf16, master fp32, int8", torch.bfloat16, {"master_weights": "fp32", "state_precision": "int8"}),
        Setting(
            "bf16, master 24bit, fp32 states", torch.bfloat16, {"master_weights": "24bit", "state_precision": "fp32"}
        ),
        Setting("bf16, master 24bit, int8", torch.bfloat16, {"master_weights": "24bit", "state_precision": "int8"}),
        Setting("bf16, master 24bit, int4", torch.bfloat16, {"master_weights": "24bit", "state_precision": "int4"}),
    ]
    try:
        import bitsandbytes  # noqa: F401

        found += [
            Setting("bitsandbytes 8-bit", options={}, library="bnb8"),
            Setting("bitsandbytes 8-bit, no fallback", options={"min_8bit_size": 0}, library="bnb8"),
        ]
    except Exception:  # noqa: BLE001 - not installed, or fails to load: not a contender
        pass
    try:
        from torchao import optim  # noqa: F401

        found += [Setting("torchao 8-bit", library="ao8"), Setting("torchao 4-bit", library="ao4")]
    except Exception:  # noqa: BLE001
        pass
    return found


def make_optimizer(setting: Setting, params: list, lr: float, weight_decay: float):
    if setting.library == "torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if setting.library == "bnb8":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, **setting.options)
    if setting.library in ("ao8", "ao4"):
        from torchao import optim

        cls = optim.AdamW8bit if setting.library == "ao8" else optim.AdamW4bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    return adamkit.AdamW(params, lr=lr, weight_decay=weight_decay, **{"seed": 0, **setting.options})


def full_precision_share(optimizer) -> float:
    """Of the params an anchor optimizer steps, the share (by elements) whose second
    moment it keeps at 32 bits (its small-tensor fallback)."""
    kept = total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("state2", "exp_avg_sq"):
                value = state.get(key)
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    total += p.numel()
                    kept += p.numel() if value.dtype == torch.float32 and type(value) is torch.Tensor else 0
                    break
    return kept / total if total else float("nan")


# ---------------------------------------------------------------------------- tasks


class Task:
    name: str
    steps: int
    lr: float
    weight_decay = 0.0

    def model(self) -> nn.Module: ...
    def loss(self, model: nn.Module, step: int) -> torch.Tensor: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    metric: str  # the key of evaluate()'s result that the panel compares (lower is better)


def forward_fp32(model: nn.Module, *inputs):
    """The forward pass in fp32 from the stored (possibly bf16) weights; gradients reach
    the stored params in their own dtype."""
    weights = {name: p.float() for name, p in model.named_parameters()}
    return functional_call(model, weights, inputs)


def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class Regression(Task):
    """Fit a random teacher MLP (8 -> 64 -> 64 -> 1, noise-free) with the same shape,
    full batch: the loss falls by orders of magnitude and the gradients shrink with it."""

    name, metric = "regression", "train_mse"

    def __init__(self, quick: bool):
        self.steps, self.lr = (300, 3e-3) if quick else (3000, 3e-3)
        g = torch.Generator().manual_seed(10)
        self.x = torch.randn(512, 8, generator=g)
        torch.manual_seed(11)
        teacher = mlp([8, 64, 64, 1])
        with torch.no_grad():
            self.y = teacher(self.x)
        self.test_x = torch.randn(512, 8, generator=g)
        with torch.no_grad():
            self.test_y = teacher(self.test_x)

    def model(self) -> nn.Module:
        torch.manual_seed(12)
        return mlp([8, 64, 64, 1])

    def loss(self, model, step):
        return (forward_fp32(model, self.x) - self.y).pow(2).mean()

    def evaluate(self, model):
        with torch.no_grad():
            return {
                "train_mse": self.loss(model, 0).item(),
                "test_mse": (forward_fp32(model, self.test_x) - self.test_y).pow(2).mean().item(),
            }


class Digits(Task):
    """scikit-learn's 8x8 digits: an MLP (64 -> 128 -> 10), batches of 64, 1,437 images to
    train on, 360 held out."""

    name, metric = "digits", "test_loss"
    weight_decay = 1e-2

    def __init__(self, quick: bool):
        from sklearn.datasets import load_digits

        self.steps, self.lr = (150, 3e-3) if quick else (2000, 1e-3)
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(20))
        self.x, self.y = x[order[:1437]], y[order[:1437]]
        self.test_x, self.test_y = x[order[1437:]], y[order[1437:]]

    def model(self):
        torch.manual_seed(21)
        return mlp([64, 128, 10])

    def loss(self, model, step):
        g = torch.Generator().manual_seed(1000 + step)
        pick = torch.randint(0, len(self.y), (64,), generator=g)
        return nn.functional.cross_entropy(forward_fp32(model, self.x[pick]), self.y[pick])

    def evaluate(self, model):
        with torch.no_grad():
            logits = forward_fp32(model, self.test_x)
            return {
                "test_loss": nn.functional.cross_entropy(logits, self.test_y).item(),
                "test_accuracy": (logits.argmax(1) == self.test_y).float().mean().item(),
            }


class CharLM(Task):
    """A byte-level transformer (1 layer, width 64, context 32) on the standard library's
    source: 90 % of the files train, 10 % are held out."""

    name, metric = "charlm", "test_loss"
    weight_decay = 0.1
    context, width = 32, 64

    def __init__(self, quick: bool):
        self.steps, self.lr = (60, 4e-3) if quick else (800, 4e-3)
        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
        files = files[:20] if quick else files
        held_out = set(files[::10])
        self.data = _bytes_of([f for f in files if f not in held_out])
        self.test = _bytes_of(sorted(held_out))
        g = torch.Generator().manual_seed(30)
        self.evaluation = [self.window(self.test, g) for _ in range(10)]

    def window(self, data, g):
        start = torch.randint(0, data.numel() - self.context - 1, (32,), generator=g)
        rows = torch.stack([data[s : s + self.context + 1] for s in start.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def model(self):
        torch.manual_seed(31)
        return _TinyLM(self.context, self.width)

    def loss(self, model, step):
        tokens, targets = self.window(self.data, torch.Generator().manual_seed(2000 + step))
        return nn.functional.cross_entropy(forward_fp32(model, tokens).reshape(-1, 256), targets.reshape(-1))

    def evaluate(self, model):
        with torch.no_grad():
            losses = [
                nn.functional.cross_entropy(forward_fp32(model, t).reshape(-1, 256), y.reshape(-1)).item()
                for t, y in self.evaluation
            ]
        return {"test_loss": sum(losses) / len(losses)}


def _bytes_of(files: list[str]) -> torch.Tensor:
    """The files' bytes, concatenated, as a long tensor of byte values."""
    return torch.frombuffer(bytearray(b"".join(open(f, "rb").read() for f in files)), dtype=torch.uint8).long()


class _TinyLM(nn.Module):
    def __init__(self, context: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens):
        return self.head(self.blocks(self.embed(tokens) + self.position, mask=self.mask, is_causal=True))


TASKS = {"regression": Regression, "digits": Digits, "charlm": CharLM}

# ---------------------------------------------------------------------------- runs


def second_moment_codes(optimizer, params) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The stored second moments (quantized codes with their block scales, or 16-bit
    patterns), to count how many the last step changed."""
    out = []
    for p in params:
        state = optimizer.state[p]
        for key, value in state.items():
            if key.startswith("exp_avg_sq") and not key.endswith("_scales"):
                scales = state.get(f"{key}_scales")
                out.append((value.detach().clone(), None if scales is None else scales.detach().clone()))
    return out


def unchanged_share(before: list, after: list) -> float:
    """Of the stored second-moment bytes, the share equal before and after a step: a
    code only where its block's scale is equal too."""
    same = total = 0
    for (codes, scales), (new_codes, new_scales) in zip(before, after):
        kept = codes == new_codes
        if scales is not None:  # each scale covers a run of code bytes
            per_block = -(-codes.numel() // scales.numel())
            kept &= (scales == new_scales).repeat_interleave(per_block)[: codes.numel()]
        same += int(kept.sum())
        total += codes.numel()
    return same / max(1, total)


class DirectionError:
    """The update-direction error against the shadow (see the module's docstring),
    summed over two windows of steps: the last tenth, and every step after the 10th."""

    def __init__(self, steps: int):
        self.last_tenth = steps - max(1, steps // 10)
        self.sums = {"direction": [0.0, 0.0], "direction_all": [0.0, 0.0]}

    def add(self, step: int, before, params, shadow_before, shadow_params) -> None:
        if step < 10:
            return
        error = reference = 0.0
        for b, p, sb, q in zip(before, params, shadow_before, shadow_params):
            d, d_shadow = (p.detach() - b).double(), (q.detach() - sb).double()
            error += (d - d_shadow).square().sum().item()
            reference += d_shadow.square().sum().item()
        windows = ["direction_all"] + (["direction"] if step >= self.last_tenth else [])
        for window in windows:
            self.sums[window][0] += error
            self.sums[window][1] += reference

    def errors(self) -> tuple[float, float]:
        return tuple(math.sqrt(e / r) if r else float("nan") for e, r in self.sums.values())


def train_beside_shadow(task: Task, model: nn.Module, optimizer, shadow_params: list, shadow, schedules=()):
    """Train ``model`` on ``task`` with ``optimizer`` for the task's steps, the fp32
    ``shadow`` (over ``shadow_params``) fed the same gradients, each of ``schedules``
    stepped after every step; returns the update-direction errors (``None`` where the
    weights are not fp32: their step is not the update itself)."""
    params = list(model.parameters())
    directions = DirectionError(task.steps) if all(p.dtype == torch.float32 for p in params) else None
    for step in range(task.steps):
        task.loss(model, step).backward()
        for p, q in zip(params, shadow_params):
            q.grad = p.grad.float()
        before = [p.detach().clone() for p in params] if directions else None
        shadow_before = [q.detach().clone() for q in shadow_params] if directions else None
        optimizer.step()
        shadow.step()
        if directions:
            directions.add(step, before, params, shadow_before, shadow_params)
        optimizer.zero_grad(set_to_none=True)
        for schedule in schedules:
            schedule.step()
    return directions


def v_ratio(optimizer, params, shadow, shadow_params) -> float:
    """The median over elements of an adamkit optimizer's stored v / its shadow's v."""
    ratios = [
        (moment_value(optimizer.state[p], "exp_avg_sq", p).double() / shadow.state[q]["exp_avg_sq"].double())
        .reshape(-1)
        .nan_to_num(nan=1.0)
        for p, q in zip(params, shadow_params)
    ]
    return torch.cat(ratios).median().item()


def warmup_cosine(steps: int):
    """The panel's lr factor at step t: a 50-step linear warm-up, then a cosine from 1 to 0.1."""
    return lambda t: min(1.0, (t + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / steps)))


def run(task: Task, setting: Setting) -> dict:
    model = cast_module(task.model(), setting.dtype)
    params = list(model.parameters())
    optimizer = make_optimizer(setting, params, task.lr, task.weight_decay)
    shadow_params = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    shadow = torch.optim.AdamW(shadow_params, lr=task.lr, weight_decay=task.weight_decay)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(task.steps)) for opt in (optimizer, shadow)]
    curve, unchanged = [], float("nan")
    directions = DirectionError(task.steps) if setting.dtype == torch.float32 else None
    for step in range(task.steps):
        loss = task.loss(model, step)
        loss.backward()
        for p, q in zip(params, shadow_params):
            q.grad = p.grad.float()
        last = step == task.steps - 1 and setting.library == "adamkit"
        before = second_moment_codes(optimizer, params) if last else None
        weights = [p.detach().clone() for p in params] if directions else None
        shadow_weights = [q.detach().clone() for q in shadow_params] if directions else None
        optimizer.step()
        shadow.step()
        if directions:
            directions.add(step, weights, params, shadow_weights, shadow_params)
        if last:
            unchanged = unchanged_share(before, second_moment_codes(optimizer, params))
        optimizer.zero_grad(set_to_none=True)
        for schedule in schedules:
            schedule.step()
        curve.append(loss.item())
    result = {"curve": curve, **task.evaluate(model), "unchanged_codes": unchanged}
    result["direction"], result["direction_all"] = directions.errors() if directions else (float("nan"),) * 2
    if setting.library == "adamkit":
        result["v_ratio"] = v_ratio(optimizer, params, shadow, shadow_params)
    else:
        result["v_ratio"] = float("nan")
    if setting.library not in ("adamkit", "torch"):
        result["fp32_share"] = full_precision_share(optimizer)
    held = sum(
        tensor_bytes(t) for p in params for k, t in optimizer.state[p].items() if k != "step" and torch.is_tensor(t)
    )
    weights = sum(p.numel() * p.element_size() for p in params)
    result["bytes_per_param"] = (held + weights) / sum(p.numel() for p in params)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--quick", action="store_true", help="tiny versions of every task (seconds)")
    parser.add_argument("--settings", nargs="*", help="setting names (default: every one that imports)")
    parser.add_argument("--out", help="write results.csv and curves.png here")
    args = parser.parse_args(argv)
    chosen = settings()
    if args.settings:
        unknown = set(args.settings) - {s.name for s in chosen}
        if unknown:
            parser.error(f"unknown settings {sorted(unknown)}; known here: {[s.name for s in chosen]}")
        chosen = [s for s in chosen if s.name in args.settings]
    threads = torch.get_num_threads()
    rows = []
    try:
        torch.set_num_threads(os.cpu_count() or 1)
        for task_name in args.tasks.split(","):
            task = TASKS[task_name](args.quick)
            print(f"\n{task.name}: {task.steps} steps, AdamW lr {task.lr:g}, weight decay {task.weight_decay:g}")
            print(
                f"  {'setting':34s} {task.metric:>11s} {'vs fp32':>8s} {'v / fp32 v':>10s} "
                f"{'unchanged':>9s} {'direction':>9s} {'dir. all':>8s} {'B/param':>8s}  other"
            )
            results = {}
            for setting in chosen:
                results[setting.name] = r = run(task, setting)
                anchor = results[chosen[0].name][task.metric]
                ratio = r[task.metric] / anchor
                extra = {
                    k: v
                    for k, v in r.items()
                    if k
                    not in (
                        "curve",
                        task.metric,
                        "v_ratio",
                        "unchanged_codes",
                        "bytes_per_param",
                        "direction",
                        "direction_all",
                    )
                }
                print(
                    f"  {setting.name:34s} {r[task.metric]:11.4g} {ratio:8.3f} {r['v_ratio']:10.3f} "
                    f"{r['unchanged_codes']:9.3f} {r['direction']:9.3f} {r['direction_all']:8.3f} "
                    f"{r['bytes_per_param']:8.2f}  " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()),
                    flush=True,
                )
                rows.append(
                    {
                        "task": task.name,
                        "setting": setting.name,
                        "ratio": ratio,
                        **{k: v for k, v in r.items() if k != "curve"},
                    }
                )
            if args.out:
                plot(task, results, os.path.join(args.out, f"{task.name}.png"))
    finally:
        torch.set_num_threads(threads)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for row in rows for k in row}))
            writer.writeheader()
            writer.writerows(rows)
    return 0


def plot(task: Task, results: dict, path: str, window: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        curve = torch.tensor(r["curve"])
        w = min(window, len(curve))
        smooth = curve.unfold(0, w, 1).mean(dim=1)
        ax.plot(range(w, len(curve) + 1), smooth.numpy(), label=f"{name} ({r[task.metric]:.3g})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({window}-step mean)")
    ax.set_title(f"{task.name}: lean settings against fp32 AdamW ({task.metric})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
