"""GPU step benchmark: adamkit's Triton kernel against torch.optim's fused and foreach
Adam, and against bitsandbytes' and torchao's low-bit AdamW where they are installed.

In one process, in interleaved rounds (one step of each contender in turn, then a
device-to-device copy of 1 GiB), timed with CUDA events:

(a) ~1B fp32 params in GPT-like shapes, (b) 50M fp32 params in 10,000 small tensors,
(c) ~350M bf16 params, (d) ~350M fp32 params with 8- and 4-bit states (AdamW).

Per contender: median ms per step, the ratio to torch fused, the optimizer state it
holds (bytes per param), the bytes its step must move per param (read param, grad and
state, write param and state: 28 for fp32 Adam, about 16 for 8-bit states), that over
the time as effective bandwidth, and as a share of the copy's bandwidth (bytes read
and written) measured in the same rounds.

``--sweep`` times the Triton kernel's launch shapes (elements per program, warps) on
~350M fp32 params, with fp32 and with int8 states, against torch fused.

    python benchmarks/bench_gpu.py               # needs a CUDA device
    python benchmarks/bench_gpu.py --cases b,c --rounds 50
    python benchmarks/bench_gpu.py --sweep
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch

import adamkit
from adamkit.experiments.bench import Case, gpt2_shapes
from adamkit.kernels import triton as triton_kernel
from adamkit.memory import tensor_bytes

CASES = {
    # 36 layers of width 1536 with a 50K vocabulary: ~1.1B params
    "a": Case("(a) ~1B fp32 params, GPT-like shapes", gpt2_shapes(n_layer=36, d_model=1536)),
    "b": Case("(b) 50M fp32 params in 10000 tensors", [(5_000,)] * 10_000),
    "c": Case("(c) ~350M bf16 params, GPT-like shapes", gpt2_shapes(n_layer=24, d_model=1024), torch.bfloat16),
    "d": Case("(d) ~350M fp32 params, GPT-like shapes, quantized states", gpt2_shapes(n_layer=24, d_model=1024)),
}

SWEEP_CASE = Case("~350M fp32 params, GPT-like shapes", gpt2_shapes(n_layer=24, d_model=1024))
#: (elements per program, warps) tried by --sweep; the first is the kernel's default
LAUNCH_SHAPES = {
    "fp32": [(1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16)],
    "int8": [(512, 4), (1024, 8), (1024, 4), (1024, 16), (512, 8), (2048, 16)],
    "int4": [(512, 4), (1024, 8), (1024, 4), (1024, 16), (512, 8), (256, 4)],
}

CONTENDERS = {
    "torch foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "adamkit triton": lambda ps: adamkit.Adam(ps, backend="triton"),
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

        contenders[f"bnb {bitsandbytes.__version__} 8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps)
    except Exception as error:  # noqa: BLE001 - any failure to load makes it no contender
        print(f"(bitsandbytes not a contender: {type(error).__name__}: {error})")
    try:
        import torchao
        from torchao import optim as torchao_optim

        contenders[f"torchao {torchao.__version__} 8bit"] = lambda ps: torchao_optim.AdamW8bit(ps)
        contenders[f"torchao {torchao.__version__} 4bit"] = lambda ps: torchao_optim.AdamW4bit(ps)
    except Exception as error:  # noqa: BLE001
        print(f"(torchao not a contender: {type(error).__name__}: {error})")
    return contenders


def sweep_contenders(state_precision: str | None) -> dict:
    """torch fused, and adamkit's kernel built with each launch shape."""
    options = {} if state_precision is None else {"state_precision": state_precision}

    def launched_with(block: int, warps: int):
        def make(params):
            names = ("BLOCK", "NUM_WARPS", "QUANTIZED_BLOCK", "QUANTIZED_NUM_WARPS")
            saved = [getattr(triton_kernel.config, name) for name in names]
            for name, value in zip(names, (block, warps, block, warps)):
                setattr(triton_kernel.config, name, value)
            try:  # a bucket takes the launch shape when its first step builds it
                opt = adamkit.AdamW(params, backend="triton", **options)
                opt.step()
            finally:
                for name, value in zip(names, saved):
                    setattr(triton_kernel.config, name, value)
            return opt

        return make

    contenders = {"torch fused": lambda ps: torch.optim.AdamW(ps, fused=True)}
    for block, warps in LAUNCH_SHAPES[state_precision or "fp32"]:
        contenders[f"adamkit {state_precision or 'fp32'} {block}x{warps}w"] = launched_with(block, warps)
    return contenders


