"""adamkit.precision: casting a model with kept modules, and seeding Kahan pairs from
fp32 weights when a run moves to bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adamkit
from adamkit.precision import NORMALIZATION_LAYERS, cast_module, seed_compensation


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))


def test_cast_keeps_chosen_module_types_in_fp32():
    m = cast_module(model(), torch.bfloat16, keep=(nn.Embedding,) + NORMALIZATION_LAYERS)
    assert m[0].weight.dtype == torch.float32 and m[1].weight.dtype == torch.float32
    assert m[2][0].weight.dtype == torch.bfloat16 and m[2][0].bias.dtype == torch.bfloat16
    assert m[2][1].weight.dtype == torch.float32 and m[2][1].running_mean.dtype == torch.float32
    assert m[2][1].num_batches_tracked.dtype == torch.int64


def test_cast_with_a_predicate_keeps_whole_subtrees():
    m = cast_module(model(), torch.float16, keep=lambda name, module: name == "2")
    assert m[0].weight.dtype == torch.float16 and m[1].bias.dtype == torch.float16
    assert m[2][0].weight.dtype == torch.float32 and m[2][1].running_var.dtype == torch.float32


def test_a_kept_module_keeps_no_sibling_whose_name_begins_like_its_own():
    """Keeping ``layer1`` (or entry ``1`` of a Sequential) keeps its own subtree, not
    ``layer10``'s (or entries ``10`` to ``12``): the names are compared part by part."""
    named = nn.Module()
    named.layer1, named.layer10 = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    cast_module(named, torch.bfloat16, keep=lambda name, module: name == "layer1")
    assert named.layer1[0].weight.dtype == torch.float32 and named.layer10[0].weight.dtype == torch.bfloat16
    layers = nn.Sequential(*(nn.Linear(2, 2) for _ in range(13)))
    cast_module(layers, torch.bfloat16, keep=lambda name, module: name == "1")
    assert [layer.weight.dtype == torch.float32 for layer in layers] == [i == 1 for i in range(13)]


def test_cast_needs_a_floating_dtype():
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype, got torch.int8"):
        cast_module(model(), torch.int8)


def test_seed_compensation_carries_the_fp32_weights():
    """Oracle: the fp32 weight itself; p + c must equal it to within a spacing of c."""
    fp32 = model()
    weights = [p.detach().clone() for p in fp32.parameters()]
    bf16 = cast_module(model(), torch.bfloat16, keep=NORMALIZATION_LAYERS)
    opt = adamkit.AdamW(bf16.parameters(), rounding="kahan")
    seed_compensation(opt, weights)
    for p, w in zip(bf16.parameters(), weights):
        if p.dtype == torch.bfloat16:
            c = opt.state[p]["kahan_compensation"]
            assert torch.equal(p, w.to(torch.bfloat16))
            assert torch.all((p.double() + c.double() - w.double()).abs() <= w.double().abs() * 2.0**-16)
        else:
            assert torch.equal(p, w)
    x = torch.randint(0, 10, (4,))
    bf16[2][0](bf16[0](x).to(torch.bfloat16)).float().sum().backward()
    opt.step()  # the seeded state steps like any other
    assert all(int(opt.state[p]["step"]) == 1 for p in bf16[2][0].parameters())


def test_seed_compensation_errors_name_the_param_and_change_nothing():
    bf16 = cast_module(model(), torch.bfloat16)
    weights = [p.detach().float() for p in bf16.parameters()]
    before = [p.detach().clone() for p in bf16.parameters()]
    with pytest.raises(ValueError, match=r"param 0 \(shape \(10, 8\), torch.bfloat16\) is in a group with rounding="):
        seed_compensation(adamkit.AdamW(bf16.parameters()), weights)
    with pytest.raises(ValueError, match=r"the weight for param 1 .* has shape \(3,\)"):
        seed_compensation(
            adamkit.AdamW(bf16.parameters(), rounding="kahan"), [weights[0], torch.zeros(3)] + weights[2:]
        )
    with pytest.raises(ValueError, match="weights has 1 tensors, but the optimizer has 7 params"):
        seed_compensation(adamkit.AdamW(bf16.parameters(), rounding="kahan"), weights[:1])
    assert all(torch.equal(p, b) for p, b in zip(bf16.parameters(), before))


