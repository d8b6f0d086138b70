"""The layout arithmetic of :mod:`adamkit.sharding` on meshes of 4 ranks (1-D and
2 x 2, as FSDP2 with tensor parallelism or HSDP lays params out), one process playing
each rank in turn through torch's fake process group (no communication: what a rank
computes from its own coordinates is all that is tested here; the 2-process runs of
``test_distributed.py`` step real shards).

The oracles cut an ``arange`` of the whole tensor as DTensor's ``Shard`` placements
do (``torch.chunk`` along the dimension, mesh dimension by mesh dimension) and read
the shard's indices off it.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager

import pytest
import torch

import adamkit.sharding as sharding

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is needed", allow_module_level=True)
fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: E402

WORLD = 4
MESHES = [(4,), (2, 2)]
SHAPES = [(8, 6), (2, 6), (1, 6), (5, 3), (7,), (4, 1, 6), (2, 3, 4)]


def _placements(mesh_shape: tuple[int, ...], ndim: int) -> list[tuple]:
    choices = [Replicate(), *(Shard(d) for d in range(ndim))]
    return list(itertools.product(choices, repeat=len(mesh_shape)))


@contextmanager
def _as_rank(rank: int, mesh_shape: tuple[int, ...]):
    """This process as ``rank`` of a fake group of WORLD, with its mesh, for the block."""
    assert not dist.is_initialized(), "a process group is already set up in this process"
    dist.init_process_group("fake", rank=rank, world_size=WORLD, store=fake_pg.FakeStore())
    try:
        yield init_device_mesh("cpu", mesh_shape)
    finally:
        dist.destroy_process_group()


def _indices_held(whole: tuple[int, ...], mesh_shape, coordinate, placements) -> torch.Tensor:
    """The row-major indices, in the whole tensor, of the elements this rank holds."""
    held = torch.arange(math.prod(whole)).reshape(whole)
    for size, at, placement in zip(mesh_shape, coordinate, placements):
        if placement.is_shard():
            pieces = held.chunk(size, dim=placement.dim)
            held = pieces[at] if at < len(pieces) else held.narrow(placement.dim, 0, 0)
    return held


def _shard(whole, mesh, placements, held: torch.Tensor) -> DTensor:
    stride = torch.empty(whole).stride()
    return DTensor.from_local(torch.zeros(held.shape), mesh, placements, run_check=False, shape=whole, stride=stride)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_a_shard_starts_where_its_run_starts_and_any_other_shard_at_0(mesh_shape):
    """element_offset: a shard that is one run of the whole tensor's row-major order
    starts at its first element's index (stochastic rounding then draws its bits as the
    unsharded tensor would); a shard that is not one run (or is empty) at 0."""
    checked = runs = 0
    for rank in range(WORLD):
        with _as_rank(rank, mesh_shape) as mesh:
            for whole in SHAPES:
                for placements in _placements(mesh_shape, len(whole)):
                    held = _indices_held(whole, mesh_shape, mesh.get_coordinate(), placements)
                    flat = held.flatten()
                    is_run = flat.numel() > 0 and torch.equal(flat, torch.arange(flat[0], flat[0] + flat.numel()))
                    expected = int(flat[0]) if is_run else 0
                    got = sharding.element_offset(_shard(whole, mesh, placements, held))
                    assert got == expected, f"rank {rank}, {whole} as {placements}: {got}, not {expected}"
                    checked, runs = checked + 1, runs + (is_run and expected > 0)
    assert runs > 0 and checked > runs  # both kinds of shard met


def test_a_row_cut_along_its_columns_is_a_run():
    """A one-row shard cut along its second dimension is a run; before, only whole-row
    shards were counted as runs and such a shard rounded from index 0."""
    with _as_rank(3, (2, 2)) as mesh:  # coordinate (1, 1)
        whole = (2, 6)
        held = _indices_held(whole, (2, 2), (1, 1), (Shard(0), Shard(1)))
        assert held.tolist() == [[9, 10, 11]]
        assert sharding.element_offset(_shard(whole, mesh, (Shard(0), Shard(1)), held)) == 9


def _distinct_shards(whole, mesh_shape, placements) -> int:
    """How many different index sets the ranks of the mesh hold."""
    coordinates = itertools.product(*(range(size) for size in mesh_shape))
    return len({tuple(_indices_held(whole, mesh_shape, c, placements).flatten().tolist()) for c in coordinates})


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_sums_are_totalled_over_the_shards_and_not_over_the_replicas(monkeypatch, mesh_shape):
    """sum_over_shards (StableAdamW's RMS, a cautious update's count): every rank here
    holds the same per-shard sums, and the fake all-reduce adds up one copy per rank of
    the group it is given; the whole param's total must count each *distinct* shard
    once (the oracle counts the distinct index sets the ranks hold), never a replica."""

    def all_reduce(tensor, group=None, **_):
        tensor.mul_(dist.get_world_size(group))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    whole = (8, 4)  # every rank's shard is non-empty
    counts = set()
    for placements in _placements(mesh_shape, len(whole)):
        shards = _distinct_shards(whole, mesh_shape, placements)
        counts.add(shards)
        for rank in range(WORLD):
            with _as_rank(rank, mesh_shape) as mesh:
                held = _indices_held(whole, mesh_shape, mesh.get_coordinate(), placements)
                total = sharding.sum_over_shards(
                    torch.tensor([1.0, 3.0], dtype=torch.float64), _shard(whole, mesh, placements, held)
                )
            assert total.tolist() == [shards * 1.0, shards * 3.0], f"rank {rank}, {placements}"
    assert counts == ({1, 4} if mesh_shape == (4,) else {1, 2, 4})  # replicated, half and fully cut layouts met
