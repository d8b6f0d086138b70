r"""What training a model costs in memory under each optimizer setting: the weights, their
gradients and the optimizer's state, in bytes per param and in GB, for adamkit's
settings and for the libraries users compare it with.

adamkit's state is not estimated: each param's state is built by
:func:`adamkit.state.init_state`, the function a real step uses, on a ``meta`` tensor
of the param's shape and dtype, and its tensors' bytes are added up (codes, block
scales, Kahan compensations and master weights' low bits included), so the planner
follows the layouts wherever they go.  The model itself is built on the ``meta``
device too, so a 70B-parameter config is planned without allocating its weights.

The peers' layouts are their own (checked against the state they allocate, on CPU,
with bitsandbytes 0.50 and torchao 0.18 in ``tests/test_memory.py``):

* torch.optim AdamW: ``exp_avg`` and ``exp_avg_sq`` in the param's dtype, a 4-byte
  ``step``;
* bitsandbytes AdamW8bit: for a param of at least 4096 elements, two ``uint8`` states
  with fp32 absmax per block of 256 and a 256-entry fp32 quantization map each; smaller
  params keep fp32 states;
* torchao AdamW8bit / AdamW4bit: where the size is at least 4096 and a multiple of the
  block (256 / 128), codes (1 byte / half a byte), fp32 scales per block and a map of
  256 / 16 fp32 entries per state; else states in the param's dtype (a silent
  full-precision fallback);
* FlashOptim (Databricks, 2026; CUDA only, not installed here): the paper's figures,
  bf16 weights with an 8-bit correction (24-bit master weights) and 1-byte states.

Gradients are held in the param's dtype.  With gradient release
(:func:`adamkit.gradient_release`), each gradient is consumed by its own step during
the backward pass, so at least the largest one is alive at a time; that is the figure
the release column uses for every setting (the peers need the same per-param hooks).

Offloaded settings (``offload="cpu"``, :mod:`adamkit.offload`) keep the state in host
memory: the device holds the weights and gradients only, and the host holds the state
plus two staging copies per param (the param and its gradient, in the param's dtype),
the ``host`` column.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

GB = 1e9


@dataclass(frozen=True)
class Setting:
    """One way to train: who does it, the params' dtype, and the optimizer's state bytes
    for a param of a given shape and dtype."""

    name: str
    library: str
    weight_dtype: torch.dtype
    state_bytes: Callable[[Tensor], int]
    #: the options of the adamkit optimizer that trains this way (adamkit settings only)
    options: dict = field(default_factory=dict)
    note: str = ""
    #: that optimizer's class in :mod:`adamkit` (adamkit settings only)
    optimizer: str = "AdamW"

    @property
    def optimizer_class(self) -> type:
        import adamkit

        return getattr(adamkit, self.optimizer)

    @property
    def offloaded(self) -> bool:
        return self.options.get("offload") is not None


def tensor_bytes(tensor: Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass (torchao's quantized states), the
    bytes of the tensors it is made of."""
    if type(tensor) is not Tensor and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in one param's optimizer state."""
    return sum(tensor_bytes(value) for value in state.values() if isinstance(value, Tensor))


def _adamkit_state_bytes(options: dict, optimizer: str = "AdamW") -> Callable[[Tensor], int]:
    """The bytes :func:`adamkit.state.init_state` allocates for a param of adamkit's
    ``optimizer`` class (its algorithm's state, from the registry), on ``meta``."""
    import adamkit

    from .state import init_state

    cls = getattr(adamkit, optimizer)
    placeholder = [torch.nn.Parameter(torch.empty(0, device="meta"))]
    group = cls(placeholder, **{"seed": 0, **options}).param_groups[0]  # (a seed given: none drawn)

    def held(param: Tensor) -> int:
        state: dict = {}
        init_state(state, torch.empty(param.shape, dtype=param.dtype, device="meta"), group, cls.algorithm)
        return state_bytes(state)

    return held


def _blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def _torch_adamw(param: Tensor) -> int:
    return 2 * param.numel() * param.element_size() + 4


