"""Device mesh and the one logical-axis rules table.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + parameter sharding),
``tensor`` (model parallel: heads, mlp, vocabulary). Parameters and activations carry logical
axis names; ``LOGICAL_RULES`` maps them to mesh axes. The vocabulary is a first-class logical
axis because the exact divergences reduce over it.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    # mixture of experts: expert parallelism over fsdp (the experts of a layer are split over the
    # fsdp devices; model/moe.py all-gathers tokens over it, so the weights stay split), their
    # embed axis whole (fsdp is taken), their intermediate axis ("mlp") over tensor
    ("expert", "fsdp"),
    ("expert_embed", None),
)


def make_mesh(axes: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh. At most one size may be -1 (filled from device count).

    ``axes`` is a mapping with exactly the keys data/fsdp/tensor (e.g. a ConfigDict) or a
    3-sequence in that order.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(axes, Mapping) or hasattr(axes, "keys"):
        keys = set(axes.keys())
        if keys != set(MESH_AXES):
            raise ValueError(f"mesh axes must be exactly {MESH_AXES}, got {sorted(keys)}")
        sizes = [int(axes[a]) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in axes]
        if len(sizes) != 3:
            raise ValueError(f"mesh needs 3 sizes for {MESH_AXES}, got {sizes}")
    n_auto = sum(s == -1 for s in sizes)
    if n_auto > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if n_auto:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices not divisible by fixed mesh sizes {sizes}")
        sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(logical_axes: Sequence[str | None], rules=LOGICAL_RULES) -> P:
    """PartitionSpec for a tuple of logical axis names, using ``rules``. Unknown names fail."""
    table = dict(rules)
    out, used = [], set()
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(table)}")
        mesh_axes = table[name]
        # A mesh axis may shard at most one dimension of an array.
        flat = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        flat = tuple(a for a in flat if a not in used)
        used.update(flat)
        out.append(None if not flat else (flat[0] if len(flat) == 1 else flat))
    return P(*out)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules=LOGICAL_RULES):
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def axis_size(mesh: Mesh, entry) -> int:
    """How many shards one PartitionSpec entry (None, an axis name or a tuple of them) splits a
    dimension into on ``mesh``."""
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names if n is not None)


def nbytes(tree) -> int:
    """Bytes of a pytree's arrays at their global shapes (leaves without a shape: none)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over data+fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def cpu_sync(tree):
    """Blocks until ``tree`` is computed, on the CPU backend only.

    XLA:CPU runs each simulated device on a small shared thread pool and its collectives block
    a worker while waiting: with several sharded programs queued by async dispatch (2 cores,
    8 devices) the devices of program N+1 can occupy every worker while program N's all-reduce
    still waits for its last participant, a deadlock that XLA aborts after 40 s. Syncing after
    each step keeps one program in flight; on TPU / GPU dispatch stays asynchronous.
    """
    if jax.default_backend() == "cpu":
        jax.block_until_ready(tree)
    return tree
