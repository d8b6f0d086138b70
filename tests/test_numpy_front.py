"""``adamkit.numpy`` (arrays stepped in place by the torch front's kernels) and
``adamkit.minimize`` (SciPy-style; also a custom method for ``scipy.optimize.minimize``)."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adamkit
import adamkit.numpy as anp
from adamkit import optimize, reference

scipy_optimize = pytest.importorskip("scipy.optimize")

CASES = [
    (anp.Adam, adamkit.Adam, {}),
    (anp.Adam, adamkit.Adam, {"amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    (anp.AdamW, adamkit.AdamW, {"weight_decay": 0.1, "decouple_lr": True}),
    (anp.AdaMax, adamkit.AdaMax, {"weight_decay": 0.1}),
]


def gradients(shapes, steps, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("array_cls,torch_cls,options", CASES)
def test_arrays_step_in_place_exactly_as_the_torch_front_steps_tensors(dtype, array_cls, torch_cls, options):
    shapes = [(7, 3), (5,)]
    start = [np.random.default_rng(1).standard_normal(s).astype(dtype) for s in shapes]
    arrays = [a.copy() for a in start]
    identities = list(map(id, arrays))
    opt = array_cls(arrays, lr=0.01, **options)
    tensors = [torch.tensor(a) for a in start]
    torch_opt = torch_cls(tensors, lr=0.01, **options)
    for grads in gradients(shapes, 5, dtype):
        opt.step(grads)
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g.copy())
        torch_opt.step()
    assert list(map(id, opt.params)) == identities
    for a, t in zip(arrays, tensors):
        assert a.dtype == dtype and np.array_equal(a, t.numpy())
    for array_state, t in zip(opt.state, tensors):
        for key, value in torch_opt.state[t].items():
            assert torch.equal(array_state[key], value)


def test_float64_arrays_follow_the_numpy_reference():
    shapes = [(4, 4), ()]
    arrays = [np.random.default_rng(1).standard_normal(s) for s in shapes]
    thetas = [np.array(a) for a in arrays]
    states = [reference.ReferenceState() for _ in shapes]
    hp = reference.Hyperparameters(lr=0.05, amsgrad=True)
    opt = anp.Adam(arrays, lr=0.05, amsgrad=True)
    for grads in gradients(shapes, 6, np.float64):
        opt.step(grads)
        thetas = [reference.adam_step(t, g, s, hp) for t, g, s in zip(thetas, grads, states)]
    for a, t in zip(arrays, thetas):
        np.testing.assert_allclose(a, t, rtol=1e-13, atol=1e-15)


def test_a_none_gradient_skips_its_array_and_state_dicts_round_trip():
    a, b = np.ones(3), np.ones(2)
    opt = anp.Adam([a, b], lr=0.1)
    opt.step([np.ones(3), None])
    assert np.all(a < 1) and np.array_equal(b, np.ones(2)) and opt.state[1] == {}
    other = anp.Adam([a.copy(), b.copy()], lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert torch.equal(other.state[0]["exp_avg"], opt.state[0]["exp_avg"])


@pytest.mark.parametrize(
    "params,error,match",
    [
        ([], ValueError, "params is empty"),
        ([np.arange(3)], TypeError, r"params\[0\] has dtype int64; allowed: float16, float32"),
        ([[1.0, 2.0]], TypeError, r"params\[0\] must be a numpy.ndarray, got list"),
        ([np.ones(2).astype(">f8")], ValueError, r"params\[0\] has non-native byte order '>f8'"),
        ([np.ones(4)[::-1]], ValueError, r"params\[0\] has a negative stride \(-8,\) .* pass the array it views"),
    ],
)
def test_bad_params_are_named(params, error, match):
    with pytest.raises(error, match=match):
        anp.Adam(params)


def test_read_only_arrays_and_bad_gradients_are_rejected_without_touching_anything():
    frozen = np.ones(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        anp.Adam([frozen])
    a = np.ones(3)
    opt = anp.Adam([a])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(2,\), but params\[0\] has shape \(3,\)"):
        opt.step([np.ones(2)])
    with pytest.raises(ValueError, match="got 2 gradients for 1 params"):
        opt.step([np.ones(3), np.ones(3)])
    with pytest.raises(TypeError, match=r"grads\[0\] is complex \(complex128\), but params\[0\] is real"):
        opt.step([np.ones(3) + 1j])
    assert np.array_equal(a, np.ones(3)) and opt.state[0] == {}


@pytest.mark.parametrize(
    "grad,match",
    [
        (np.array(["a", "b", "c"]), r"grads\[1\] has dtype <U1; allowed: booleans, integers, floating and complex"),
        (np.array([1.0, None, 2.0], dtype=object), r"grads\[1\] has dtype object; allowed"),  # None would be NaN
        ({"a": 1.0}, r"grads\[1\] has dtype object; allowed"),
        ([[1.0], [2.0, 3.0], [4.0]], r"grads\[1\] is not an array of numbers \(list: .*inhomogeneous"),
    ],
    ids=["strings", "object-with-None", "dict", "ragged-list"],
)
def test_a_gradient_that_is_not_numbers_is_named_and_nothing_moves(grad, match):
    """Before, NumPy's own error (naming no gradient) came from the cast, or an object
    array's None became NaN and was stepped; the first gradient must not move either."""
    a, b = np.ones(3, dtype=np.float32), np.ones(3, dtype=np.float32)
    opt = anp.Adam([a, b], lr=0.1)
    with pytest.raises(TypeError, match=match):
        opt.step([np.ones(3), grad])
    assert np.array_equal(a, np.ones(3)) and np.array_equal(b, np.ones(3)) and opt.state == [{}, {}]
    opt.step([np.ones(3), [True, 0, 2.5]])  # booleans, integers and floats are numbers, cast to the param's dtype
    assert np.array_equal(opt.state[1]["exp_avg"].numpy(), np.float32([0.1, 0.0, 0.25]))


