"""The algorithm registry (:mod:`adamkit.algorithms`): each algorithm declared once, and
every consumer reading the declaration."""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import adamkit
from adamkit import kernels
from adamkit.algorithms import REGISTRY, Denominator, FirstMoment, FirstMomentScale, SecondMoment, lookup, register
from adamkit.kernels import foreach, single_tensor
from adamkit.kernels.cpu.layout import algorithm_witness_shape
from adamkit.rule import UpdateRule

SOURCE = Path(adamkit.__file__).parent


def test_every_class_is_registered_and_every_algorithm_has_its_class():
    classes = {
        cls.algorithm: cls
        for cls in vars(adamkit).values()
        if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and hasattr(cls, "algorithm")
    }
    assert set(classes) == set(REGISTRY)
    for spec in REGISTRY.values():
        assert getattr(adamkit, spec.class_name).algorithm == spec.name


@pytest.mark.parametrize("name", list(REGISTRY))
def test_hyperparameter_defaults_are_the_constructors(name):
    spec = REGISTRY[name]
    parameters = inspect.signature(getattr(adamkit, spec.class_name)).parameters
    for key, default in spec.hyperparameters.items():
        assert parameters[key].default == default
        rule = UpdateRule(name, 1e-3, 0.9, 0.999, 1e-8, 0.0, "l2", None, False, False, False)
        assert getattr(rule, key) == default  # the rule reads the same default


def test_every_kernel_runs_what_the_registry_says():
    """The list kernels run every algorithm; the fused kernels those declared ``fused``
    (their forms among KERNEL_FORMS, no slow first moment), and nothing else."""
    assert set(single_tensor.ALGORITHMS) == set(foreach.ALGORITHMS) == set(REGISTRY)
    for kernel in kernels.KERNELS.values():
        expected = {n for n, s in REGISTRY.items() if s.fused} if kernel.fused else set(REGISTRY)
        assert {n for n in REGISTRY if kernel.runs(n)} == expected, kernel.name
    # and every algorithm shipped runs fused (docs/options.md: "every backend, fused ones included")
    assert kernels.FUSED_ALGORITHMS == set(REGISTRY)


def test_codes_are_the_registry_order_and_stable():
    # the CPU kernel's disk-cached loops are keyed on the codes: a new algorithm takes the next
    assert [spec.code for spec in REGISTRY.values()] == list(range(len(REGISTRY)))
    assert list(REGISTRY) == [
        "adam",
        "adamax",
        "nadam",
        "radam",
        "adopt",
        "stable_adamw",
        "ademamix",
        "schedule_free_adamw",
    ]


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"name": "adam"}, "'adam' is registered already"),
        ({"name": "adam_twin"}, "code 0 is 'adam''s already"),
        ({"name": "adam_twin", "code": -1}, "code -1 is not an int >= 0"),
        ({"name": "adam_twin", "code": True}, "code True is not an int >= 0"),
        ({"name": "adam_twin", "code": 8.0}, "code 8.0 is not an int >= 0"),
    ],
)
def test_register_refuses_a_taken_name_or_code(changes, words):
    before = dict(REGISTRY)
    with pytest.raises(ValueError, match=re.escape(words)):
        register(replace(lookup("adam"), **changes))
    assert REGISTRY == before and list(REGISTRY) == list(before)


def test_register_keeps_the_registry_in_the_order_of_the_codes():
    before = dict(REGISTRY)
    try:
        for name, code in (("adam_later", 9), ("adam_sooner", 8)):  # registered out of order
            register(replace(lookup("adam"), name=name, code=code))
        assert list(REGISTRY)[-2:] == ["adam_sooner", "adam_later"]
        assert [spec.code for spec in REGISTRY.values()] == list(range(10))
    finally:
        REGISTRY.clear()
        REGISTRY.update(before)


