"""Training a small byte-level transformer language model on Python's
standard-library source with lean storage: final loss per storage policy (bf16
weights with each rounding mode; int8 and int4 optimizer states) against fp32 AdamW.

Each run starts from the same fp32 initialisation and sees the same batches, with no
re-synchronisation.  In the bf16 runs the weights, their gradients and (unless
stated) the optimizer states are bf16; the activations are computed in fp32 from the
bf16 weights, because this CPU has no bf16 matrix units (a bf16 forward is ~14x
slower here) and the question is what the optimizer does with bf16 weights.  The
loss is measured on held-out files, in fp32, from the weights as stored (for Kahan:
p, not p + c).

Usage: python benchmarks/train_storage.py [--steps 1000] [--out DIR] [--runs NAME ...]
(``--out`` writes curves.csv and curves.png)
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import sysconfig
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

import adamkit
from adamkit.experiments.bench import held_state_bytes
from adamkit.precision import cast_module

CONTEXT, BATCH, WIDTH, LAYERS, HEADS = 64, 32, 128, 2, 4


@dataclass
class Run:
    name: str
    dtype: torch.dtype
    options: dict = field(default_factory=dict)


RUNS = [
    Run("fp32", torch.float32),
    Run("bf16 nearest", torch.bfloat16, {"rounding": "nearest"}),
    Run("bf16 kahan", torch.bfloat16, {"rounding": "kahan"}),
    Run("bf16 stochastic", torch.bfloat16, {"rounding": "stochastic", "seed": 0}),
    Run("bf16 kahan, fp32 states", torch.bfloat16, {"rounding": "kahan", "state_precision": "fp32"}),
    Run("fp32, int8 states", torch.float32, {"state_precision": "int8"}),
    Run("fp32, int4 states", torch.float32, {"state_precision": "int4"}),
    Run("bf16 kahan, int8 states", torch.bfloat16, {"rounding": "kahan", "state_precision": "int8"}),
    Run(
        "bf16 stochastic, int4 states", torch.bfloat16, {"rounding": "stochastic", "seed": 0, "state_precision": "int4"}
    ),
]


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The stdlib's top-level .py files as bytes: 90% of the files train, 10% are held out."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    held_out = set(files[::10])
    train = b"".join(open(f, "rb").read() for f in files if f not in held_out)
    test = b"".join(open(f, "rb").read() for f in sorted(held_out))
    return (
        torch.frombuffer(bytearray(train), dtype=torch.uint8).long(),
        torch.frombuffer(bytearray(test), dtype=torch.uint8).long(),
    )


class ByteTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, WIDTH)
        self.position = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position
        return self.head(self.norm(self.blocks(h, mask=self.mask, is_causal=True)))


def batch(data: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, data.numel() - CONTEXT - 1, (BATCH,), generator=generator)
    window = torch.stack([data[s : s + CONTEXT + 1] for s in start.tolist()])
    return window[:, :-1], window[:, 1:]


def loss_of(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the forward in fp32 from the stored (possibly bf16) weights;
    gradients reach the stored params in their own dtype."""
    weights = {name: p.float() for name, p in model.named_parameters()}
    logits = functional_call(model, weights, (tokens,))
    return nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))


def train(run: Run, steps: int, data, evaluation, lr: float = 8e-3) -> dict:
    torch.manual_seed(0)
    model = cast_module(ByteTransformer(), run.dtype)
    optimizer = adamkit.AdamW(model.parameters(), lr=lr, weight_decay=0.1, **run.options)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min(1.0, (t + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / steps)))
    )
    generator = torch.Generator().manual_seed(1)
    curve, started = [], time.perf_counter()
    for _ in range(steps):
        loss = loss_of(model, *batch(data, generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        curve.append(loss.item())
    with torch.no_grad():
        held_out = sum(loss_of(model, *b).item() for b in evaluation) / len(evaluation)
    tail = curve[-50:]
    return {
        "curve": curve,
        "train": sum(tail) / len(tail),
        "held_out": held_out,
        "state_bytes": held_state_bytes(optimizer),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--lr",
        type=float,
        default=8e-3,
        help="peak lr (default 8e-3: the best of 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2 for fp32 AdamW at 1000 steps)",
    )
    parser.add_argument("--runs", nargs="*", default=[r.name for r in RUNS], help="run names (default: all)")
    parser.add_argument("--out", help="write the loss curves to DIR/curves.csv")
    args = parser.parse_args()
    unknown = set(args.runs) - {r.name for r in RUNS}
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; known: {[r.name for r in RUNS]}")

    torch.set_num_threads(os.cpu_count() or 1)
    data, test = corpus()
    generator = torch.Generator().manual_seed(2)
    evaluation = [batch(test, generator) for _ in range(20)]
    print(
        f"byte-level transformer ({LAYERS} layers, width {WIDTH}, context {CONTEXT}, batch {BATCH}), "
        f"{data.numel() / 1e6:.1f} MB of stdlib source, {args.steps} steps, AdamW lr {args.lr:g} wd 0.1, cosine"
    )
    print("bf16 runs: weights, gradients and states in bf16 (unless stated); activations in fp32\n")
    results = {}
    for run in (r for r in RUNS if r.name in args.runs):
        results[run.name] = train(run, args.steps, data, evaluation, args.lr)
        r = results[run.name]
        print(f"  {run.name:26s} done in {r['seconds']:.0f} s", flush=True)

    reference = results.get("fp32")
    print(f"\n{'run':26s} {'train loss':>10s} {'held-out':>9s} {'vs fp32':>8s} {'state B/param':>13s}")
    for name, r in results.items():
        ratio = f"{100 * (r['held_out'] / reference['held_out'] - 1):+.2f}%" if reference else "-"
        print(f"{name:26s} {r['train']:10.4f} {r['held_out']:9.4f} {ratio:>8s} {r['state_bytes']:13.2f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", *results])
            for step, losses in enumerate(zip(*(r["curve"] for r in results.values()))):
                writer.writerow([step + 1, *(f"{x:.5f}" for x in losses)])
        plot_curves(results, os.path.join(args.out, "curves.png"))


def plot_curves(results: dict, path: str, window: int = 25) -> None:
    """Training loss (a moving average over ``window`` steps) of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        curve = torch.tensor(r["curve"])
        smooth = curve.unfold(0, min(window, len(curve)), 1).mean(dim=1)
        ax.plot(
            range(len(curve) - len(smooth) + 1, len(curve) + 1), smooth.numpy(), label=f"{name} ({r['held_out']:.3f})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({window}-step mean)")
    ax.set_title("byte-level transformer on stdlib source: AdamW storage policies (held-out loss)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
