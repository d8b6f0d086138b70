r"""Every value a param group holds, and every check of it.

adamkit's own options live in one table, :data:`OPTIONS` (name, default, check,
meaning).  The constructors' keyword-only arguments, the param groups' defaults, the
keys a torch.optim checkpoint lacks, the upgrade of an old pickle and the checks all
read it; the public signatures spell the options out for users and IDEs, and
:func:`check_signature` holds them to the table when a class is defined.

torch.optim's own arguments (``lr``, ``betas``, ``eps``, ``weight_decay``...) are
checked here too, with torch's messages and in torch's order.  Every check runs when
a group is made and again at every step (a scheduler or a hand edit may have changed
the group), before any tensor is touched.

The options (reproduced from :data:`OPTIONS`):
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .algorithms import REGISTRY, is_real_number
from .algorithms.adopt import check_clip_exponent
from .algorithms.base import number_of
from .algorithms.nadam import check_momentum_decay
from .kernels import KERNELS
from .offload import OFFLOADS
from .rule import Scalar, as_number, to_scalar
from .specs.master import MASTER_WEIGHTS
from .specs.quantization import FORMATS
from .specs.rounding import ROUNDINGS
from .user_warnings import warn_at_user

#: The execution paths a param group may ask for; ``None`` picks per device.
BACKENDS = (None, *KERNELS)

#: The backends an offloaded group may name (they step host tensors)
HOST_BACKENDS = ("cpu", "foreach", "single_tensor")

#: The dtype of ``exp_avg`` and the second moments: ``None`` is the param's dtype.
STATE_PRECISIONS = (None, "fp32", "bf16", *FORMATS)


def _one_of(allowed: tuple) -> Callable[[str, Any, str], None]:
    def check(name: str, value: Any, where: str) -> None:
        if value not in allowed:
            raise ValueError(f"Invalid {name}: {value!r}{where} (allowed: {', '.join(map(repr, allowed))})")

    return check


def _boolean(name: str, value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False{where}, got {value!r}")


def _number_or_none(name: str, value: Any, where: str) -> None:
    if value is not None and not (isinstance(value, Tensor) or is_real_number(value)):
        raise TypeError(f"{name} must be a float > 0 or None{where}, got {value!r}")


def _seed(name: str, value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64):
        raise ValueError(f"Invalid {name}: {value!r}{where} ({name} must be None or an int in [0, 2**64))")


def _count(name: str, value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}{where} (an int >= 1)")


@dataclass(frozen=True)
class Option:
    """One of adamkit's options: its name, default, check and meaning (reST)."""

    name: str
    default: Any
    #: ``check(name, value, where)`` raises a ``ValueError`` or ``TypeError`` for a bad value
    check: Callable[[str, Any, str], None]
    doc: str


