r"""The Adam family (Kingma & Ba; NAdam, RAdam, ADOPT, StableAdamW, AdEMAMix), line by line, in NumPy float64: the
ground truth for every other path.

Algorithm 1 (Adam), for step :math:`t = 1, 2, \dots` with gradient :math:`g_t`:

.. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    \hat m_t &= m_t / (1 - \beta_1^t) \\
    \hat v_t &= v_t / (1 - \beta_2^t) \\
    \theta_t &= \theta_{t-1} - \eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)

Algorithm 2 (AdaMax), the :math:`L^\infty` variant:

.. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
    u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
    \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\, m_t / u_t

(the paper has :math:`\epsilon = 0` in AdaMax; torch adds it inside the max, and so
does this reference when ``eps`` is non-zero).

NAdam (Dozat, 2016: Nesterov momentum in Adam), with torch's momentum schedule
:math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{t \psi})` (``momentum_decay`` :math:`\psi`)
and its running product :math:`\Pi_t = \prod_{i \le t} \mu_i`:

.. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    d_t &= \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
    \theta_t &= \theta_{t-1}
        - \eta \frac{1 - \mu_t}{1 - \Pi_t} \frac{g_t}{d_t}
        - \eta \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} \frac{m_t}{d_t}

RAdam (Liu et al., 2020: the variance of the adaptive step, rectified).  With
:math:`\rho_\infty = 2 / (1 - \beta_2) - 1` and
:math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`, the length of the
approximated simple moving average:

.. math::

    \hat m_t &= m_t / (1 - \beta_1^t) \\
    r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}} \\
    \theta_t &= \begin{cases}
        \theta_{t-1} - \eta\, \hat m_t\, r_t \sqrt{1 - \beta_2^t} / (\sqrt{v_t} + \epsilon)
            & \rho_t > 5 \\
        \theta_{t-1} - \eta\, \hat m_t & \text{otherwise (SGD with momentum)}
    \end{cases}

(:math:`\epsilon` is added to :math:`\sqrt{v_t}` before the bias correction, as torch
does; the paper leaves it out).

ADOPT (Taniguchi et al., 2024: Adam converging for any :math:`\beta_2`): the gradient is
normalized by the *previous* second moment, then averaged; the first step only measures
:math:`v`.  With the clipping value :math:`c_t = (t - 1)^p` (``clip_exponent`` :math:`p`,
the authors' :math:`\text{step}^{1/4}` by default; :math:`c_t = \infty` without clipping):

.. math::

    t = 1:\quad & v_1 = g_1^2 \quad (\theta \text{ and } m \text{ unchanged}) \\
    t > 1:\quad & m_t = \beta_1 m_{t-1} + (1 - \beta_1)
        \operatorname{clip}\Bigl(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)}, c_t\Bigr) \\
    & \theta_t = \theta_{t-1} - \eta\, m_t \\
    & v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2

(no bias correction; decoupled weight decay, like the update, starts at :math:`t = 2`).

StableAdamW (Wortsman et al., 2023, Algorithm 2: AdamW with update clipping): Adam's
moments and bias corrections, and per tensor the root mean square of the gradient over
the second moment it has just entered,

.. math::

    \mathrm{RMS}_t = \sqrt{\operatorname{mean}\bigl(g_t^2 / \max(\hat v_t, \epsilon^2)\bigr)}, \qquad
    \eta'_t = \eta / \max(1, \mathrm{RMS}_t)

so a tensor whose gradient jumps far above its running second moment takes a smaller
step.  :math:`\eta'_t` replaces :math:`\eta` in the update and in decoupled weight decay:
:math:`\theta_t = \theta_{t-1}(1 - \eta'_t \lambda) - \eta'_t \hat m_t / (\sqrt{\hat v_t} + \epsilon)`
(fully decoupled: :math:`1 - (\eta'_t / \eta_{max})\lambda`).

AdEMAMix (Pagliardini et al., 2024, Algorithm 1): Adam's moments and a slow average
:math:`m^{(2)}` of the gradient with decay :math:`\beta_3(t)`, not bias-corrected, mixed
into the direction with weight :math:`\alpha(t)` (decay decoupled, as AdamW's):

.. math::

    m^{(2)}_t &= \beta_3(t)\, m^{(2)}_{t-1} + (1 - \beta_3(t))\, g_t \\
    \theta_t &= \theta_{t-1}(1 - \eta\lambda)
        - \eta\, (\hat m_t + \alpha(t)\, m^{(2)}_t) / (\sqrt{\hat v_t} + \epsilon)

with the warm-ups over :math:`T_\alpha` and :math:`T_{\beta_3}` steps (none: the final
value from the start): :math:`\alpha(t) = \min(t / T_\alpha, 1)\,\alpha` and
:math:`\beta_3(t)` equal to :math:`\beta_3` for :math:`t \ge T_{\beta_3}`, before that the
:math:`\beta` whose half-life :math:`h(\beta) = \ln\tfrac12 / \ln\beta` is
:math:`(1 - a)\, h(\beta_1) + a\, h(\beta_3)`, :math:`a = t / T_{\beta_3}`.

Options, applied in this order before the moment updates:

* ``maximize``: :math:`g_t \leftarrow -g_t`.
* weight decay :math:`\lambda`, one of three modes:

  - ``"l2"`` (Adam's original coupling): :math:`g_t \leftarrow g_t + \lambda\theta_{t-1}`;
  - ``"decoupled"`` (Loshchilov & Hutter, AdamW): :math:`\theta \leftarrow \theta(1 - \eta\lambda)`;
  - ``"fully_decoupled"`` (as optimi's ``decouple_lr``):
    :math:`\theta \leftarrow \theta(1 - \frac{\eta_t}{\eta_{max}}\lambda)`, so the decay
    follows the schedule's shape but not the learning rate's magnitude.

* ``cautious`` (Liang et al., 2024), applied to the update :math:`u` each algorithm
  subtracts from :math:`\theta` (weight decay excluded): with
  :math:`\phi = [u \odot g_t > 0]` (the gradient after ``maximize`` and L2 decay),
  :math:`\theta \leftarrow \theta - u \odot \phi \cdot n / (\lVert\phi\rVert_0 + 1)`, n the
  number of (real) elements.
* ``amsgrad`` (Reddi et al., as torch computes it): keep
  :math:`v^{max}_t = \max(v^{max}_{t-1}, v_t)` and use it in place of :math:`v_t`
  in :math:`\hat v_t`.

Complex parameters are treated as pairs of reals, as torch does: the real and
imaginary parts each get their own moments.

Everything here is float64 and written for clarity, not speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..algorithms import ADEMAMIX, ADOPT, NADAM, SCHEDULE_FREE_ADAMW

WeightDecayMode = Literal["l2", "decoupled", "fully_decoupled"]


@dataclass
class ReferenceState:
    """Per-parameter state: the step count and the moment estimates (float64)."""

    step: int = 0
    exp_avg: np.ndarray | None = None  # m
    exp_avg_sq: np.ndarray | None = None  # v (Adam) or u (AdaMax)
    max_exp_avg_sq: np.ndarray | None = None  # v^max (AMSGrad)
    mu_product: float = 1.0  # NAdam's product of momentum coefficients
    exp_avg_slow: np.ndarray | None = None  # AdEMAMix's slow average m^(2)
    #: schedule-free: the SGD sequence z, its average x, the running sum of the averaging
    #: weights and the largest warmed-up learning rate so far
    z: np.ndarray | None = None
    x: np.ndarray | None = None
    weight_sum: float = 0.0
    lr_max: float = -1.0


@dataclass
class Hyperparameters:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_mode: WeightDecayMode = "l2"
    max_lr: float | None = None
    amsgrad: bool = False
    maximize: bool = False
    #: NAdam's momentum decay psi (torch's default)
    momentum_decay: float = NADAM.default("momentum_decay")
    #: ADOPT's clipping exponent p (c_t = (t - 1)^p); None: no clipping
    clip_exponent: float | None = ADOPT.default("clip_exponent")
    #: cautious updates (Liang et al., 2024)
    cautious: bool = False
    #: AdEMAMix's slow average: its decay beta3, its weight alpha, their warm-ups (steps)
    beta3: float = ADEMAMIX.default("beta3")
    alpha: float = ADEMAMIX.default("alpha")
    alpha_warmup: int | None = ADEMAMIX.default("alpha_warmup")
    beta3_warmup: int | None = ADEMAMIX.default("beta3_warmup")
    #: schedule-free: linear warm-up (steps), the averaging weights' powers of t and of lr_max
    warmup_steps: float = SCHEDULE_FREE_ADAMW.default("warmup_steps")
    r: float = SCHEDULE_FREE_ADAMW.default("r")
    weight_lr_power: float = SCHEDULE_FREE_ADAMW.default("weight_lr_power")

    def __post_init__(self) -> None:
        """``max_lr`` left unset is the lr given here, the schedule's peak, as the torch
        classes take their initial lr (later changes of ``lr`` leave it)."""
        if self.max_lr is None:
            self.max_lr = self.lr


def _as_real(x: np.ndarray) -> np.ndarray:
    """float64 view of ``x``; complex numbers become (real, imag) pairs on a last axis."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return np.stack([x.real, x.imag], axis=-1).astype(np.float64)
    return x.astype(np.float64)


