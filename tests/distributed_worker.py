"""One rank of the 2-process distributed tests (gloo, CPU), and the model, data and
optimizer settings the single-process oracles in ``test_distributed.py`` share.

``python tests/distributed_worker.py PHASE RANK WORLD INIT_FILE OUT_DIR``:

- ``train``: FSDP2 (``fully_shard``) training for every setting in :data:`SETTINGS`;
  a DCP checkpoint after :data:`STEPS_BEFORE_SAVE` steps, then more steps, then a fresh
  model and optimizer loaded from that checkpoint take the same steps; DDP and
  ``ZeroRedundancyOptimizer`` training.  Rank 0 writes what it saw to ``OUT_DIR``.
- ``resume``: load the single-process checkpoint the parent wrote (1 process to 2)
  into FSDP2 and take the remaining steps.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

# the ranks step CPU tensors (gloo): Triton kernels run under its CPU interpreter (set before triton loads)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import adamkit  # noqa: E402

WIDTH = 512  # every shard of every param starts on an int8 (256) and int4 (128) block boundary
STEPS_BEFORE_SAVE, STEPS_AFTER_SAVE = 3, 2

#: name -> (optimizer class name, keyword arguments, param dtype)
SETTINGS: dict[str, tuple[str, dict, torch.dtype]] = {
    "fp32-single_tensor": ("Adam", {"backend": "single_tensor"}, torch.float32),
    "fp32-foreach": ("Adam", {"backend": "foreach", "amsgrad": True}, torch.float32),
    "fp32-cpu": ("AdamW", {"backend": "cpu", "weight_decay": 0.1}, torch.float32),
    "adamax-cpu": ("AdaMax", {"backend": "cpu"}, torch.float32),
    "bf16-kahan-cpu": ("AdamW", {"backend": "cpu", "rounding": "kahan"}, torch.bfloat16),
    "bf16-kahan-foreach": ("Adam", {"backend": "foreach", "rounding": "kahan"}, torch.bfloat16),
    "bf16-master-cpu": (
        "AdamW",
        {"backend": "cpu", "master_weights": "fp32", "state_precision": "int8"},
        torch.bfloat16,
    ),
    "bf16-master24-cpu": ("AdamW", {"backend": "cpu", "master_weights": "24bit", "seed": 7}, torch.bfloat16),
    "int8-cpu": ("AdamW", {"backend": "cpu", "state_precision": "int8"}, torch.float32),
    "int8-foreach": ("Adam", {"backend": "foreach", "state_precision": "int8"}, torch.float32),
    "int4-cpu": ("Adam", {"backend": "cpu", "state_precision": "int4"}, torch.float32),
    # 6 rows split 3 + 3: shards start mid-block, so blocks are cut at the boundary
    # one row per param: rank 1 holds empty shards
    "int8-empty-shards": ("AdamW", {"backend": "cpu", "state_precision": "int8"}, torch.float32),
    "accumulation-foreach": ("Adam", {"backend": "foreach", "accumulation_steps": 2}, torch.float32),
    # NAdam accumulates the gradient itself: a param-shaped sum, saved mid-update (3 micro-batches)
    "accumulation-nadam-single_tensor": ("NAdam", {"backend": "single_tensor", "accumulation_steps": 2}, torch.float32),
    # stochastic rounding draws each shard's bits by its elements' index in the whole param
    "bf16-stochastic-cpu": ("AdamW", {"backend": "cpu", "rounding": "stochastic", "seed": 7}, torch.bfloat16),
    "int8-unaligned": ("AdamW", {"backend": "cpu", "state_precision": "int8"}, torch.float32),
    # per-tensor reductions (StableAdamW's clipping, a cautious update's count) over the whole param
    "stable-cpu": ("StableAdamW", {"backend": "cpu", "weight_decay": 0.1}, torch.float32),
    "stable-int8-foreach": ("StableAdamW", {"backend": "foreach", "state_precision": "int8"}, torch.float32),
    "cautious-nadam-single_tensor": ("NAdam", {"backend": "single_tensor", "cautious": True}, torch.float32),
    # HSDP: replicated over one mesh dimension, sharded over the other; the cautious count must not add
    # up the replicas (on a narrow model, where its +1 is not lost in rounding)
    "cautious-hsdp-cpu": ("StableAdamW", {"backend": "cpu", "cautious": True}, torch.float32),
    # Triton under its CPU interpreter: smaller layers (256 keeps int4's 128-blocks aligned)
    "fp32-triton": ("AdamW", {"backend": "triton"}, torch.float32),
    "int4-triton": ("Adam", {"backend": "triton", "state_precision": "int4"}, torch.float32),
    # the Triton kernel's random bits by global index (a shard's offset): held to one process's CPU kernel
    "bf16-stochastic-triton": ("AdamW", {"backend": "triton", "rounding": "stochastic", "seed": 7}, torch.bfloat16),
}
#: layer widths other than WIDTH
WIDTHS = {
    "cautious-hsdp-cpu": 16,
    "int8-empty-shards": 1,
    "int8-unaligned": 6,
    "fp32-triton": 64,
    "int4-triton": 256,
    "bf16-stochastic-triton": 64,
}
#: settings whose params are laid out on a 2-D mesh (replicate, shard) of the given shape
HSDP_MESHES = {"cautious-hsdp-cpu": (2, 1)}
#: settings that do not equal single-process training
NOT_EQUAL = ("int8-unaligned",)
#: the settings checkpointed with DCP (and loaded 2 -> 1 -> 2 processes)
CHECKPOINTED = ("fp32-cpu", "bf16-kahan-cpu", "int8-cpu", "bf16-master-cpu", "accumulation-nadam-single_tensor")


#: each rank on its share of the batch: adamkit's torch-exact path against torch.optim itself
SPLIT_OPTIMIZERS = {
    "adamkit": lambda params: adamkit.AdamW(params, lr=1e-2, weight_decay=0.1, backend="single_tensor"),
    "torch": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False),
}


def build_model(dtype: torch.dtype = torch.float32, width: int = WIDTH) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)
    ).to(dtype)


def build_optimizer(params, setting: str, *, oracle: bool = False) -> torch.optim.Optimizer:
    """``oracle``: the single-process run that the sharded one is held to; a Triton
    setting's oracle steps on the CPU kernel, whose bits the Triton kernel's equal
    (``test_kernel_parity.py``) at a small fraction of the interpreter's time."""
    name, kwargs, _ = SETTINGS[setting]
    if oracle and kwargs.get("backend") == "triton":
        kwargs = {**kwargs, "backend": "cpu"}
    return getattr(adamkit, name)(params, lr=1e-2, **kwargs)


