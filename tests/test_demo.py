"""Tests for ``adamkit.experiments`` (objectives, demo) and the ``adamkit`` CLI."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch

from adamkit.cli import main
from adamkit.experiments import demo as demo_module
from adamkit.experiments.demo import EXPERIMENTS, Row
from adamkit.experiments.functions import OBJECTIVES, Objective

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cli_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Row], str]:
    """One run of ``adamkit demo`` (through the CLI), shared by the tests below: its
    output directory, the rows ``run_demo`` returned, and what the command printed."""
    out = tmp_path_factory.mktemp("demo") / "new" / "dir"
    rows: list[Row] = []
    run_demo = demo_module.run_demo

    def recorded(out, **kwargs):
        rows.extend(run_demo(out, **kwargs))
        return rows

    printed = io.StringIO()
    with mock.patch.object(demo_module, "run_demo", recorded), redirect_stdout(printed):
        assert main(["demo", "--out", str(out)]) == 0
    return out, rows, printed.getvalue()


@pytest.fixture(scope="module")
def demo(cli_demo: tuple[Path, list[Row], str]) -> tuple[Path, list[Row]]:
    return cli_demo[:2]


def _row(rows: list[Row], function: str, optimizer: str) -> Row:
    (row,) = [r for r in rows if r.function == function and r.optimizer == optimizer]
    return row


# --------------------------------------------------------------------------- objectives


def _probe_points(obj: Objective) -> list[torch.Tensor]:
    """The start, the minimizers and a few fixed points spread over the plotting window."""
    gen = torch.Generator().manual_seed(0)
    lo = torch.tensor([w[0] for w in obj.window], dtype=torch.float64)
    hi = torch.tensor([w[1] for w in obj.window], dtype=torch.float64)
    spread = [lo + (hi - lo) * torch.rand(obj.dim, generator=gen, dtype=torch.float64) for _ in range(8)]
    fixed = [torch.tensor(p, dtype=torch.float64) for p in (obj.start, *obj.minimizers)]
    return fixed + spread


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradient_matches_autograd(name: str) -> None:
    obj = OBJECTIVES[name]
    for x in _probe_points(obj):
        x = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(obj.value(x), x)
        torch.testing.assert_close(obj.grad(x.detach()), expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_minimum_is_stationary_with_known_value(name: str) -> None:
    obj = OBJECTIVES[name]
    for point in obj.minimizers:
        x = torch.tensor(point, dtype=torch.float64)
        assert obj.value(x).item() == pytest.approx(obj.min_value, abs=1e-12)
        assert torch.all(obj.grad(x).abs() < 1e-12)
    assert obj.value(obj.start_tensor()).item() > obj.min_value


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_value_and_grad_accept_batches(name: str) -> None:
    obj = OBJECTIVES[name]
    points = torch.stack(_probe_points(obj), dim=1)  # (d, n)
    values, grads = obj.value(points), obj.grad(points)
    assert values.shape == points.shape[1:] and grads.shape == points.shape
    for i in range(points.shape[1]):
        torch.testing.assert_close(values[i], obj.value(points[:, i]))
        torch.testing.assert_close(grads[:, i], obj.grad(points[:, i]))


# --------------------------------------------------------------------------- demo


def test_demo_writes_three_pngs(demo: tuple[Path, list[Row]]) -> None:
    out, _ = demo
    assert sorted(p.name for p in out.iterdir()) == ["beale.png", "quadratic.png", "rosenbrock.png"]
    for path in out.iterdir():
        data = path.read_bytes()
        assert len(data) > 1000
        assert data.startswith(PNG_SIGNATURE)


def test_demo_rows_cover_every_pair(demo: tuple[Path, list[Row]]) -> None:
    _, rows = demo
    expected = {(e.objective.name, opt) for e in EXPERIMENTS for opt in e.lrs}
    assert {("quadratic", "Adam"), ("quadratic", "SGD")} <= expected
    for function in ("rosenbrock", "beale"):
        assert {(function, opt) for opt in ("Adam", "AdamW", "AMSGrad", "SGD+momentum")} <= expected
    assert [(r.function, r.optimizer) for r in rows] == [(e.objective.name, opt) for e in EXPERIMENTS for opt in e.lrs]


def test_rows_are_consistent_with_their_trajectories(demo: tuple[Path, list[Row]]) -> None:
    _, rows = demo
    for row in rows:
        obj = OBJECTIVES[row.function]
        traj = row.trajectory
        assert traj.points.shape == (traj.steps + 1, obj.dim)
        assert tuple(traj.points[0]) == obj.start
        assert row.final_point == tuple(traj.points[-1])
        final = torch.tensor(row.final_point, dtype=torch.float64)
        assert row.final_loss == pytest.approx(obj.value(final).item(), rel=1e-12)
        gaps = traj.losses - obj.min_value
        if row.steps_to_tol is None:
            assert all(g > 1e-3 for g in gaps)
        else:
            assert gaps[row.steps_to_tol] <= 1e-3
            assert all(g > 1e-3 for g in gaps[: row.steps_to_tol])


def _seed_adam(x: float, steps: int, alpha: float = 0.1) -> list[float]:
    """The seed's Adam loop on f(x) = (x - 2)^2, in plain Python floats."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = v = 0.0
    path = [x]
    for t in range(1, steps + 1):
        g = 2 * (x - 2)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        x -= alpha * m_hat / (math.sqrt(v_hat) + eps)
        path.append(x)
    return path


def _seed_sgd(x: float, steps: int, alpha: float = 0.1) -> list[float]:
    """The seed's SGD loop on f(x) = (x - 2)^2, in plain Python floats."""
    path = [x]
    for _ in range(steps):
        x -= alpha * 2 * (x - 2)
        path.append(x)
    return path


@pytest.mark.parametrize("optimizer, seed_loop", [("Adam", _seed_adam), ("SGD", _seed_sgd)])
def test_quadratic_matches_seed_loop(demo: tuple[Path, list[Row]], optimizer, seed_loop) -> None:
    _, rows = demo
    row = _row(rows, "quadratic", optimizer)
    assert row.lr == 0.1 and row.trajectory.steps == 50
    expected = torch.tensor(seed_loop(8.0, 50), dtype=torch.float64)
    actual = torch.from_numpy(row.trajectory.points[:, 0])
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- CLI


def test_cli_demo_prints_its_figures_and_refuses_non_empty_dir_without_force(
    cli_demo: tuple[Path, list[Row], str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _, printed = cli_demo
    for name in ("quadratic.png", "rosenbrock.png", "beale.png"):
        assert (out / name).is_file()
        assert str(out / name) in printed
    assert "steps to" in printed and "rosenbrock" in printed

    assert main(["demo", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err

    calls = []
    monkeypatch.setattr("adamkit.experiments.demo.run_demo", lambda out, **kw: calls.append(out) or [])
    assert main(["demo", "--out", str(out), "--force"]) == 0
    assert calls == [out]


def test_cli_demo_refuses_a_file_as_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["demo", "--out", str(target), "--force"]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_cli_help(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 0
    assert "usage: adamkit" in capsys.readouterr().out


def test_cli_version(capsys: pytest.CaptureFixture) -> None:
    from adamkit._version import __version__

    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_cli_without_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "usage: adamkit" in capsys.readouterr().err


def test_python_dash_m_adamkit() -> None:
    from adamkit._version import __version__

    argv = [sys.executable, "-m", "adamkit", "--version"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip() == f"adamkit {__version__}"
