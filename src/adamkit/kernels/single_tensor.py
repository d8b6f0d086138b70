r"""torch's single-tensor path (``foreach=False``): per-tensor torch ops, the readable
path, the one autograd can flow through.

For each tensor, in the order ``torch.optim.Adam(foreach=False)`` uses, so results
are bit-identical to it:

.. math::

    g &\leftarrow -g \ \text{if maximize}; \quad
        \theta \leftarrow \theta \cdot \text{decay\_factor} \ \text{or}\
        g \leftarrow g + \lambda\theta \\
    m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1) \\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2
        \quad (v^{max} \leftarrow \max(v^{max}, v) \text{ with AMSGrad}) \\
    \theta &\leftarrow \theta - \text{step\_size} \cdot
        m / (\sqrt{v} / \text{bias\_correction2\_sqrt} + \epsilon)

AdaMax replaces the second moment by :math:`u \leftarrow \max(\beta_2 u, |g| + \epsilon)`
and the denominator by :math:`u`.

Scalars arrive as Python floats, or as tensors on the differentiable path (gradients
flow through them) and the capturable path (no host sync).  With tensor scalars the
ops that need a Python number are written as tensor ops instead, and on the
differentiable path tensors that autograd saves are cloned before their next
in-place update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..rule import GroupScalars, StepScalars, UpdateRule
from ..sharding import per_tensor_totals
from .lists import named_after_algorithms
from .types import GroupTensors, as_real


def effective_gradient(param: Tensor, grad: Tensor, rule: UpdateRule, group_scalars: GroupScalars) -> Tensor:
    """``maximize`` and L2 weight decay applied to the gradient (a new tensor if either is on)."""
    if rule.maximize:
        grad = -grad
    if group_scalars.decay_factor is None and group_scalars.l2_weight_decay != 0:
        grad = grad.add(param, alpha=group_scalars.l2_weight_decay)
    return grad


def decay_param(param: Tensor, group_scalars: GroupScalars) -> None:
    """Decoupled weight decay: theta <- theta * decay_factor."""
    if group_scalars.decay_factor is not None:
        param.mul_(group_scalars.decay_factor)


def _decayed_gradient(param: Tensor, grad: Tensor, rule: UpdateRule, group_scalars: GroupScalars) -> Tensor:
    """Apply ``maximize`` and weight decay (decoupled: to the param; L2: to the gradient)."""
    decay_param(param, group_scalars)
    return effective_gradient(param, grad, rule, group_scalars)


def _second_moment_update(exp_avg_sq: Tensor, grad: Tensor, group_scalars: GroupScalars) -> None:
    """v <- beta2 v + (1 - beta2) g^2; as ``lerp`` towards g^2 when (1 - beta2) is a tensor."""
    if isinstance(group_scalars.one_minus_beta2, Tensor):
        weight = group_scalars.one_minus_beta2.to(device=exp_avg_sq.device, dtype=exp_avg_sq.dtype)
        exp_avg_sq.lerp_(grad.square(), weight)
    else:
        exp_avg_sq.mul_(group_scalars.beta2).addcmul_(grad, grad, value=group_scalars.one_minus_beta2)


def adam_denominator(second_moment: Tensor, step: StepScalars, eps: float) -> Tensor:
    """sqrt(v) / sqrt(1 - beta2^t) + eps, as a new tensor."""
    return (second_moment.sqrt() / step.bias_correction2_sqrt).add_(eps)


def apply_update(param: Tensor, exp_avg: Tensor, denom: Tensor, step_size, differentiable: bool = False) -> None:
    """theta <- theta - step_size * m / denom."""
    if isinstance(step_size, Tensor) or differentiable:
        param.sub_((exp_avg.clone() if differentiable else exp_avg) / denom * step_size)
    else:
        param.addcdiv_(exp_avg, denom, value=-step_size)


def descend_cautiously(param: Tensor, update: Tensor, grad: Tensor, shard=None) -> None:
    r"""Cautious updates (Liang et al., 2024): :math:`\theta \leftarrow \theta - u \odot \phi
    \cdot n / (\lVert\phi\rVert_0 + 1)`, :math:`\phi = [u \odot g > 0]`: only the elements whose
    update (``update``, the amount subtracted) agrees in sign with the gradient move, the
    kept ones scaled up so the update keeps about its size.  The scale is a float64
    device tensor (no host read).  ``shard``: the sharded param whose local shard
    ``param`` is (the count and n are then the whole param's), or ``None``."""
    agree = update * grad > 0
    if shard is None:
        scale = update.numel() / (agree.sum().to(torch.float64) + 1.0)
    else:
        local = torch.stack([agree.sum().to(torch.float64), torch.tensor(float(update.numel()), device=agree.device)])
        kept, total = per_tensor_totals(local.reshape(1, 2), [shard])[0]
        scale = total / (kept + 1.0)
    param.sub_(update * agree * scale)


def _descend(
    param: Tensor, exp_avg: Tensor, denom: Tensor, step_size, grad: Tensor, rule: UpdateRule, shard=None
) -> None:
    """theta <- theta - step_size * m / denom, cautiously if the rule says so."""
    if rule.cautious:  # (autograd saves m: a copy, as m changes in place next step)
        update = (exp_avg.clone() if rule.differentiable else exp_avg) / denom * step_size
        descend_cautiously(param, update, grad, shard)
    else:
        apply_update(param, exp_avg, denom, step_size, rule.differentiable)


def shard_of(tensors: GroupTensors, i: int):
    """The sharded param whose local shard is ``tensors.params[i]``, or ``None``."""
    return tensors.shards[i] if tensors.shards else None


def adam(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    for i, param in enumerate(tensors.params):
        grad = _decayed_gradient(param, tensors.grads[i], rule, group_scalars)
        param, grad = as_real(param), as_real(grad)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        _second_moment_update(exp_avg_sq, grad, group_scalars)
        second_moment = exp_avg_sq
        if rule.amsgrad:
            max_exp_avg_sq = as_real(tensors.max_exp_avg_sqs[i])
            if rule.differentiable:  # maximum saves both inputs; both change in place later
                max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq.clone(), exp_avg_sq.clone()))
            else:
                torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second_moment = max_exp_avg_sq

        denom = adam_denominator(second_moment, steps[i], group_scalars.eps)
        _descend(param, exp_avg, denom, steps[i].step_size, grad, rule, shard_of(tensors, i))


