"""``adamkit.gradient_release``: params stepped in backward equal normal stepping, bit for
bit, with a scheduler, across a save/load, and with gradients freed."""

from __future__ import annotations

import io

import pytest
import torch
from matrix import CPU_BACKENDS

import adamkit


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)) for _ in range(8)]
    return model, data


def make_optimizer(model, backend, cls=adamkit.AdamW, **options):
    decay, rest = [model[0].weight, model[2].weight], [model[0].bias, model[2].bias]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}]
    opt = cls(groups, lr=1e-2, backend=backend, **options)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def train(model, opt, scheduler, data, release: bool, reload_at: int | None = None):
    handle = adamkit.gradient_release(model, opt) if release else None
    for step, (x, y) in enumerate(data):
        if step == reload_at:  # save and load mid-run, into the same (attached) optimizer
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt.load_state_dict(torch.load(buffer))
        torch.nn.functional.mse_loss(model(x), y).backward()
        if release:
            assert all(p.grad is None for p in model.parameters())  # freed in backward
        opt.step()
        opt.zero_grad()
        scheduler.step()
    if handle is not None:
        handle.remove()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [{}, {"state_precision": "int8"}], ids=["fp32", "int8"])
@pytest.mark.parametrize("reload_at", [None, 4])
def test_release_equals_normal_stepping(backend, options, reload_at):
    normal_model, data = model_and_data()
    opt, scheduler = make_optimizer(normal_model, backend, **options)
    train(normal_model, opt, scheduler, data, release=False, reload_at=reload_at)

    released_model, _ = model_and_data()
    released_opt, released_scheduler = make_optimizer(released_model, backend, **options)
    train(released_model, released_opt, released_scheduler, data, release=True, reload_at=reload_at)

    assert all(torch.equal(a, b) for a, b in zip(normal_model.parameters(), released_model.parameters()))
    assert opt.state_dict()["param_groups"] == released_opt.state_dict()["param_groups"]
    mine, theirs = opt.state_dict()["state"], released_opt.state_dict()["state"]
    assert all(torch.equal(mine[i][k], theirs[i][k]) for i in mine for k in mine[i])


@pytest.mark.parametrize("backend", ["single_tensor", "cpu"])
@pytest.mark.parametrize("cls", [adamkit.NAdam, adamkit.RAdam, adamkit.ADOPT], ids=lambda c: c.__name__)
def test_the_family_s_release_equals_normal_stepping(backend, cls):
    normal_model, data = model_and_data()
    opt, scheduler = make_optimizer(normal_model, backend, cls)
    train(normal_model, opt, scheduler, data, release=False, reload_at=4)
    released_model, _ = model_and_data()
    released_opt, released_scheduler = make_optimizer(released_model, backend, cls)
    train(released_model, released_opt, released_scheduler, data, release=True, reload_at=4)
    assert all(torch.equal(a, b) for a, b in zip(normal_model.parameters(), released_model.parameters()))
    mine, theirs = opt.state_dict()["state"], released_opt.state_dict()["state"]
    assert all(torch.equal(mine[i][k], theirs[i][k]) for i in mine for k in mine[i])


