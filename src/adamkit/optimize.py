r"""``adamkit.minimize``: Adam and its variants for ``scipy.optimize``-style problems.

    >>> from scipy.optimize import rosen, rosen_der
    >>> result = adamkit.minimize(rosen, [-1.5, 2.0], jac=rosen_der, method="adam", lr=0.02, maxiter=20000)
    >>> result.success, result.x.round(3)
    (True, array([1., 1.]))

The same callable is a custom method for SciPy, with adamkit's options in
``options``::

    scipy.optimize.minimize(rosen, x0, jac=rosen_der, method=adamkit.minimize,
                            options={"method": "amsgrad", "lr": 0.02})

``method``: ``"adam"``, ``"adamw"``, ``"amsgrad"`` (Adam with ``amsgrad=True``) or
``"adamax"``; other keywords (``betas``, ``eps``, ``weight_decay``, ``decouple_lr``,
...) go to the optimizer.  ``x`` is float64 and the step is :mod:`adamkit.numpy`'s.
As in SciPy, ``fun`` and ``jac`` are called with a copy of ``x``, and a one-variable
``jac`` may return a number.

Stopping: success when the projected gradient's max-norm is at most ``gtol`` (``tol``,
as SciPy passes it, stands for ``gtol``); otherwise after ``maxiter`` steps, at a
non-finite value or gradient, or when ``callback`` returns True or raises
``StopIteration``.  ``bounds`` are kept by projecting (clipping) after every step, and
the projected gradient is the gradient without the components that push against an
active bound (:math:`g_i > 0` at :math:`x_i = l_i`, :math:`g_i < 0` at :math:`x_i = u_i`),
as L-BFGS-B's is: a minimum on a bound is a success.  ``jac=None`` takes forward
differences with SciPy's absolute step :math:`\sqrt{\epsilon_{64}}` (at most ``d``
extra calls per step), backward where the forward point would leave the bounds, shorter
where the bounds are closer than the step (none for a fixed variable).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, OptimizeResult

from . import numpy as anp
from .user_warnings import warn_at_user

#: method name -> (array optimizer, its fixed keywords)
METHODS = {
    "adam": (anp.Adam, {}),
    "adamw": (anp.AdamW, {}),
    "amsgrad": (anp.Adam, {"amsgrad": True}),
    "adamax": (anp.AdaMax, {}),
}

STATUS_MESSAGES = {
    0: "Optimization terminated successfully: the projected gradient's max-norm is at most gtol.",
    1: "Maximum number of iterations has been exceeded.",
    2: "Stopped: the function value or gradient is not finite.",
    3: "Stopped by the callback.",
}


#: the forward-difference step of ``jac=None`` (SciPy's ``approx_fprime`` default)
DIFFERENCE_STEP = float(np.sqrt(np.finfo(np.float64).eps))


@dataclass(frozen=True)
class Box:
    """``bounds`` as arrays (infinite where a side is open)."""

    low: np.ndarray
    high: np.ndarray

    def project(self, x: np.ndarray) -> None:
        """Clip ``x`` into the box, in place."""
        np.clip(x, self.low, self.high, out=x)

    def projected_gradient(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        """``g`` without the components that push ``x`` out through an active bound."""
        blocked = ((x <= self.low) & (g > 0)) | ((x >= self.high) & (g < 0))
        return np.where(blocked, 0.0, g)


def _numbers(value, requirement: str) -> np.ndarray:
    """``value`` as a float64 array (no copy where it is one), or an error stating
    ``requirement`` and what came instead."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{requirement}, got {value!r}") from None


def _scalar(value) -> float:
    """``fun``'s value as a float: a number or a one-element array, as SciPy takes it."""
    array = _numbers(value, "fun must return a scalar value")
    if array.size != 1:
        raise ValueError(f"fun must return a scalar value, got an array of shape {array.shape}")
    return float(array.reshape(()))


