"""Lean-state step benchmark on the CPU: adamkit's int8 and int4 optimizer states and
its 16-bit master-weight modes against torch's fused AdamW (fp32 or bf16 states),
adamkit's own full-width states, and the peers that import here: bitsandbytes'
AdamW8bit, torchao's AdamW8bit/AdamW4bit and DeepSpeed's DeepSpeedCPUAdam.

Prints ms per step (median of interleaved rounds, every contender in one process),
the ratio to torch fused, the optimizer-state bytes per param measured on the case's
real shapes (codes, block scales, master-weight low bits: everything the optimizer
holds beyond ``step``), the bytes a step moves per param and the effective
bandwidth, against an in-place ``add_`` in the same rounds (see bench_cpu.py).  On the
CPU, bitsandbytes 0.50 dequantizes, runs plain torch ops and requantizes; torchao 0.18
quantizes only tensors of at least 4,096 elements that its block (256 elements for
8-bit, 128 for 4-bit) divides, so on case (a), whose tensors hold 10^6 elements, it
keeps fp32 states (its state B/param says so), and on GPT-2 shapes (c) it quantizes.

    python benchmarks/bench_quantized.py [--cases a,c,e] [--rounds 20]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from bench_cpu import parse_arguments

import adamkit
from adamkit.experiments.bench import Case, bytes_moved_per_param, gpt2_shapes, run_case, state_bytes_per_param

CASES = {
    "a": Case("(a) 50M fp32 params in 50 tensors", [(1_000_000,)] * 50),
    "c": Case("(c) GPT-2-small shapes, fp32 (148 tensors)", gpt2_shapes()),
    "e": Case("(e) GPT-2-small shapes, bf16 (148 tensors)", gpt2_shapes(), torch.bfloat16),
}


def adamkit_adamw(**options) -> Callable:
    return lambda ps: adamkit.AdamW(ps, backend="cpu", **options)


CONTENDERS: dict[str, Callable] = {
    "torch fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    "adamkit (states as params)": adamkit_adamw(),
    "adamkit int8 states": adamkit_adamw(state_precision="int8"),
    "adamkit int4 states": adamkit_adamw(state_precision="int4"),
}
BF16_CONTENDERS: dict[str, Callable] = {
    "torch fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    "adamkit 24-bit master, int8": adamkit_adamw(master_weights="24bit", state_precision="int8", seed=0),
    "adamkit 24-bit master, int4": adamkit_adamw(master_weights="24bit", state_precision="int4", seed=0),
    "adamkit fp32 master, int8": adamkit_adamw(master_weights="fp32", state_precision="int8", seed=0),
    "adamkit kahan, int8 states": adamkit_adamw(rounding="kahan", state_precision="int8"),
}


def peer_contenders(dtype: torch.dtype) -> dict[str, Callable]:
    """The peers' CPU optimizers that import here (low-bit ones for fp32 params only)."""
    found: dict[str, Callable] = {}
    if dtype == torch.float32:
        try:
            import bitsandbytes

            found["bitsandbytes AdamW8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps)
        except ImportError:
            pass
        try:
            from torchao import optim

            found["torchao AdamW8bit"] = lambda ps: optim.AdamW8bit(ps)
            found["torchao AdamW4bit"] = lambda ps: optim.AdamW4bit(ps)
        except ImportError:
            pass
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        found["DeepSpeedCPUAdam"] = lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True)
    except ImportError:
        pass
    return found


def main(argv: list[str] | None = None) -> None:
    cases, rounds = parse_arguments(__doc__, CASES, argv)
    for case in cases:
        contenders = (BF16_CONTENDERS if case.dtype == torch.bfloat16 else CONTENDERS) | peer_contenders(case.dtype)
        held = {name: state_bytes_per_param(case, make) for name, make in contenders.items()}
        medians, bandwidth = run_case(case, rounds, contenders)
        fused = medians["torch fused"]
        print(f"{case.name}: {case.params / 1e6:.1f}M params; add_ bandwidth in the same rounds {bandwidth:.1f} GB/s")
        header = f"  {'contender':32s} {'ms':>8s} {'vs fused':>9s} {'state B/param':>14s} {'B moved':>8s} {'GB/s':>6s}"
        print(header)
        for name, seconds in medians.items():
            moved = bytes_moved_per_param(case, held[name])
            rate = moved * case.params / seconds / 1e9
            print(
                f"  {name:32s} {seconds * 1e3:8.2f} {seconds / fused:9.2f} {held[name]:14.3f} {moved:8.1f} {rate:6.1f}"
            )
        print()


if __name__ == "__main__":
    main()
