"""The core install is torch + numpy + numba: plots, the CLI's experiments and SciPy
are extras, and what needs one says which when it is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

import adamkit

#: the extras' top-level modules and distributions (as site-packages entries start)
EXTRA_ENTRIES = ("matplotlib", "mpl_toolkits", "scipy", "sklearn", "scikit_learn")


def test_the_core_requirements_are_torch_numpy_and_numba():
    core = {Requirement(r).name for r in requires("adamkit") if "extra ==" not in r}
    assert core == {"numpy", "torch", "numba"}


def _install_without_extras(tmp_path: Path) -> list[str]:
    """adamkit as ``pip install --no-deps`` installs it (from a copy of its source, so
    the wheel's package list is what is tested), and a site directory of links to this
    environment's packages except the extras' (no .pth files): the ``PYTHONPATH`` of a
    core install."""
    repo = Path(adamkit.__file__).resolve().parents[2]
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc", "*.egg-info")
    shutil.copytree(repo / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    target = tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    site = Path(sysconfig.get_paths()["purelib"])
    lean = tmp_path / "site"
    lean.mkdir()
    for entry in site.iterdir():
        keep = not entry.name.lower().startswith(EXTRA_ENTRIES + ("adamkit", "__editable__"))
        if keep and entry.suffix != ".pth":
            (lean / entry.name).symlink_to(entry)
    return [str(target), str(lean)]


def _run_without_extras(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (``python -S``) on a core install."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_install_without_extras(tmp_path))}
    return subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_without_the_extras_adamkit_steps_and_the_cli_names_the_extra_it_needs(tmp_path):
    code = f"""
import sys, torch, adamkit
from adamkit import cli
assert "installed" in adamkit.__file__, adamkit.__file__
p = torch.nn.Parameter(torch.randn(10))
p.grad = torch.randn(10)
adamkit.AdamW([p]).step()
assert not {{"matplotlib", "scipy", "sklearn"}} & set(sys.modules), sorted(sys.modules)
for command in ("demo", "viz", "reproduce"):
    print(command, cli.main([command, "--out", {str(tmp_path / "out")!r}]))
try:
    adamkit.minimize
except ImportError as exc:
    print("minimize:", exc)
"""
    result = _run_without_extras(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["demo 2", "viz 2", "reproduce 2"]
    assert "pip install 'adamkit[scipy]'" in result.stdout
    lines = result.stderr.splitlines()
    assert "adamkit demo needs matplotlib, which the 'cli' extra installs: pip install 'adamkit[cli]'" in lines[0]
    assert "adamkit viz needs matplotlib" in lines[1]
    assert "adamkit reproduce needs matplotlib, sklearn, which the 'experiments' extra installs" in lines[2]
    assert not (tmp_path / "out").exists()
