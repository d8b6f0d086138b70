"""GPU step benchmark: adamkit's Triton kernel against torch.optim.Adam fused and foreach.

In one process, in interleaved rounds, timed with CUDA events: (a) ~1B fp32 params in
GPT-like shapes, (b) many small tensors, (c) bf16 params, (d) quantized states.
Prints median ms, the ratio to torch fused, effective bandwidth (28 bytes per fp32
param, 14 per bf16) and that as a percentage of a device-to-device copy timed in the
same rounds.  Case (d) times AdamW with int8/int4 states against torch fused (fp32
states) and, where installed, bitsandbytes' and torchao's 8-/4-bit AdamW, and prints
each one's optimizer-state bytes per param.

    python benchmarks/bench_gpu.py               # needs a CUDA device
    python benchmarks/bench_gpu.py --cases b,c --rounds 50
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import adamkit
from adamkit.experiments.bench import BYTES_PER_PARAM, Case, gpt2_shapes

CASES = {
    # 36 layers of width 1536 with a 50K vocabulary: ~1.1B params
    "a": Case("(a) ~1B fp32 params, GPT-like shapes", gpt2_shapes(n_layer=36, d_model=1536)),
    "b": Case("(b) 50M fp32 params in 10000 tensors", [(5_000,)] * 10_000),
    "c": Case("(c) ~350M bf16 params, GPT-like shapes", gpt2_shapes(n_layer=24, d_model=1024), torch.bfloat16),
    "d": Case("(d) ~350M fp32 params, GPT-like shapes, quantized states", gpt2_shapes(n_layer=24, d_model=1024)),
}


def quantized_contenders() -> dict:
    """AdamW with low-bit states: adamkit's, and the anchors' where they are installed."""
    contenders = {
        "torch fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "adamkit int8": lambda ps: adamkit.AdamW(ps, backend="triton", state_precision="int8"),
        "adamkit int4": lambda ps: adamkit.AdamW(ps, backend="triton", state_precision="int4"),
    }
    try:
        import bitsandbytes

        contenders["bitsandbytes 8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps)
    except ImportError:
        print("(bitsandbytes not installed: not a contender)")
    try:
        from torchao import optim as torchao_optim

        contenders["torchao 8bit"] = lambda ps: torchao_optim.AdamW8bit(ps)
        contenders["torchao 4bit"] = lambda ps: torchao_optim.AdamW4bit(ps)
    except ImportError:
        print("(torchao not installed: not a contender)")
    return contenders


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    held = 0
    for p in params:
        for key, value in optimizer.state[p].items():
            if key != "step" and torch.is_tensor(value):
                inner = getattr(value, "__tensor_flatten__", None)  # torchao's tensor subclasses
                parts = [getattr(value, name) for name in inner()[0]] if inner else [value]
                held += sum(t.numel() * t.element_size() for t in parts)
    return held / sum(p.numel() for p in params)


CONTENDERS = {
    "torch foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "adamkit triton": lambda ps: adamkit.Adam(ps, backend="triton"),
}


def make_params(case: Case) -> list[torch.nn.Parameter]:
    params = []
    for shape in case.shapes:
        p = torch.nn.Parameter(torch.randn(shape, device="cuda", dtype=case.dtype))
        p.grad = torch.randn(shape, device="cuda", dtype=case.dtype)
        params.append(p)
    return params


def time_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def run_case(case: Case, rounds: int, contenders: dict = CONTENDERS) -> tuple[dict[str, float], float, dict]:
    optimizers = {name: make(make_params(case)) for name, make in contenders.items()}
    source = torch.empty(256 << 20, dtype=torch.float32, device="cuda")  # 1 GiB
    target = torch.empty_like(source)
    steps = {name: opt.step for name, opt in optimizers.items()} | {"copy": lambda: target.copy_(source)}
    for step in steps.values():
        step()
        step()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(time_ms(step))
    medians = {name: statistics.median(t) for name, t in times.items()}
    copy_gbps = 2 * source.numel() * 4 / (medians.pop("copy") / 1e3) / 1e9
    held = {name: state_bytes_per_param(opt) for name, opt in optimizers.items()}
    return medians, copy_gbps, held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="a,b,c,d")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device (none found)", file=sys.stderr)
        return 2
    import triton

    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton.__version__}, adamkit {adamkit.__version__}\n"
    )
    for key in args.cases.split(","):
        case = CASES[key]
        if key == "d":
            medians, _, held = run_case(case, args.rounds, quantized_contenders())
            print(f"{case.name}: {case.params / 1e6:.0f}M params")
            print(f"  {'contender':18s} {'ms':>8s} {'vs fused':>9s} {'state B/param':>14s}")
            for name, ms in medians.items():
                print(f"  {name:18s} {ms:8.2f} {ms / medians['torch fused']:9.2f} {held[name]:14.3f}")
            print()
            continue
        medians, copy_gbps, _ = run_case(case, args.rounds)
        fused, moved = medians["torch fused"], BYTES_PER_PARAM[case.dtype] * case.params
        print(f"{case.name}: {case.params / 1e6:.0f}M params, {moved / 1e9:.2f} GB moved per step")
        print(f"  device-to-device copy, same rounds: {copy_gbps:.0f} GB/s")
        print(f"  {'contender':16s} {'ms':>8s} {'vs fused':>9s} {'GB/s':>7s} {'% of copy':>10s}")
        for name, ms in medians.items():
            rate = moved / (ms / 1e3) / 1e9
            print(f"  {name:16s} {ms:8.2f} {ms / fused:9.2f} {rate:7.0f} {100 * rate / copy_gbps:9.0f}%")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