def test_the_documented_move_from_fp32_to_bf16_continues_the_fp32_run_bit_for_bit():
    """The module docstring's recipe: bf16 params with fp32 masters and fp32 moments, the
    fp32 run's state dict given this run's options before loading.  Oracle: the fp32 run
    itself (its gradients are bf16 values, so both runs see the same numbers)."""
    torch.manual_seed(0)
    fp32 = [nn.Parameter(torch.randn(300, 7))]
    fp32_optimizer = adamkit.AdamW(fp32, lr=1e-2, weight_decay=0.1)
    gradients = [torch.randn(300, 7).bfloat16() for _ in range(6)]
    for gradient in gradients[:3]:
        fp32[0].grad = gradient.float()
        fp32_optimizer.step()
    fp32_optimizer_state = copy.deepcopy(fp32_optimizer.state_dict())  # (the fp32 run goes on stepping)
    bf16 = [nn.Parameter(fp32[0].detach().bfloat16())]
    opt = adamkit.AdamW(bf16, lr=1e-2, weight_decay=0.1, master_weights="fp32", state_precision="fp32")
    for group in fp32_optimizer_state["param_groups"]:
        group.update(master_weights="fp32", state_precision="fp32")
    opt.load_state_dict(fp32_optimizer_state)
    adamkit.precision.load_master_weights(opt, [fp32[0].detach()])
    for gradient in gradients[3:]:
        fp32[0].grad, bf16[0].grad = gradient.float(), gradient
        fp32_optimizer.step()
        opt.step()
    assert torch.equal(adamkit.precision.master_weights(opt)[0], fp32[0].detach())
    assert torch.equal(opt.state[bf16[0]]["exp_avg_sq"], fp32_optimizer.state[fp32[0]]["exp_avg_sq"])


def test_a_param_a_kept_module_shares_stays_as_it_is():
    """A head tied to the embedding, the head kept: the one tensor they share stays fp32
    (it was cast through the embedding)."""
    m = nn.ModuleDict({"emb": nn.Embedding(10, 8), "head": nn.Linear(8, 10, bias=False), "mid": nn.Linear(8, 8)})
    m["head"].weight = m["emb"].weight
    cast_module(m, torch.bfloat16, keep=lambda name, module: name == "head")
    assert m["head"].weight is m["emb"].weight and m["head"].weight.dtype == torch.float32
    assert m["mid"].weight.dtype == torch.bfloat16


def test_master_weights_of_complex_params_round_trip():
    """A complex param's weight is itself, in its dtype (its imaginary part was dropped
    on the way to fp32, and the documented round trip then wiped it)."""
    z = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    w = nn.Parameter(torch.randn(4))
    opt = adamkit.AdamW([z, w])
    before = z.detach().clone()
    weights = adamkit.precision.master_weights(opt)
    assert [t.dtype for t in weights] == [torch.complex64, torch.float32]
    adamkit.precision.load_master_weights(opt, weights)
    assert torch.equal(z.detach(), before)


def test_a_kahan_pair_cast_up_to_fp32_keeps_its_weight():
    """``model.float()`` then ``load_state_dict(state_dict())`` (the step's own advice):
    the param takes p + c, as the split master does (the compensation was dropped)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4096).to(torch.bfloat16))
    opt = adamkit.AdamW([p], lr=1e-3, rounding="kahan")
    for _ in range(5):
        p.grad = torch.randn(4096).to(torch.bfloat16)
        opt.step()
    (held,) = adamkit.precision.master_weights(opt)
    p.data = p.data.float()
    opt.load_state_dict(opt.state_dict())
    assert torch.equal(p.detach(), held) and "kahan_compensation" not in opt.state[p]


def test_a_module_shared_under_two_names_is_kept_by_either():
    norm = nn.LayerNorm(8)
    for name in ("enc.norm", "dec.norm"):
        m = nn.ModuleDict({"enc": nn.ModuleDict({"norm": norm}), "dec": nn.ModuleDict({"norm": norm})})
        cast_module(m, torch.bfloat16, keep=lambda n, module, name=name: n == name)
        assert norm.weight.dtype == torch.float32, name
    shared = nn.BatchNorm1d(4)
    m = nn.ModuleDict({"a": shared, "b": nn.ModuleDict({"again": shared})})
    m["b"].register_buffer("scale", shared.running_mean)  # one tensor under two modules
    cast_module(m, torch.bfloat16)
    assert m["b"].scale is shared.running_mean and shared.running_mean.dtype == torch.bfloat16