GRADIENT_KINDS = {
    "float32": lambda shape: np.full(shape, 0.5, np.float32),
    "float64": lambda shape: np.full(shape, -1.25),
    "float16": lambda shape: np.full(shape, 2.0, np.float16),
    "int": lambda shape: np.full(shape, 3),
    "bool": lambda shape: np.ones(shape, bool),
    "complex": lambda shape: np.full(shape, 1 + 1j),
    "strings": lambda shape: np.full(shape, "x"),
    "objects": lambda shape: np.full(shape, None, object),
    "list": lambda shape: np.full(shape, 0.75).tolist(),
    "ragged": lambda shape: [[1.0], [1.0, 2.0]],
    "torch": lambda shape: torch.full(shape, -0.5),
    "None": lambda shape: None,
}


@settings(max_examples=80, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(sorted(GRADIENT_KINDS)), min_size=2, max_size=2),
    shapes=st.lists(st.sampled_from([(3,), (2, 3), (), (4,)]), min_size=2, max_size=2),
    complex_param=st.booleans(),
)
def test_any_gradients_are_stepped_as_the_torch_front_would_or_refused_by_name(kinds, shapes, complex_param):
    """Whatever comes as gradients: either the step is the torch front's with each gradient
    cast to its param's dtype, or an error names a ``grads[i]`` and nothing moved."""
    params = [np.ones((3,), np.complex64 if complex_param else np.float32), np.ones((2, 3), np.float32)]
    arrays = [p.copy() for p in params]
    opt = anp.Adam(arrays, lr=0.1)
    grads = [GRADIENT_KINDS[kind](shape) for kind, shape in zip(kinds, shapes)]
    try:
        opt.step(grads)
    except (TypeError, ValueError) as error:
        assert re.search(r"grads\[[01]\]", str(error)), error
        assert all(np.array_equal(a, p) for a, p in zip(arrays, params)) and opt.state == [{}, {}]
        return
    tensors = [torch.from_numpy(p.copy()) for p in params]
    twin = adamkit.Adam(tensors, lr=0.1)
    for tensor, grad in zip(tensors, grads):
        tensor.grad = None if grad is None else torch.as_tensor(np.asarray(grad)).to(tensor.dtype)
    twin.step()
    for array, tensor, grad in zip(arrays, tensors, grads):
        if grad is not None:  # what is stepped: numbers of the param's shape, complex only for a complex param
            kind = np.asarray(grad).dtype.kind
            assert np.shape(grad) == array.shape and kind in "biuf" + "c" * np.iscomplexobj(array)
        assert np.array_equal(array, tensor.numpy())


# ---------------------------------------------------------------- minimize

METHODS = ["adam", "adamw", "amsgrad", "adamax"]


