"""Are the 8-bit peers' fast paths what the GPU tables time? (issue 39, part ``peers``)

On ~350M fp32 params in GPT-like shapes (bench_gpu.py's case d), for torch's fused AdamW,
adamkit's Triton kernel (fp32 and int8 states), bitsandbytes' AdamW8bit and torchao's
AdamW8bit:

- evidence that the fast path ran: bitsandbytes' native library (its class, whether it
  was built with CUDA, the file loaded); torchao's compiled step (dynamo's counts of
  frames compiled and of distinct graphs before and after the timed rounds: a
  recompilation grows both, so they must not grow; its ``recompiles`` counter is not
  read: torch 2.13 never advances it); for
  everyone, the CUDA kernels one profiled step launches (how many, the busiest three);
- per step, in interleaved rounds after a warm-up of 3 steps: host ms (``step()``
  returning, no sync: launch and Python overhead), device ms (CUDA events around the
  step) and wall ms (with a sync), so per-tensor host overhead shows as such.

    python benchmarks/peers_gpu.py [--rounds 20]      # needs a CUDA device
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import adamkit
from adamkit.experiments.bench import gpt2_shapes

SHAPES = gpt2_shapes(n_layer=24, d_model=1024)


def contenders() -> dict[str, Callable]:
    found = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "adamkit triton fp32": lambda ps: adamkit.AdamW(ps, lr=1e-4, backend="triton"),
        "adamkit triton int8": lambda ps: adamkit.AdamW(ps, lr=1e-4, backend="triton", state_precision="int8"),
    }
    try:
        import bitsandbytes

        found["bitsandbytes AdamW8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps, lr=1e-4)
    except Exception as error:  # noqa: BLE001 - a peer that cannot load is reported
        print(f"bitsandbytes: not run ({type(error).__name__}: {error})")
    try:
        from torchao.optim import AdamW8bit

        found["torchao AdamW8bit"] = lambda ps: AdamW8bit(ps, lr=1e-4)
    except Exception as error:  # noqa: BLE001
        print(f"torchao: not run ({type(error).__name__}: {error})")
    return found


def bitsandbytes_evidence() -> str:
    try:
        from bitsandbytes.cextension import BNB_BACKEND, lib
    except Exception as error:  # noqa: BLE001
        return f"not importable ({error})"
    path = getattr(getattr(lib, "_lib", None), "_name", "?")
    return f"backend {BNB_BACKEND}, {type(lib).__name__}, compiled_with_cuda={lib.compiled_with_cuda}, {path}"


def dynamo_counts() -> dict[str, int]:
    """Frames dynamo compiled and distinct graphs it made: both grow on a recompilation."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"]}


def launched_kernels(step: Callable[[], None]) -> tuple[int, list[str]]:
    """CUDA kernels one ``step()`` launches: how many, and the three taking most time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busiest = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))
    names = [e.key[:60] for e in busiest if getattr(e, "device_time_total", 0) > 0][:3]
    return len(kernels), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        sys.exit(0)
    device = torch.device("cuda")
    count = sum(torch.Size(s).numel() for s in SHAPES)
    print(
        f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; {count / 1e6:.0f}M fp32 params in {len(SHAPES)} tensors"
    )
    print(f"bitsandbytes native library: {bitsandbytes_evidence()}")
    generator = torch.Generator(device=device).manual_seed(0)
    setups = {}
    for name, make in contenders().items():
        params = [torch.nn.Parameter(torch.randn(s, device=device, generator=generator) * 0.02) for s in SHAPES]
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=generator) * 1e-3
        optimizer = make(params)
        for _ in range(3):  # warm-up: compiles, allocates state
            optimizer.step()
        torch.cuda.synchronize()
        launches, busiest = launched_kernels(optimizer.step)
        print(f"{name}: {launches} CUDA kernels per step; busiest: {', '.join(busiest)}")
        setups[name] = (optimizer, {"host": [], "device": [], "wall": []})
    before = dynamo_counts()
    for _ in range(args.rounds):
        for optimizer, times in setups.values():
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began = time.perf_counter()
            start.record()
            optimizer.step()
            returned = time.perf_counter()
            end.record()
            torch.cuda.synchronize()
            finished = time.perf_counter()
            times["host"].append(1e3 * (returned - began))
            times["device"].append(start.elapsed_time(end))
            times["wall"].append(1e3 * (finished - began))
    after = dynamo_counts()
    print(f"dynamo counters over the timed rounds: before {before}, after {after} (torchao: must not grow)")
    base = statistics.median(setups["torch AdamW fused"][1]["wall"])
    print(f"\n{'contender':24s} {'host ms':>8s} {'device ms':>10s} {'wall ms':>8s} {'x torch fused':>14s}")
    for name, (_, times) in setups.items():
        host, device_ms, wall = (statistics.median(times[k]) for k in ("host", "device", "wall"))
        print(f"{name:24s} {host:8.2f} {device_ms:10.2f} {wall:8.2f} {wall / base:14.2f}")


if __name__ == "__main__":
    main()