def _gradient(value, n: int) -> np.ndarray:
    """``jac``'s value as float64 of shape ``(n,)`` (a number for one variable, as SciPy
    takes it)."""
    g = np.atleast_1d(_numbers(value, "jac must return an array of numbers"))
    if g.shape != (n,):
        raise ValueError(f"jac must return one derivative per variable, shape ({n},); got shape {g.shape}")
    return g


def _difference_step(x: float, low: float, high: float) -> float:
    """The step of one coordinate's difference: forward, backward where forward would
    leave the bounds, and where neither side has room for it, as far as the roomier
    side allows (0 for a fixed variable, whose derivative is then taken as 0)."""
    if x + DIFFERENCE_STEP <= high:
        return DIFFERENCE_STEP
    if x - DIFFERENCE_STEP >= low:
        return -DIFFERENCE_STEP
    return high - x if high - x >= x - low else low - x


def _forward_differences(value: Callable, x: np.ndarray, f: float, box: Box | None) -> np.ndarray:
    """Two-point differences of ``value`` at ``x`` (``f`` = value(x)), one call per
    coordinate, never leaving ``box`` (:func:`_difference_step`)."""
    g = np.zeros_like(x)
    for i in range(x.size):
        h = DIFFERENCE_STEP if box is None else _difference_step(x[i], box.low[i], box.high[i])
        moved = x.copy()
        moved[i] += h
        if moved[i] != x[i]:
            g[i] = (value(moved) - f) / (moved[i] - x[i])  # the step as it is represented
    return g


def _objective(fun: Callable, jac, args: tuple, counts: dict, box: Box | None):
    """x -> (f(x), grad f(x)) from SciPy's ``fun``/``jac`` conventions, counting calls.
    Like SciPy, ``fun`` and ``jac`` get a copy of ``x``: one that keeps it (a history)
    keeps that point, and one that writes into it cannot move the optimizer's."""

    def value(x: np.ndarray) -> float:
        counts["nfev"] += 1
        return _scalar(fun(x.copy(), *args))

    def both(x: np.ndarray) -> tuple[float, np.ndarray]:
        if jac is True:  # fun returns (f, g)
            counts["nfev"] += 1
            counts["njev"] += 1
            returned = fun(x.copy(), *args)
            if not isinstance(returned, Sequence) or len(returned) != 2:
                raise ValueError(f"with jac=True, fun must return (value, gradient), got {returned!r}")
            return _scalar(returned[0]), _gradient(returned[1], x.size)
        if callable(jac):
            counts["njev"] += 1
            return value(x), _gradient(jac(x.copy(), *args), x.size)
        f = value(x)
        return f, _forward_differences(value, x, f, box)

    if jac is not None and jac is not True and not callable(jac):
        raise ValueError(f"jac must be a callable, True or None, got {jac!r}")
    return both


def _box(bounds, n: int) -> Box | None:
    if bounds is None:
        return None
    if isinstance(bounds, Bounds):
        sides = [np.asarray(bounds.lb, dtype=np.float64), np.asarray(bounds.ub, dtype=np.float64)]
        for name, side in zip(("lb", "ub"), sides):
            if side.size not in (1, n):
                raise ValueError(f"bounds.{name} has {side.size} values for {n} variables (1 or {n} allowed)")
        low, high = (np.broadcast_to(side.reshape(-1), n) for side in sides)
    else:
        pairs = list(bounds)
        if len(pairs) != n:
            raise ValueError(f"bounds has {len(pairs)} (low, high) pairs for {n} variables")
        for i, pair in enumerate(pairs):
            if not hasattr(pair, "__len__") or len(pair) != 2:
                raise ValueError(f"bounds[{i}] must be a (low, high) pair, got {pair!r}")
        low = np.array([-np.inf if lo is None else lo for lo, _ in pairs], dtype=np.float64)
        high = np.array([np.inf if hi is None else hi for _, hi in pairs], dtype=np.float64)
    if np.isnan(low).any() or np.isnan(high).any():
        raise ValueError("bounds: NaN is not a bound (None or an infinity leaves a side open)")
    if np.any(low > high):
        raise ValueError("bounds: a lower bound is above its upper bound")
    return Box(np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64))