def test_a_state_dict_saved_under_release_loads_into_torch():
    model, data = model_and_data()
    opt, scheduler = make_optimizer(model, "cpu")
    train(model, opt, scheduler, data[:3], release=True)
    torch_opt = torch.optim.AdamW(
        [{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias]}]
    )
    torch_opt.load_state_dict(opt.state_dict())
    assert torch.equal(torch_opt.state[model[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])


def test_remove_restores_normal_stepping_and_errors_are_clear():
    model, data = model_and_data()
    opt, _ = make_optimizer(model, "cpu")
    handle = adamkit.gradient_release(model, opt)
    with pytest.raises(RuntimeError, match="already has gradient release attached"):
        adamkit.gradient_release(model, opt)
    handle.remove()
    x, y = data[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)
    with pytest.raises(TypeError, match="needs an adamkit optimizer, got SGD"):
        adamkit.gradient_release(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"params \[0\] of model_or_params are not in the optimizer"):
        adamkit.gradient_release([torch.nn.Parameter(torch.ones(1))], opt)


def scaled_training(backend, release: bool, poison: tuple[int, int] | None = None, steps: int = 4):
    """``steps`` iterations of the usual GradScaler loop; ``poison=(step, layer)`` makes
    that layer's weight gradient infinite at that step.  Returns the model, the
    optimizer, the scaler and the params and states right before the poisoned step."""
    model, data = model_and_data()
    opt, _ = make_optimizer(model, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    handle = adamkit.gradient_release(model, opt, scaler=scaler) if release else None
    before = None
    for step, (x, y) in enumerate(data[:steps]):
        hook = None
        if poison is not None and step == poison[0]:
            before = ([p.detach().clone() for p in model.parameters()], copy_state(opt))
            hook = model[poison[1]].weight.register_hook(lambda g: g * float("inf"))
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if hook is not None:
            hook.remove()
    if handle is not None:
        handle.remove()
    return model, opt, scaler, before


def copy_state(opt):
    return {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_release_with_a_grad_scaler_equals_scaled_normal_stepping(backend):
    """Power-of-two scales unscale exactly: gradient release under a GradScaler gives
    the bits of normal stepping under the same scaler."""
    normal, normal_opt, normal_scaler, _ = scaled_training(backend, release=False)
    released, released_opt, released_scaler, _ = scaled_training(backend, release=True)
    assert released_scaler.get_scale() == normal_scaler.get_scale() == 2.0**12
    for p, q in zip(released.parameters(), normal.parameters()):
        assert torch.equal(p, q)
        for key, value in normal_opt.state[q].items():
            assert torch.equal(released_opt.state[p][key], value), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_release_with_a_grad_scaler_skips_the_param_with_an_inf_and_backs_off(backend):
    """The last layer's gradient comes first in backward: it is stepped; the first
    layer's weight gets an inf and is left exactly as it was; the scale halves and
    training goes on."""
    model, opt, scaler, (params_before, state_before) = scaled_training(backend, release=True, poison=(2, 0), steps=3)
    poisoned = model[0].weight
    index = [id(p) for p in model.parameters()].index(id(poisoned))
    assert torch.equal(poisoned, params_before[index])
    for key, value in state_before[poisoned].items():
        assert torch.equal(opt.state[poisoned][key], value), key
    assert not torch.equal(model[2].weight, params_before[2])  # stepped before the inf showed up
    assert scaler.get_scale() == 2.0**11
    assert opt.state[model[2].weight]["step"].item() == 3 and opt.state[poisoned]["step"].item() == 2


def test_release_rejects_something_that_is_not_a_grad_scaler():
    model, _ = model_and_data()
    opt, _ = make_optimizer(model, "single_tensor")
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler or None, got float"):
        adamkit.gradient_release(model, opt, scaler=1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_skip_nonfinite_under_release_skips_the_param_whose_gradient_is_bad(backend):
    """Under release each param is stepped as its gradient arrives, so skip_nonfinite
    skips the param whose own gradient holds a NaN (its state untouched) and steps the
    others, as a run without release steps a group holding only them (documented: the
    whole group cannot wait for the last gradient)."""
    model, data = model_and_data()
    twin, _ = model_and_data()
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, backend=backend, skip_nonfinite=True)
    poisoned = model[0].weight
    others = [p for p in twin.parameters() if p is not twin[0].weight]
    plain = adamkit.AdamW(others, lr=1e-2, backend=backend)
    handle = adamkit.gradient_release(model, opt)
    poisoned.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    x, y = data[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    handle.remove()
    torch.nn.functional.mse_loss(twin(x), y).backward()
    plain.step()
    assert torch.equal(poisoned, twin[0].weight) and not opt.state.get(poisoned)
    for p, q in zip(model.parameters(), twin.parameters()):
        if p is not poisoned:
            assert torch.equal(p, q) and not torch.equal(p, model_and_data()[0].state_dict()[_name(model, p)])


def assert_same_weights(model, twin) -> None:
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def _name(model, param) -> str:
    return next(name for name, p in model.named_parameters() if p is param)


def test_a_frozen_backbone_left_out_of_the_optimizer_is_accepted():
    """The usual fine-tuning set-up: only the trainable params in the optimizer, the
    module passed whole (its frozen params get no hook, and need not be in it)."""
    model, data = model_and_data()
    twin, _ = model_and_data()
    for m in (model, twin):
        m[0].requires_grad_(False)
    opt = adamkit.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    plain = adamkit.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    handle = adamkit.gradient_release(model, opt)
    for x, y in data[:3]:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        plain.step()
        plain.zero_grad()
    handle.remove()
    assert_same_weights(model, twin)


class SharedUnderReentrantCheckpoints(torch.nn.Module):
    """One layer applied three times, each under reentrant activation checkpointing:
    autograd accumulates into its .grad once per checkpointed block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.shared, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 1)

    def forward(self, x):
        x = self.first(x)  # (a reentrant checkpoint's input must require grad)
        for _ in range(3):
            x = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.shared(t)), x, use_reentrant=True)
        return self.head(x)


@pytest.mark.parametrize("offload", [None, "cpu"])
def test_a_second_gradient_in_one_backward_is_refused(offload):
    """Gradient release steps a param when its hook fires; a second firing in the same
    backward means the first step used part of its gradient (a layer shared under
    reentrant checkpoints): refused by name (it had stepped the shared layer three
    times per backward)."""
    model, (x, y) = SharedUnderReentrantCheckpoints(), model_and_data()[1][0]
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, offload=offload)
    adamkit.gradient_release(model, opt)
    refusal = r"params\[\d\] of param_groups\[0\] got a second gradient in one backward"
    if offload:  # the host worker may copy the first step back before the next block's backward reads it
        refusal += "|modified by an inplace operation"
    with pytest.raises(RuntimeError, match=refusal):
        torch.nn.functional.mse_loss(model(x[:, :6]), y).backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_second_backward_through_a_graph_whose_params_were_stepped_fails(backend):
    """retain_graph and a second backward: the first stepped the params in place, and
    autograd refuses to differentiate through them (their version counters moved, on
    the fused kernels too); after step() the next forward and backward run as usual."""
    model, data = model_and_data()
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, backend=backend)
    adamkit.gradient_release(model, opt)
    x, y = data[0]
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_loops_without_step_still_release():
    """Backwards with no step() between them (params given, no module; or
    accumulation with one step() per update) are separate backwards: each param's one
    gradient in each is stepped, as before the second-gradient check."""
    model, data = model_and_data()
    twin, _ = model_and_data()
    opt = adamkit.AdamW(list(model.parameters()), lr=1e-2, accumulation_steps=2)
    plain = adamkit.AdamW(twin.parameters(), lr=1e-2, accumulation_steps=2)
    adamkit.gradient_release(list(model.parameters()), opt)
    for x, y in data[:4]:
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        plain.step()
        plain.zero_grad()
    opt.step()
    assert_same_weights(model, twin)


def test_a_ddp_module_is_refused(tmp_path):
    """Under DDP the hooks would step each rank with its own gradient, before the
    all-reduce averages them, and the replicas would part: refused (a one-process
    gloo group here; on several ranks the weights had differed by 5e-2 after 4 steps)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        model, _ = model_and_data()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = adamkit.AdamW(ddp.parameters(), lr=1e-2)
        with pytest.raises(ValueError, match="before DistributedDataParallel averages the gradients"):
            adamkit.gradient_release(ddp, opt)
    finally:
        torch.distributed.destroy_process_group()
