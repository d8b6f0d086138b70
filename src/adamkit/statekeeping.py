r"""How an optimizer keeps its state so that the fused kernels may cache addresses into it.

A fused kernel builds a table of raw addresses once and reuses it while nothing it
addresses has changed.  Two things make "nothing has changed" cheap to know and safe
to trust, whatever a user does between steps:

- **Tracked containers.** ``optimizer.state`` is a :class:`StateTable` whose values are
  :class:`ParamState` dicts; every write to either (an entry replaced, a state popped,
  ``clear()``) advances the optimizer's :class:`StateEpoch`.  They pickle, copy and
  export as the plain ``defaultdict``/``dict`` torch.optim uses.
- **Issued tensors.** Every state tensor a fused kernel addresses is *issued*
  (:func:`issue`): the dict holds an alias of memory that only the optimizer's
  allocation owns, through a storage of its own that cannot be resized.  A user may
  re-point that alias (``.data =``, ``set_``), move its storage (``share_memory_()``)
  or drop it; each of these releases the alias's hold on the memory, and the release
  advances the epoch at once (before any later step can run).  Nothing a user can
  reach frees or moves the memory while the alias holds it.

So a table built at epoch :math:`e` addresses live memory of the size it was built for
for as long as the epoch is still :math:`e`: the kernels compare one integer per step
instead of reading every state tensor (each read of a tensor the last step's sweep has
evicted from cache costs about a microsecond: milliseconds for thousands of tensors).

What this does not see (a review's findings; memory stays safe in both, as the kernels
write only memory the optimizer allocated and still holds): an alias re-pointed while
the user holds a view of it (the view keeps the old memory, so nothing is released and
the kernels go on stepping the memory the view shows, not the new tensor), and an alias
shrunk in place by ``resize_`` (its storage keeps its size; the kernels step every
element, the tensor shows fewer).  Replace a state tensor through the dict
(``state[key] = tensor``) or through ``load_state_dict``, which both advance the epoch.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from itertools import count

import torch
from torch import Tensor

#: where tensors can be issued (the devices the fused kernels run on)
ISSUABLE_DEVICES = frozenset({"cpu", "cuda"})


class StateEpoch:
    """A counter that changes whenever an optimizer's state may have changed.

    ``issued`` maps each issued alias's storage (by identity) to weak references to
    that storage and to the tensor whose death marks the release of its memory."""

    __slots__ = ("__weakref__", "_counter", "issued", "value")

    def __init__(self) -> None:
        self._counter = count(1)
        self.value = 0
        self.issued: dict[int, tuple[weakref.ref, weakref.ref]] = {}

    def advance(self) -> None:
        self.value = next(self._counter)  # (one C call: atomic where callbacks run on other threads)


#: state keys no kernel caches an address of (bookkeeping written at every step, such
#: as optimizer accumulation's): writing them does not advance the epoch
UNTRACKED_KEYS: set[str] = set()


def untracked(*keys: str) -> None:
    """Declare state ``keys`` that no kernel caches an address of (see :data:`UNTRACKED_KEYS`)."""
    UNTRACKED_KEYS.update(keys)


class _Tracked:
    """The mutators of a dict that advance its ``epoch`` before they change it (mixed
    into a dict subclass with an ``epoch``); :meth:`_changing` says which keys count,
    :meth:`_kept` what a stored value becomes."""

    __slots__ = ()

    def _changing(self, key=None) -> None:
        self.epoch.advance()

    def _kept(self, value):
        return value

    def __setitem__(self, key, value) -> None:
        self._changing(key)
        super().__setitem__(key, self._kept(value))

    def __delitem__(self, key) -> None:
        self._changing(key)
        super().__delitem__(key)

    def pop(self, key, *default):
        if key in self:  # popping what is not there changes nothing
            self._changing(key)
        return super().pop(key, *default)

    def popitem(self):
        self._changing()
        return super().popitem()

    def clear(self) -> None:
        self._changing()
        super().clear()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self


class ParamState(_Tracked, dict):
    """One param's state: a dict that advances its :class:`StateEpoch` on every write
    (but those of :data:`UNTRACKED_KEYS`)."""

    __slots__ = ("epoch",)

    def __init__(self, epoch: StateEpoch, *args, **kwargs) -> None:
        dict.__init__(self, *args, **kwargs)
        self.epoch = epoch

    def _changing(self, key=None) -> None:
        if key not in UNTRACKED_KEYS:
            self.epoch.advance()

    def __reduce__(self):  # pickles and copies as the plain dict torch.optim keeps
        return (dict, (dict(self),))


class StateTable(_Tracked, defaultdict):
    """``optimizer.state``: param -> :class:`ParamState`, as torch.optim's
    ``defaultdict(dict)``; a dict stored in it is kept as a :class:`ParamState` copy."""

    __slots__ = ("epoch",)

    def __init__(self, epoch: StateEpoch, items=()) -> None:
        defaultdict.__init__(self, partial(ParamState, epoch))
        self.epoch = epoch
        for param, state in dict(items).items():
            dict.__setitem__(self, param, self._kept(state))

    def _kept(self, state):
        if isinstance(state, dict) and not (isinstance(state, ParamState) and state.epoch is self.epoch):
            return ParamState(self.epoch, state)
        return state

    def setdefault(self, param, state=None):
        return super().setdefault(param, ParamState(self.epoch) if state is None else state)

    def __reduce__(self):  # pickles and copies as torch.optim's defaultdict(dict)
        return (defaultdict, (dict,), None, None, iter(self.items()))

    def __copy__(self) -> StateTable:
        return StateTable(self.epoch, self)


def tracked(table, epoch: StateEpoch) -> StateTable:
    """``table`` (an ``optimizer.state`` as torch.optim or a user left it) as a
    :class:`StateTable` of ``epoch``; the same object if it already is one."""
    if isinstance(table, StateTable) and table.epoch is epoch:
        return table
    epoch.advance()
    return StateTable(epoch, table)


#: where issued memory comes from: ``None`` for torch's allocator, or a callable giving an
#: uninitialised tensor like its argument (the hostile-use fuzzer's guard-paged memory)
allocator: Callable[[Tensor], Tensor] | None = None


def _empty_like(tensor: Tensor) -> Tensor:
    return torch.empty_like(tensor, memory_format=torch.preserve_format)


def issue(tensor: Tensor, epoch: StateEpoch, *, fresh: bool = False) -> Tensor:
    """``tensor``'s values, issued (see the module docstring): an alias, through a storage
    of its own that cannot be resized, of memory that nothing but the alias holds.
    ``fresh``: ``tensor`` was just allocated by adamkit and is held nowhere else, so its
    memory is taken over instead of copied."""
    if fresh and allocator is None:
        owner = tensor.detach()
    else:
        owner = (allocator or _empty_like)(tensor).copy_(tensor)
    alias = torch.from_dlpack(owner)  # the alias's storage holds ``owner`` until it lets go of the memory
    storage = alias.untyped_storage()
    key, epoch_ref = id(storage), weakref.ref(epoch)
    epoch.issued[key] = (weakref.ref(storage, _release(epoch_ref, key)), weakref.ref(owner, _release(epoch_ref, key)))
    return alias


def issue_all(state, epoch: StateEpoch) -> None:
    """Issue every tensor of one param's ``state`` (a mapping: a :class:`ParamState`, or a
    sharded param's local view of one) that is not issued yet, by copying it.  (Never by
    taking its memory over: a loaded tensor's memory may be reachable in ways no count
    shows, a storage object the caller kept or a DLPack or NumPy alias, and freeing it
    from there would leave a kernel writing freed memory.)"""
    for key, value in list(state.items()):
        if isinstance(value, Tensor) and value.device.type in ISSUABLE_DEVICES and not is_issued(value, epoch):
            state[key] = issue(value, epoch)


def is_issued(tensor: Tensor, epoch: StateEpoch) -> bool:
    """Whether ``tensor`` views memory issued by ``epoch`` through the issued storage,
    and that memory has not been released since."""
    storage = tensor.untyped_storage()
    entry = epoch.issued.get(id(storage))
    return entry is not None and entry[0]() is storage and entry[1]() is not None


def _release(epoch_ref: weakref.ref, key: int):
    """What runs when an issued alias lets go of its memory (its storage is gone, or its
    memory moved elsewhere): the epoch advances, and the entry goes."""

    def callback(_) -> None:
        epoch = epoch_ref()
        if epoch is not None:
            epoch.advance()
            epoch.issued.pop(key, None)

    return callback


__all__ = [
    "ISSUABLE_DEVICES",
    "UNTRACKED_KEYS",
    "ParamState",
    "StateEpoch",
    "StateTable",
    "is_issued",
    "issue",
    "issue_all",
    "tracked",
    "untracked",
]
