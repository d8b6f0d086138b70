"""Test session set-up.

The suite runs on the CPU; there, Triton kernels run under Triton's CPU interpreter,
so the conformance suite tests them on every machine (this must happen before triton
loads).  ``ADAMKIT_TEST_DEVICE=cuda`` runs the conformance suite and the CUDA tests
(``test_cuda.py``) on a GPU instead, with Triton's real compiler."""

import os

if os.environ.get("ADAMKIT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