def _from_real(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.iscomplexobj(like):
        return x[..., 0] + 1j * x[..., 1]
    return x


def _effective_gradient(theta: np.ndarray, grad: np.ndarray, hp: Hyperparameters) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``maximize`` and weight decay; return (theta, g)."""
    if np.shape(grad) != np.shape(theta):
        raise ValueError(f"grad has shape {np.shape(grad)}, but theta has {np.shape(theta)}: they must be equal")
    g = -grad if hp.maximize else grad
    if hp.weight_decay != 0:
        if hp.weight_decay_mode == "l2":
            g = g + hp.weight_decay * theta
        elif hp.weight_decay_mode == "decoupled":
            theta = theta * (1.0 - hp.lr * hp.weight_decay)
        elif hp.weight_decay_mode == "fully_decoupled":
            theta = theta * (1.0 - (hp.lr / hp.max_lr) * hp.weight_decay)
        else:
            raise ValueError(f"unknown weight_decay_mode {hp.weight_decay_mode!r}")
    return theta, g


def _begin_step(state: ReferenceState, theta: np.ndarray, *, amsgrad: bool) -> int:
    """Zero moments on the first step; count the step and return its number ``t`` (from 1)."""
    if state.step and np.shape(state.exp_avg) != np.shape(theta):
        raise ValueError(
            f"the state's moments have shape {np.shape(state.exp_avg)}, but theta has {np.shape(theta)}: "
            "a state belongs to one parameter (use a new ReferenceState)"
        )
    if state.step and amsgrad and state.max_exp_avg_sq is None:
        raise ValueError("amsgrad=True after steps without it: the state has no running maximum (start a new state)")
    if state.step == 0:
        state.exp_avg = np.zeros_like(theta)
        state.exp_avg_sq = np.zeros_like(theta)
        state.max_exp_avg_sq = np.zeros_like(theta) if amsgrad else None
    state.step += 1
    return state.step


def _start(theta: np.ndarray, grad: np.ndarray, state: ReferenceState, hp: Hyperparameters, name: str):
    """Refuse AMSGrad where ``name`` has none, count the step, apply ``maximize`` and
    weight decay: ``(theta, g, t)`` as float64 reals."""
    if hp.amsgrad and name != "Adam":
        raise ValueError(f"{name} has no AMSGrad variant (amsgrad must be False)")
    theta, grad = _as_real(theta), _as_real(grad)
    t = _begin_step(state, theta, amsgrad=hp.amsgrad)
    theta, g = _effective_gradient(theta, grad, hp)
    return theta, g, t


def _descend(theta: np.ndarray, update: np.ndarray, g: np.ndarray, hp: Hyperparameters) -> np.ndarray:
    """theta - update; with ``cautious``, only where the update agrees in sign with g,
    the kept elements scaled by n / (kept + 1)."""
    if not hp.cautious:
        return theta - update
    agree = update * g > 0
    return theta - update * agree * (agree.size / (agree.sum() + 1.0))


def _update_moments(state: ReferenceState, g: np.ndarray, hp: Hyperparameters) -> None:
    """m_t and v_t (Adam's moments, shared by NAdam and RAdam)."""
    state.exp_avg = hp.beta1 * state.exp_avg + (1.0 - hp.beta1) * g
    state.exp_avg_sq = hp.beta2 * state.exp_avg_sq + (1.0 - hp.beta2) * g * g


def adam_step(theta: np.ndarray, grad: np.ndarray, state: ReferenceState, hp: Hyperparameters) -> np.ndarray:
    """One step of Algorithm 1 with the options above; updates ``state``, returns the new theta."""
    like = theta
    theta, g, t = _start(theta, grad, state, hp, "Adam")
    _update_moments(state, g, hp)
    m_hat = state.exp_avg / (1.0 - hp.beta1**t)
    if hp.amsgrad:
        state.max_exp_avg_sq = np.maximum(state.max_exp_avg_sq, state.exp_avg_sq)
        v_hat = state.max_exp_avg_sq / (1.0 - hp.beta2**t)
    else:
        v_hat = state.exp_avg_sq / (1.0 - hp.beta2**t)
    theta = _descend(theta, hp.lr * m_hat / (np.sqrt(v_hat) + hp.eps), g, hp)
    return _from_real(theta, like)


def adamax_step(theta: np.ndarray, grad: np.ndarray, state: ReferenceState, hp: Hyperparameters) -> np.ndarray:
    """One step of Algorithm 2 (AdaMax); ``state.exp_avg_sq`` holds u_t."""
    like = theta
    theta, g, t = _start(theta, grad, state, hp, "AdaMax")
    state.exp_avg = hp.beta1 * state.exp_avg + (1.0 - hp.beta1) * g
    state.exp_avg_sq = np.maximum(hp.beta2 * state.exp_avg_sq, np.abs(g) + hp.eps)
    theta = _descend(theta, (hp.lr / (1.0 - hp.beta1**t)) * state.exp_avg / state.exp_avg_sq, g, hp)
    return _from_real(theta, like)


def accumulated_step(
    theta: np.ndarray, micro_grads: list[np.ndarray], state: ReferenceState, hp: Hyperparameters, algorithm: str
) -> np.ndarray:
    r"""One update of optimizer accumulation (Zhang et al., 2023; :mod:`adamkit.accumulation`)
    from the gradients :math:`g_1..g_N` of N micro-batches:
    :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\mathrm{mean}_k\, g_k`,
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\mathrm{mean}_k\, g_k^2`
    (AdaMax: :math:`u_t = \max(\beta_2 u_{t-1}, \max_k |g_k| + \epsilon)`), then the
    update of Algorithm 1 (2) with the same options (``algorithm`` "adam", "adamax" or
    "radam": RAdam's rectified update from those moments).  The algorithms whose update
    reads its gradient ("nadam", "adopt", "stable_adamw", "ademamix", and any cautious
    update) take their own step with the mean gradient :math:`\sum_k g_k / N` instead."""
    if algorithm in ("nadam", "adopt", "stable_adamw", "ademamix") or hp.cautious:
        mean = sum(np.asarray(grad) / len(micro_grads) for grad in micro_grads)
        return STEP_FUNCTIONS[algorithm](theta, mean, state, hp)
    like = theta
    theta = _as_real(theta)
    decayed, grads = theta, []
    for grad in micro_grads:
        decayed, g = _effective_gradient(theta, _as_real(grad), hp)
        grads.append(g)
    g = np.stack(grads)
    t = _begin_step(state, theta, amsgrad=hp.amsgrad)
    state.exp_avg = hp.beta1 * state.exp_avg + (1.0 - hp.beta1) * g.mean(axis=0)
    if algorithm == "radam":
        state.exp_avg_sq = hp.beta2 * state.exp_avg_sq + (1.0 - hp.beta2) * (g * g).mean(axis=0)
        return _from_real(_radam_descent(decayed, g.mean(axis=0), state, hp, t), like)
    if algorithm == "adamax":
        state.exp_avg_sq = np.maximum(hp.beta2 * state.exp_avg_sq, np.abs(g).max(axis=0) + hp.eps)
        denom = state.exp_avg_sq
    else:
        state.exp_avg_sq = hp.beta2 * state.exp_avg_sq + (1.0 - hp.beta2) * (g * g).mean(axis=0)
        second = state.exp_avg_sq
        if hp.amsgrad:
            state.max_exp_avg_sq = np.maximum(state.max_exp_avg_sq, state.exp_avg_sq)
            second = state.max_exp_avg_sq
        denom = np.sqrt(second / (1.0 - hp.beta2**t)) + hp.eps
    theta = decayed - hp.lr / (1.0 - hp.beta1**t) * state.exp_avg / denom
    return _from_real(theta, like)


def nadam_step(theta: np.ndarray, grad: np.ndarray, state: ReferenceState, hp: Hyperparameters) -> np.ndarray:
    """One step of NAdam (see the module docstring); updates ``state`` (``mu_product``
    included), returns the new theta."""
    like = theta
    theta, g, t = _start(theta, grad, state, hp, "NAdam")
    mu = hp.beta1 * (1.0 - 0.5 * 0.96 ** (t * hp.momentum_decay))
    mu_next = hp.beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * hp.momentum_decay))
    state.mu_product *= mu
    _update_moments(state, g, hp)
    denom = np.sqrt(state.exp_avg_sq / (1.0 - hp.beta2**t)) + hp.eps
    gradient_term = hp.lr * (1.0 - mu) / (1.0 - state.mu_product) * g / denom
    momentum_term = hp.lr * mu_next / (1.0 - state.mu_product * mu_next) * state.exp_avg / denom
    if hp.cautious:
        return _from_real(_descend(theta, gradient_term + momentum_term, g, hp), like)
    return _from_real(theta - gradient_term - momentum_term, like)


