"""Compiles adamkit's Triton kernel for a CUDA GPU on a machine without one (Triton
ships the compiler and ``ptxas``) and prints what the PTX holds, per kernel variant,
as JSON.  Run by ``test_triton_compile.py`` in a subprocess: the test session runs
Triton under its interpreter, and a compile needs the real JIT."""

from __future__ import annotations

import json
import os
import re
import sys

#: one entry per storage and option path; each overrides the plain fp32 Adam variant
VARIANTS = {
    "adam-fp32": {},
    "adam-fp32-amsgrad-l2-maximize-amp": {"AMSGRAD": True, "DECAY": 1, "MAXIMIZE": True, "AMP": True},
    "adamax-fp32": {"ALGORITHM": "adamax", "DECAY": 0},
    "nadam-fp32-l2": {"ALGORITHM": "nadam", "DECAY": 1},
    "adopt-fp32-decoupled": {"ALGORITHM": "adopt", "DECAY": 2},
    "radam-bf16-master24-int8": {
        "ALGORITHM": "radam",
        "PARAM_STORAGE": "bfloat16",
        "MASTER": 8,
        "STATE_STORAGE": "uint8",
        "QUANT": "int8",
        "RANDOM": True,
    },
    "adam-fp64": {"PARAM_STORAGE": "float64", "STATE_STORAGE": "float64", "COMPUTE": "float64"},
    "adam-bf16-kahan": {"PARAM_STORAGE": "bfloat16", "STATE_STORAGE": "bfloat16", "KAHAN": True, "RANDOM": True},
    "adam-bf16-stochastic": {"PARAM_STORAGE": "bfloat16", "STOCHASTIC": True, "RANDOM": True},
    "adam-bf16-master": {"PARAM_STORAGE": "bfloat16", "MASTER": 16},
    "adam-bf16-master24": {"PARAM_STORAGE": "bfloat16", "MASTER": 8, "RANDOM": True},
    "adam-fp16-stochastic": {
        "PARAM_STORAGE": "float16",
        "STATE_STORAGE": "float16",
        "STOCHASTIC": True,
        "RANDOM": True,
    },
    "adam-fp32-unaligned": {"ALIGNED": False},
    "adam-int8-amsgrad": {"STATE_STORAGE": "uint8", "QUANT": "int8", "AMSGRAD": True, "RANDOM": True},
    "adam-int4-amsgrad": {"STATE_STORAGE": "uint8", "QUANT": "int4", "AMSGRAD": True, "RANDOM": True},
    # int4's first moment divided by a norm's divisor (AdaMax), and stored plain (ADOPT)
    "adamax-int4": {"ALGORITHM": "adamax", "STATE_STORAGE": "uint8", "QUANT": "int4", "RANDOM": True},
    "adopt-int4": {"ALGORITHM": "adopt", "STATE_STORAGE": "uint8", "QUANT": "int4", "RANDOM": True},
    "adam-fp32-cautious": {"CAUTIOUS": True},
    # a slow first moment in the maximum's place (AdEMAMix): plain, and int4 normalized
    "ademamix-fp32": {"ALGORITHM": "ademamix"},
    # a second weight sequence z in the first moment's place (schedule-free): in the param's
    # dtype (bf16, stored stochastically, beside int4 v), and in fp32 beside a split master
    "schedule_free-bf16-int4": {
        "ALGORITHM": "schedule_free_adamw",
        "PARAM_STORAGE": "bfloat16",
        "STATE_STORAGE": "uint8",
        "QUANT": "int4",
        "RANDOM": True,
    },
    "schedule_free-bf16-master-bf16-states": {
        "ALGORITHM": "schedule_free_adamw",
        "PARAM_STORAGE": "bfloat16",
        "STATE_STORAGE": "bfloat16",
        "MASTER": 16,
        "RANDOM": True,
    },
    "ademamix-bf16-stochastic-int4": {
        "ALGORITHM": "ademamix",
        "PARAM_STORAGE": "bfloat16",
        "STOCHASTIC": True,
        "STATE_STORAGE": "uint8",
        "QUANT": "int4",
        "RANDOM": True,
    },
    # the passes before the update: StableAdamW's clipping sums, cautious updates' agreement
    # counts (the update kernel, counting instead of storing)
    "clipping-fp32-amp": {"KERNEL": "_clipping_sums", "AMP": True},
    "clipping-bf16-int8": {
        "KERNEL": "_clipping_sums",
        "PARAM_STORAGE": "bfloat16",
        "STATE_STORAGE": "uint8",
        "QUANT": "int8",
    },
    "counting-adopt-bf16-master24-int8-l2": {
        "COUNTING": True,
        "ALGORITHM": "adopt",
        "DECAY": 1,
        "PARAM_STORAGE": "bfloat16",
        "MASTER": 8,
        "STATE_STORAGE": "uint8",
        "QUANT": "int8",
    },
}

