"""On a GPU: what only a CUDA device can show.  Run with ``ADAMKIT_TEST_DEVICE=cuda``
(Triton's real compiler; ``scripts/gpu_check.sh`` does it); skipped otherwise.

- CUDA params default to the Triton kernel, with no warning.
- A captured CUDA graph of ``step()`` (capturable, tensor lr) replays exactly as the
  eager steps do, with the lr and gradients changed between replays in place.
- With a ``GradScaler``, a step whose gradients hold an inf leaves params and state
  untouched and is not counted; the others follow torch's fused Adam.
- The Triton kernel follows torch's fused CUDA Adam to fp32 rounding.

The conformance suite itself runs on the GPU in the same way
(``ADAMKIT_TEST_DEVICE=cuda pytest tests/test_conformance.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from matrix import DEVICE

import adamkit

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="set ADAMKIT_TEST_DEVICE=cuda on a machine with a GPU")


def params_like(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype, generator=g)) for s in shapes]


SHAPES = [(1024, 1024), (3000,), (7, 5), ()]


def test_cuda_params_default_to_the_triton_kernel_without_a_warning():
    params = params_like(SHAPES)
    for p in params:
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = adamkit.AdamW(params)
        opt.step()
    assert "triton" in opt._stepper.cache(opt.param_groups[0])


STORAGE = {
    "fp32": (torch.float32, {}),
    "bf16-nearest": (torch.bfloat16, {}),
    "bf16-nearest-fp32-states": (torch.bfloat16, {"state_precision": "fp32"}),
    "bf16-kahan": (torch.bfloat16, {"rounding": "kahan"}),
    "bf16-stochastic": (torch.bfloat16, {"rounding": "stochastic"}),
    "bf16-master-int8": (torch.bfloat16, {"master_weights": "fp32", "state_precision": "int8"}),
    "fp16-kahan-int8": (torch.float16, {"rounding": "kahan", "state_precision": "int8"}),
    "int8": (torch.float32, {"state_precision": "int8"}),
    "int4-amsgrad": (torch.float32, {"state_precision": "int4", "amsgrad": True}),
}


LRS = [1e-2, 5e-3, 2e-3, 1e-3, 5e-4]


def steps_with_changing_lr(storage: str, graphed: bool):
    """Steps with capturable AdamW and a tensor lr, refilling the lr and the static
    gradients in place: all eager, or the first eager and the rest by replaying a
    graph captured once.  Returns the params and their state."""
    dtype, options = STORAGE[storage]
    params = params_like(SHAPES, dtype)
    grads = [torch.zeros_like(p) for p in params]
    for p, grad in zip(params, grads):
        p.grad = grad
    lr = torch.tensor(LRS[0], device="cuda")
    opt = adamkit.AdamW(params, lr=lr, capturable=True, weight_decay=0.1, seed=0, backend="triton", **options)
    g = torch.Generator(device="cuda").manual_seed(1)
    graph = None
    for step, value in enumerate(LRS):
        lr.fill_(value)
        for grad in grads:
            grad.copy_(torch.randn(grad.shape, device="cuda", generator=g).to(dtype))
        if graph is not None:
            graph.replay()
            continue
        opt.step()  # the first step is eager either way: state and compiled kernel exist before capture
        if graphed and step == 0:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records a step, runs nothing
                opt.step()
    torch.cuda.synchronize()
    return params, [dict(opt.state[p]) for p in params]


@pytest.mark.parametrize("storage", list(STORAGE))
def test_a_captured_graph_replays_exactly_as_eager_steps(storage):
    eager_params, eager_state = steps_with_changing_lr(storage, graphed=False)
    graph_params, graph_state = steps_with_changing_lr(storage, graphed=True)
    for p_eager, p_graph in zip(eager_params, graph_params):
        assert torch.equal(p_eager, p_graph)
    for s_eager, s_graph in zip(eager_state, graph_state):
        assert s_eager.keys() == s_graph.keys()
        for key, value in s_eager.items():
            assert torch.equal(value, s_graph[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grad_scaler_skips_inf_steps_and_follows_torch_fused(dtype):
    """(torch's GradScaler cannot check bf16 gradients on CUDA: fp32 and fp16 params.)"""
    runs = {}
    for name, make in {
        "adamkit": lambda ps: adamkit.Adam(ps, lr=1e-2, backend="triton"),
        "torch": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    }.items():
        params = params_like([(256, 64), (64,)], dtype)
        opt = make(params)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
        g = torch.Generator(device="cuda").manual_seed(2)
        for step in range(6):
            scaler.scale(torch.ones((), device="cuda"))  # the loss: a scaler steps only after scaling one
            for p in params:
                p.grad = (torch.randn(p.shape, device="cuda", generator=g) * scaler.get_scale()).to(dtype)
            if step == 3:
                params[0].grad[0, 0] = float("inf")
                before = [p.detach().clone() for p in params]
                state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
            scaler.step(opt)
            scaler.update()
            if step == 3:
                for p, b in zip(params, before):
                    assert torch.equal(p.detach(), b)
                for p, s in zip(params, state_before):
                    for key, value in s.items():
                        assert torch.equal(opt.state[p][key].to(value.device), value), key
        assert [float(opt.state[p]["step"]) for p in params] == [5.0, 5.0]
        runs[name] = [p.detach().float() for p in params]
    # fp32 math both, in different orders.  fp16 params and moments: a moment may round
    # to the neighbouring fp16 value, which changes each update (at most ~3 lr) by up to
    # 2^-10 relative, so 5 updates may move a param by 5 * 3 * 1e-2 * 2^-10 < 2e-4,
    # and the param itself may round to a neighbour (2^-10 relative)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (2.0**-9, 2e-4)
    for ours, theirs in zip(runs["adamkit"], runs["torch"]):
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


def test_triton_follows_torch_fused_adamw():
    shapes = [(2048, 512), (512,), (100, 3), ()]
    ours_params, torch_params = params_like(shapes), params_like(shapes)
    ours = adamkit.AdamW(ours_params, lr=1e-3, weight_decay=0.1, backend="triton")
    theirs = torch.optim.AdamW(torch_params, lr=1e-3, weight_decay=0.1, fused=True)
    g = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(20):
        for a, b in zip(ours_params, torch_params):
            a.grad = torch.randn(a.shape, device="cuda", generator=g)
            b.grad = a.grad.clone()
        ours.step()
        theirs.step()
    # Both in fp32, in different orders (torch's kernel contracts multiply-adds): each
    # step rounds m's O(|g|) terms a few times, errors that then decay by beta1 per
    # step, so m may differ by a few ulps of max|g| / (1 - beta1) where it cancels to
    # near zero.  v sums positive terms, but torch's fused kernel weighs them by
    # 1 - fp32(beta2) = 0.00099998713 where torch's for-loop and adamkit take
    # fp32(1 - beta2) = 0.001: all of v differs by that ratio (1.29e-5), plus roundings.
    grad_max = max(float(p.grad.abs().max()) for p in ours_params)
    m_atol = 4 * 2.0**-24 * grad_max / (1 - 0.9)
    beta2 = torch.tensor(0.999, dtype=torch.float32).item()
    v_rtol = (torch.tensor(1 - 0.999, dtype=torch.float32).item() - (1 - beta2)) / (1 - 0.999) + 4 * 20 * 2.0**-24
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"], rtol=1e-5, atol=m_atol)
        torch.testing.assert_close(ours.state[a]["exp_avg_sq"], theirs.state[b]["exp_avg_sq"], rtol=v_rtol, atol=0)


@pytest.mark.parametrize("backend", ["single_tensor", "foreach"])
def test_schedule_free_adamw_equals_the_schedulefree_package_on_cuda(backend):
    """ScheduleFreeAdamW on CUDA params (the per-tensor paths: the fused kernels do not run
    it) issues the ``schedulefree`` package's ops in its order, so on the same device the
    bits are the same, through an eval/train switch."""
    schedulefree = pytest.importorskip("schedulefree")
    ours_params, theirs_params = params_like(SHAPES), params_like(SHAPES)
    ours = adamkit.ScheduleFreeAdamW(ours_params, lr=1e-2, weight_decay=0.1, warmup_steps=3, backend=backend)
    theirs = schedulefree.AdamWScheduleFree(
        theirs_params, lr=1e-2, weight_decay=0.1, warmup_steps=3, foreach=backend == "foreach"
    )
    theirs.train()
    g = torch.Generator(device="cuda").manual_seed(1)
    for step in range(10):
        for a, b in zip(ours_params, theirs_params):
            a.grad = torch.randn(a.shape, device="cuda", generator=g)
            b.grad = a.grad.clone()
        ours.step(), theirs.step()
        if step == 4:
            ours.eval(), theirs.eval()
            ours.train(), theirs.train()
    ours.eval(), theirs.eval()
    for a, b in zip(ours_params, theirs_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [{}, {"rounding": "kahan", "state_precision": "int8"}], ids=["bf16", "kahan-int8"])
def test_bf16_subnormals_are_read_as_the_cpu_kernel_reads_them(options):
    """bf16 params and gradients below bf16's smallest normal number (1.2e-38): Triton's
    interpreter converts them wrongly (so the CPU parity runs hold none), and this checks
    the GPU's conversion: the Triton kernel stores the numba kernel's bits."""
    tiny = torch.tensor([1.0e-39, -4.6e-40, 1.0e-38, 9.2e-41] * 64, dtype=torch.bfloat16)
    runs = {}
    for backend, device in (("triton", DEVICE), ("cpu", torch.device("cpu"))):
        p = torch.nn.Parameter(tiny.clone().to(device))
        opt = adamkit.AdamW([p], lr=1e-40, weight_decay=0.5, backend=backend, seed=1, **options)
        for step in range(3):
            p.grad = (tiny * (step + 1)).to(device)
            opt.step()
        runs[backend] = (p.detach().cpu(), {k: v.cpu() for k, v in opt.state[p].items()})
    (p_gpu, s_gpu), (p_cpu, s_cpu) = runs["triton"], runs["cpu"]
    assert torch.equal(p_gpu.view(torch.int16), p_cpu.view(torch.int16))
    for key, value in s_cpu.items():
        assert torch.equal(s_gpu[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
