"""Test session set-up.

The suite runs on the CPU; there, Triton kernels run under Triton's CPU interpreter,
so the conformance suite tests them on every machine (this must happen before triton
loads).  ``ADAMKIT_TEST_DEVICE=cuda`` runs the conformance suite and the CUDA tests
(``test_cuda.py``) on a GPU instead, with Triton's real compiler."""

import os

if os.environ.get("ADAMKIT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after the environment is set: triton must not load first)
import torch  # noqa: E402


@pytest.fixture
def float64_default():
    """torch's default dtype float64 for the test (torch keeps NAdam's ``mu_product`` and
    other scalar state in it), restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def seeded_global_generator():
    """Every test starts from the same state of torch's global generator, so what a test
    draws from it (an optimizer's default stochastic-rounding seed among other things)
    does not depend on which tests ran before it in its worker."""
    torch.manual_seed(0)