#: dtype-valued constexprs, given by name above
DTYPES = ("PARAM_STORAGE", "STATE_STORAGE", "COMPUTE")

BASE = {
    "PARAM_STORAGE": "float32",
    "STATE_STORAGE": "float32",
    "COMPUTE": "float32",
    "ALGORITHM": "adam",  # passed as its FORMS (adamkit.algorithms)
    "AMSGRAD": False,
    "MAXIMIZE": False,
    "DECAY": 2,
    "AMP": False,
    "KAHAN": False,
    "MASTER": 0,
    "STOCHASTIC": False,
    "RANDOM": False,
    "QUANT_BITS": 0,
    "QBLOCK": 1,
    "QBLOCK_SECOND": 1,
    "EXACT_SECOND": False,
    "FLOAT_MAPS_SECOND": 0,
    "NORMALIZE": 0,
    "ALIGNED": True,
    "CAUTIOUS": False,
    "COUNTING": False,
}

#: the launches' tensor arguments (every other argument is a constexpr)
POINTERS = {
    "table_ptr": "*i64",
    "chunk_ptr": "*i64",
    "tensor_scalar_ptr": "*fp64",
    "grad_scale_ptr": "*fp32",
    "found_inf_ptr": "*fp32",
    "key_ptr": "*i64",
    "constants_ptr": "*fp64",
    "sums_ptr": "*fp64",
    "counts_ptr": "*fp64",
}


def compile_variant(overrides: dict, capability: int) -> str:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adamkit.algorithms import lookup
    from adamkit.kernels import triton as kernel
    from adamkit.specs.quantization import FORMATS

    overrides = dict(overrides)
    fn = getattr(kernel, overrides.pop("KERNEL", "_fused_step"))
    constexprs = BASE | overrides | {"BLOCK": kernel.BLOCK}
    for name in DTYPES:
        constexprs[name] = getattr(tl, constexprs[name])
    spec = lookup(constexprs.pop("ALGORITHM"))
    constexprs["FORMS"] = spec.forms
    fmt = FORMATS.get(constexprs.pop("QUANT", None))
    warps = kernel.NUM_WARPS
    if fmt is not None:  # the quantized buckets' launch shape
        constexprs |= {"QUANT_BITS": fmt.bits, "QBLOCK": fmt.block, "BLOCK": kernel.QUANTIZED_BLOCK}
        constexprs |= {"QBLOCK_SECOND": fmt.block_of(False), "EXACT_SECOND": fmt.exact_scales(False)}
        constexprs |= {"FLOAT_MAPS_SECOND": kernel.float_maps(fmt), "NORMALIZE": kernel.normalization(fmt, spec)}
        warps = kernel.QUANTIZED_NUM_WARPS
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature = {name: POINTERS.get(name, "constexpr") for name in fn.arg_names}
    pointers = [name for name in fn.arg_names if name in POINTERS]
    assert set(signature) == set(pointers) | set(constexprs), "the worker's signature is out of date"
    # torch allocations are 16-byte aligned: the launcher specializes tensor arguments so
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", capability, 32),
        options=kernel.COMPILE_OPTIONS | {"num_warps": warps},
    )
    return compiled.asm["ptx"]


def instructions(ptx: str) -> list[str]:
    """Distinct memory and floating-point instructions, with their modifiers."""
    pattern = r"\b(?:ld\.global|st\.global|sqrt|div|rcp|rsqrt|fma|ex2|lg2)(?:\.\w+)+"
    return sorted(set(re.findall(pattern, ptx)))


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # before triton loads: the real JIT
    capability = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    report = {}
    for name, overrides in VARIANTS.items():
        try:
            report[name] = {"instructions": instructions(compile_variant(overrides, capability))}
        except Exception as error:  # reported, so the test names the variant that failed
            report[name] = {"error": f"{type(error).__name__}: {error}"[-2000:]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
