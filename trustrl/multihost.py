"""Multi-controller helpers: one Python process per host, every process runs the same program.

The rules the loop follows (docs/scaling.md, "Multi-process runs"):
- Every process runs the same host code on the same data in the same order (the prompt
  iterator, the RNG keys and the config are identical), so collectives line up.
- A host read of a global array goes through ``to_host``: it gathers the rows held by other
  processes (a collective: every process calls it) and returns numpy. ``np.asarray`` on an array
  that spans non-addressable devices fails.
- Host data entering a jitted program goes through ``to_global``: each process places only its
  own shards of the (identical) host value.
- Files are written by process 0 (``is_primary``); a file the others read afterwards is written
  under ``primary_first``: process 0 runs the block while the others wait, then they run it and
  find what process 0 wrote (a built dataset, a trained tokenizer, the warm-start cache).

With one process every helper reduces to the single-host operation.
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_primary() -> bool:
    return jax.process_index() == 0


def sync(name: str):
    """A barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str):
    """Process 0 runs the block first; the others run it after process 0 has finished it (also
    when it raised: they then raise their own error rather than wait for ever)."""
    if jax.process_count() == 1:
        yield
        return
    if is_primary():
        try:
            yield
        finally:
            sync(f"trustrl_primary_first:{name}")
    else:
        sync(f"trustrl_primary_first:{name}")
        yield


def _leaf_to_host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_host(tree):
    """numpy copies of a pytree's arrays, gathered across processes where they are sharded over
    other processes' devices (a collective: every process must call it, in the same order)."""
    return jax.tree.map(_leaf_to_host, tree)


def to_global(tree, shardings):
    """Global jax.Arrays from host values that are identical on every process: each process
    places the shards its devices hold. ``shardings``: one Sharding or a matching pytree."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, s):
        x = np.asarray(x)
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)
