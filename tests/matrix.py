"""The shared test matrix: the single source of the cases, backends, optimizer
configurations and bad inputs the tests draw from, so a new option or kernel is
tested everywhere at once.

- :class:`Case` (keyword-only) says which optimizer, which options and which dtype,
  for the oracle tests over the whole matrix (:func:`torch_comparable_cases`,
  :func:`reference_cases`); :func:`make_params` builds a set of awkward params
  (transposed, sliced and strided views, 0-d, empty, complex) in two param groups;
  :func:`gradients` yields deterministic gradients, leaving some params without a
  gradient on some steps.
- :data:`CONFIGS` names a few optimizer configurations that between them use every
  weight-decay mode and flag, for tests that run each one in depth (storage,
  rounding, accumulation); :func:`reference_setup` is the NumPy reference's view of one.
- :data:`DEVICE_BACKENDS`, :data:`CPU_BACKENDS`, :data:`TORCH_EXACT_BACKENDS`: the
  registered kernels a test runs.
- :data:`TORCH_ERROR_INPUTS` and :data:`ADAMKIT_ERROR_INPUTS`: bad constructor
  arguments, with what the error must say.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

import adamkit
from adamkit import reference
from adamkit.algorithms import REGISTRY, lookup
from adamkit.kernels import KERNELS


def _torch_counterpart(class_name: str):
    """torch.optim's class of the same name (AdaMax: Adamax), or ``None``."""
    return {name.lower(): cls for name, cls in vars(torch.optim).items() if isinstance(cls, type)}.get(
        class_name.lower()
    )


#: the whole family, one row per algorithm of the registry (and AdamW, Adam's with decoupled
#: decay): name -> (adamkit class, torch.optim's counterpart or None, algorithm)
FAMILY = {
    spec.class_name: (getattr(adamkit, spec.class_name), _torch_counterpart(spec.class_name), spec.name)
    for spec in REGISTRY.values()
}
FAMILY = {"Adam": FAMILY.pop("Adam"), "AdamW": (adamkit.AdamW, torch.optim.AdamW, "adam"), **FAMILY}
#: the members torch.optim has
OPTIMIZERS = {name: row for name, row in FAMILY.items() if row[1] is not None}

WEIGHT_DECAYS = ("none", "l2", "decoupled")
#: the classes whose weight decay is always decoupled (they take no ``decoupled_weight_decay``)
ALWAYS_DECOUPLED = tuple(
    name for name, (cls, _, _) in FAMILY.items() if "decoupled_weight_decay" not in inspect.signature(cls).parameters
)


def refused(name: str) -> frozenset[str]:
    """The options and torch.optim arguments the class of row ``name`` refuses (its
    ``unavailable_options`` and ``unavailable_arguments``)."""
    cls = FAMILY[name][0]
    return frozenset(cls.unavailable_options) | frozenset(cls.unavailable_arguments)


def refuses(name: str, fields: dict) -> bool:
    """Whether the class of row ``name`` refuses what a case's ``fields`` set."""
    asked = {option for option in ("capturable", "cautious") if fields.get(option)}
    if fields.get("weight_decay") == "fully_decoupled":
        asked.add("decouple_lr")
    return bool(asked & refused(name))


#: where the matrix's params live: the CPU, or ``ADAMKIT_TEST_DEVICE=cuda`` to run the
#: conformance suite on a GPU (with the kernels that run there)
DEVICE = torch.device(os.environ.get("ADAMKIT_TEST_DEVICE", "cpu"))
DEVICE_BACKENDS = tuple(name for name, kernel in KERNELS.items() if kernel.supports(DEVICE) and kernel.available())
#: the kernels that run on the CPU here (the tests that build CPU params themselves)
CPU_BACKENDS = tuple(n for n, k in KERNELS.items() if k.supports(torch.device("cpu")) and k.available())
#: the fused kernels among them
CPU_FUSED_BACKENDS = tuple(name for name in CPU_BACKENDS if KERNELS[name].fused)


