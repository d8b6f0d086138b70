"""Run to run, one result: every backend under every storage mode gives the same bits in
each of 20 fresh processes, at the machine's own thread settings (issue 35: the
single-tensor path with split master weights once differed in 2 processes of 10: torch's
first MKL vector-math call, made on two threads after numba's pool had run; see
``adamkit.kernels.cpu._settle_torch_vector_math``)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from matrix import CPU_BACKENDS

PROCESSES = 20


def test_every_backend_and_storage_mode_gives_one_result_in_fresh_processes():
    worker = Path(__file__).with_name("determinism_worker.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}

    def fresh_process(_) -> str:
        run = subprocess.run(
            [sys.executable, str(worker), *CPU_BACKENDS], capture_output=True, text=True, timeout=600, env=env
        )
        assert run.returncode == 0, run.stderr[-3000:]
        return run.stdout

    outputs = [fresh_process(0)]  # alone: whatever it compiles is cached for the others
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs += pool.map(fresh_process, range(1, PROCESSES))
    runs = [dict(line.split() for line in output.splitlines()) for output in outputs]
    assert len(runs[0]) == 1 + len(CPU_BACKENDS) * 9 - (7 if "triton" in CPU_BACKENDS else 0)
    differed = [run["first-vector-math-calls"] for run in runs if run["first-vector-math-calls"] != "same"]
    assert not differed, f"torch's first vector-math calls differed from its second in {differed}"
    for name in runs[0]:
        digests = {run[name] for run in runs}
        assert len(digests) == 1, f"{name}: {len(digests)} different results in {PROCESSES} fresh processes"