def adamax(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    for i, param in enumerate(tensors.params):
        grad = _decayed_gradient(param, tensors.grads[i], rule, group_scalars)
        param, grad = as_real(param), as_real(grad)
        exp_avg, exp_inf = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        norm = grad.abs().add_(group_scalars.eps)
        if rule.differentiable:
            exp_inf.copy_(torch.maximum(exp_inf.clone().mul(group_scalars.beta2), norm))  # (mul keeps its input)
        else:
            torch.maximum(exp_inf.mul_(group_scalars.beta2), norm, out=exp_inf)
        denom = exp_inf.clone() if rule.differentiable else exp_inf
        _descend(param, exp_avg, denom, steps[i].step_size, grad, rule, shard_of(tensors, i))


def nadam(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    """NAdam as torch.optim.NAdam steps it: ``mu_product`` is a 0-d state tensor
    multiplied by mu_t in its own dtype, the update two ``addcdiv`` terms over
    sqrt(v / (1 - beta2^t)) + eps."""
    tensor_scalars = rule.differentiable or rule.capturable
    for i, param in enumerate(tensors.params):
        param, grad = as_real(param), as_real(tensors.grads[i])  # torch decays the real views
        grad = _decayed_gradient(param, grad, rule, group_scalars)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        mu_product, step = tensors.mu_products[i], steps[i]
        mu_product *= step.mu
        if rule.differentiable:  # (autograd keeps what it reads; the state moves in place next step)
            mu_product = mu_product.clone()

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        _second_moment_update(exp_avg_sq, grad, group_scalars)
        denom = (exp_avg_sq.clone() if rule.differentiable else exp_avg_sq).div(step.bias_correction2).sqrt()
        lr, mu, mu_next = rule.lr, step.mu, step.mu_next
        if rule.cautious:  # the two terms as one update, masked
            product = mu_product if tensor_scalars else mu_product.item()
            momentum = exp_avg.clone() if rule.differentiable else exp_avg  # (m changes in place next step)
            gradient_part = grad * (lr * (1.0 - mu) / (1.0 - product))
            update = (gradient_part + momentum * (lr * mu_next / (1.0 - product * mu_next))) / denom.add(
                group_scalars.eps
            )
            descend_cautiously(param, update, grad, shard_of(tensors, i))
        elif tensor_scalars:  # no host read; autograd sees the products
            denom = denom.add(group_scalars.eps)
            grad = grad * (-lr * (1.0 - mu) / (1.0 - mu_product))
            momentum = (exp_avg.clone() if rule.differentiable else exp_avg) * (
                -lr * mu_next / (1.0 - mu_product * mu_next)
            )
            param.addcdiv_(grad, denom)
            param.addcdiv_(momentum, denom)
        else:
            product = mu_product.item()
            denom.add_(group_scalars.eps)
            param.addcdiv_(grad, denom, value=-lr * (1.0 - mu) / (1.0 - product))
            param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - product * mu_next))