def batch(step: int, dtype: torch.dtype, width: int = WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch on every rank (gradients averaged over ranks equal each rank's)."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, 32, generator=generator).to(dtype)
    return x, torch.randn(64, width, generator=generator).to(dtype)


def train(model: nn.Module, optimizer, steps: range, dtype: torch.dtype, *, split: bool = False) -> list[float]:
    """Train on :func:`batch`; ``split``: each rank on its share of the rows (data
    parallelism proper: the averaged gradient is the whole batch's, up to rounding)."""
    losses = []
    width = getattr(model, "module", model)[-1].out_features  # DDP wraps the model
    for step in steps:
        x, y = batch(step, dtype, width)
        if split:
            x, y = x[dist.get_rank() :: dist.get_world_size()], y[dist.get_rank() :: dist.get_world_size()]
        loss = (model(x).float() - y.float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: _full(p).detach().clone() for name, p in model.named_parameters()}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """Every param's state as full tensors, keyed by the param's name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))["state"]
    return {name: {k: _full(v).clone() if torch.is_tensor(v) else v for k, v in s.items()} for name, s in state.items()}


# ------------------------------------------------------------------------- ranks


def _sharded(setting: str):
    from torch.distributed.fsdp import fully_shard

    dtype = SETTINGS[setting][2]
    model = build_model(dtype, WIDTHS.get(setting, WIDTH))
    mesh = None
    if setting in HSDP_MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", HSDP_MESHES[setting], mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, build_optimizer(model.parameters(), setting), dtype


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _dcp_load(model, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def fsdp_phase(out: Path, results: dict) -> None:
    import torch.distributed.checkpoint as dcp

    total = STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE
    for setting in SETTINGS:
        model, optimizer, dtype = _sharded(setting)
        record = {"losses": train(model, optimizer, range(1), dtype), "first_params": full_params(model)}
        record["losses"] += train(model, optimizer, range(1, STEPS_BEFORE_SAVE), dtype)
        if setting in CHECKPOINTED:
            record["saved_params"] = full_params(model)
            record["saved_state"] = full_optimizer_state(model, optimizer)
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(out / f"dcp-{setting}"))
        record["losses"] += train(model, optimizer, range(STEPS_BEFORE_SAVE, total), dtype)
        record["params"] = full_params(model)
        record["state"] = full_optimizer_state(model, optimizer)
        if setting in CHECKPOINTED:  # a fresh run resumed from the checkpoint
            model, optimizer, dtype = _sharded(setting)
            _dcp_load(model, optimizer, out / f"dcp-{setting}")
            record["loaded_state"] = full_optimizer_state(model, optimizer)
            record["resumed_losses"] = train(model, optimizer, range(STEPS_BEFORE_SAVE, total), dtype)
            record["resumed_params"] = full_params(model)
        results[setting] = record
    for name, make in SPLIT_OPTIMIZERS.items():
        model, _, dtype = _sharded("fp32-cpu")
        train(model, make(model.parameters()), range(total), dtype, split=True)
        results[f"split-fsdp2-{name}"] = full_params(model)


FEATURES = {"backend": "cpu", "skip_nonfinite": True, "diagnostics": True}
NAN_STEP = 1


def train_with_a_nan(model: nn.Module, optimizer, poison) -> dict:
    """Train with ``poison(first_param_grad)`` called at step NAN_STEP; what stats() saw."""
    for step in range(STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE):
        x, y = batch(step, torch.float32)
        (model(x) - y).pow(2).mean().backward()
        if step == NAN_STEP:
            poison(next(model.parameters()).grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"skipped": optimizer.skipped_steps, "stats": optimizer.stats(), "params": full_params(model)}


def features_phase(results: dict) -> None:
    """skip_nonfinite with a NaN in one rank's shard only, and stats(), under FSDP2."""
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)

    def poison(grad) -> None:
        if dist.get_rank() == 1:  # global row WIDTH // 2: rank 1's first row
            grad.to_local()[0, 0] = float("nan")

    results["features"] = train_with_a_nan(model, adamkit.Adam(model.parameters(), lr=1e-2, **FEATURES), poison)


def replicated_phase(results: dict) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    steps = range(STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE)
    for setting in ("fp32-cpu", "int8-cpu"):
        model = DistributedDataParallel(build_model())
        train(model, build_optimizer(model.parameters(), setting), steps, torch.float32)
        results[f"ddp-{setting}"] = full_params(model.module)
        model = DistributedDataParallel(build_model())
        name, kwargs, _ = SETTINGS[setting]
        zero = ZeroRedundancyOptimizer(model.parameters(), getattr(adamkit, name), lr=1e-2, **kwargs)
        train(model, zero, steps, torch.float32)
        results[f"zero-{setting}"] = full_params(model.module)
    for name, make in SPLIT_OPTIMIZERS.items():
        model = DistributedDataParallel(build_model())
        train(model, make(model.parameters()), steps, torch.float32, split=True)
        results[f"split-ddp-{name}"] = full_params(model.module)
    results["release-warnings"] = release_warnings(DistributedDataParallel)


def release_warnings(ddp) -> dict[str, list[str]]:
    """What ``gradient_release`` warns, given a DDP module's params (replicated: its
    all-reduce would come after the hooks) and an FSDP2 model's (shards: none)."""
    from torch.distributed.fsdp import fully_shard

    replicated = ddp(build_model())
    sharded = build_model()
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    caught = {}
    for name, params in (("ddp-params", list(replicated.parameters())), ("fsdp2", list(sharded.parameters()))):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            adamkit.gradient_release(params, adamkit.Adam(params)).remove()
        caught[name] = [str(w.message) for w in record]
    return caught


def resume_phase(out: Path, results: dict) -> None:
    """1 process -> 2: the parent's single-process checkpoint, resumed under FSDP2."""
    total = STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE
    for setting in CHECKPOINTED:
        model, optimizer, dtype = _sharded(setting)
        _dcp_load(model, optimizer, out / f"dcp-single-{setting}")
        results[setting] = {
            "loaded_state": full_optimizer_state(model, optimizer),
            "losses": train(model, optimizer, range(STEPS_BEFORE_SAVE, total), dtype),
            "params": full_params(model),
        }
        # the same from plain full state dicts (torch.save in one process; int8 codes
        # of whole tensors): optimizer.load_state_dict cuts them to this rank's shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        saved = torch.load(out / f"plain-{setting}.pt", weights_only=False)
        model, optimizer, dtype = _sharded(setting)
        set_model_state_dict(model, saved["model"], options=StateDictOptions(full_state_dict=True))
        optimizer.load_state_dict(saved["optim"])
        results[f"plain-{setting}"] = {
            "losses": train(model, optimizer, range(STEPS_BEFORE_SAVE, total), dtype),
            "params": full_params(model),
        }


def main(phase: str, rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results: dict = {}
        if phase == "train":
            fsdp_phase(Path(out), results)
            features_phase(results)
            replicated_phase(results)
        else:
            resume_phase(Path(out), results)
        if rank == 0:
            torch.save(results, Path(out) / f"{phase}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    phase, rank, world, init_file, out = sys.argv[1:]
    main(phase, int(rank), int(world), init_file, out)