def bytes_per_param(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(state held, bytes a step moves) per param: the state as held (step counters
    aside); a step reads param, grad and state and writes param and state."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    count = sum(p.numel() for p in params)
    held = sum(
        tensor_bytes(v) for p in params for k, v in optimizer.state[p].items() if k != "step" and torch.is_tensor(v)
    )
    weights = sum(p.numel() * p.element_size() for p in params)
    return held / count, (3 * weights + 2 * held) / count


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


def run_case(case: Case, rounds: int, contenders: dict) -> tuple[dict[str, float], float, dict]:
    """Median ms per contender, the copy's GB/s, and (state, moved) bytes per param."""
    optimizers = {}
    for name, make in contenders.items():
        try:
            optimizers[name] = make(make_params(case))
        except Exception as error:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
            print(f"  ({name} could not be built: {type(error).__name__}: {error})")
    source = torch.empty(256 << 20, dtype=torch.float32, device="cuda")  # 1 GiB
    target = torch.empty_like(source)
    steps = {name: opt.step for name, opt in optimizers.items()} | {"copy": lambda: target.copy_(source)}
    for name in list(steps):  # warm-up: state allocation, compilation
        try:
            steps[name]()
            steps[name]()
        except Exception as error:  # noqa: BLE001
            print(f"  ({name} failed to step: {type(error).__name__}: {error})")
            del steps[name], optimizers[name]
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(time_ms(step))
    medians = {name: statistics.median(t) for name, t in times.items()}
    copy_gbps = 2 * source.numel() * 4 / (medians.pop("copy") / 1e3) / 1e9
    sizes = {name: bytes_per_param(opt) for name, opt in optimizers.items()}
    return medians, copy_gbps, sizes


def report(title: str, case: Case, medians: dict, copy_gbps: float, sizes: dict) -> None:
    print(f"{title}: {case.params / 1e6:.0f}M params in {len(case.shapes)} tensors")
    print(f"  device-to-device copy, same rounds: {copy_gbps:.0f} GB/s")
    print(
        f"  {'contender':22s} {'ms':>8s} {'vs fused':>9s} {'state B/p':>10s} {'moved B/p':>10s}"
        f" {'GB/s':>7s} {'% of copy':>10s}"
    )
    fused = medians.get("torch fused")
    for name, ms in medians.items():
        held, moved = sizes[name]
        rate = moved * case.params / (ms / 1e3) / 1e9
        ratio = f"{ms / fused:9.2f}" if fused else f"{'-':>9s}"
        print(f"  {name:22s} {ms:8.2f} {ratio} {held:10.2f} {moved:10.2f} {rate:7.0f} {100 * rate / copy_gbps:9.0f}%")
    print(flush=True)


def release_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="a,b,c,d", help="which of a,b,c,d (empty: none)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--sweep",
        nargs="?",
        const="fp32,int8",
        default="",
        help="also time the Triton kernel's launch shapes for these state precisions (default fp32,int8)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device (none found)", file=sys.stderr)
        return 2
    import triton

    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton.__version__}, adamkit {adamkit.__version__}\n",
        flush=True,
    )
    for key in filter(None, args.cases.split(",")):
        case = CASES[key]
        contenders = quantized_contenders() if key == "d" else CONTENDERS
        report(case.name, case, *run_case(case, args.rounds, contenders))
        release_memory()
    for name in filter(None, args.sweep.split(",")):
        precision = None if name == "fp32" else name
        title = f"launch shapes, AdamW with {name} states, {SWEEP_CASE.name}"
        report(title, SWEEP_CASE, *run_case(SWEEP_CASE, args.rounds, sweep_contenders(precision)))
        release_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