@pytest.mark.parametrize(
    ("algorithm", "changes", "words"),
    [
        ("schedule_free_adamw", {"advance": None}, "group state and its advance come together"),
        ("adam", {"group_state": {"count": 0}}, "group state and its advance come together"),
        ("nadam", {"checks": {"nosuch": abs}}, "checks of undeclared hyperparameters {'nosuch'}"),
        ("ademamix", {"amsgrad": True}, "a slow first moment takes AMSGrad's place"),
        ("adam", {"weight_copy": "z"}, "a second weight sequence is held where the first moment's form says so"),
        ("schedule_free_adamw", {"weight_copy": None}, "a second weight sequence is held where"),
    ],
)
def test_a_declaration_that_contradicts_itself_is_refused(algorithm, changes, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        replace(lookup(algorithm), name="contradiction", **changes)


def test_every_code_names_a_cpu_kernel_specialization_of_its_own():
    """The CPU kernel tells algorithms apart by the type of an empty witness array: eight
    dtypes, then one more dimension per further eight codes (not a ninth dtype)."""
    shapes = [algorithm_witness_shape(code) for code in range(64)]
    assert len(set(shapes)) == 64
    assert shapes[:8] == [(np.dtype(t), 1) for t in ("i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")]
    assert shapes[8] == (np.dtype("i1"), 2) and shapes[63] == (np.dtype("u8"), 8)


def test_forms_pack_each_choice():
    spec = lookup("adopt")
    forms = spec.forms
    assert (forms % 4, forms // 4 % 4, forms // 16 % 4, forms // 64) == (
        FirstMoment.NORMALIZED_CLIPPED,
        SecondMoment.AVERAGE_AFTER,
        Denominator.NONE,
        0,
    )
    assert lookup("nadam").forms // 64 == 1 and lookup("adam").forms == 0
    for spec in REGISTRY.values():  # each choice in its own bits: Triton's kernel decodes them
        forms = spec.forms
        decoded = (forms % 4, forms // 4 % 4, forms // 16 % 4, forms // 64 % 2, forms // 128)
        assert decoded == (
            spec.first_moment,
            spec.second_moment,
            spec.denominator,
            spec.nesterov,
            spec.slow_first_moment,
        )


@pytest.mark.parametrize(
    "name,scale",
    [
        ("adam", FirstMomentScale.ROOT),
        ("nadam", FirstMomentScale.ROOT),
        ("radam", FirstMomentScale.ROOT),
        ("stable_adamw", FirstMomentScale.ROOT),
        ("ademamix", FirstMomentScale.ROOT),
        ("adamax", FirstMomentScale.NORM),  # its denominator is the norm u itself
        ("adopt", FirstMomentScale.NONE),  # its first moment is normalized already
        ("schedule_free_adamw", FirstMomentScale.NONE),  # z, a weight, takes the first moment's place
    ],
)
def test_what_a_normalized_first_moment_is_divided_by(name, scale):
    """The divisor int4 stores each algorithm's first moment over (m / d, d from the stored
    v): the scale of its update's denominator, and nothing where there is no first moment
    to normalize (a weight sequence in its place keeps the plain format, no scratch work)."""
    assert lookup(name).first_moment_scale == scale
    assert set(REGISTRY) == {
        "adam",
        "nadam",
        "radam",
        "stable_adamw",
        "ademamix",
        "adamax",
        "adopt",
        "schedule_free_adamw",
    }


def test_forms_the_fused_kernels_lack_leave_it_to_the_list_kernels():
    spec = replace(lookup("adam"), name="adam_without_denominator", denominator=Denominator.NONE)
    assert not spec.fused and lookup("adam").fused
    with pytest.raises(ValueError, match="takes AMSGrad's place"):
        replace(lookup("adam"), name="x", slow_first_moment=True)


def test_unknown_algorithm_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown algorithm 'lion' \(registered: adam, adamax"):
        lookup("lion")


@pytest.mark.parametrize("mapping", ["hyperparameters", "checks", "group_state", "rule_values"])
def test_a_declarations_mappings_are_read_only(mapping):
    """A write would change every later optimizer's defaults (or checks) silently."""
    spec = lookup("schedule_free_adamw")  # the one with group state
    values = getattr(spec, mapping)
    assert values, mapping
    with pytest.raises(TypeError):
        values[next(iter(values))] = 1.0


def test_no_algorithm_name_is_compared_outside_the_registry():
    """The consumers read the declaration, not the name: at most the NumPy reference (an
    independent oracle, which keeps its own branches) and the kernels' capability check."""
    pattern = re.compile(r"algorithm (==|!=|in|not in) ")
    hits = [
        f"{path.relative_to(SOURCE)}:{n}"
        for path in sorted(SOURCE.rglob("*.py"))
        if "algorithms" not in path.relative_to(SOURCE).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert len(hits) <= 5, hits
    assert all(h.startswith(("specs/reference.py", "kernels/__init__.py")) for h in hits), hits


def test_the_registry_imports_nothing_else_of_adamkit():
    """The bottom layer: the specs, the rule and every kernel import it, so it imports none
    of them when it runs (the torch paths name the kernels' types for the type checker only)."""
    outside = []
    for path in sorted((SOURCE / "algorithms").glob("*.py")):
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for node in ast.walk(block)
        }
        outside += [
            f"{path.name}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and id(node) not in typing_only
            if node.level > 1 or (node.module or "").startswith("adamkit")
        ]
        outside += [
            f"{path.name}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Import) and any(a.name.startswith("adamkit") for a in node.names)
        ]
    assert outside == []


def test_names_derived_from_the_registry_keep_their_values():
    """Module constants earlier versions defined by hand, kept for code that imports them."""
    from adamkit.accumulation import STEP_WITH_MEAN
    from adamkit.diagnostics import READ_BACK
    from adamkit.state import SECOND_MOMENT_KEY

    assert READ_BACK == {"adam", "adamax", "radam", "adopt"}
    assert STEP_WITH_MEAN == {"nadam", "adopt", "stable_adamw", "ademamix"}
    assert SECOND_MOMENT_KEY["adamax"] == "exp_inf" and SECOND_MOMENT_KEY["nadam"] == "exp_avg_sq"


# ------------------------------------------------------------ error inputs, from the table

#: (algorithm, hyperparameter) for every hyperparameter the registry declares
DECLARED = [(name, key) for name, spec in REGISTRY.items() for key in spec.hyperparameters]
#: (class, option) for every option a class refuses
REFUSED = [
    (spec.class_name, option)
    for spec in REGISTRY.values()
    for option in getattr(adamkit, spec.class_name).unavailable_options
]


def _stepped(cls, **kwargs):
    p = torch.nn.Parameter(torch.randn(5))
    optimizer = cls([p], **kwargs)
    p.grad = torch.randn(5)
    optimizer.step()
    p.grad = torch.randn(5)
    return p, optimizer


@pytest.mark.parametrize(("name", "key"), DECLARED)
def test_every_declared_hyperparameter_refuses_a_bad_value_by_name(name, key):
    """Generated from the registry: a string for any declared hyperparameter is refused
    when the optimizer is made, and when written into a group between steps, the error
    naming the argument and its value; the failed step changes nothing."""
    cls = getattr(adamkit, REGISTRY[name].class_name)
    with pytest.raises((TypeError, ValueError), match=rf"{key}.*'bad'|'bad'.*{key}"):
        cls([torch.nn.Parameter(torch.zeros(2))], **{key: "bad"})
    p, optimizer = _stepped(cls)
    before = p.detach().clone()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
    optimizer.param_groups[0][key] = "bad"
    with pytest.raises((TypeError, ValueError), match=rf"{key}.*param_groups\[0\]|param_groups\[0\].*{key}"):
        optimizer.step()
    assert torch.equal(p, before)
    for k, v in state.items():
        assert torch.equal(optimizer.state[p][k], v) if torch.is_tensor(v) else optimizer.state[p][k] == v


@pytest.mark.parametrize(("class_name", "option"), REFUSED)
def test_every_refused_option_is_refused_by_name(class_name, option):
    """Generated from each class's ``unavailable_options``: setting one names it, the
    class, and the value to leave it at."""
    from adamkit.options import DEFAULTS

    samples = {"decouple_lr": True, "master_weights": "fp32", "cautious": True, "accumulation_steps": 2}
    samples |= {"diagnostics": True, "offload": "cpu"}
    value = samples[option]
    with pytest.raises(ValueError, match=rf"{option}={value!r}: {class_name} does not run this option yet; "):
        getattr(adamkit, class_name)([torch.nn.Parameter(torch.zeros(2))], **{option: value})
    assert DEFAULTS[option] != value


TWIN_MODULE = """from dataclasses import replace

from .adam import ADAM
from .base import register

ADAM_TWIN = register(replace(ADAM, name="adam_twin", class_name="AdamTwin", code=8))
"""

TWIN_RUN = """
import torch

import adamkit
from adamkit.algorithms import REGISTRY


class AdamTwin(adamkit.Adam):
    algorithm = "adam_twin"


def run(cls, backend):
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(3000, generator=generator))
    optimizer = cls([param], lr=1e-2, weight_decay=0.1, backend=backend, cautious=backend != "foreach")
    for _ in range(4):
        param.grad = torch.randn(3000, generator=generator)
        optimizer.step()
    assert optimizer.param_groups[0]["backend"] == backend
    return param.detach()


assert list(REGISTRY)[-1] == "adam_twin" and REGISTRY["adam_twin"].code == 8
for backend in ("single_tensor", "foreach", "cpu"):
    assert torch.equal(run(adamkit.Adam, backend), run(AdamTwin, backend)), backend
print("the twin ran on every backend")
"""


def test_an_algorithm_added_as_a_module_of_its_own_runs_on_every_cpu_backend(tmp_path):
    """The registry's promise, run: a copy of the package with one module more in
    adamkit/algorithms (a ninth algorithm, Adam's twin: the ninth code is past the
    eight witness dtypes of the CPU kernel) registers it with no other file touched, and
    it steps as Adam does on the per-tensor, foreach and fused CPU kernels."""
    shutil.copytree(SOURCE, tmp_path / "adamkit", ignore=shutil.ignore_patterns("*.nbi", "*.nbc"))
    (tmp_path / "adamkit" / "algorithms" / "adam_twin.py").write_text(TWIN_MODULE)
    environment = {**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", TWIN_RUN], env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the twin ran on every backend" in result.stdout