OPTIONS: tuple[Option, ...] = (
    Option(
        "decouple_lr",
        False,
        _boolean,
        r"Fully decoupled weight decay, "
        r":math:`\theta \leftarrow \theta (1 - \frac{\eta_t}{\eta_{max}} \lambda)`: the decay follows the "
        "learning-rate *schedule* but not its magnitude.",
    ),
    Option(
        "max_lr",
        None,
        _number_or_none,
        r":math:`\eta_{max}` for ``decouple_lr``, per param group; defaults to the group's initial lr.",
    ),
    Option(
        "backend",
        None,
        _one_of(BACKENDS),
        '``None`` (pick per device), ``"single_tensor"`` (torch\'s single-tensor path: per-tensor torch ops), '
        '``"foreach"`` (multi-tensor ops), ``"cpu"`` (numba) or ``"triton"``.  ``foreach=True`` and '
        "``fused=True`` map onto the matching adamkit path.  With a fused backend a "
        "``torch.amp.GradScaler`` hands over its scale and inf flag, as it does to torch's fused "
        "optimizers: gradients are unscaled inside the kernel and left scaled in ``.grad``; on other "
        "paths the scaler unscales ``.grad`` in place.",
    ),
    Option(
        "rounding",
        "nearest",
        _one_of(ROUNDINGS),
        'How bf16/fp16 params are stored after each update: ``"nearest"`` (torch\'s behaviour), '
        '``"kahan"`` (a compensation buffer carries what rounding lost) or ``"stochastic"`` (unbiased '
        "random rounding, reproducible from ``seed``); see :mod:`adamkit.specs.rounding`.  fp32/fp64 params "
        "are unaffected.",
    ),
    Option(
        "master_weights",
        None,
        _one_of(MASTER_WEIGHTS),
        '``"fp32"``: each bf16 param is the high half of an fp32 master weight whose low 16 bits the '
        'optimizer keeps (``state["master_low_bits"]``, +2 bytes per param), so the step runs on the '
        'fp32 master and, with ``state_precision="fp32"`` (the moments of a bf16 param are bf16 by '
        'default), its bits are those of the same run on fp32 params.  ``"24bit"``: 8 more bits '
        "(+1 byte), the master rounded stochastically to 16 significant bits after each update.  "
        "``None``: the param is the weight.  See :mod:`adamkit.specs.master`; needs "
        '``rounding="nearest"``; fp16 params cannot split.',
    ),
    Option(
        "state_precision",
        None,
        _one_of(STATE_PRECISIONS),
        'The moments\' storage: ``None`` (the param\'s dtype, as torch), ``"fp32"``, ``"bf16"``, or '
        'block-wise quantized ``"int8"`` / ``"int4"`` (about 2 and 1 bytes per param for both moments; '
        "see :mod:`adamkit.specs.quantization`).  Per param group, so a group can opt out.",
    ),
    Option(
        "seed",
        None,
        _seed,
        "The stochastic-rounding seed (an int in [0, 2**64)); ``None`` draws one from torch's default "
        "generator when a group first rounds stochastically.",
    ),
    Option(
        "skip_nonfinite",
        False,
        _boolean,
        "``True``: a group whose gradients hold a NaN or an infinity is not stepped (params, moments "
        "and step counters stay as they were; under gradient release, each param whose own gradient "
        "does), counted in ``optimizer.skipped_steps``; reads one flag "
        "per group on the host.  ``False`` follows torch.optim.",
    ),
    Option(
        "cautious",
        False,
        _boolean,
        "``True``: cautious updates (Liang et al., 2024): each tensor's update keeps only the "
        "elements whose sign agrees with the gradient's (the gradient the moments see), the kept ones "
        "scaled by n / (kept + 1) so the update's size is roughly kept; weight decay is not masked.  "
        "Every class, every backend: the fused kernels first count each tensor's agreeing elements (the "
        "update kernel run with nothing stored), then update; ``foreach`` runs it tensor by tensor.",
    ),
    Option(
        "diagnostics",
        False,
        _boolean,
        "``True``: record each gradient's norm at every step for ``optimizer.stats()`` "
        "(:mod:`adamkit.diagnostics`); one extra norm per tensor, no host sync.",
    ),
    Option(
        "accumulation_steps",
        1,
        _count,
        "N > 1: optimizer accumulation (:mod:`adamkit.accumulation`): each ``step()`` folds one "
        "micro-batch's gradient into the moments, and the weights move on every N-th (NAdam, ADOPT, "
        "StableAdamW and cautious updates add up the gradients and step with their mean).",
    ),
    Option(
        "offload",
        None,
        _one_of(OFFLOADS),
        '``"cpu"``: the group\'s state lives in host memory (pinned for CUDA params) and a CPU kernel '
        "steps it there: each step copies the params and gradients to the host and the new params "
        "back; with :func:`adamkit.gradient_release`, a host thread steps each param while backward "
        "goes on (:mod:`adamkit.offload`).  Results equal the device-resident run's bit for bit.  "
        '``backend`` may be ``None`` (the ``"cpu"`` kernel), ``"cpu"``, ``"foreach"`` or '
        '``"single_tensor"``; not with ``capturable`` or ``differentiable``.  A loaded state dict '
        "does not change it: checkpoints move between offloaded and resident runs.",
    ),
)

#: option name -> default
DEFAULTS: dict[str, Any] = {option.name: option.default for option in OPTIONS}

if __doc__ is not None:  # (``python -OO`` strips docstrings)
    __doc__ += "\n\n" + "\n".join(f"``{o.name}`` (default ``{o.default!r}``)\n    {o.doc}\n" for o in OPTIONS)


def check_signature(cls: type) -> None:
    """Raise ``TypeError`` unless ``cls.__init__`` takes every option keyword-only, with
    the table's default (run for every optimizer class when it is defined)."""
    parameters = inspect.signature(cls.__init__).parameters
    for option in OPTIONS:
        parameter = parameters.get(option.name)
        if parameter is None or parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"{cls.__name__}.__init__ must take the option {option.name!r} keyword-only")
        if parameter.default != option.default:
            raise TypeError(
                f"{cls.__name__}.__init__'s {option.name}={parameter.default!r} differs from the table's "
                f"default {option.default!r}"
            )


def split_arguments(arguments: Mapping[str, Any]) -> tuple[dict, dict]:
    """A constructor's arguments (``locals()``, less ``self`` and ``params``) as
    (torch.optim's, adamkit's options)."""
    not_torch = {*DEFAULTS, "self", "params", "__class__"}
    return {k: v for k, v in arguments.items() if k not in not_torch}, {name: arguments[name] for name in DEFAULTS}


