"""The adapter shared by the list-based kernels (reference and foreach): from
per-list element functions to a kernel's ``step``."""

from __future__ import annotations

from collections.abc import Mapping

from ..algorithms.base import ListStepFn
from ..guard import share_memory
from ..rule import UpdateRule
from ..sharding import whole_param_totals
from ..state import moment_keys
from . import storage
from .types import GroupBatch, StepFn


def list_kernel(algorithms: Mapping[str, ListStepFn], *, one_by_one: bool) -> StepFn:
    """A kernel's ``step`` from per-list functions, one per algorithm: advance each ``step`` counter (as
    torch does, one per tensor), get the scalars from the rule, run the element math
    (on widened copies where the storage policy asks, see :mod:`.storage`: 16-bit
    values are rounded once per update, as the fused kernels round them).

    Params that share memory (tied weights held as two params, or one param listed twice)
    are stepped one after the other, each from what the one before it wrote, as torch's
    for-loop steps them: in rounds (:func:`rounds`), each round a batch of params of
    their own.  ``one_by_one``: the per-list functions step tensor by tensor (the
    for-loop), so every shared param needs a round of its own; else (foreach ops, which
    torch's foreach path also runs over shared params op by op) only those stepped on
    widened copies, which would otherwise each start from the same value."""

    def step_part(batch: GroupBatch, rule: UpdateRule) -> None:
        states = batch.states
        steps = [s["step"] for s in states]
        for step_t in steps:
            step_t += 1
        run = algorithms[rule.algorithm]
        work, store = storage.widened(
            batch.params, batch.grads, states, steps, rule, batch.param_indices, batch.element_offsets
        )
        work.totals = whole_param_totals(batch.shards)
        run(work, rule, rule.group_scalars(), rule.step_scalars_for(steps))
        store()

    def step(batch: GroupBatch, rule: UpdateRule) -> None:
        parts = rounds(batch, rule, one_by_one)
        if parts is None:
            step_part(batch, rule)
            return
        for rows in parts:
            step_part(_rows_of(batch, rows), rule)

    return step


def rounds(batch: GroupBatch, rule: UpdateRule, one_by_one: bool) -> list[list[int]] | None:
    """The rows of ``batch`` in rounds, each row after every earlier row it shares memory
    with (``None``: one round, the whole batch).  Row j's round is one past the last
    round of the earlier rows it shares a byte with (compared byte by byte among the rows
    the guard found sharing)."""
    pairs = batch.checked.overlapping if batch.checked is not None else ()
    if not pairs:
        return None
    shared = sorted({row for pair in pairs for row in pair})
    if not one_by_one:
        keys = moment_keys(rule.algorithm, rule.amsgrad)
        states = batch.states
        shared = [row for row in shared if storage.is_widened(batch.params[row], states[row], keys)]
    params, round_of = batch.params, {}
    for j in shared:
        before = [round_of[k] for k in round_of if share_memory(params[k], params[j])]
        round_of[j] = 1 + max(before, default=-1)
    if not any(round_of.values()):
        return None
    parts = [[] for _ in range(1 + max(round_of.values()))]
    for row in range(len(params)):
        parts[round_of.get(row, 0)].append(row)
    return parts


def _rows_of(batch: GroupBatch, rows: list[int]) -> GroupBatch:
    """The part of ``batch`` that is ``rows``."""

    def pick(values):
        return None if values is None else [values[i] for i in rows]

    return GroupBatch(
        params=pick(batch.params),
        grads=pick(batch.grads),
        state_table=batch.state_table,
        cache=batch.cache,
        key=batch.key,
        grad_scale=batch.grad_scale,
        found_inf=batch.found_inf,
        param_indices=pick(batch.param_indices),
        element_offsets=pick(batch.element_offsets),
        shards=pick(batch.shards),
    )


__all__ = ["list_kernel", "rounds"]
