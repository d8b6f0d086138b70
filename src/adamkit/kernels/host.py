r"""The host side shared by the fused kernels (:mod:`adamkit.kernels.cpu` and
:mod:`adamkit.kernels.triton`): one layout of the address table, of the group's
constants and of the per-tensor scalars, the state tensors a bucket addresses, the
table of chunks a launch covers, and the CPU ``step`` counters (and NAdam's
``mu_product``), advanced together.

The address table has one row per tensor and these columns (:data:`COLUMNS`)::

    param, grad, exp_avg, second moment, its maximum, extra, and three block scales

``extra`` is the param's own buffer (a Kahan compensation or a split master's low
bits) or 0; the scales are the quantized moments' (their columns then hold codes) or
0.  A moment the variant never touches (the maximum without AMSGrad) repeats the
second moment's address.

Every algorithm's update is one element-wise form with per-tensor scalars
(:data:`TENSOR_SCALARS`: :math:`\alpha` step size, :math:`c_2` bias correction,
:math:`\gamma` gradient step size, whether the step is adaptive (RAdam: rectified;
ADOPT: past its first step), and ADOPT's clipping value :math:`c` and weight :math:`w`):

.. math::

    \text{Adam, AdaMax:}\quad & \theta \leftarrow \theta - \alpha\, m / d, \qquad
        d = \sqrt{v} / c_2 + \epsilon \ \text{(AdaMax: } d = u) \\
    \text{NAdam:}\quad & \theta \leftarrow \theta - (\alpha\, m + \gamma\, g) / d,
        \qquad \alpha = \frac{\eta\,\mu_{t+1}}{1 - \textstyle\prod_{i \le t+1} \mu_i}, \quad
        \gamma = \frac{\eta (1 - \mu_t)}{1 - \prod_{i \le t} \mu_i} \\
    \text{RAdam:}\quad & \theta \leftarrow \theta - \alpha\, m / d, \qquad
        d = \sqrt{v} + \epsilon, \ \alpha = \frac{\eta\, r_t \sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
        \ \text{once } \rho_t > 5; \quad d = 1, \ \alpha = \frac{\eta}{1 - \beta_1^t} \text{ before} \\
    \text{ADOPT:}\quad & m \leftarrow m + (1 - \beta_1)
        \bigl(\operatorname{clip}(g / \max(\sqrt{v}, \epsilon), c) - m\bigr), \quad
        \theta \leftarrow \theta - \eta\, m, \quad v \leftarrow \beta_2 v + w g^2 \\
    \text{AdEMAMix:}\quad & m_2 \leftarrow m_2 + (1 - \beta_3(t))(g - m_2), \quad
        \theta \leftarrow \theta - (\alpha\, m + \alpha_2\, m_2) / d, \qquad
        \alpha = \frac{\eta}{1 - \beta_1^t}, \ \alpha_2 = \eta\, \alpha(t) \\
    \text{schedule-free:}\quad & d = g / (\sqrt{v / (1 - \beta_2^t)} + \epsilon) + \lambda \theta,
        \quad \theta \leftarrow \operatorname{lerp}(\theta, z, c) + a\, d, \quad
        z \leftarrow z - \gamma d, \qquad a = \gamma(\beta_1(1 - c) - 1)

ADOPT's first step has :math:`c = 0` and :math:`w = 1` (so :math:`m` stays 0 and
:math:`v = g^2`) and is not adaptive: its decoupled decay factor is 1.  The decay factor
is a per-tensor scalar for that reason and for StableAdamW's:

.. math::

    \text{StableAdamW:}\quad s = 1 / \max\bigl(1, \sqrt{\operatorname{mean}(g^2 / \max(v / b_2, \epsilon^2))}\bigr),
    \qquad \alpha \leftarrow s\,\alpha, \quad \text{decay factor} = 1 - s\,\eta\lambda

(:math:`b_2 = 1 - \beta_2^t`, :math:`v` the new second moment), then Adam's update.  The
sums behind :math:`s` are a reduction over each whole tensor: the kernels run a pass of
chunk sums of their own first (:func:`clip_update_sizes` turns them into the scalars).
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import torch
from torch import Tensor

from .. import blockwise
from ..algorithms import lookup
from ..rule import Algorithm, GroupScalars, StepScalars, UpdateRule, as_number
from ..sharding import PARAM_SHAPED_KEYS
from ..specs import rounding
from ..specs.master import LOW_BITS_DTYPE
from ..specs.quantization import SIGNED_KEYS, QuantFormat
from ..state import MU_PRODUCT_KEY, PARAM_EXTRA_KEY, moment_keys
from .types import as_real

#: the address table's columns (see the module docstring)
COLUMNS = (
    "param",
    "grad",
    "exp_avg",
    "second",
    "max_second",
    "extra",
    "exp_avg_scales",
    "second_scales",
    "max_second_scales",
)
#: how many of them come from the state (fixed while the state is)
STATE_COLUMNS = len(COLUMNS) - 2

#: the group's constants as both kernels read them, in this order (float64 on the
#: host; each kernel rounds them to its compute dtype)
GROUP_CONSTANTS = ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "l2_weight_decay")


#: the per-tensor scalars, one row per tensor, in this order (float64; see the module
#: docstring): the step size of m / d, sqrt(1 - beta2^t), NAdam's step size of g / d,
#: 1 where the step is adaptive (RAdam: rectified; ADOPT: not the first), ADOPT's
#: clipping value and weight of g^2, the decoupled decay factor (1 without decoupled
#: decay), 1 - beta2^t (read by StableAdamW's clipping pass; 1 for the others), a
#: cautious update's n / (kept + 1) (1 until :func:`set_cautious_scales`), a slow
#: first moment's step size and weight 1 - beta3(t) of g (AdEMAMix; 0 for the others),
#: and schedule-free's c_{t+1}, step of the param along the direction and weight decay
#: at the param (0 for the others)
TENSOR_SCALARS = (
    "step_size",
    "bias_correction2_sqrt",
    "gradient_step_size",
    "adaptive",
    "clip",
    "second_weight",
    "decay_factor",
    "bias_correction2",
    "cautious_scale",
    "slow_step_size",
    "one_minus_beta3",
    "average_weight",
    "point_step_size",
    "point_decay",
)
STEP_SIZE_COLUMN = TENSOR_SCALARS.index("step_size")
DECAY_FACTOR_COLUMN = TENSOR_SCALARS.index("decay_factor")
CAUTIOUS_SCALE_COLUMN = TENSOR_SCALARS.index("cautious_scale")


def group_constants(group_scalars: GroupScalars) -> tuple:
    """:data:`GROUP_CONSTANTS` of a group; a tensor hyperparameter (a capturable
    group's) stays a tensor, in float64."""
    beta1 = group_scalars.beta1.to(torch.float64) if isinstance(group_scalars.beta1, Tensor) else group_scalars.beta1
    return (
        1.0 - beta1,
        group_scalars.beta2,
        group_scalars.one_minus_beta2,
        group_scalars.eps,
        group_scalars.l2_weight_decay,
    )


def tensor_scalar_columns(algorithm: Algorithm, lr, scalars: StepScalars, mu_products, decay_factor, where) -> tuple:
    """:data:`TENSOR_SCALARS` from each tensor's step scalars (fields that are float64
    arrays or device tensors, aligned with the tensors), NAdam's new ``mu_product``
    values and the group's decoupled decay factor (``None`` without decoupled decay):
    Adam's, changed by the algorithm's
    :attr:`~adamkit.algorithms.AlgorithmSpec.tensor_columns`; ``where`` is
    ``numpy.where`` or ``torch.where``."""
    s = scalars
    columns = {
        "step_size": s.step_size,
        "bias_correction2_sqrt": s.bias_correction2_sqrt,
        "gradient_step_size": 0.0,
        "adaptive": 0.0,
        "clip": 0.0,
        "second_weight": 0.0,
        "decay_factor": 1.0 if decay_factor is None else decay_factor,
        "bias_correction2": 1.0,
        "cautious_scale": 1.0,
        "slow_step_size": 0.0,
        "one_minus_beta3": 0.0,
        "average_weight": 0.0,
        "point_step_size": 0.0,
        "point_decay": 0.0,
    }
    lookup(algorithm).tensor_columns(columns, lr, s, mu_products, where)
    return tuple(columns[name] for name in TENSOR_SCALARS)


def clip_update_sizes(rows, sums, numels, decay_rate) -> None:
    r"""StableAdamW's update clipping, in place on ``rows`` of the tensor scalars
    (a NumPy or torch float64 array): each tensor's
    :math:`s = 1 / \max(1, \sqrt{\Sigma / n})` from ``sums``
    :math:`\Sigma = \sum g^2 / \max(\hat v, \epsilon^2)` over its ``numels`` real elements
    :math:`n` (1 for an empty tensor, and where the sum is NaN); the step size becomes
    :math:`s\alpha` and the decay factor :math:`1 - s\,\eta\lambda` (``decay_rate``
    :math:`\eta\lambda`, or ``None`` without decoupled decay), as
    :func:`adamkit.algorithms.stable_adamw.update_clipping` forms them."""
    lib = torch if isinstance(rows, Tensor) else np
    rms = lib.sqrt(sums / numels)
    scale = 1.0 / lib.where(rms > 1.0, rms, 1.0)
    rows[:, STEP_SIZE_COLUMN] *= scale
    if decay_rate is not None:
        rows[:, DECAY_FACTOR_COLUMN] = 1.0 - scale * decay_rate


def set_cautious_scales(rows, kept, numels) -> None:
    r"""A cautious update's scale, in place on ``rows`` of the tensor scalars (NumPy or
    torch, float64): :math:`n / (\lVert\phi\rVert_0 + 1)` from each tensor's count ``kept``
    of elements whose update agrees in sign with the gradient and its ``numels`` n, as
    :func:`adamkit.algorithms.single_tensor_ops.descend_cautiously` forms it."""
    rows[:, CAUTIOUS_SCALE_COLUMN] = numels / (kept + 1.0)


def host_step_scalars(rule: UpdateRule, counts: np.ndarray) -> StepScalars:
    """The step scalars of host step counts ``counts``, as float64 arrays aligned with
    them (of one element, which broadcasts, where every count is the same: the usual
    case): computed once per distinct count by :meth:`~adamkit.rule.UpdateRule.step_scalars`,
    tensor hyperparameters read as floats.  RAdam's ``rectification`` is NaN where
    ``rectified`` is False."""
    if (counts == counts[0]).all():  # the usual case: one step count for the whole group
        distinct, position = counts[:1], slice(None)
    else:
        distinct, position = np.unique(counts, return_inverse=True)
    per_count = [rule.step_scalars(float(count)) for count in distinct]

    def column(name: str) -> np.ndarray:
        values = (getattr(s, name) for s in per_count)
        return np.array([np.nan if v is None else as_number(v) for v in values], dtype=np.float64)[position]

    scalars = StepScalars(**{name: column(name) for name in _STEP_FIELDS})
    return replace(scalars, rectified=~np.isnan(scalars.rectification))


#: the fields of :class:`~adamkit.rule.StepScalars` that hold numbers
_STEP_FIELDS = [f.name for f in fields(StepScalars) if f.name != "rectified"]


#: the rounding modes whose params keep an exact value beside them (a Kahan compensation,
#: a split master's low bits): a second weight sequence is then held in fp32
EXACT_MODES = ("kahan", "master", "master24")


def weight_copy_dtype(param_dtype: torch.dtype, mode: str) -> torch.dtype:
    """The dtype of a second weight sequence (schedule-free's z) beside a param of
    ``param_dtype`` under rounding ``mode``: the precision the param's value is kept at
    (:func:`adamkit.state.init_state` allocates it so)."""
    return torch.float32 if mode in EXACT_MODES else param_dtype


def draws_random_bits(algorithm: Algorithm, rounding_option: str, param_dtype: torch.dtype, storage) -> bool:
    """Whether a fused step of such a param draws random bits: for its param or its
    moments (:func:`adamkit.specs.rounding.needs_random_bits`), or for a 16-bit second
    weight sequence (stored stochastically, as 16-bit moments are)."""
    mode = rounding.effective_rounding(rounding_option, param_dtype)
    copy = lookup(algorithm).weight_copy and rounding.is_low_precision(weight_copy_dtype(param_dtype, mode))
    return bool(copy) or rounding.needs_random_bits(rounding_option, param_dtype, storage)


def _quantized_moments(algorithm: Algorithm, amsgrad: bool) -> list[str]:
    """The moments a quantized state holds as codes and scales (a weight copy is never quantized)."""
    return [key for key in moment_keys(algorithm, amsgrad) if key != lookup(algorithm).weight_copy]


def state_keys(algorithm: Algorithm, amsgrad: bool, fmt: QuantFormat | None, mode: str) -> tuple[list[str], int]:
    """The state keys a bucket's rows address, in order: the moments (quantized: their
    codes, a second weight sequence as it is; then the quantized ones' scales), then the
    param's extra buffer under rounding ``mode``; and the number of moments."""
    moments = moment_keys(algorithm, amsgrad)
    keys = list(moments)
    if fmt is not None:
        quantized = _quantized_moments(algorithm, amsgrad)
        keys = [blockwise.stored_keys(k, fmt)[0] if k in quantized else k for k in moments]
        keys += [blockwise.stored_keys(k, fmt)[1] for k in quantized]
    if mode in PARAM_EXTRA_KEY:
        keys.append(PARAM_EXTRA_KEY[mode])
    return keys, len(moments)


def check_addressed(
    params: list[Tensor],
    rows: list[list[Tensor]],
    keys: list[str],
    forms: list[list[tuple[torch.dtype, int]]],
    members: list[int],
) -> None:
    """Where a fused kernel's bucket is built: every state tensor it will address (``rows``,
    under ``keys`` as :func:`state_keys` lists them) is on its param's device, holds exactly
    the elements of the dtype the kernel reads (``forms``: :func:`addressed_forms` per row;
    ``members``: the rows' places in the group) and, if quantized, is contiguous.  The step's validation and
    :func:`adamkit.state.init_state` make it so; this is the kernels' own check before they
    trust an address (a ``RuntimeError``: an adamkit bug)."""
    for param, tensors, row_forms, member in zip(params, rows, forms, members):
        where = f" of the group's params[{member}]"
        for key, t, (dtype, numel) in zip(keys, tensors, row_forms):
            real = as_real(t)
            packed = key not in PARAM_SHAPED_KEYS  # quantized codes and scales: read as one block
            if (real.dtype, real.numel(), t.device) != (dtype, numel, param.device) or (
                packed and not t.is_contiguous()
            ):
                raise RuntimeError(
                    f"state[{key!r}]{where} holds {real.numel()} {real.dtype} on {t.device}, but the kernel reads "
                    f"{numel} {dtype} on {param.device} (an adamkit bug: please report it)"
                )


def addressed_forms(algorithm: Algorithm, amsgrad: bool, fmt: QuantFormat | None, mode: str, moment_dtype, param):
    """The (dtype, element count) a fused kernel reads from each of ``param``'s state
    tensors, in :func:`state_keys` order (complex tensors as their real views)."""
    real = as_real(param)
    numel, moments = real.numel(), moment_keys(algorithm, amsgrad)
    copy = lookup(algorithm).weight_copy
    copy_form = (weight_copy_dtype(real.dtype, mode), numel)
    if fmt is None:
        forms = [copy_form if k == copy else (moment_dtype, numel) for k in moments]
    else:
        forms = [copy_form if k == copy else (torch.uint8, fmt.code_bytes(numel)) for k in moments]
        forms += [
            (blockwise.scale_dtype(fmt, k in SIGNED_KEYS), fmt.blocks(numel, k in SIGNED_KEYS))
            for k in _quantized_moments(algorithm, amsgrad)
        ]
    if mode in PARAM_EXTRA_KEY:
        forms.append((LOW_BITS_DTYPE[_MASTER_MODE[mode]] if mode in _MASTER_MODE else real.dtype, numel))
    return forms


#: the ``master_weights`` value of each split-master rounding mode
_MASTER_MODE = {"master": "fp32", "master24": "24bit"}


def stage_rows(table: np.ndarray, rows: list[int], params, grads, state_tensors, state_row_of) -> list[tuple]:
    """Contiguous copies of the params, gradients and state of ``rows`` (a fused
    kernel's rows it does not address in place), put in ``table`` (columns 0 and 1, and
    the state's from ``state_row_of(buffers)``); the list returned keeps them alive
    until :func:`copy_back` (after the launch, in its stream order)."""
    staged = []
    for row in rows:
        param_buffer, grad_buffer = params[row].contiguous(), grads[row].contiguous()
        buffers = [t.contiguous() for t in state_tensors[row]]
        table[row, 0], table[row, 1] = param_buffer.data_ptr(), grad_buffer.data_ptr()
        table[row, 2:] = state_row_of(buffers)
        staged.append((params[row], param_buffer, grad_buffer, state_tensors[row], buffers))
    return staged


def copy_back(staged: list[tuple]) -> None:
    """Copy what a launch stored in staged buffers (:func:`stage_rows`) into the tensors."""
    for param, param_buffer, _grad_buffer, state_tensors, state_buffers in staged:
        param.copy_(param_buffer)
        for state, buffer in zip(state_tensors, state_buffers):
            if state.data_ptr() != buffer.data_ptr():  # (a contiguous one was its own buffer)
                state.copy_(buffer)


def state_row(addresses: list[int], moment_count: int, extra: bool, quantized: bool, copied: bool = False) -> list[int]:
    """A row's :data:`STATE_COLUMNS` from the addresses of the tensors under
    :func:`state_keys` (in that order); ``copied``: the first moment's place holds a
    second weight sequence (no scales: 0)."""
    n = moment_count
    moments = addresses[:n] + addresses[1:2] * (3 - n)
    scales = [0, 0, 0]
    if quantized:
        held = [0] * copied + addresses[n : 2 * n - copied]  # (a weight copy, first, has none)
        scales = held + held[1:2] * (3 - n)
    return moments + [addresses[-1] if extra else 0] + scales


try:  # numba is a dependency, but the rest of adamkit works without it
    from numba import njit

    from . import compile_cache
    from .intrinsics import typed_pointer

    compile_cache.install()  # (the cached functions below: stamped with the whole package's source)
except ImportError:  # pragma: no cover - exercised only where numba is missing
    njit = None


def chunk_table(numels: np.ndarray, size: int) -> np.ndarray:
    """Rows (tensor, first, end) covering every element in pieces of at most ``size``;
    every piece starts on a multiple of ``size``."""
    numels = np.asarray(numels, dtype=np.int64)
    counts = (numels + size - 1) // size
    tensor_index = np.repeat(np.arange(len(numels)), counts)
    first_chunk = np.repeat(np.cumsum(counts) - counts, counts)
    first = (np.arange(counts.sum()) - first_chunk) * size
    end = np.minimum(first + size, numels[tensor_index])
    return np.stack([tensor_index, first, end], axis=1).astype(np.int64)


class HostCounters:
    """CPU ``step`` counters (and NAdam's ``mu_product`` tensors) advanced together:
    one compiled loop over their addresses (a Python call per tensor costs
    microseconds: tens of ms a step for 10,000 tensors).

    Needs numba and one dtype for every counter; otherwise each one is advanced and
    read as torch does (``torch._foreach_add_`` / ``_foreach_mul_``, then ``item()``)."""

    def __init__(self, states: list[dict], algorithm: Algorithm):
        self.steps = [state["step"] for state in states]
        self.products = [state[MU_PRODUCT_KEY] for state in states] if lookup(algorithm).keeps_mu_product else []
        counters = self.steps + self.products
        dtypes = {c.dtype for c in counters}
        self.compiled = njit is not None and len(dtypes) == 1 and all(c.device.type == "cpu" for c in counters)
        if self.compiled:
            self.addresses = np.array([c.data_ptr() for c in self.steps], dtype=np.int64)
            self.product_addresses = np.array([c.data_ptr() for c in self.products], dtype=np.int64)
            self.witness = np.empty(0, dtype=np.float64 if dtypes == {torch.float64} else np.float32)

    def advance(self, rule: UpdateRule, decay_factor) -> tuple[np.ndarray, np.ndarray]:
        """``step += 1`` for every counter (NAdam: then ``mu_product *= mu_t``); the new
        counts as float64, and the tensors' :data:`TENSOR_SCALARS` (``decay_factor``:
        the group's, or ``None``)."""
        counts = self._add_one()
        scalars = host_step_scalars(rule, counts)
        products = self._multiply_products(scalars.mu) if self.products else None
        decay = None if decay_factor is None else as_number(decay_factor)
        columns = tensor_scalar_columns(rule.algorithm, as_number(rule.lr), scalars, products, decay, np.where)
        rows = np.empty((len(counts), len(columns)), dtype=np.float64)
        for j, column in enumerate(columns):  # (a float or a float64 array per column)
            rows[:, j] = column
        return counts, rows

    def _add_one(self) -> np.ndarray:
        if self.compiled:
            return _advance_steps(self.addresses, self.witness)
        torch._foreach_add_(self.steps, 1)
        return np.array([s.item() for s in self.steps], dtype=np.float64)

    def _multiply_products(self, factors: np.ndarray) -> np.ndarray:
        """Each product times its factor rounded to the product's dtype (as torch's
        ``mul_`` by a Python float rounds it); the new products as float64."""
        factors = np.broadcast_to(factors, (len(self.products),))  # one per product (one value may stand for all)
        if self.compiled:
            return _multiply_in_place(self.product_addresses, factors.astype(self.witness.dtype))
        torch._foreach_mul_(self.products, factors.tolist())
        return np.array([p.item() for p in self.products], dtype=np.float64)


if njit is not None:

    @njit(cache=True, nogil=True)
    def _advance_steps(addresses, witness):
        """``step += 1`` for every step counter; returns the new counts (float64)."""
        counts = np.empty(addresses.shape[0], dtype=np.float64)
        for t in range(addresses.shape[0]):
            step = typed_pointer(addresses[t], witness)
            step[0] += 1
            counts[t] = step[0]
        return counts

    @njit(cache=True, nogil=True)
    def _multiply_in_place(addresses, factors):
        """``x *= factor`` for every 0-d tensor at ``addresses`` (of ``factors``' dtype);
        returns the new values (float64)."""
        values = np.empty(addresses.shape[0], dtype=np.float64)
        for t in range(addresses.shape[0]):
            x = typed_pointer(addresses[t], factors)
            x[0] = x[0] * factors[t]
            values[t] = x[0]
        return values