def _notify(callback, x: np.ndarray, f: float) -> bool:
    """Call ``callback`` the way SciPy does (the keyword form when its only parameter is
    ``intermediate_result``); True means stop."""
    if callback is None:
        return False
    try:
        if set(inspect.signature(callback).parameters) == {"intermediate_result"}:
            return bool(callback(intermediate_result=OptimizeResult(x=x.copy(), fun=f)))
        return bool(callback(x.copy()))
    except StopIteration:
        return True


def _check_optimizer_options(cls, method: str, options: dict) -> None:
    """Keywords for the optimizer must be its own: a typo is named here, not as an
    argument of the optimizer's constructor the caller never called."""
    accepted = [name for name in inspect.signature(cls.torch_class).parameters if name != "params"]
    for name in options:
        if name not in accepted:
            raise TypeError(
                f"minimize() got an unexpected keyword argument {name!r} (method {method!r} also takes: "
                f"{', '.join(accepted)})"
            )


def minimize(
    fun: Callable,
    x0: Sequence[float] | np.ndarray,
    args: tuple = (),
    method: str = "adam",
    jac=None,
    bounds=None,
    callback=None,
    *,
    lr: float = 1e-3,
    maxiter: int = 10_000,
    gtol: float | None = None,
    tol: float | None = None,
    hess=None,
    hessp=None,
    constraints=(),
    **optimizer_options,
) -> OptimizeResult:
    """Minimize ``fun`` from ``x0`` with an Adam-family method (see the module).
    ``gtol`` defaults to ``tol``, else 1e-6."""
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (allowed: {', '.join(map(repr, METHODS))})")
    cls, fixed = METHODS[method]
    _check_optimizer_options(cls, method, optimizer_options)
    if constraints:
        raise ValueError("constraints are not supported by adamkit.minimize (bounds are)")
    if hess is not None or hessp is not None:
        warn_at_user(
            f"method {method!r} does not use Hessian information (hess, hessp)", RuntimeWarning, passing=("scipy",)
        )
    if not isinstance(maxiter, numbers.Integral) or isinstance(maxiter, bool) or maxiter < 0:
        raise ValueError(f"Invalid maxiter: {maxiter!r} (an int >= 0)")
    gtol = (1e-6 if tol is None else tol) if gtol is None else gtol
    if not gtol >= 0:
        raise ValueError(f"Invalid gtol: {gtol!r} (a number >= 0)")
    x = np.atleast_1d(_numbers(x0, "x0 must be numbers")).copy()  # stepped in place: never the caller's array
    if x.ndim != 1:
        raise ValueError(f"x0 must have one dimension, got shape {x.shape}")
    counts = {"nfev": 0, "njev": 0}
    box = _box(bounds, x.size)
    evaluate = _objective(fun, jac, args if isinstance(args, tuple) else (args,), counts, box)
    if box is not None:
        box.project(x)
    optimizer = cls([x], lr=lr, backend="single_tensor" if x.size < 1 << 16 else None, **fixed, **optimizer_options)
    f, g = evaluate(x)
    status, nit = 1, 0
    for nit in range(int(maxiter) + 1):
        if not (np.isfinite(f) and np.all(np.isfinite(g))):
            status = 2
            break
        if np.max(np.abs(g if box is None else box.projected_gradient(x, g)), initial=0.0) <= gtol:
            status = 0
            break
        if nit == maxiter:
            break
        optimizer.step([g])
        if box is not None:
            box.project(x)
        f, g = evaluate(x)
        if _notify(callback, x, f):
            status, nit = 3, nit + 1
            break
    return OptimizeResult(
        x=x,
        fun=f,
        jac=g,
        nit=nit,
        nfev=counts["nfev"],
        njev=counts["njev"],
        status=status,
        success=status == 0,
        message=STATUS_MESSAGES[status],
    )


__all__ = ["METHODS", "minimize"]