def parabola(x):
    return float(np.sum((x - 3.0) ** 2))


def parabola_grad(x):
    return 2.0 * (x - 3.0)


@pytest.mark.parametrize("method", METHODS)
def test_minimize_converges_on_a_parabola(method):
    options = {"weight_decay": 0.0} if method == "adamw" else {}
    result = adamkit.minimize(parabola, np.zeros(5), jac=parabola_grad, method=method, lr=0.1, **options)
    assert result.success and result.status == 0
    np.testing.assert_allclose(result.x, 3.0, atol=1e-6)
    assert result.nfev == result.njev == result.nit + 1


@pytest.mark.parametrize("method", METHODS)
def test_minimize_converges_on_rosenbrock(method):
    options = {"weight_decay": 0.0} if method == "adamw" else {}
    result = adamkit.minimize(
        scipy_optimize.rosen,
        [-1.5, 2.0],
        jac=scipy_optimize.rosen_der,
        method=method,
        lr=0.05,
        maxiter=20_000,
        **options,
    )
    assert result.success, result.message
    np.testing.assert_allclose(result.x, [1.0, 1.0], atol=1e-5)
    assert result.fun < 1e-10 and np.max(np.abs(result.jac)) <= 1e-6


def test_the_same_callable_is_a_scipy_custom_method():
    ours = adamkit.minimize(scipy_optimize.rosen, [-1.5, 2.0], jac=scipy_optimize.rosen_der, method="amsgrad", lr=0.05)
    through_scipy = scipy_optimize.minimize(
        scipy_optimize.rosen,
        [-1.5, 2.0],
        jac=scipy_optimize.rosen_der,
        method=adamkit.minimize,
        options={"method": "amsgrad", "lr": 0.05},
    )
    assert isinstance(through_scipy, scipy_optimize.OptimizeResult)
    assert through_scipy.success and np.array_equal(through_scipy.x, ours.x) and through_scipy.nit == ours.nit


@pytest.mark.parametrize("through_scipy", [False, True])
def test_the_hessian_warning_points_at_the_callers_line(through_scipy):
    """Called through ``scipy.optimize.minimize``, it once pointed into SciPy."""
    solve = scipy_optimize.minimize if through_scipy else adamkit.minimize
    options = {"method": adamkit.minimize, "options": {"maxiter": 3}} if through_scipy else {"maxiter": 3}
    with pytest.warns(RuntimeWarning, match="does not use Hessian information") as caught:
        line = sys._getframe().f_lineno + 1
        solve(parabola, np.ones(3), jac=parabola_grad, hess=lambda x: 2 * np.eye(3), **options)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


def test_jac_true_and_finite_differences():
    combined = adamkit.minimize(lambda x: (parabola(x), parabola_grad(x)), np.zeros(3), jac=True, lr=0.1)
    assert combined.success and combined.nfev == combined.nit + 1
    numeric = adamkit.minimize(parabola, np.zeros(3), lr=0.1, gtol=1e-4)
    assert numeric.success and numeric.nfev == (numeric.nit + 1) * 4  # f(x) and one call per coordinate
    np.testing.assert_allclose(numeric.x, 3.0, atol=1e-4)


def test_finite_differences_are_scipys_and_stay_inside_the_bounds():
    """Unbounded, the differences are approx_fprime's (same step, same numbers); at an
    upper bound they step backward, so a function undefined past it is never called
    there (a forward step from x = 1 had evaluated sqrt(1 - x) at 1 + h: NaN)."""
    x = np.array([0.3, -2.0, 5.0])
    value = scipy_optimize.rosen(x)
    counts = {"nfev": 0, "njev": 0}
    _, ours = optimize._objective(scipy_optimize.rosen, None, (), counts, None)(x)
    assert np.array_equal(ours, scipy_optimize.approx_fprime(x, scipy_optimize.rosen)) and counts["nfev"] == 4
    assert value == scipy_optimize.rosen(x)

    def edge(x):
        assert x[0] <= 1.0, "evaluated outside the bounds"
        return float(-x[0] + np.sqrt(1.0 - x[0]))

    result = adamkit.minimize(edge, [0.5], bounds=[(0.0, 1.0)], lr=0.05, maxiter=2000)
    assert result.success and result.x[0] == 1.0

    def narrow(x):  # bounds closer than the step, and a fixed variable
        assert 0.0 <= x[0] <= 1e-9 and x[1] == 2.0, "evaluated outside the bounds"
        return float((x[0] - 1.0) ** 2 + x[1] ** 2)

    boxed = adamkit.minimize(narrow, [0.0, 2.0], bounds=[(0.0, 1e-9), (2.0, 2.0)], lr=0.1, maxiter=50)
    assert boxed.success and boxed.x[0] == 1e-9 and boxed.jac[1] == 0.0


