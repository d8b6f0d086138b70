"""The hostile-use fuzzer (``tests/hostile_fuzz.py``), one subprocess per backend: its
tensors end at guard pages, so an out-of-bounds access kills the subprocess, and the
test reports the signal; any other failure is the sweep's sequence (every mutation
variant alone, with every optimizer row) or hypothesis's shrunk counterexample."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from matrix import CPU_BACKENDS

#: random sequences per backend, after the sweep (the interpreted Triton kernel is slow: fewer)
EXAMPLES = {"cpu": 300, "triton": 30, "foreach": 200, "single_tensor": 200}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages via mprotect (Linux)")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_sequence_of_user_actions_reaches_outside_a_tensor_or_half_changes_a_step(backend):
    worker = Path(__file__).with_name("hostile_fuzz.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, str(worker), backend, str(EXAMPLES[backend])],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=worker.parent,
    )
    if run.returncode < 0:
        name = signal.Signals(-run.returncode).name
        pytest.fail(f"the fuzzer's process died of {name} (an access outside a tensor?)\n{run.stdout[-3000:]}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert run.stdout.strip().endswith("ok")
