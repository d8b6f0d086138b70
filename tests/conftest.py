"""Test session set-up: without a GPU, Triton kernels run under its CPU interpreter,
so the conformance suite tests them here too (this must happen before triton loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
