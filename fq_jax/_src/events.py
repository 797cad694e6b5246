"""Schedule events run outside the train step: the event form of the compression transforms.

The in-step form (`fq.dns_pruning`, `fq.focused_quantization`) decides inside
every `update` whether a DNS mask refresh, a GMM refit or an INQ growth is due,
with `jax.lax.cond`. That is the simplest to use, but every compiled step then
carries the event's computation as a conditional branch (on a GPU the
predicate goes to the host and back every step, and the branch is compiled
into every step).

The event form (`fq.dns_pruning_with_events`, `fq.focused_quantization_with_events`)
returns the transform together with its `ScheduleEvents`: the transform's
`update` holds no control flow, and the events, which happen at update counts
known in advance, are computed by their own pure function, called only when
the host says one is due:

    tx, events = fq.focused_quantization_with_events(inner, schedule=...)
    for i, batch in enumerate(batches):
      params, opt_state = train_step(params, opt_state, batch)  # jitted, no conditionals
      if due := events.due(i + 1):
        opt_state = events.run(params, opt_state, due)  # or jax.jit(events.run, static_argnums=2)

Both forms give identical states and parameters (tests/test_events.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

Due = Callable[[int], tuple[str, ...]]
Run = Callable[[Any, Any, tuple[str, ...]], Any]


class ScheduleEvents(NamedTuple):
  """The schedule events of a compression transform in its event form.

  Attributes:
    due: host function of the update count (the number of `update` calls
      made so far, 1 after the first): the names of the events due right
      after that update, in the order they run; () when none is. Pure in
      the count, so a resumed run needs no extra state.
    run: `run(params, opt_state, names) -> opt_state`, pure and jittable
      with `names` static: runs the named events on the parameters after
      the update (the ones the next forward pass reads) and returns the
      whole optimizer state (the compression state found anywhere inside
      it, as by `fq.find_state`, replaced). Called eagerly it runs its
      expensive parts as jitted functions shared with the transform's
      `init` (a refit reuses the mixture fit `init` compiled).
    names: every event name `due` can return.
  """

  due: Due
  run: Run
  names: tuple[str, ...]


def no_events() -> ScheduleEvents:
  """The events of a transform whose schedule has none (every event fused into the step)."""
  return ScheduleEvents(due=lambda count: (), run=lambda params, state, names: state, names=())


def replace_state(opt_state, is_state: Callable[[Any], bool], new):
  """`opt_state` with its single sub-state for which `is_state` holds replaced by `new`."""
  if is_state(opt_state):
    return new
  return jax.tree.map(lambda x: new if is_state(x) else x, opt_state, is_leaf=is_state)


def refit_counts(first: int, growth: float, up_to: int) -> list[int]:
  """Update counts of the mixture refits up to `up_to`: exactly what the in-step form computes.

  The interval is kept in float32 and grown by `growth` at each refit, the next
  refit `ceil(interval)` updates later, with the same float32 rounding as the
  traced counters of `FQState` (`next_refit`, `refit_interval`).
  """
  if first <= 0:
    return []
  counts, interval, nxt = [], np.float32(first), first
  while nxt <= up_to:
    counts.append(nxt)
    interval = np.float32(interval * np.float32(growth))
    nxt = nxt + int(np.ceil(interval))
  return counts


@functools.lru_cache(maxsize=64)
def _refit_set(first: int, growth: float, up_to: int) -> frozenset[int]:
  return frozenset(refit_counts(first, growth, up_to))


def is_refit_count(first: int, growth: float, count: int) -> bool:
  """Whether the mixtures are refitted right after update `count` (host, cached)."""
  if first <= 0 or count < first:
    return False
  # Refit counts grow geometrically: a cache keyed by the next power of two holds few sets.
  horizon = 1 << max(count, 1).bit_length()
  return count in _refit_set(first, float(growth), horizon)


def bound_arguments(fn: Callable, *args, **kwargs) -> dict[str, Any]:
  """`fn`'s arguments for this call with its own defaults filled in (one owner of the defaults)."""
  bound = inspect.signature(fn).bind(*args, **kwargs)
  bound.apply_defaults()
  return dict(bound.arguments)