def test_a_minimum_on_a_bound_is_a_success():
    """The projected gradient (L-BFGS-B's test) drops the components pushing against an
    active bound: at x = (1, 2.5) only they are left, so the run stops there."""
    result = adamkit.minimize(
        parabola, np.zeros(2), jac=parabola_grad, bounds=[(-1, 1), (None, 2.5)], lr=0.1, maxiter=500
    )
    assert result.success and result.status == 0 and result.nit < 500
    np.testing.assert_array_equal(result.x, [1.0, 2.5])
    np.testing.assert_array_equal(result.jac, parabola_grad(result.x))  # the gradient itself, as SciPy's
    boxed = adamkit.minimize(parabola, np.zeros(2), jac=parabola_grad, bounds=scipy_optimize.Bounds(-1, 1), maxiter=50)
    assert np.all(np.abs(boxed.x) <= 1)
    inside = adamkit.minimize(parabola, np.zeros(2), jac=parabola_grad, bounds=[(-5, 5)] * 2, lr=0.1)
    assert inside.success and np.max(np.abs(inside.jac)) <= 1e-6  # an inactive bound changes nothing


def test_scipys_conventions():
    """tol (which SciPy passes to a custom method), NumPy ints, a lone args value, a
    one-element array from fun, a callback with a defaulted intermediate_result: as
    SciPy takes them; a 2-D x0 and a misspelt keyword are refused by name."""
    through_scipy = scipy_optimize.minimize(
        parabola, np.zeros(2), jac=parabola_grad, tol=1e-3, method=adamkit.minimize, options={"lr": 0.1}
    )
    assert through_scipy.success and np.max(np.abs(through_scipy.jac)) <= 1e-3
    assert np.max(np.abs(through_scipy.jac)) > 1e-6  # stopped at tol, not at the default 1e-6
    shifted = adamkit.minimize(
        lambda x, c: np.array([np.sum((x - c) ** 2)]), np.zeros(2), args=2.0, lr=0.1, maxiter=np.int64(5000)
    )
    assert shifted.success and np.allclose(shifted.x, 2.0, atol=1e-3)
    seen = []
    adamkit.minimize(
        parabola,
        np.zeros(2),
        jac=parabola_grad,
        maxiter=3,
        callback=lambda xk, intermediate_result=None: seen.append(xk),
    )
    assert len(seen) == 3
    with pytest.raises(ValueError, match=r"x0 must have one dimension, got shape \(2, 2\)"):
        adamkit.minimize(parabola, np.zeros((2, 2)), jac=parabola_grad)
    with pytest.raises(TypeError, match=r"minimize\(\) got an unexpected keyword argument 'maxiters'"):
        adamkit.minimize(parabola, np.zeros(2), jac=parabola_grad, maxiters=3)
    with pytest.raises(ValueError, match=r"fun must return a scalar value, got an array of shape \(2,\)"):
        adamkit.minimize(lambda x: x, np.zeros(2), jac=parabola_grad)


def test_callbacks_old_and_new_style_can_stop_the_run():
    seen = []
    result = adamkit.minimize(
        parabola, np.zeros(2), jac=parabola_grad, lr=0.1, callback=lambda x: seen.append(x) or len(seen) == 3
    )
    assert result.status == 3 and result.nit == 3 and len(seen) == 3 and not result.success

    def new_style(intermediate_result):
        if intermediate_result.fun < 1.0:
            raise StopIteration

    stopped = adamkit.minimize(parabola, np.zeros(2), jac=parabola_grad, lr=0.1, callback=new_style)
    assert stopped.status == 3 and stopped.fun < 1.0