@dataclass(frozen=True, kw_only=True)
class Case:
    optimizer: str
    dtype: torch.dtype = torch.float32
    amsgrad: bool = False
    maximize: bool = False
    weight_decay: str = "none"  # none | l2 | decoupled | fully_decoupled
    tensor_lr: bool = False
    complex_params: bool = False
    backend: str = "single_tensor"
    capturable: bool = False

    @property
    def id(self) -> str:
        bits = [self.optimizer, str(self.dtype).removeprefix("torch."), self.backend, f"wd={self.weight_decay}"]
        bits += [
            name for name in ("amsgrad", "maximize", "tensor_lr", "complex_params", "capturable") if getattr(self, name)
        ]
        return "-".join(bits)

    @property
    def algorithm(self) -> str:
        return FAMILY[self.optimizer][2]

    def torch_kwargs(self) -> dict:
        """Constructor kwargs that torch.optim accepts for this case (lr excluded)."""
        kw: dict = {"maximize": self.maximize}
        if self.weight_decay != "none":
            kw["weight_decay"] = 0.1
        elif self.optimizer in ALWAYS_DECOUPLED:
            kw["weight_decay"] = 0.0
        if lookup(self.algorithm).amsgrad:
            kw["amsgrad"] = self.amsgrad
        if self.optimizer in ("Adam", "NAdam", "RAdam") and self.weight_decay == "decoupled":
            kw["decoupled_weight_decay"] = True
        return kw

    def adamkit_kwargs(self) -> dict:
        kw = self.torch_kwargs()
        if self.optimizer == "AdaMax" and self.weight_decay == "decoupled":
            kw["decoupled_weight_decay"] = True
        if self.optimizer == "ADOPT":  # Adam's betas and eps, as the shared oracle runs
            kw.update(betas=(0.9, 0.999), eps=1e-8, decoupled_weight_decay=self.weight_decay == "decoupled")
        if self.weight_decay == "fully_decoupled":
            kw["weight_decay"] = 0.1
            kw["decouple_lr"] = True
        kw["backend"] = self.backend
        if self.capturable:
            kw["capturable"] = True
        return kw

    def lr(self, value: float):
        """A float64 case gets a float64 lr tensor, so the lr itself is not rounded; a
        capturable case keeps it on the params' device."""
        dtype = torch.float64 if self.dtype == torch.float64 else None
        device = DEVICE if self.capturable else None
        return torch.tensor(value, dtype=dtype, device=device) if self.tensor_lr else value

    def reference_hyperparameters(self, lr: float, max_lr: float) -> reference.Hyperparameters:
        mode = {"none": "l2", "l2": "l2", "decoupled": "decoupled", "fully_decoupled": "fully_decoupled"}[
            self.weight_decay
        ]
        return reference.Hyperparameters(
            lr=lr,
            eps=1e-8,
            weight_decay=0.0 if self.weight_decay == "none" else 0.1,
            weight_decay_mode=mode,
            max_lr=max_lr,
            amsgrad=self.amsgrad,
            maximize=self.maximize,
        )


TORCH_EXACT_BACKENDS = tuple(name for name, kernel in KERNELS.items() if kernel.torch_exact)


def _cases(*, torch_expressible: bool, **grid: tuple) -> list[Case]:
    """A :class:`Case` per combination of ``grid``'s values (field name -> values), each
    with and without amsgrad where the optimizer has it; a capturable case takes a
    tensor lr.  ``torch_expressible``: only what torch.optim's classes can express."""
    cases = []
    for values in itertools.product(*grid.values()):
        fields = dict(zip(grid, values))
        name, decay = fields["optimizer"], fields["weight_decay"]
        if name in ALWAYS_DECOUPLED and decay == "l2":
            continue  # their decay is always decoupled
        if torch_expressible and name == "AdaMax" and decay == "decoupled":
            continue  # torch.optim.Adamax has no decoupled decay
        if FAMILY[name][2] not in KERNELS[fields["backend"]].algorithms:
            continue
        if refuses(name, fields):
            continue
        if not torch_expressible and lookup(FAMILY[name][2]).group_state:
            # the NumPy reference counts each param's steps, but such an algorithm counts
            # its group's, and here a param skips steps: its own tests (every param
            # stepping every step) hold it to the reference
            continue
        if fields.get("capturable"):
            fields["tensor_lr"] = True
        for amsgrad in (False, True) if lookup(FAMILY[name][2]).amsgrad else (False,):
            cases.append(Case(**fields, amsgrad=amsgrad))
    return cases


def torch_comparable_cases(backends=None) -> list[Case]:
    """Every combination torch.optim can be compared with bit for bit, for every kernel
    that promises torch's bits (the others are held to the reference instead)."""
    return _cases(
        torch_expressible=True,
        optimizer=tuple(OPTIMIZERS),
        backend=backends or TORCH_EXACT_BACKENDS,
        dtype=(torch.float32, torch.float64),
        maximize=(False, True),
        weight_decay=WEIGHT_DECAYS,
        tensor_lr=(False, True),
        complex_params=(False, True),
    )


