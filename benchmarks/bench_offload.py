"""Offload benchmark (issue 36): a GPT-like model with bf16 weights and fp32 master
weights, trained 10 steps four ways in one process, on the same data:

(i)   GPU-resident adamkit (the Triton kernel), fp32 states, and again with int8 states;
(ii)  ``offload="cpu"`` with fp32 host states, under gradient release;
(iii) ``offload="cpu"`` with int8 host states, under gradient release;
(iv)  torchao's ``CPUOffloadOptimizer`` around ``torch.optim.AdamW(fused=True)`` (where
      torchao imports), with ``offload_gradients=True`` (each device gradient freed once
      copied, as gradient release frees it).  Its host copies take the params' dtype, so
      its host step keeps bf16 weights and bf16 moments, no master weights: less host
      work and memory than (ii), and not its accuracy; its "x max(parts)" is not
      printed (the parts measured are adamkit's).

It prints (ii) and (iii) against the resident run with the same storage (params and
every state tensor, bit for bit), the peak device memory of each run against the bound
``bf16 weights + largest gradient + activations`` (activations: the peak of a
forward+backward alone, gradients freed as they come, less the weights and the largest
gradient), and the step time against its parts, each measured alone in this run:
forward+backward, the host step (the CPU kernel on host copies), and the transfers
(each param and gradient to the host, each param back).  Last, the host step's kernel
alone on fp32 params of the model's shapes, fp32 and int8 states, against torch's fused
CPU AdamW, in interleaved rounds (the host that offload runs on).

    python benchmarks/bench_offload.py            # ~1B params on CUDA; a tiny model on CPU
    python benchmarks/bench_offload.py --layers 4 --width 1024 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import adamkit
from adamkit.memory import tensor_bytes

GB = 1e9


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(torch.nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed, self.position = torch.nn.Embedding(vocab, width), torch.nn.Embedding(context, width)
        self.blocks = torch.nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm, self.head = torch.nn.LayerNorm(width), torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device) -> GPT:
    torch.manual_seed(0)
    return GPT(args.vocab, args.width, args.layers, args.heads, args.context).to(device, torch.bfloat16)


def batches(args, device):
    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        yield torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=g).to(device)


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def timed_steps(args, device, model, after_backward) -> tuple[float, int]:
    """Median ms of a forward, backward and ``after_backward()`` (the first of
    ``args.steps`` not counted: it compiles), and the peak device memory meanwhile."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for tokens in batches(args, device):
        sync(device)
        start = time.perf_counter()
        loss_of(model, tokens).backward()
        after_backward()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return 1e3 * statistics.median(times[1:] or times), peak


def train(args, device, optimizer_for, release: bool) -> dict:
    """``args.steps`` training steps (under gradient release if ``release``)."""
    model = build(args, device)
    optimizer = optimizer_for(model)
    handle = adamkit.gradient_release(model, optimizer) if release else None

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms, peak = timed_steps(args, device, model, step)
    if handle is not None:
        handle.remove()
    return {"model": model, "optimizer": optimizer, "ms": ms, "peak": peak}


def forward_backward_alone(args, device) -> dict:
    """Forward and backward with each gradient freed as soon as it is ready."""
    model = build(args, device)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ms, peak = timed_steps(args, device, model, lambda: None)
    params = list(model.parameters())
    weights = sum(tensor_bytes(p) for p in params)
    largest = max(tensor_bytes(p) for p in params)
    return {"ms": ms, "peak": peak, "weights": weights, "largest": largest}


