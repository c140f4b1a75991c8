"""Weight operands prepared once per version: what a kernel derives from a weight, kept until the weight changes.

A layer's weights change once per optimiser step, and never in evaluation, yet every call of an approximate
layer would split, quantise and pack them again.  :func:`prepared` keeps what was derived from a tensor (the
last :data:`PER_TENSOR` keys used, so a few designs alternate freely but a sweep over many never piles up
copies) and hands it back while the tensor is provably the same:

* the same Python object owns the memory (a weak reference to the view's base: a freed tensor's address is
  reused, and a new tensor starts at version 0, so neither an address nor a version alone says "same");
* its version counter (``tensor._version``) is unchanged: every in-place write (``add_``, ``copy_``, an
  optimiser step, ``load_state_dict``) bumps it;
* its data pointer, shape, strides, storage offset, dtype and device are unchanged (``param.data = t`` and
  ``module.to(...)`` swap the memory of the same object without bumping the version);
* the caller's key (multiplier, instruction set, layout) is equal.

An entry holds a detached alias of each tensor it was derived from, so their memory cannot be freed and
reused at the same address while the entry lives; the entry goes when the tensor's owner is collected.
Inference tensors (no version counter) and tensors autograd computed (activations) are never cached.  Writes through ``tensor.data`` bypass the version
counter (as they bypass autograd's own checks): after one, call :func:`clear`.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import torch

__all__ = ["prepared", "clear", "size"]


PER_TENSOR = 4  # entries kept per tensor (the last used): a few designs over the same weights alternate freely


class _Entry(NamedTuple):
    owners: tuple  # weak references to the bases of the tensors after the first
    stamps: tuple  # what must be unchanged (see _stamp)
    keep: tuple  # detached aliases: their memory stays allocated while the entry lives
    value: Any


class _Slot(NamedTuple):
    owner: weakref.ref  # the first tensor's base; its callback drops the slot
    entries: dict  # key -> _Entry, least recently used first


_SLOTS: dict[int, _Slot] = {}  # id(base of the first tensor) -> what was prepared from it


def _owner(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _stamp(t: torch.Tensor) -> tuple:
    return (t._version, t.data_ptr(), tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device)


def _cacheable(tensors: Sequence[torch.Tensor]) -> bool:
    """Plain tensors with a version counter, owned by leaves: weights and buffers, not activations that autograd
    keeps for the backward pass (their prepared copies would live as long, for nothing)."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_inference() and _owner(t).grad_fn is None
               for t in tensors)


def prepared(tensors: Sequence[torch.Tensor], key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()``, or what it returned last time for the same ``tensors`` (unchanged since) and ``key``.

    ``tensors``: what ``build`` reads (a weight first, then e.g. its scales); ``key``: everything else its
    result depends on.  ``build`` must not keep a reference to the tensors themselves.
    """
    if not _cacheable(tensors):
        return build()
    first, *others = (_owner(t) for t in tensors)
    stamps = tuple(_stamp(t) for t in tensors)
    slot = _slot(first)
    entry = slot.entries.pop(key, None)
    if entry is None or entry.stamps != stamps or any(ref() is not o for ref, o in zip(entry.owners, others)):
        entry = _Entry(tuple(weakref.ref(o) for o in others), stamps, tuple(t.detach() for t in tensors), build())
    slot.entries[key] = entry  # the most recently used last
    while len(slot.entries) > PER_TENSOR:
        del slot.entries[next(iter(slot.entries))]
    return entry.value


def _slot(owner: torch.Tensor) -> _Slot:
    """The entries of ``owner``, made empty for a new owner; the weakref callback drops them when the owner is
    collected (before its id can be reused), holding the dict itself: module globals may be gone at exit."""
    slot = _SLOTS.get(id(owner))
    if slot is None or slot.owner() is not owner:
        slot = _SLOTS[id(owner)] = _Slot(weakref.ref(owner, functools.partial(_forget, _SLOTS, id(owner))), {})
    return slot


def _forget(slots: dict, slot: int, _ref) -> None:
    slots.pop(slot, None)


def clear() -> None:
    """Forget every prepared operand (frees their memory now)."""
    _SLOTS.clear()


def size() -> int:
    """How many prepared operands are held."""
    return sum(len(slot.entries) for slot in list(_SLOTS.values()))