#: option values renamed since a release: (option, old value) -> its new value.  The old
#: value keeps working (from a constructor, a group edit or a loaded checkpoint), with a
#: ``FutureWarning`` naming the new one.
RENAMED_VALUES: dict[tuple[str, Any], Any] = {("backend", "reference"): "single_tensor"}


def renew_values(values: dict, where: str = "") -> None:
    """Replace renamed option values in ``values`` (a constructor's options or a param
    group) by their new names, in place, warning once for each."""
    for (name, old), new in RENAMED_VALUES.items():
        if isinstance(values.get(name), str) and values[name] == old:
            warn_at_user(
                f"{name}={old!r}{where} is deprecated and will be removed: it is now {name}={new!r}", FutureWarning
            )
            values[name] = new


def check_options(values: Mapping[str, Any], *, differentiable: bool, where: str = "") -> None:
    """Each option's own check, then the combinations that cannot work together."""
    for option in OPTIONS:
        option.check(option.name, values.get(option.name, option.default), where)
    master, rounding = values.get("master_weights"), values.get("rounding", "nearest")
    precision, steps = values.get("state_precision"), values.get("accumulation_steps", 1)
    if master is not None and rounding != "nearest":
        raise ValueError(
            f"master_weights={master!r} and rounding={rounding!r} both say how a 16-bit weight keeps "
            f"its updates{where}: pick one (master_weights with rounding='nearest')"
        )
    offload, backend = values.get("offload"), values.get("backend")
    if offload is not None and backend is not None and backend not in HOST_BACKENDS:
        raise ValueError(
            f"offload={offload!r} steps the state on the host, but backend={backend!r}{where} does not run there "
            f"(allowed with offload: None, {', '.join(map(repr, HOST_BACKENDS))})"
        )
    if offload is not None and values.get("capturable"):
        raise ValueError(
            f"offload={offload!r} and capturable=True{where}: a CUDA graph cannot capture a step made on the host"
        )
    if values.get("decouple_lr") and values.get("max_lr") is not None:
        check_max_lr(values["max_lr"], where=where)
    if not differentiable:
        return
    for name, value, cannot, instead in (
        ("master_weights", master, master is not None, "splitting bits is not differentiable"),
        (
            "state_precision",
            precision,
            precision in FORMATS,
            "quantized states are not differentiable; use state_precision=None or 'fp32'",
        ),
        ("rounding", rounding, rounding != "nearest", "rounding is not differentiable; use rounding='nearest'"),
        ("accumulation_steps", steps, steps > 1, "use accumulation_steps=1"),
        ("offload", values.get("offload"), values.get("offload") is not None, "use offload=None"),
    ):
        if cannot:
            raise ValueError(f"{name}={value!r} does not support differentiable=True{where} ({instead})")


def check_available(values: Mapping[str, Any], unavailable: tuple[str, ...], optimizer: str, where: str = "") -> None:
    """Raise ``ValueError`` where an option ``optimizer`` does not run is set."""
    for name in unavailable:
        value = values.get(name, DEFAULTS[name])
        if value != DEFAULTS[name]:
            raise ValueError(
                f"{name}={value!r}{where}: {optimizer} does not run this option yet; leave it at {DEFAULTS[name]!r}"
            )


def check_hyperparameters(
    *,
    lr: Scalar,
    betas: tuple[Scalar, Scalar],
    eps: float,
    weight_decay: float,
    where: str = "",
    read_tensors: bool = True,
) -> None:
    """Raise ``ValueError`` (with ``torch.optim``'s message text) for a bad value.

    Torch's checks (``not 0.0 <= lr`` and so on) already reject NaN; on top of
    them infinite values are rejected, since no step can use them.  Values are
    formatted as torch formats them (a 0-d tensor prints as its number).
    ``where`` names the param group when the check runs at step time; with
    ``read_tensors=False`` tensors are checked for shape only.
    """
    checks = (
        ("learning rate", "lr", lr, "a finite number >= 0"),
        ("epsilon value", "eps", eps, "a finite number >= 0"),
    )
    for label, name, value, allowed in checks:
        number = number_of(name, value, where, read_tensors=read_tensors)
        if number is not None and (not 0.0 <= number or math.isinf(number)):
            raise ValueError(f"Invalid {label}: {value} ({name} must be {allowed}{where})")
    check_betas_pair(betas, where)
    for index, beta in enumerate(betas):
        number = number_of(f"betas[{index}]", beta, where, read_tensors=read_tensors)
        if number is not None and not 0.0 <= number < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {index}: {beta} (betas[{index}] must be in [0, 1){where})"
            )
    number = number_of("weight_decay", weight_decay, where, read_tensors=read_tensors)
    if number is not None and (not 0.0 <= number or math.isinf(number)):
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay} (weight_decay must be a finite number >= 0{where})"
        )


