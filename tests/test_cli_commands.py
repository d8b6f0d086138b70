"""``adamkit viz``, ``bench`` and ``reproduce``: they run, write what they say, refuse bad
arguments and non-empty output directories with exit status 2, report failures with 1."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from adamkit.cli import main
from adamkit.experiments.functions import OBJECTIVES
from adamkit.experiments.paper import EXPERIMENTS
from adamkit.experiments.progress import progress


@pytest.mark.parametrize("command", ["demo", "viz", "bench", "reproduce"])
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: adamkit {command}" in capsys.readouterr().out


# --------------------------------------------------------------------------- viz


def test_viz_writes_png_and_gif_and_will_not_overwrite(tmp_path, capsys):
    out = tmp_path / "viz"
    assert main(["viz", "saddle", "quadratic", "--steps", "30", "--animate", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["quadratic.png", "saddle.gif", "saddle.png"]
    assert str(out / "saddle.gif") in printed.out and "viz: 3/3" in printed.err
    with Image.open(out / "saddle.gif") as gif:
        assert gif.n_frames > 10
    assert Image.open(out / "saddle.png").size == (2000, 600)

    assert main(["viz", "saddle", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["viz", "saddle", "--steps", "5", "--out", str(out), "--force"]) == 0


def test_viz_without_names_draws_every_function(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr("adamkit.experiments.viz.run_viz", lambda names, out, **kw: drawn.extend(names) or [])
    assert main(["viz", "--out", str(tmp_path / "v")]) == 0
    assert drawn == list(OBJECTIVES)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["viz", "himalaya"], "unknown function 'himalaya'; choose from quadratic, rosenbrock"),
        (["viz", "--steps", "0"], "expected a positive integer, got 0"),
        (["viz", "--steps", "many"], "expected a positive integer, got 'many'"),
        (["bench", "--cases", "a,z"], "unknown cases 'z'; choose from a, b, c, d"),
        (["bench", "--rounds", "-3"], "expected a positive integer, got -3"),
        (["bench", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["reproduce", "imagenet"], "unknown experiment 'imagenet'; choose from logreg,"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "o")] if argv[0] != "bench" else argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- bench


def test_bench_quick_prints_a_table(capsys):
    torch.manual_seed(0)
    assert main(["bench", "--quick", "--cases", "b,d", "--rounds", "1", "--device", "cpu"]) == 0
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3)), "bench drew from the caller's random generator"
    out = capsys.readouterr().out
    assert "device cpu" in out and "(b) 1M fp32 params in 200 tensors" in out and "(d) 5M bf16" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("  torch", "  adamkit"))]
    assert [" ".join(r[:2]) for r in rows[:4]] == ["torch for-loop", "torch foreach", "torch fused", "adamkit cpu"]
    fused = [r for r in rows if r[:2] == ["torch", "fused"]][0]
    assert float(fused[3]) == 1.0  # its own ratio


def test_bench_times_5_rounds_quick_20_otherwise_and_what_rounds_says(monkeypatch, capsys):
    from adamkit.experiments import bench

    taken = []

    def first_case(case, rounds, *args, **kwargs):  # (the rounds it is asked for; then the user stops it)
        taken.append(rounds)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_case", first_case)
    for options in (["--quick"], [], ["--quick", "--rounds", "3"], ["--rounds", "7"]):
        assert main(["bench", *options, "--cases", "b", "--device", "cpu"]) == 130
    assert taken == [5, 20, 3, 7]


@pytest.mark.parametrize("argv", [["memory", "gpt2"], ["memory", "--layers", "1", "gpt2", "--time"]], ids=" ".join)
def test_memory_leaves_the_callers_random_generator_as_it_was(argv, capsys):
    """Its settings build optimizers that round stochastically: they once drew their
    seeds from torch's global generator."""
    torch.manual_seed(0)
    assert main(argv) == 0
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_on_cuda_without_a_device_is_refused(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# --------------------------------------------------------------------------- reproduce


@pytest.fixture(scope="module")
def quick_reproduction(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "out"
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    return out


def test_reproduce_writes_every_figure_curve_and_the_report(quick_reproduction):
    out = quick_reproduction
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    assert [e["name"] for e in results["experiments"]] == list(EXPERIMENTS)
    report = (out / "report.md").read_text()
    assert "scikit-learn's 8x8 digits" in report and "quick mode" in report and "too short" in report
    assert "**no**" not in report and "does not hold" not in report
    for entry in results["experiments"]:
        for name in entry["files"]:
            assert (out / name).stat().st_size > (10_000 if name.endswith(".png") else 100), name
            assert f"({name})" in report
        png = out / f"{entry['name']}.png"
        assert Image.open(png).size[0] >= 700
        verdict = "yes" if entry["holds"] else "**not shown by this quick run**"  # (a quick run is no finding)
        assert f"| [{entry['title']}](#{entry['name']}) | {verdict} |" in report
        assert isinstance(entry["holds"], bool) and entry["found"] and entry["paper"]


def test_reproduce_curves_are_the_plotted_runs(quick_reproduction):
    lines = (quick_reproduction / "logreg.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,Adam (lr ")
    assert len(lines) == 1 + 5  # quick: 5 epochs
    search = (quick_reproduction / "mlp_lr_search.csv").read_text().splitlines()
    assert len(search) == 1 + 5 * 5  # five optimizers, five rates


def test_reproduce_refuses_a_non_empty_directory(quick_reproduction, capsys):
    assert main(["reproduce", "amsgrad", "--quick", "--out", str(quick_reproduction)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_failing_run_exits_1(tmp_path, monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("adamkit.experiments.paper.run_reproduce", explode)
    assert main(["reproduce", "amsgrad", "--out", str(tmp_path / "r")]) == 1
    assert "adamkit reproduce: failed: RuntimeError: out of memory" in capsys.readouterr().err


def test_an_interrupted_run_exits_130(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("adamkit.experiments.viz.run_viz", interrupt)
    assert main(["viz", "--out", str(tmp_path / "v")]) == 130


# --------------------------------------------------------------------------- progress bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_into_a_file_writes_few_plain_lines():
    stream = io.StringIO()
    with progress(1000, "work", stream=stream, lines=10) as tick:
        for i in range(1000):
            tick(f"item {i}")
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10 and lines[-1] == "work: 1000/1000 item 999"


def test_progress_on_a_terminal_is_a_tqdm_bar_redrawn_in_place():
    stream = _Terminal()
    with progress(4, "work", stream=stream) as tick:
        for i in range(4):
            tick(f"item {i}")
    text = stream.getvalue()
    final = text.split("\r")[-1]
    assert text.count("\n") == 1 and text.count("\r") > 1  # one line, redrawn
    assert final.startswith("work: 100%") and "4/4" in final and "item 3" in final


def test_on_the_saddle_radam_leaves_the_ridge_last_of_the_adam_family():
    """RAdam warms its step up (five momentum-SGD steps, then the rectification r_t: 0.026
    at step 6, 0.22 at step 100 with beta2 = 0.999): from 1e-3 off the ridge it leaves
    several times later than the rest of the family (the viz's claim, measured)."""
    import numpy as np

    from adamkit.experiments.demo import run_experiment
    from adamkit.experiments.viz import VIZ_EXPERIMENTS

    runs = run_experiment(VIZ_EXPERIMENTS["saddle"])
    left = {name: int(np.argmax(np.abs(run.points[:, 1]) > 0.5)) for name, run in runs.items()}
    assert all(0 < steps for steps in left.values()), left  # every method leaves it
    normalised = [left[name] for name in ("Adam", "AdamW", "AMSGrad", "NAdam", "ADOPT")]
    assert max(normalised) <= 25 and left["RAdam"] >= 3 * max(normalised), left


@pytest.mark.parametrize("command", ["demo", "viz", "reproduce"])
def test_an_out_that_cannot_be_written_is_refused_before_the_run(command, capsys, tmp_path):
    """Checked by making the directory and writing a file there, before anything runs."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([command, "--out", str(blocker / "inside")]) == 2
    assert "cannot write there" in capsys.readouterr().err