def reference_cases(backends=None) -> list[Case]:
    """Every option adamkit has, including those torch lacks, for the NumPy oracle.

    Capturable groups take the tensor-scalar path (no host sync), with a tensor lr."""
    return _cases(
        torch_expressible=False,
        optimizer=tuple(FAMILY),
        backend=backends or DEVICE_BACKENDS,
        dtype=(torch.float64,),
        maximize=(False, True),
        weight_decay=WEIGHT_DECAYS + ("fully_decoupled",),
        complex_params=(False, True),
        capturable=(False, True),
    )


#: named optimizer configurations (class, keyword arguments): between them every
#: weight-decay mode (L2, decoupled, fully decoupled, AdaMax's decoupled), amsgrad
#: and maximize
CONFIGS = {
    "adam": (adamkit.Adam, {}),
    "adam-amsgrad-l2": (adamkit.Adam, {"amsgrad": True, "weight_decay": 0.1}),
    "adamw-maximize": (adamkit.AdamW, {"maximize": True, "weight_decay": 0.1}),
    "adamw-maximize-decouple_lr": (adamkit.AdamW, {"maximize": True, "weight_decay": 0.1, "decouple_lr": True}),
    "adamax-decoupled": (adamkit.AdaMax, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
}


def reference_setup(config: str, lr: float, max_lr: float | None = None) -> tuple[str, reference.Hyperparameters]:
    """The NumPy reference's algorithm and hyperparameters for a :data:`CONFIGS` entry."""
    cls, kwargs = CONFIGS[config]
    if kwargs.get("decouple_lr"):
        mode = "fully_decoupled"
    elif cls is adamkit.AdamW or kwargs.get("decoupled_weight_decay"):
        mode = "decoupled"
    else:
        mode = "l2"
    hp = reference.Hyperparameters(
        lr=lr,
        weight_decay=kwargs.get("weight_decay", 0.0),
        weight_decay_mode=mode,
        max_lr=lr if max_lr is None else max_lr,
        amsgrad=kwargs.get("amsgrad", False),
        maximize=kwargs.get("maximize", False),
    )
    return ("adamax" if cls is adamkit.AdaMax else "adam"), hp


#: (optimizer, kwargs) that torch.optim rejects: adamkit raises torch's type and message
TORCH_ERROR_INPUTS = [
    ("Adam", {"lr": -1.0}),
    ("Adam", {"lr": math.nan}),
    ("Adam", {"eps": -1e-8}),
    ("Adam", {"eps": math.nan}),
    ("Adam", {"betas": (1.0, 0.999)}),
    ("Adam", {"betas": (0.9, -0.5)}),
    ("Adam", {"betas": (math.nan, 0.999)}),
    ("Adam", {"weight_decay": -0.1}),
    ("Adam", {"weight_decay": math.nan}),
    ("Adam", {"lr": torch.tensor(0.1), "foreach": True}),
    ("Adam", {"lr": torch.tensor([0.1, 0.2])}),
    ("Adam", {"betas": (torch.tensor(0.9), 0.999)}),
    ("Adam", {"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True}),
    ("Adam", {"fused": True, "foreach": True}),
    ("Adam", {"fused": True, "differentiable": True}),
    ("AdamW", {"lr": -1e-3}),
    ("AdamW", {"betas": (0.9, 1.0)}),
    ("AdamW", {"lr": torch.tensor(0.1), "foreach": True}),
    ("AdamW", {"fused": True, "foreach": True}),
    ("AdaMax", {"lr": -2e-3}),
    ("AdaMax", {"eps": -1.0}),
    ("AdaMax", {"betas": (0.9, 1.5)}),
    ("AdaMax", {"weight_decay": -1.0}),
    ("AdaMax", {"lr": torch.tensor([1.0, 2.0])}),
    ("NAdam", {"momentum_decay": -0.1}),
    ("NAdam", {"betas": (0.9, 1.0)}),
    ("NAdam", {"lr": torch.tensor([1.0, 2.0])}),
    ("RAdam", {"lr": -1e-3}),
    ("RAdam", {"eps": -1.0}),
    ("RAdam", {"weight_decay": -1.0}),
]

#: (kwargs, exception type, words the message must hold) for what adamkit checks beyond
#: torch: values torch lets through, and a bad value of every option of
#: :data:`adamkit.options.OPTIONS`.  Single-key entries are also written into a param
#: group by hand, and must then fail at the next step.
ADAMKIT_ERROR_INPUTS = [
    ({"lr": math.inf}, ValueError, ["learning rate", "inf", "finite"]),
    ({"eps": math.inf}, ValueError, ["epsilon", "inf", "finite"]),
    ({"weight_decay": math.inf}, ValueError, ["weight_decay", "inf", "finite"]),
    # torch fails here by accident ("Boolean value of Tensor ... is ambiguous")
    ({"betas": (torch.tensor([0.9, 0.8]), torch.tensor(0.99))}, ValueError, ["betas[0]", "1-element", "(2,)"]),
    ({"decouple_lr": "yes"}, TypeError, ["decouple_lr", "'yes'", "True or False"]),
    ({"decouple_lr": True, "max_lr": 0.0}, ValueError, ["max_lr", "0.0", "> 0"]),
    ({"decouple_lr": True, "max_lr": -1.0}, ValueError, ["max_lr", "-1.0", "> 0"]),
    ({"decouple_lr": True, "max_lr": math.nan}, ValueError, ["max_lr", "nan", "> 0"]),
    ({"decouple_lr": True, "lr": 0.0}, ValueError, ["max_lr", "0.0", "lr"]),
    ({"max_lr": "big"}, TypeError, ["max_lr", "'big'", "float > 0 or None"]),
    ({"backend": "cuda-magic"}, ValueError, ["backend", "cuda-magic", "'foreach'"]),
    ({"rounding": "up"}, ValueError, ["rounding", "'up'", "'kahan'"]),
    ({"master_weights": "fp8"}, ValueError, ["master_weights", "'fp8'", "'24bit'"]),
    ({"master_weights": "fp32", "rounding": "kahan"}, ValueError, ["master_weights", "rounding='kahan'", "pick one"]),
    ({"state_precision": "int2"}, ValueError, ["state_precision", "'int2'", "'int4'"]),
    ({"seed": -1}, ValueError, ["seed", "-1", "[0, 2**64)"]),
    ({"seed": 2**64}, ValueError, ["seed", str(2**64), "[0, 2**64)"]),
    ({"skip_nonfinite": 1}, TypeError, ["skip_nonfinite", "1", "True or False"]),
    ({"diagnostics": "no"}, TypeError, ["diagnostics", "'no'", "True or False"]),
    ({"cautious": 1}, TypeError, ["cautious", "1", "True or False"]),
    ({"accumulation_steps": 0}, ValueError, ["accumulation_steps", "0", "int >= 1"]),
    ({"accumulation_steps": 2.0}, ValueError, ["accumulation_steps", "2.0", "int >= 1"]),
    ({"state_precision": "int8", "differentiable": True}, ValueError, ["state_precision='int8'", "differentiable"]),
    ({"rounding": "stochastic", "differentiable": True}, ValueError, ["rounding='stochastic'", "differentiable"]),
    ({"master_weights": "24bit", "differentiable": True}, ValueError, ["master_weights='24bit'", "differentiable"]),
    ({"accumulation_steps": 4, "differentiable": True}, ValueError, ["accumulation_steps=4", "differentiable"]),
    ({"offload": "gpu"}, ValueError, ["offload", "'gpu'", "'cpu'"]),
    ({"offload": "cpu", "backend": "triton"}, ValueError, ["offload='cpu'", "backend='triton'", "'foreach'"]),
    ({"offload": "cpu", "capturable": True}, ValueError, ["offload='cpu'", "capturable=True", "CUDA graph"]),
    ({"offload": "cpu", "differentiable": True}, ValueError, ["offload='cpu'", "differentiable"]),
]

#: each adamkit option of :data:`adamkit.options.OPTIONS` set to other values than its
#: default: option -> ((settings, param dtype), ...), the settings holding what the value
#: needs beside it (a seed, a weight decay to decouple).  :func:`option_cases` crosses
#: them with the family; a new option without samples fails
#: ``tests/test_state_dict.py``.
OPTION_SAMPLES: dict[str, tuple[tuple[dict, torch.dtype], ...]] = {
    "decouple_lr": (({"decouple_lr": True, "weight_decay": 0.1}, torch.float32),),
    "max_lr": (({"decouple_lr": True, "max_lr": 0.05, "weight_decay": 0.1}, torch.float32),),
    "backend": tuple(({"backend": name}, torch.float32) for name in CPU_BACKENDS),
    "rounding": (({"rounding": "kahan"}, torch.bfloat16), ({"rounding": "stochastic"}, torch.bfloat16)),
    "master_weights": (({"master_weights": "fp32"}, torch.bfloat16), ({"master_weights": "24bit"}, torch.bfloat16)),
    "state_precision": tuple(({"state_precision": p}, torch.float32) for p in ("fp32", "bf16", "int8", "int4")),
    "seed": (({"seed": 7, "rounding": "stochastic", "state_precision": "int8"}, torch.bfloat16),),
    "skip_nonfinite": (({"skip_nonfinite": True}, torch.float32),),
    "cautious": (({"cautious": True}, torch.float32),),
    "diagnostics": (({"diagnostics": True}, torch.float32),),
    "accumulation_steps": (({"accumulation_steps": 2}, torch.float32),),
    "offload": (({"offload": "cpu"}, torch.float32),),
}


def option_cases() -> list:
    """``pytest.param(row, settings, dtype)`` for every row of :data:`FAMILY` and every
    sample of :data:`OPTION_SAMPLES` that the row's class takes (not refused, and its
    backend runs the algorithm)."""
    import pytest

    cases = []
    for name, (_, _, algorithm) in FAMILY.items():
        for option, samples in OPTION_SAMPLES.items():
            for index, (settings, dtype) in enumerate(samples):
                if set(settings) & refused(name):
                    continue
                backend = settings.get("backend")
                if backend is not None and algorithm not in KERNELS[backend].algorithms:
                    continue
                ident = f"{name}-{option}-{index}"
                cases.append(pytest.param(name, settings, dtype, id=ident))
    return cases


GROUP_LRS = (1e-2, 3e-3)


def make_params(case: Case, seed: int = 0, device: torch.device = DEVICE) -> list[dict]:
    """Two param groups of awkward params, as ``[{"params": [...], "lr": ...}, ...]``.

    Group 0: a contiguous matrix, a transposed view, a column-sliced strided view of
    a larger tensor (its other columns must never be written), a 0-d param.
    Group 1: a vector, an empty tensor and (if asked) a complex param.
    """
    g = torch.Generator().manual_seed(seed)
    real = case.dtype
    cplx = torch.complex64 if real == torch.float32 else torch.complex128

    def randn(*shape, dtype=real):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    base = randn(5, 8)
    group0 = [
        randn(4, 3),
        randn(3, 6).t(),
        base[:, ::3],  # strided view
        randn(()),
    ]
    group1 = [randn(7), torch.empty(0, 3, dtype=real, device=device)]
    if case.complex_params:
        group1.append(randn(3, 2, dtype=cplx))
    return [
        {"params": [torch.nn.Parameter(p) for p in group0], "lr": case.lr(GROUP_LRS[0])},
        {"params": [torch.nn.Parameter(p) for p in group1], "lr": case.lr(GROUP_LRS[1])},
    ]


def clone_groups(groups: list[dict]) -> list[dict]:
    """Same values and layouts (strides preserved), fresh storage."""
    out = []
    for group in groups:
        params = []
        for p in group["params"]:
            copy = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device=p.device)
            copy.copy_(p.detach())
            params.append(torch.nn.Parameter(copy))
        lr = group["lr"].clone() if isinstance(group["lr"], torch.Tensor) else group["lr"]
        out.append({**group, "params": params, "lr": lr})
    return out


def gradients(groups: list[dict], steps: int, seed: int = 1):
    """Per step, a list (flattened over groups) of gradient tensors or ``None``.

    The first param of group 0 has no gradient on every third step.
    """
    g = torch.Generator().manual_seed(seed)
    params = [p for group in groups for p in group["params"]]
    for step in range(steps):
        grads = []
        for i, p in enumerate(params):
            if i == 0 and step % 3 == 2:
                grads.append(None)
            elif p.is_complex():
                grads.append(torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                grads.append(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        yield grads


def assign(groups: list[dict], grads: list) -> None:
    params = [p for group in groups for p in group["params"]]
    for p, grad in zip(params, grads):
        p.grad = None if grad is None else grad.to(p.device, copy=True)


def run(optimizer, groups: list[dict], steps: int, seed: int = 1) -> None:
    for grads in gradients(groups, steps, seed):
        assign(groups, grads)
        optimizer.step()


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().resolve_conj().cpu().numpy().copy()
