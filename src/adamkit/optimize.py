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

Stopping: success when :math:`\max_i |\nabla f(x)_i| \le` ``gtol``; otherwise after
``maxiter`` steps, at a non-finite value or gradient, or when ``callback`` returns
True or raises ``StopIteration``.  ``bounds`` are kept by projecting (clipping) after
every step.  ``jac=None`` takes two-point finite differences (``d`` extra calls per
step).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import Bounds, OptimizeResult, approx_fprime

from . import numpy as anp

#: method name -> (array optimizer, its fixed keywords)
METHODS = {
    "adam": (anp.Adam, {}),
    "adamw": (anp.AdamW, {}),
    "amsgrad": (anp.Adam, {"amsgrad": True}),
    "adamax": (anp.AdaMax, {}),
}

STATUS_MESSAGES = {
    0: "Optimization terminated successfully: the gradient's max-norm is at most gtol.",
    1: "Maximum number of iterations has been exceeded.",
    2: "Stopped: the function value or gradient is not finite.",
    3: "Stopped by the callback.",
}


def _objective(fun: Callable, jac, args: tuple, counts: dict) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """x -> (f(x), grad f(x)) from SciPy's ``fun``/``jac`` conventions, counting calls."""

    def value(x: np.ndarray) -> float:
        counts["nfev"] += 1
        return float(fun(x, *args))

    def both(x: np.ndarray) -> tuple[float, np.ndarray]:
        if jac is True:  # fun returns (f, g)
            counts["nfev"] += 1
            counts["njev"] += 1
            f, g = fun(x, *args)
            return float(f), np.asarray(g, dtype=np.float64)
        if callable(jac):
            counts["njev"] += 1
            return value(x), np.asarray(jac(x, *args), dtype=np.float64)
        f = value(x)
        return f, approx_fprime(x, value, np.sqrt(np.finfo(np.float64).eps))

    if jac is not None and jac is not True and not callable(jac):
        raise ValueError(f"jac must be a callable, True or None, got {jac!r}")
    return both


def _projection(bounds, n: int) -> Callable[[np.ndarray], None] | None:
    if bounds is None:
        return None
    if isinstance(bounds, Bounds):
        low, high = np.broadcast_to(bounds.lb, n), np.broadcast_to(bounds.ub, n)
    else:
        pairs = list(bounds)
        if len(pairs) != n:
            raise ValueError(f"bounds has {len(pairs)} (low, high) pairs for {n} variables")
        low = np.array([-np.inf if lo is None else lo for lo, _ in pairs], dtype=np.float64)
        high = np.array([np.inf if hi is None else hi for _, hi in pairs], dtype=np.float64)
    if np.any(low > high):
        raise ValueError("bounds: a lower bound is above its upper bound")
    return lambda x: np.clip(x, low, high, out=x)


def _notify(callback, x: np.ndarray, f: float) -> bool:
    """Call ``callback`` the way SciPy does; True means stop."""
    if callback is None:
        return False
    try:
        if "intermediate_result" in inspect.signature(callback).parameters:
            return bool(callback(intermediate_result=OptimizeResult(x=x.copy(), fun=f)))
        return bool(callback(x.copy()))
    except StopIteration:
        return True


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
    gtol: float = 1e-6,
    hess=None,
    hessp=None,
    constraints=(),
    **optimizer_options,
) -> OptimizeResult:
    """Minimize ``fun`` from ``x0`` with an Adam-family method (see the module)."""
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (allowed: {', '.join(map(repr, METHODS))})")
    if constraints:
        raise ValueError("constraints are not supported by adamkit.minimize (bounds are)")
    if hess is not None or hessp is not None:
        warnings.warn(f"method {method!r} does not use Hessian information (hess, hessp)", RuntimeWarning, stacklevel=2)
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
        raise ValueError(f"Invalid maxiter: {maxiter!r} (an int >= 0)")
    if not gtol >= 0:
        raise ValueError(f"Invalid gtol: {gtol!r} (a number >= 0)")
    x = np.array(x0, dtype=np.float64).reshape(-1)
    counts = {"nfev": 0, "njev": 0}
    evaluate = _objective(fun, jac, tuple(args), counts)
    project = _projection(bounds, x.size)
    if project is not None:
        project(x)
    cls, fixed = METHODS[method]
    optimizer = cls([x], lr=lr, backend="single_tensor" if x.size < 1 << 16 else None, **fixed, **optimizer_options)
    f, g = evaluate(x)
    status, nit = 1, 0
    for nit in range(maxiter + 1):
        if not (np.isfinite(f) and np.all(np.isfinite(g))):
            status = 2
            break
        if np.max(np.abs(g), initial=0.0) <= gtol:
            status = 0
            break
        if nit == maxiter:
            break
        optimizer.step([g])
        if project is not None:
            project(x)
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