def radam_step(theta: np.ndarray, grad: np.ndarray, state: ReferenceState, hp: Hyperparameters) -> np.ndarray:
    """One step of RAdam (see the module docstring); updates ``state``, returns the new theta."""
    like = theta
    theta, g, t = _start(theta, grad, state, hp, "RAdam")
    _update_moments(state, g, hp)
    return _from_real(_radam_descent(theta, g, state, hp, t), like)


def _radam_descent(theta: np.ndarray, g: np.ndarray, state: ReferenceState, hp: Hyperparameters, t: int):
    """RAdam's update of theta from the new moments of step t."""
    m_hat = state.exp_avg / (1.0 - hp.beta1**t)
    rho_inf = 2.0 / (1.0 - hp.beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * hp.beta2**t / (1.0 - hp.beta2**t)
    if rho_t <= 5.0:
        return _descend(theta, hp.lr * m_hat, g, hp)
    rectification = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    adaptive = np.sqrt(1.0 - hp.beta2**t) / (np.sqrt(state.exp_avg_sq) + hp.eps)
    return _descend(theta, hp.lr * m_hat * rectification * adaptive, g, hp)


def adopt_step(theta: np.ndarray, grad: np.ndarray, state: ReferenceState, hp: Hyperparameters) -> np.ndarray:
    """One step of ADOPT (see the module docstring); updates ``state``, returns the new theta."""
    like = theta
    if hp.amsgrad:
        raise ValueError("ADOPT has no AMSGrad variant (amsgrad must be False)")
    theta = _as_real(theta)
    t = _begin_step(state, theta, amsgrad=False)
    decayed, g = _effective_gradient(theta, _as_real(grad), hp)
    if t == 1:  # the first step measures v (an L2 term included); nothing moves
        state.exp_avg_sq = g * g
        return _from_real(theta, like)
    clip = np.inf if hp.clip_exponent is None else (t - 1.0) ** hp.clip_exponent
    normalized = np.clip(g / np.maximum(np.sqrt(state.exp_avg_sq), hp.eps), -clip, clip)
    state.exp_avg = hp.beta1 * state.exp_avg + (1.0 - hp.beta1) * normalized
    theta = _descend(decayed, hp.lr * state.exp_avg, g, hp)
    state.exp_avg_sq = hp.beta2 * state.exp_avg_sq + (1.0 - hp.beta2) * g * g
    return _from_real(theta, like)


def stable_adamw_step(theta: np.ndarray, grad: np.ndarray, state: ReferenceState, hp: Hyperparameters) -> np.ndarray:
    """One step of StableAdamW (see the module docstring); updates ``state``, returns the new theta."""
    if hp.amsgrad:
        raise ValueError("StableAdamW has no AMSGrad variant (amsgrad must be False)")
    like = theta
    theta, grad = _as_real(theta), _as_real(grad)
    t = _begin_step(state, theta, amsgrad=False)
    g = -grad if hp.maximize else grad
    if hp.weight_decay != 0 and hp.weight_decay_mode == "l2":
        g = g + hp.weight_decay * theta
    _update_moments(state, g, hp)
    m_hat = state.exp_avg / (1.0 - hp.beta1**t)
    v_hat = state.exp_avg_sq / (1.0 - hp.beta2**t)
    rms = np.sqrt(np.mean(g * g / np.maximum(v_hat, hp.eps**2))) if g.size else 0.0
    lr = hp.lr / max(1.0, rms)
    if hp.weight_decay != 0 and hp.weight_decay_mode == "decoupled":
        theta = theta * (1.0 - lr * hp.weight_decay)
    elif hp.weight_decay != 0 and hp.weight_decay_mode == "fully_decoupled":
        theta = theta * (1.0 - (lr / hp.max_lr) * hp.weight_decay)
    theta = _descend(theta, lr * m_hat / (np.sqrt(v_hat) + hp.eps), g, hp)
    return _from_real(theta, like)


def _half_life(beta: float) -> float:
    """The steps after which an average with decay ``beta`` weighs a gradient by 1/2
    (0 for ``beta = 0``, which keeps only the newest)."""
    return 0.0 if beta == 0 else np.log(0.5) / np.log(beta)


def ademamix_step(theta: np.ndarray, grad: np.ndarray, state: ReferenceState, hp: Hyperparameters) -> np.ndarray:
    """One step of AdEMAMix (see the module docstring); updates ``state``, returns the new theta."""
    if hp.amsgrad:
        raise ValueError("AdEMAMix has no AMSGrad variant (amsgrad must be False)")
    like = theta
    theta, g, t = _start(theta, grad, state, hp, "AdEMAMix")
    if state.exp_avg_slow is None:
        state.exp_avg_slow = np.zeros_like(theta)
    alpha = hp.alpha if hp.alpha_warmup is None else min(t / hp.alpha_warmup, 1.0) * hp.alpha
    beta3 = hp.beta3
    if hp.beta3_warmup is not None and t < hp.beta3_warmup and hp.beta3 > 0:
        a = t / hp.beta3_warmup  # (the paper's min(., beta3): a beta1 above beta3 is not kept)
        beta3 = min(0.5 ** (1.0 / ((1.0 - a) * _half_life(hp.beta1) + a * _half_life(hp.beta3))), hp.beta3)
    _update_moments(state, g, hp)
    state.exp_avg_slow = beta3 * state.exp_avg_slow + (1.0 - beta3) * g
    m_hat = state.exp_avg / (1.0 - hp.beta1**t)
    v_hat = state.exp_avg_sq / (1.0 - hp.beta2**t)
    update = hp.lr * (m_hat + alpha * state.exp_avg_slow) / (np.sqrt(v_hat) + hp.eps)
    return _from_real(_descend(theta, update, g, hp), like)


def schedule_free_adamw_step(
    theta: np.ndarray, grad: np.ndarray, state: ReferenceState, hp: Hyperparameters
) -> np.ndarray:
    r"""One step of schedule-free AdamW (Defazio et al., 2024) from the training point
    ``theta`` (:math:`y`), written in the paper's three sequences: :math:`z` steps along
    the normalized gradient (weight decay at :math:`y`), :math:`x` averages the
    :math:`z` with weight :math:`c_{t+1} = w_t / \sum_{i \le t} w_i`,
    :math:`w_t = t^r \gamma_{max}^p`; returns the next :math:`y = (1 - \beta_1) z + \beta_1 x`
    (:func:`schedule_free_average` is :math:`x`, the point to evaluate).  The step count
    and the weights' sum are this param's (a group's params step together)."""
    if hp.amsgrad or hp.cautious or hp.weight_decay_mode == "fully_decoupled":
        raise ValueError("schedule-free AdamW has no AMSGrad or cautious variant; its weight decay is at y")
    like, y = theta, _as_real(theta)
    g = -_as_real(grad) if hp.maximize else _as_real(grad)
    if state.z is None:
        state.z, state.x, state.exp_avg_sq = y.copy(), y.copy(), np.zeros_like(y)
    state.step += 1
    t = state.step
    lr = hp.lr * (t / hp.warmup_steps if t - 1 < hp.warmup_steps else 1.0)  # (the package's test, for any real)
    state.lr_max = max(state.lr_max, lr)
    weight = t**hp.r * state.lr_max**hp.weight_lr_power
    state.weight_sum += weight
    c = weight / state.weight_sum if state.weight_sum != 0 else 0.0
    state.exp_avg_sq = hp.beta2 * state.exp_avg_sq + (1.0 - hp.beta2) * g * g
    d = g / (np.sqrt(state.exp_avg_sq / (1.0 - hp.beta2**t)) + hp.eps) + hp.weight_decay * y
    state.z = state.z - lr * d
    state.x = (1.0 - c) * state.x + c * state.z
    return _from_real((1.0 - hp.beta1) * state.z + hp.beta1 * state.x, like)


def schedule_free_average(state: ReferenceState, like: np.ndarray) -> np.ndarray:
    """Schedule-free's average :math:`x`, the point to evaluate (the param in eval mode)."""
    return _from_real(state.x, like)


STEP_FUNCTIONS = {
    "adam": adam_step,
    "adamax": adamax_step,
    "nadam": nadam_step,
    "radam": radam_step,
    "adopt": adopt_step,
    "stable_adamw": stable_adamw_step,
    "ademamix": ademamix_step,
    "schedule_free_adamw": schedule_free_adamw_step,
}


def moments_as(state: ReferenceState, like: np.ndarray) -> dict[str, np.ndarray]:
    """The state's arrays in the shape (and complex-ness) of the parameter ``like``."""
    out = {}
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_slow", "z"):
        value = getattr(state, name)
        if value is not None:
            out[name] = _from_real(value, like)
    return out


__all__ = [
    "Hyperparameters",
    "accumulated_step",
    "ReferenceState",
    "STEP_FUNCTIONS",
    "adam_step",
    "adamax_step",
    "ademamix_step",
    "schedule_free_adamw_step",
    "schedule_free_average",
    "adopt_step",
    "moments_as",
    "nadam_step",
    "radam_step",
    "stable_adamw_step",
]