def test_iteration_limit_and_non_finite_values():
    limited = adamkit.minimize(parabola, np.zeros(2), jac=parabola_grad, lr=1e-3, maxiter=10)
    assert limited.status == 1 and limited.nit == 10 and "Maximum number of iterations" in limited.message
    broken = adamkit.minimize(lambda x: float("nan"), np.zeros(2), jac=lambda x: np.zeros(2))
    assert broken.status == 2 and broken.nit == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "lbfgs"}, "Invalid method: 'lbfgs' \\(allowed: 'adam', 'adamw', 'amsgrad', 'adamax'\\)"),
        ({"constraints": [{"type": "eq", "fun": sum}]}, "constraints are not supported"),
        ({"maxiter": -1}, "Invalid maxiter: -1"),
        ({"gtol": float("nan")}, "Invalid gtol: nan"),
        ({"jac": "2-point"}, "jac must be a callable, True or None, got '2-point'"),
        ({"bounds": [(0, 1)]}, "bounds has 1 \\(low, high\\) pairs for 2 variables"),
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"bounds": [(0, 1, 2), (0, 1)]}, r"bounds\[0\] must be a \(low, high\) pair, got \(0, 1, 2\)"),
        ({"bounds": [3.0, (0, 1)]}, r"bounds\[0\] must be a \(low, high\) pair, got 3.0"),
        ({"bounds": [(0, np.nan), (0, 1)]}, "bounds: NaN is not a bound"),
        ({"bounds": scipy_optimize.Bounds([0, 0, 0], [1, 1, 1])}, r"bounds.lb has 3 values for 2 variables"),
        ({"bounds": [(1, 0), (0, 1)]}, "a lower bound is above its upper bound"),
        ({"jac": lambda x: np.ones(3)}, r"jac must return one derivative per variable, shape \(2,\); got shape \(3,\)"),
        ({"jac": lambda x: "slope"}, "jac must return an array of numbers, got 'slope'"),
        ({"jac": True}, r"with jac=True, fun must return \(value, gradient\), got 2.0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adamkit.minimize(lambda x: 2.0, np.zeros(2), **({"jac": parabola_grad} | kwargs))


@pytest.mark.parametrize(
    "fun,x0,match",
    [
        (lambda x: "a", np.zeros(2), "fun must return a scalar value, got 'a'"),
        (parabola, ["a", "b"], r"x0 must be numbers, got \['a', 'b'\]"),
    ],
)
def test_bad_values_and_starting_points_are_named(fun, x0, match):
    """Before, NumPy's cast error named neither fun nor x0 (SciPy's names neither too)."""
    with pytest.raises(ValueError, match=match):
        adamkit.minimize(fun, x0, jac=parabola_grad)


@pytest.mark.parametrize("jac", [parabola_grad, True, None], ids=["jac", "jac=True", "differences"])
def test_fun_and_jac_get_a_copy_of_x_as_scipy_gives_them(jac):
    """A function that keeps the points it is called at (a history) keeps each point,
    and one that writes into its argument cannot move the run (SciPy's convention;
    before, every call got the optimizer's own array)."""
    start = np.zeros(2)
    clean = adamkit.minimize(parabola, start, jac=parabola_grad, lr=0.1, maxiter=30)
    assert np.array_equal(start, np.zeros(2)) and clean.x is not start  # nor is x0 stepped

    def returned(x):
        return (parabola(x), parabola_grad(x)) if jac is True else parabola(x)

    history = []
    adamkit.minimize(lambda x: history.append(x) or returned(x), np.zeros(2), jac=jac, lr=0.1, maxiter=30)
    assert np.array_equal(history[0], np.zeros(2)) and np.allclose(history[-1], clean.x, atol=1e-6)

    def careless(function):
        def writing_into_its_argument(x):
            value = function(x)
            x[:] = 1e6
            return value

        return writing_into_its_argument

    careless_jac = careless(jac) if callable(jac) else jac
    kept = adamkit.minimize(careless(returned), np.zeros(2), jac=careless_jac, lr=0.1, maxiter=30)
    assert np.allclose(kept.x, clean.x, atol=1e-6)


def test_a_one_variable_gradient_may_be_a_number_as_in_scipy():
    result = adamkit.minimize(parabola, [0.0], jac=lambda x: float(parabola_grad(x)[0]), lr=0.1, maxiter=2000)
    assert result.success and result.x == pytest.approx([3.0], abs=1e-5)


@pytest.mark.parametrize("module", ["adamkit.numpy", "adamkit.optimize"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    import adamkit

    results = doctest.testmod(importlib.import_module(module), extraglobs={"adamkit": adamkit})
    assert results.attempted >= 3 and results.failed == 0