def _bitsandbytes_8bit(param: Tensor) -> int:
    n = param.numel()
    if n < 4096:
        return 2 * 4 * n
    return 2 * (n + 4 * _blocks(n, 256) + 4 * 256)


def _torchao(bits: int, block: int) -> Callable[[Tensor], int]:
    def held(param: Tensor) -> int:
        n = param.numel()
        if n < 4096 or n % block:
            return _torch_adamw(param)
        return 2 * (n * bits // 8 + 4 * (n // block) + 4 * 2**bits) + 4

    return held


def _flashoptim_24bit_int8(param: Tensor) -> int:
    return 3 * param.numel()  # the paper: an 8-bit weight correction and two 1-byte states


def _adamkit(name: str, dtype: torch.dtype, note: str = "", optimizer: str = "AdamW", **options) -> Setting:
    return Setting(name, "adamkit", dtype, _adamkit_state_bytes(options, optimizer), options, note, optimizer)


def settings() -> list[Setting]:
    """adamkit's settings, then the peers'."""
    fp32, bf16 = torch.float32, torch.bfloat16
    return [
        _adamkit("fp32", fp32),
        _adamkit("int8 states", fp32, state_precision="int8"),
        _adamkit("int4 states", fp32, state_precision="int4"),
        _adamkit("bf16, stochastic rounding", bf16, rounding="stochastic"),
        _adamkit("bf16, kahan", bf16, rounding="kahan"),
        _adamkit("bf16, kahan, int8", bf16, rounding="kahan", state_precision="int8"),
        _adamkit(
            "bf16, master fp32, fp32 states", bf16, "exact fp32 AdamW", master_weights="fp32", state_precision="fp32"
        ),
        _adamkit("bf16, master fp32, int8", bf16, master_weights="fp32", state_precision="int8"),
        _adamkit("bf16, master 24bit, int8", bf16, master_weights="24bit", state_precision="int8"),
        _adamkit("bf16, master 24bit, int4", bf16, master_weights="24bit", state_precision="int4"),
        _adamkit(
            "bf16, master fp32, fp32, offload",
            bf16,
            "state on the host",
            master_weights="fp32",
            state_precision="fp32",
            offload="cpu",
        ),
        _adamkit(
            "bf16, master fp32, int8, offload",
            bf16,
            "state on the host",
            master_weights="fp32",
            state_precision="int8",
            offload="cpu",
        ),
        _adamkit("AdEMAMix, int8 states", fp32, "three moments", optimizer="AdEMAMix", state_precision="int8"),
        _adamkit("ScheduleFreeAdamW fp32", fp32, "z and v", optimizer="ScheduleFreeAdamW"),
        _adamkit(
            "ScheduleFreeAdamW 24bit, int8",
            bf16,
            "z in fp32",
            optimizer="ScheduleFreeAdamW",
            master_weights="24bit",
            state_precision="int8",
        ),
        Setting("AdamW fp32", "torch.optim", fp32, _torch_adamw),
        Setting("AdamW bf16", "torch.optim", bf16, _torch_adamw, note="loses small updates"),
        Setting("AdamW8bit", "bitsandbytes", fp32, _bitsandbytes_8bit),
        Setting("AdamW8bit", "torchao", fp32, _torchao(8, 256)),
        Setting("AdamW4bit", "torchao", fp32, _torchao(4, 128)),
        Setting("24-bit master, int8", "FlashOptim", bf16, _flashoptim_24bit_int8, note="paper's figures, CUDA only"),
    ]


@dataclass(frozen=True)
class Plan:
    """One setting's bytes for a model."""

    setting: Setting
    params: int
    weights: int
    gradients: int
    largest_gradient: int
    #: the optimizer's state, wherever it lives
    state: int
    #: bytes in host memory (an offloaded setting's state and staging copies)
    host: int = 0

    def per_param(self, nbytes: int) -> float:
        return nbytes / self.params

    @property
    def device_state(self) -> int:
        return 0 if self.setting.offloaded else self.state

    @property
    def total(self) -> int:
        """Bytes on the device (where the weights are)."""
        return self.weights + self.gradients + self.device_state

    @property
    def total_with_release(self) -> int:
        return self.weights + self.largest_gradient + self.device_state


def plan(shapes: Iterable[Sequence[int]], setting: Setting, frozen: Iterable[Sequence[int]] = ()) -> Plan:
    """Bytes of weights, gradients and state for trainable params of ``shapes`` (and the
    weights alone of ``frozen`` params, which have no gradient or state) under ``setting``."""
    metas = [torch.empty(tuple(shape), dtype=setting.weight_dtype, device="meta") for shape in shapes]
    size = torch.empty(0, dtype=setting.weight_dtype).element_size()
    counts = [m.numel() for m in metas]
    frozen_count = sum(math.prod(shape) for shape in frozen)
    state = sum(setting.state_bytes(m) for m in metas)
    return Plan(
        setting,
        params=sum(counts) + frozen_count,
        weights=size * (sum(counts) + frozen_count),
        gradients=size * sum(counts),
        largest_gradient=size * max(counts, default=0),
        state=state,
        host=state + 2 * size * sum(counts) if setting.offloaded else 0,
    )


# --------------------------------------------------------------------------- models


class ModelSpecError(ValueError):
    """A model spec that names nothing buildable."""


def build_model(spec: str, overrides: dict | None = None) -> torch.nn.Module:
    """The model ``spec`` names, built on the ``meta`` device (no memory):

    * ``"package.module:factory"``: a callable (a function, or an ``nn.Module`` class)
      taking no arguments;
    * a Hugging Face model type (``gpt2``, ``llama``, ``bert``, ...): its config class
      with ``overrides`` (config attributes, e.g. ``{"hidden_size": 4096}``), and the
      causal-LM model for it where there is one, else the base model.  Nothing is
      downloaded: the config comes from transformers' own defaults.
    """
    overrides = overrides or {}
    with torch.device("meta"):
        if ":" in spec:
            if overrides:
                raise ModelSpecError(f"config overrides {sorted(overrides)} apply to Hugging Face model types only")
            module_name, _, attribute = spec.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError, ValueError) as error:  # (ValueError: an empty module name)
                raise ModelSpecError(f"model {spec!r}: {error}") from None
            if not callable(factory):
                raise ModelSpecError(f"model {spec!r} is a {type(factory).__name__}, not a callable")
            model = factory()
            if not isinstance(model, torch.nn.Module):
                raise ModelSpecError(f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
            return model
        return _hugging_face_model(spec, overrides)


def _hugging_face_model(model_type: str, overrides: dict) -> torch.nn.Module:
    try:
        import transformers
    except ImportError:
        raise ModelSpecError(
            f"model {model_type!r}: a Hugging Face model type needs transformers (pip install transformers); "
            "or name a factory as package.module:function"
        ) from None
    known = transformers.CONFIG_MAPPING
    if model_type not in known:
        close = sorted(name for name in known.keys() if model_type.lower() in name)[:8]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelSpecError(
            f"model {model_type!r} is neither package.module:function nor a Hugging Face model type{hint}"
        )
    defaults = transformers.AutoConfig.for_model(model_type)
    _check_names(defaults, overrides, model_type)
    causal = type(defaults) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING  # else the base model
    try:
        _check_sizes(defaults, overrides)
        with _at_most(MAX_TENSORS, model_type):
            config = transformers.AutoConfig.for_model(model_type, **overrides)
            return (transformers.AutoModelForCausalLM if causal else transformers.AutoModel).from_config(config)
    except ModelSpecError:
        raise
    except Exception as error:  # a value the config or the model cannot take (an unknown activation, a text)
        if not overrides:
            raise
        raise ModelSpecError(f"model {model_type!r} with {overrides}: {type(error).__name__}: {error}") from None


#: the most param tensors a model may have for ``adamkit memory`` to build it (building
#: takes about a quarter of a millisecond per tensor on the meta device: 20 s at this bound)
MAX_TENSORS = 80_000

#: the most layers a config may ask for (the largest published models have a few hundred)
MAX_LAYERS = 2_000


def _check_names(defaults, overrides: dict, model_type: str) -> None:
    """Refuse a config attribute the model type does not have (a misspelt one would be
    kept by the config and change nothing)."""
    for key in overrides:
        if not hasattr(defaults, key):
            close = difflib.get_close_matches(key, [n for n in dir(defaults) if not n.startswith("_")], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ModelSpecError(f"{key!r} is not an attribute of {type(defaults).__name__} ({model_type}){hint}")


def _check_sizes(defaults, overrides: dict) -> None:
    """Refuse a size that is not a positive integer (an attribute whose default is one), and
    a layer count beyond :data:`MAX_LAYERS`."""
    for key, value in overrides.items():
        default = getattr(defaults, key, None)
        if isinstance(default, int) and not isinstance(default, bool) and default > 0:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelSpecError(
                    f"{key}={value!r}: {key} is a size (default {default}); expected a positive integer"
                )
    layers = getattr(defaults.__class__(**overrides), "num_hidden_layers", None) if overrides else None
    if isinstance(layers, int) and layers > MAX_LAYERS:
        raise ModelSpecError(
            f"{layers:,} layers: adamkit memory builds models of up to {MAX_LAYERS:,} layers (bytes grow linearly "
            f"with them: plan a smaller config and scale)"
        )


@contextmanager
def _at_most(count: int, name: str) -> Iterator[None]:
    """Stop building a model once it has registered ``count`` param tensors."""
    registered = 0

    def hook(module, param_name, param):
        nonlocal registered
        registered += param is not None
        if registered > count:
            raise ModelSpecError(
                f"model {name!r} has more than {count:,} param tensors; adamkit memory builds models of up to "
                f"{count:,} (a few seconds): plan a smaller config and scale"
            )

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def param_shapes(model: torch.nn.Module, trainable: bool = True) -> list[tuple[int, ...]]:
    """The shapes of the model's trainable params (``trainable=False``: its frozen ones);
    a param shared between modules counts once."""
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad == trainable]


def format_table(plans: list[Plan]) -> str:
    """The plans as a table: bytes per param of each part on the device, the device's
    totals in GB (and with gradient release), and bytes per param in host memory."""
    header = (
        f"{'library':13s} {'setting':32s} {'weights':>7s} {'grads':>6s} {'state':>6s} {'B/param':>8s} "
        f"{'GB':>8s} {'GB, release':>11s} {'host':>6s}  note"
    )
    rows = [header, "-" * len(header)]
    for p in plans:
        rows.append(
            f"{p.setting.library:13s} {p.setting.name:32s} {p.per_param(p.weights):7.3f} "
            f"{p.per_param(p.gradients):6.3f} {p.per_param(p.device_state):6.3f} {p.per_param(p.total):8.3f} "
            f"{p.total / GB:8.3f} {p.total_with_release / GB:11.3f} {p.per_param(p.host):6.3f}  "
            f"{p.setting.note}".rstrip()
        )
    return "\n".join(rows)


def available_bytes() -> int | None:
    """Memory this machine has free (Linux and other POSIX systems that report it), or ``None``."""
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def time_step(model_shapes: list[tuple[int, ...]], setting: Setting, rounds: int = 3) -> float:
    """Median seconds of one step of an adamkit ``setting``'s optimizer, on real params
    of the model's shapes (random gradients; the first step not timed)."""
    import time

    generator = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=generator).to(setting.weight_dtype)) for shape in model_shapes
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    optimizer = setting.optimizer_class(params, lr=1e-4, **{"seed": 0, **setting.options})  # (none drawn)
    optimizer.step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def parameter_count_text(count: int) -> str:
    exponent = min(int(math.log10(max(count, 1)) // 3), 4)
    return f"{count / 10 ** (3 * exponent):.2f}{['', 'K', 'M', 'B', 'T'][exponent]}"


__all__ = [
    "ModelSpecError",
    "available_bytes",
    "Plan",
    "Setting",
    "build_model",
    "format_table",
    "parameter_count_text",
    "param_shapes",
    "plan",
    "settings",
    "state_bytes",
    "tensor_bytes",
    "time_step",
]
