"""The examples run, and log what they say they log."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tensorboard_example_logs_every_stat_of_every_group(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stats = load("tensorboard_stats").train(steps=20, logdir=str(tmp_path), log_every=5)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name, figures in zip(["weights", "biases"], stats):
        for key, value in figures.items():
            logged = events.Scalars(f"{name}/{key}")
            assert [e.step for e in logged] == [5, 10, 15, 20]
            assert logged[-1].value == pytest.approx(value, rel=1e-6)
    assert "loss" in tags and stats[0]["update_rms"] > 0 and stats[0]["grad_norm"] > 0
