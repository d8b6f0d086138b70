"""torch.compile: a compiled training step with an adamkit optimizer gives the eager
results, and a scheduler changing the learning rate (a tensor, or a float) never
recompiles anything.  Compilations are counted with a counting dynamo backend."""

from __future__ import annotations

import pytest
import torch
from matrix import CPU_BACKENDS, DEVICE

import adamkit


def train(backend: str, lr, *, compiled: bool, steps: int = 5, device: str = "cpu", release=False, **options):
    """``steps`` steps of a tiny model under StepLR (its params stepped in backward with
    ``release``); returns the model, optimizer and the number of graphs compiled after
    each step (empty when not compiled)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(device)
    lr = lr.clone().to(device) if isinstance(lr, torch.Tensor) else lr  # schedulers fill a tensor lr in place
    opt = adamkit.AdamW(model.parameters(), lr=lr, backend=backend, **options)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    if release:
        adamkit.gradient_release(model, opt)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def train_step(x):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        scheduler.step()

    if compiled:
        train_step = torch.compile(train_step, backend=counting_backend)
    x = torch.randn(16, 8).to(device)
    counts = []
    for _ in range(steps):
        train_step(x)
        counts.append(len(graphs))
    return model, opt, counts


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lr", [torch.tensor(0.01), 0.01], ids=["tensor_lr", "float_lr"])
def test_compiled_step_matches_eager_and_never_recompiles(backend, lr):
    check_compiled_against_eager(backend, lr, "cpu")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="set ADAMKIT_TEST_DEVICE=cuda on a machine with a GPU")
@pytest.mark.parametrize("options", [{}, {"capturable": True}], ids=["default", "capturable"])
@pytest.mark.parametrize("lr", [torch.tensor(0.01), 0.01], ids=["tensor_lr", "float_lr"])
def test_on_cuda_the_triton_step_compiles_once_as_the_lr_changes(lr, options):
    check_compiled_against_eager("triton", lr, "cuda", **options)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("offload", [None, "cpu"])
def test_a_compiled_step_under_gradient_release_never_recompiles(backend, offload):
    """The release hooks run eagerly inside a compiled train step (dynamo had traced
    them, guarding on each param and on the lr: 66 graphs for 6 steps)."""
    if offload and backend not in adamkit.options.HOST_BACKENDS:
        pytest.skip(f"backend={backend!r} does not run on the host")
    check_compiled_against_eager(backend, 0.01, "cpu", release=True, offload=offload)


def check_compiled_against_eager(backend, lr, device, **options):
    compiled_model, compiled_opt, counts = train(backend, lr, compiled=True, device=device, **options)
    eager_model, eager_opt, _ = train(backend, lr, compiled=False, device=device, **options)
    assert counts[0] >= 1, "the training step was not compiled at all"
    assert counts == [counts[0]] * len(counts), f"recompiled as the lr changed: graphs after each step {counts}"
    assert float(compiled_opt.param_groups[0]["lr"]) == pytest.approx(0.01 / 2**5)  # the scheduler ran
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)
        for key, value in compiled_opt.state[p].items():
            assert torch.equal(value, eager_opt.state[q][key]), key


def test_compiled_step_with_quantized_states_and_capturable_tensors():
    options = {"state_precision": "int8", "capturable": True}
    compiled_model, _, counts = train("foreach", torch.tensor(0.01), compiled=True, **options)
    eager_model, _, _ = train("foreach", torch.tensor(0.01), compiled=False, **options)
    assert counts == [counts[0]] * len(counts)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)


def test_compiling_the_step_itself_runs_it_eagerly():
    p = torch.nn.Parameter(torch.ones(4))
    opt = adamkit.Adam([p], lr=0.1)
    p.grad = torch.ones(4)
    torch.compile(opt.step, backend="eager")()
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.9))
