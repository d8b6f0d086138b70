"""adamkit in the Hugging Face Trainer and in Lightning, the way docs/integrations.md shows.

transformers, accelerate and lightning are in the ``test`` extra, so these tests run
(not skip) wherever the suite runs.  The models are built from configs (no download):
a one-layer GPT-2 of a few thousand weights on random tokens.  Each library trains with
an adamkit optimizer, saves a checkpoint midway, and a second run resumed from that
checkpoint must end bit for bit where the uninterrupted run ended: weights, moments
(int8 codes and scales, split master weights' low bits) and step counts.
"""

from __future__ import annotations

import copy

import lightning
import pytest
import torch
import transformers

import adamkit
from adamkit.specs.master import MASTER_KEY

VOCAB, CONTEXT = 64, 16


def _tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def _token_rows(count: int = 64) -> list[dict[str, torch.Tensor]]:
    """Random sequences over a small vocabulary whose next token is the current one plus
    one (mod VOCAB), so the loss has somewhere to go."""
    starts = torch.randint(0, VOCAB, (count, 1), generator=torch.Generator().manual_seed(0))
    ids = (starts + torch.arange(CONTEXT)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def _mean_loss(model: torch.nn.Module) -> float:
    batch = torch.stack([row["input_ids"] for row in _token_rows()])
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.float().item()


def _hf_args(out, **overrides) -> transformers.TrainingArguments:
    settings = dict(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=16, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, data_seed=0, logging_strategy="no",
    )  # fmt: skip
    return transformers.TrainingArguments(**{**settings, **overrides})


def _same_tensors(a: dict, b: dict) -> None:
    """Every tensor of two (nested) state dicts equal, bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _hf_train(out, make_optimizer) -> tuple[torch.nn.Module, transformers.Trainer]:
    model = _tiny_gpt2()
    optimizer = make_optimizer(model.parameters())
    trainer = transformers.Trainer(
        model=model, args=_hf_args(out, max_steps=16), train_dataset=_token_rows(), optimizers=(optimizer, None)
    )
    trainer.train()
    return model, trainer


def test_hugging_face_trainer_steps_an_adamkit_optimizer_with_int8_states(tmp_path):
    before = _mean_loss(_tiny_gpt2())
    options = {"lr": 1e-2, "weight_decay": 0.01}
    model, trainer = _hf_train(tmp_path / "int8", lambda p: adamkit.AdamW(p, state_precision="int8", **options))
    fp32_model, _ = _hf_train(tmp_path / "torch", lambda p: torch.optim.AdamW(p, **options))
    optimizer = trainer.optimizer.optimizer  # accelerate wraps it, and steps it
    assert isinstance(optimizer, adamkit.AdamW)
    weight = model.transformer.h[0].mlp.c_fc.weight
    assert optimizer.state[weight]["step"] == 16
    assert optimizer.state[weight]["exp_avg_int8"].dtype == torch.uint8  # one code a byte
    assert trainer.lr_scheduler.get_last_lr()[0] == 0.0  # the Trainer's linear decay ran on our groups
    # the same training as torch.optim.AdamW on fp32 states, to within int8's rounding
    after, fp32_after = _mean_loss(model), _mean_loss(fp32_model)
    assert after < 0.8 * before
    assert after == pytest.approx(fp32_after, rel=0.02)


def _hf_master_weight_run(out, *, steps: int, resume: str | None = None):
    """A bf16 GPT-2 trained by the Trainer from ``optimizer_cls_and_kwargs`` with 24-bit
    split master weights and int8 states; checkpoints every 4 steps."""
    model = _tiny_gpt2().to(torch.bfloat16)
    kwargs = {"lr": 1e-2, "master_weights": "24bit", "state_precision": "int8", "seed": 7}
    args = _hf_args(out, max_steps=steps, save_strategy="steps", save_steps=4, save_only_model=False)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_token_rows(), optimizer_cls_and_kwargs=(adamkit.AdamW, kwargs)
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer.optimizer.optimizer


def test_hugging_face_trainer_resumes_bf16_master_weights_and_int8_states_bit_for_bit(tmp_path):
    whole_model, whole = _hf_master_weight_run(tmp_path / "whole", steps=8)
    assert isinstance(whole, adamkit.AdamW)
    first = whole.param_groups[0]["params"][0]
    assert first.dtype == torch.bfloat16 and MASTER_KEY in whole.state[first]
    assert whole.state[first]["step"] == 8

    # the Trainer's checkpoint at step 4 holds adamkit's state dict; resume it elsewhere
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").exists()
    resumed_model, resumed = _hf_master_weight_run(tmp_path / "resumed", steps=8, resume=str(checkpoint))
    _same_tensors(whole_model.state_dict(), resumed_model.state_dict())
    _same_tensors(whole.state_dict(), resumed.state_dict())


class _Regression(lightning.LightningModule):
    """A linear model fit by adamkit with a per-step OneCycle schedule."""

    def __init__(self, **optimizer_options) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 1)
        self.optimizer_options = optimizer_options

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

    def configure_optimizers(self):
        optimizer = adamkit.AdamW(self.parameters(), lr=5e-2, **self.optimizer_options)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-2, total_steps=20)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _regression_data() -> torch.utils.data.DataLoader:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1)), batch_size=16)


def _lightning_run(out, epochs: int, resume: str | None = None, **optimizer_options):
    module = _Regression(**optimizer_options)
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=out, every_n_epochs=1, save_top_k=-1)
    trainer = lightning.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, callbacks=[checkpoints], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, _regression_data(), ckpt_path=resume)
    return module, trainer


@pytest.mark.parametrize("options", [{"rounding": "kahan"}, {"state_precision": "int8", "seed": 3}], ids=str)
def test_lightning_trains_and_resumes_an_adamkit_optimizer_with_its_schedule(tmp_path, options):
    x, y = _regression_data().dataset.tensors
    whole_module, whole_trainer = _lightning_run(tmp_path / "whole", epochs=5, **options)
    optimizer = whole_trainer.optimizers[0]
    assert isinstance(optimizer, adamkit.AdamW)  # Lightning's wrapper class derives from ours
    assert optimizer.state[whole_module.linear.weight]["step"] == 20
    assert whole_trainer.lr_scheduler_configs[0].scheduler.last_epoch == 20
    start = torch.nn.functional.mse_loss(_Regression().linear(x).squeeze(-1), y).item()
    end = torch.nn.functional.mse_loss(whole_module.linear(x).squeeze(-1), y).item()
    assert end < start / 2

    # resume from the checkpoint after epoch 2 (step 8) and finish: the same end, bit for bit
    checkpoint = next((tmp_path / "whole").glob("epoch=1-step=8*.ckpt"))
    resumed_module, resumed_trainer = _lightning_run(tmp_path / "resumed", epochs=5, resume=str(checkpoint), **options)
    _same_tensors(whole_module.state_dict(), resumed_module.state_dict())
    _same_tensors(optimizer.state_dict(), resumed_trainer.optimizers[0].state_dict())


class _Narrow(adamkit.AdamW):
    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr, state_precision="int8")


class _Forwarding(adamkit.AdamW):
    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)


@pytest.mark.parametrize("cls", [_Narrow, _Forwarding])
def test_a_subclass_written_outside_adamkit_may_take_its_own_arguments_and_loads_its_checkpoints(cls):
    """Lightning derives a class from the optimizer's to wrap it; users subclass too.
    Loading a state dict read the defaults of the subclass's constructor, which names no
    option: ``KeyError: 'max_lr'``."""
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = cls([p], lr=0.1)
    p.grad = torch.ones(4)
    optimizer.step()
    assert torch.all(p < 1)
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(saved)
    _same_tensors(saved, optimizer.state_dict())
    assert optimizer.param_groups[0]["max_lr"] == 0.1
    copied = copy.deepcopy(optimizer)  # (unpickling fills the defaults alike)
    assert copied.param_groups[0]["state_precision"] == optimizer.param_groups[0]["state_precision"]


def test_lightnings_optimizer_wrapper_loads_a_state_dict():
    """A ``LightningOptimizer`` is an instance of a class derived from the optimizer's
    whose constructor takes only the optimizer.  (Loading through it loads into the
    wrapper's own attributes, as it does for torch.optim: Lightning itself loads into
    the optimizer.)"""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    p = torch.nn.Parameter(torch.ones(4))
    optimizer = adamkit.AdamW([p], lr=0.1, state_precision="int8")
    p.grad = torch.ones(4)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    p.grad = torch.ones(4)
    optimizer.step()
    wrapper = LightningOptimizer(optimizer)
    wrapper.load_state_dict(saved)
    _same_tensors(saved, wrapper.state_dict())


def test_adamkits_own_classes_are_held_to_the_option_table():
    with pytest.raises(TypeError, match="must take the option 'decouple_lr' keyword-only"):

        class Forgetful(adamkit.AdamW):
            __module__ = "adamkit.optim"

            def __init__(self, params, lr: float = 1e-3) -> None:
                super().__init__(params, lr=lr)


def _release_run(wrap, clip: bool, skip_odd: bool, attach_to_wrapper: bool) -> torch.nn.Module:
    """Eight batches of a small model under gradient release with offload="cpu" (and
    clipping, held host steps), the handle attached through ``wrap(optimizer)`` (or to
    the optimizer before it is wrapped, as in ``configure_optimizers``) and the optimizer
    stepped and its gradients dropped as Lightning's manual optimization does: the
    wrapper's ``zero_grad``, the inner optimizer's ``step``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = adamkit.AdamW(model.parameters(), lr=1e-2, offload="cpu")
    max_grad_norm = 0.1 if clip else None
    if not attach_to_wrapper:
        handle = adamkit.gradient_release(model, optimizer, max_grad_norm=max_grad_norm)
    wrapper = wrap(optimizer)
    if attach_to_wrapper:
        handle = adamkit.gradient_release(model, wrapper, max_grad_norm=max_grad_norm)
    generator = torch.Generator().manual_seed(1)
    for batch in range(8):
        loss = model(torch.randn(4, 6, generator=generator)).square().mean()
        loss.backward()
        if skip_odd and batch % 2:
            wrapper.zero_grad()  # a skipped batch: its held steps are dropped with its gradients
            continue
        optimizer.step()
        wrapper.zero_grad()
    handle.remove()
    return model


@pytest.mark.parametrize("attach_to_wrapper", [True, False], ids=["attached-to-wrapper", "attached-before"])
@pytest.mark.parametrize("clip, skip_odd", [(False, False), (True, False), (True, True)])
def test_gradient_release_through_lightnings_optimizer_wrapper_trains_as_without_it(clip, skip_odd, attach_to_wrapper):
    """Lightning hands ``self.optimizers()`` out as a ``LightningOptimizer`` (an instance of
    a subclass of the optimizer's class that forwards the attributes it lacks) and steps
    the optimizer inside it. The handle attached through the wrapper stayed on the
    wrapper, and a class-level default hid it there otherwise: with clipping,
    no step ever ran; and the wrapper's ``zero_grad`` kept the held steps, so the next
    backward raised."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    plain = _release_run(lambda optimizer: optimizer, clip, skip_odd, attach_to_wrapper)
    wrapped = _release_run(LightningOptimizer, clip, skip_odd, attach_to_wrapper)
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    assert not torch.equal(plain[0].weight, start[0].weight)  # it trained
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p, q)