def check_betas_pair(betas: Any, where: str = "") -> None:
    """``betas`` is a pair (beta1, beta2): a sequence, or an array or tensor of two
    numbers, as torch.optim indexes it.  torch.optim fails on anything else only later,
    or with an IndexError that does not say which argument."""
    pair = isinstance(betas, (Sequence, np.ndarray, Tensor)) and getattr(betas, "ndim", 1) > 0
    if isinstance(betas, (str, bytes)) or not pair:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")


def check_constructor_arguments(arguments: Mapping[str, Any], *, adam_checks: bool) -> tuple[Scalar, Scalar]:
    """torch.optim's constructor checks of its own arguments, in torch's order and with
    its messages.

    Returns the betas to store: torch.optim.Adam makes 1-element tensors 0-d,
    torch.optim.Adamax keeps what it was given.

    ``adam_checks``: torch.optim.Adam also rejects tensor hyperparameters with
    ``foreach=True`` and mixed float/tensor betas; torch.optim.Adamax does not.
    """
    lr, betas = arguments["lr"], arguments["betas"]
    tensors_refused = arguments["foreach"] and not arguments["capturable"] and adam_checks
    if isinstance(lr, Tensor):
        if tensors_refused:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    check_betas_pair(betas)
    for index, beta in enumerate(betas):  # before the range checks, which need one element
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element, got shape {tuple(beta.shape)}")
    check_hyperparameters(lr=lr, betas=betas, eps=arguments["eps"], weight_decay=arguments["weight_decay"])
    check_algorithm_hyperparameters(arguments)
    if not adam_checks:
        return betas
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor) and tensors_refused:
            raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
    return tuple(to_scalar(b) for b in betas)


def check_max_lr(max_lr: Any, *, where: str = "") -> None:
    """``max_lr`` scales fully decoupled weight decay: it must be a finite number > 0."""
    _number_or_none("max_lr", max_lr, where)
    number = as_number(max_lr)
    if not (number > 0.0 and math.isfinite(number)):
        raise ValueError(
            f"Invalid max_lr value: {number} (with decouple_lr=True, max_lr must be a "
            f"finite number > 0{where}; it defaults to the group's initial lr, so pass "
            "max_lr explicitly when lr starts at 0)"
        )


def check_algorithm_hyperparameters(values: Mapping[str, Any], where: str = "") -> None:
    """Check every algorithm hyperparameter ``values`` holds (a constructor's arguments or
    a group), by the checks each algorithm declares (:mod:`adamkit.algorithms`)."""
    for spec in REGISTRY.values():
        for name, check in spec.checks.items():
            if name in values:
                check(values[name], where)


def check_group(group: dict, where: str) -> None:
    """Every check of a param group's values, run when the group is made and at every
    step.  A capturable group's tensors are not read: on an accelerator that would sync."""
    renew_values(group, where)
    lr, weight_decay = group["lr"], group["weight_decay"]
    check_hyperparameters(
        lr=lr,
        betas=group["betas"],
        eps=group["eps"],
        weight_decay=weight_decay,
        where=where,
        read_tensors=not group.get("capturable"),
    )
    check_options(group, differentiable=group["differentiable"], where=where)
    check_algorithm_hyperparameters(group, where)
    master = group.get("master_weights")
    if master is not None:
        for j, p in enumerate(group["params"]):
            if p.dtype == torch.float16:
                raise ValueError(
                    f"master_weights={master!r} splits bf16 params, but params[{j}]{where} is float16 (its "
                    "exponent is not an fp32's): use bf16, or rounding='kahan' or 'stochastic'"
                )
    if group.get("cautious") and group.get("diagnostics"):
        raise ValueError(
            f"diagnostics=True with cautious=True{where}: a cautious update kept only the elements where it "
            "agreed with that step's gradient, which the state does not keep, so its figures cannot be read back"
        )
    max_lr = group["max_lr"]  # checked by check_options where decouple_lr is set
    if group.get("decouple_lr") and not isinstance(lr, Tensor) and (lr / max_lr) * weight_decay > 1:
        raise ValueError(
            f"fully decoupled weight decay would flip the params' sign{where}: "
            f"1 - (lr / max_lr) * weight_decay = 1 - ({lr} / {max_lr}) * {weight_decay} < 0 "
            "(keep lr <= max_lr / weight_decay)"
        )


__all__ = [
    "BACKENDS",
    "DEFAULTS",
    "OPTIONS",
    "STATE_PRECISIONS",
    "Option",
    "check_algorithm_hyperparameters",
    "check_available",
    "check_clip_exponent",
    "check_constructor_arguments",
    "check_group",
    "check_hyperparameters",
    "check_max_lr",
    "check_momentum_decay",
    "check_options",
    "check_signature",
    "split_arguments",
]