def radam(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    """RAdam as torch.optim.RAdam steps it: the bias-corrected m times lr, times
    sqrt(1 - beta2^t) / (sqrt(v) + eps) and the rectification once rho_t > 5."""
    for i, param in enumerate(tensors.params):
        param, grad = as_real(param), as_real(tensors.grads[i])  # torch decays the real views
        grad = _decayed_gradient(param, grad, rule, group_scalars)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        step = steps[i]

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        _second_moment_update(exp_avg_sq, grad, group_scalars)
        update = radam_update(exp_avg, exp_avg_sq, step, rule, group_scalars.eps)
        if rule.cautious:
            descend_cautiously(param, update, grad, shard_of(tensors, i))
        else:
            param.add_(update, alpha=-1.0)


def radam_update(exp_avg: Tensor, exp_avg_sq: Tensor, step: StepScalars, rule: UpdateRule, eps: float) -> Tensor:
    """RAdam's update from the new moments: the bias-corrected m times lr, times the
    rectification and sqrt(1 - beta2^t) / (sqrt(v) + eps) once rho_t > 5."""
    corrected = (exp_avg.clone() if rule.differentiable else exp_avg) / step.bias_correction1  # (m moves in place)
    if step.rectified is not None:  # capturable: both branches, picked on the device
        adaptive = step.rectification * _radam_adaptive_lr(exp_avg_sq, step, eps, rule)
        return corrected * rule.lr * torch.where(step.rectified, adaptive, 1.0)
    if step.rectification is not None:
        return corrected * rule.lr * _radam_adaptive_lr(exp_avg_sq, step, eps, rule) * step.rectification
    return corrected * rule.lr


def _radam_adaptive_lr(exp_avg_sq: Tensor, step: StepScalars, eps: float, rule: UpdateRule) -> Tensor:
    """sqrt(1 - beta2^t) / (sqrt(v) + eps)."""
    root = exp_avg_sq.sqrt()
    root = root.add(eps) if rule.differentiable else root.add_(eps)
    return step.bias_correction2_sqrt / root


def adopt(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    r"""ADOPT: m follows the gradient normalized by the *previous* v, clipped to
    :math:`[-c_t, c_t]`; the param moves by :math:`-\eta m`; then v is updated.  The
    first step's scalars (:meth:`~adamkit.rule.UpdateRule.step_scalars`: :math:`c = 0`,
    weight 1 for :math:`g^2`, no decay) leave m and the param as they are and set
    :math:`v = g^2`, without a branch (a device step count is never read)."""
    for i, param in enumerate(tensors.params):
        param, grad = as_real(param), as_real(tensors.grads[i])
        grad = effective_gradient(param, grad, rule, group_scalars)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        step = steps[i]
        if group_scalars.decay_factor is not None:
            param.mul_(_unless_first(step, group_scalars.decay_factor))

        root = exp_avg_sq.sqrt()  # (autograd keeps the root: clamped out of place where it flows)
        normalized = grad / (
            root.clamp(min=group_scalars.eps) if rule.differentiable else root.clamp_(min=group_scalars.eps)
        )
        normalized.clamp_(-step.clip, step.clip)
        exp_avg.lerp_(normalized, group_scalars.one_minus_beta1(param))
        update = (exp_avg.clone() if rule.differentiable else exp_avg) * step.step_size
        if rule.cautious:
            descend_cautiously(param, update, grad, shard_of(tensors, i))
        else:
            param.sub_(update)
        if isinstance(step.second_weight, Tensor):
            exp_avg_sq.mul_(group_scalars.beta2).addcmul_(grad * step.second_weight, grad)
        else:
            exp_avg_sq.mul_(group_scalars.beta2).addcmul_(grad, grad, value=step.second_weight)


def stable_adamw(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    r"""StableAdamW: Adam's moments, then per tensor :math:`s = 1 / \max(1, \mathrm{RMS})`
    with :math:`\mathrm{RMS} = \sqrt{\operatorname{mean}(g^2 / \max(\hat v, \epsilon^2))}`
    (:func:`update_clipping`); the step size and the decoupled decay are scaled by s."""
    decay_rate = rule.decay_rate()
    for i, param in enumerate(tensors.params):
        param, grad = as_real(param), as_real(tensors.grads[i])
        grad = effective_gradient(param, grad, rule, group_scalars)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        step = steps[i]

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        _second_moment_update(exp_avg_sq, grad, group_scalars)
        scale = update_clipping(grad, exp_avg_sq, step, group_scalars.eps, shard_of(tensors, i), rule.differentiable)
        if decay_rate is not None:
            param.mul_(1 - scale * decay_rate)
        denom = adam_denominator(exp_avg_sq, step, group_scalars.eps)
        _descend(param, exp_avg, denom, step.step_size * scale, grad, rule, shard_of(tensors, i))


def ademamix(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    r"""AdEMAMix: Adam's moments and a slow first moment :math:`m_2` (decay :math:`\beta_3(t)`,
    not bias-corrected); the direction is
    :math:`(m_1 / (1 - \beta_1^t) + \alpha(t) m_2) / (\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon)`."""
    for i, param in enumerate(tensors.params):
        grad = _decayed_gradient(param, tensors.grads[i], rule, group_scalars)
        param, grad = as_real(param), as_real(grad)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        exp_avg_slow, step = as_real(tensors.exp_avg_slows[i]), steps[i]

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        exp_avg_slow.lerp_(grad, _weight(1 - step.slow_decay, exp_avg_slow))
        _second_moment_update(exp_avg_sq, grad, group_scalars)
        denom = adam_denominator(exp_avg_sq, step, group_scalars.eps)
        if rule.differentiable:  # (both move in place next step)
            exp_avg, exp_avg_slow = exp_avg.clone(), exp_avg_slow.clone()
        direction = exp_avg / step.bias_correction1 + exp_avg_slow * step.slow_weight
        _descend(param, direction, denom, step.step_size, grad, rule, shard_of(tensors, i))


def schedule_free_adamw(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    r"""Schedule-free AdamW (:mod:`adamkit.algorithms.schedule_free`) as the ``schedulefree``
    package steps it, its arithmetic in its order: :math:`d = g / (\sqrt{v / (1 - \beta_2^t)}
    + \epsilon) + \lambda y`, :math:`y \leftarrow \operatorname{lerp}(y, z, c) +
    \gamma(\beta_1(1 - c) - 1)\, d`, :math:`z \leftarrow z - \gamma d`.  The second weight
    sequence :math:`z` is held in the first moment's place; ``.grad`` is not written."""
    for i, param in enumerate(tensors.params):
        y, grad = as_real(param), as_real(tensors.grads[i])
        grad = -grad if rule.maximize else grad
        z, exp_avg_sq, step = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i]), steps[i]
        _second_moment_update(exp_avg_sq, grad, group_scalars)
        direction = grad.div(exp_avg_sq.div(step.bias_correction2).sqrt_().add_(group_scalars.eps))
        if step.point_decay != 0:
            direction.add_(y, alpha=step.point_decay)
        y.lerp_(z, step.average_weight)
        y.add_(direction, alpha=step.point_step_size)
        z.sub_(direction, alpha=step.step_size)


def _weight(value, like: Tensor):
    """A lerp weight: a float, or a device tensor in ``like``'s dtype."""
    return value.to(like.dtype) if isinstance(value, Tensor) else value


def update_clipping(grad: Tensor, exp_avg_sq: Tensor, step: StepScalars, eps: float, shard=None, keep=False):
    r""":math:`1 / \max(1, \mathrm{RMS})` of one tensor (1 for an empty one): a float read
    from the device, or a 0-d tensor where the step scalars are tensors (no host read).
    ``shard``: the sharded param whose local shard this is (the mean is then over the
    whole param: a collective), or ``None``.  ``keep``: read a copy of v (autograd keeps
    what it reads, and v moves in place next step)."""
    if grad.numel() == 0 and shard is None:
        return 1.0
    v_hat = ((exp_avg_sq.clone() if keep else exp_avg_sq) / step.bias_correction2).clamp_(min=eps * eps)
    total = (grad * grad / v_hat).sum(dtype=torch.float64)  # (float64, as the fused kernels add)
    if shard is None:
        rms = (total / grad.numel()).sqrt()
    else:
        local = torch.stack([total, total.new_tensor(grad.numel())])
        total, count = per_tensor_totals(local.reshape(1, 2), [shard])[0]
        rms = (total / count.clamp(min=1.0)).sqrt()
    if isinstance(step.bias_correction2, Tensor):
        return 1.0 / rms.to(torch.float64).clamp(min=1.0)
    return 1.0 / max(1.0, rms.item())


def _unless_first(step: StepScalars, factor):
    """``factor``, or 1 on ADOPT's first step."""
    if isinstance(step.first, Tensor):
        return torch.where(step.first, 1.0, factor)
    return 1.0 if step.first else factor


#: the per-list function of each algorithm: the function above named after it
ALGORITHMS = named_after_algorithms(globals())