def host_step_alone(args, precision: str) -> float:
    """The CPU kernel stepping host copies of the model's params (bf16, fp32 master)."""
    shapes = [p.shape for p in build(args, torch.device("meta")).parameters()]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in shapes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer = adamkit.AdamW(params, lr=1e-4, master_weights="fp32", state_precision=precision)
    optimizer.step()
    times = []
    for _ in range(max(3, args.steps // 2)):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def transfers_alone(args, device) -> float:
    """Each param and gradient to pinned host buffers and each param back, on a side
    stream, as the offloaded step moves them."""
    model = build(args, device)
    params = list(model.parameters())
    grads = [torch.ones_like(p) for p in params]
    pinned = device.type == "cuda"
    hosts = [
        (torch.empty(p.shape, dtype=p.dtype, pin_memory=pinned), torch.empty(p.shape, dtype=p.dtype, pin_memory=pinned))
        for p in params
    ]
    stream = torch.cuda.Stream(device) if pinned else None
    times = []
    for _ in range(max(3, args.steps // 2)):
        sync(device)
        start = time.perf_counter()
        with torch.cuda.stream(stream) if stream is not None else _nothing():
            for p, g, (hp, hg) in zip(params, grads, hosts):
                hp.copy_(p.detach(), non_blocking=pinned)
                hg.copy_(g, non_blocking=pinned)
            for p, (hp, _) in zip(params, hosts):
                p.detach().copy_(hp, non_blocking=pinned)
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def host_kernel_vs_torch(args, rounds: int = 5) -> None:
    """adamkit's CPU kernel (fp32 and int8 states) against ``torch.optim.AdamW(fused=True)``
    on fp32 host params of the model's shapes, one step of each in turn."""
    shapes = [p.shape for p in build(args, torch.device("meta")).parameters()]
    generator = torch.Generator().manual_seed(2)
    contenders = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "adamkit cpu, fp32 states": lambda ps: adamkit.AdamW(ps, lr=1e-4),
        "adamkit cpu, int8 states": lambda ps: adamkit.AdamW(ps, lr=1e-4, state_precision="int8"),
    }
    setups = {}
    for name, make in contenders.items():
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02) for shape in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        optimizer = make(params)
        optimizer.step()
        state = sum(tensor_bytes(v) for p in params for v in optimizer.state[p].values() if torch.is_tensor(v))
        moved = 3 * sum(tensor_bytes(p) for p in params) + 2 * state  # read param, grad, state; write both
        setups[name] = (optimizer, moved, [])
    for _ in range(rounds):
        for optimizer, _, times in setups.values():
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
    base = statistics.median(setups["torch AdamW fused"][2])
    print(f"\nhost kernel alone: fp32 params of the model's shapes, {torch.get_num_threads()} threads, {rounds} rounds")
    for name, (_, moved, times) in setups.items():
        median = statistics.median(times)
        print(
            f"  {name:26s} {1e3 * median:9.1f} ms  {median / base:5.2f}x torch fused  {moved / median / GB:6.1f} GB/s"
        )


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def same_bits(ours, theirs) -> tuple[bool, str]:
    """Params and every state tensor of two runs, byte for byte."""
    for (name, p), q in zip(ours["model"].named_parameters(), theirs["model"].parameters()):
        if not torch.equal(p.detach().cpu().view(torch.uint8), q.detach().cpu().view(torch.uint8)):
            return False, f"param {name}"
        a, b = ours["optimizer"].state[p], theirs["optimizer"].state[q]
        for key, value in a.items():
            if torch.is_tensor(value):
                x, y = value.detach().cpu().reshape(-1), b[key].detach().cpu().reshape(-1)
                if x.dtype != y.dtype or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                    return False, f"state[{key!r}] of {name}"
    return True, "params and state"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--layers", type=int, default=20 if cuda else 2)
    parser.add_argument("--width", type=int, default=2048 if cuda else 64)
    parser.add_argument("--heads", type=int, default=16 if cuda else 4)
    parser.add_argument("--vocab", type=int, default=32000 if cuda else 512)
    parser.add_argument("--context", type=int, default=1024 if cuda else 16)
    parser.add_argument("--batch", type=int, default=4 if cuda else 2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-torchao", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    count = sum(p.numel() for p in build(args, torch.device("meta")).parameters())
    print(
        f"GPT-like: {count / 1e9:.3f}B params, {args.layers} layers of width {args.width}, bf16 weights, fp32 "
        f"master weights, {args.steps} steps (the first not timed), batch {args.batch} x {args.context}, on {device} "
        f"({torch.cuda.get_device_name(device) if cuda else 'no GPU: a dry run'}), {torch.get_num_threads()} host threads"
    )

    def adamkit_for(precision, offload):
        return lambda model: adamkit.AdamW(
            model.parameters(), lr=1e-4, master_weights="fp32", state_precision=precision, offload=offload
        )

    runs = {
        "(i) resident, fp32 states": train(args, device, adamkit_for("fp32", None), release=False),
        "(ii) offload + release, fp32": train(args, device, adamkit_for("fp32", "cpu"), release=True),
    }
    runs["(i') resident, int8 states"] = train(args, device, adamkit_for("int8", None), release=False)
    runs["(iii) offload + release, int8"] = train(args, device, adamkit_for("int8", "cpu"), release=True)
    for ours, theirs in (
        ("(ii) offload + release, fp32", "(i) resident, fp32 states"),
        ("(iii) offload + release, int8", "(i') resident, int8 states"),
    ):
        equal, what = same_bits(runs[ours], runs[theirs])
        print(f"{ours} vs {theirs}: {'bit for bit equal' if equal else 'DIFFERS at ' + what} after {args.steps} steps")
    if not args.skip_torchao:
        try:
            from torchao.optim import CPUOffloadOptimizer

            runs["(iv) torchao, bf16 host states"] = train(
                args,
                device,
                lambda m: CPUOffloadOptimizer(
                    m.parameters(), torch.optim.AdamW, offload_gradients=True, lr=1e-4, fused=True
                ),
                False,
            )
        except Exception as error:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            print(f"(iv) torchao CPUOffloadOptimizer: not run ({type(error).__name__}: {error})")
    alone = forward_backward_alone(args, device)
    host = {precision: host_step_alone(args, precision) for precision in ("fp32", "int8")}
    moved = transfers_alone(args, device)
    activations = max(0, alone["peak"] - alone["weights"] - alone["largest"])
    bound = alone["weights"] + alone["largest"] + activations
    print(
        f"\nparts alone: forward+backward {alone['ms']:.1f} ms; host step fp32 {host['fp32']:.1f} ms, "
        f"int8 {host['int8']:.1f} ms; transfers {moved:.1f} ms"
    )
    print(
        f"memory bound: weights {alone['weights'] / GB:.3f} GB + largest gradient {alone['largest'] / GB:.3f} GB "
        f"+ activations {activations / GB:.3f} GB = {bound / GB:.3f} GB (x1.05 = {1.05 * bound / GB:.3f} GB)"
    )
    print(f"\n{'run':34s} {'ms/step':>9s} {'x max(parts)':>13s} {'peak GB':>8s} {'x bound':>8s}")
    for name, run in runs.items():
        precision = "int8" if "int8" in name else "fp32"
        parts = max(alone["ms"], host[precision], moved)
        versus_parts = "—" if "torchao" in name else f"{run['ms'] / parts:.2f}"  # (another host step)
        print(
            f"{name:34s} {run['ms']:9.1f} {versus_parts:>13s} {run['peak'] / GB:8.3f} "
            f"{run['peak'] / bound if bound else float('nan'):8.3f}"
        )
    runs.clear()  # the runs' memory, before the host kernel's own params
    host_kernel_vs_torch(args)


if __name__ == "__main__":
    main()
