"""Weight sync between disjoint sub-meshes (train.mode="async"; trustrl.training.async_rollouts).

    sync = WeightSync(sampler_mesh)
    params_sampler, metrics = sync(params_roll)   # trainer-mesh arrays -> sampler mesh
    sync = WeightSync([mesh_0, mesh_1])           # several sampler replicas' meshes
    [params_0, params_1], metrics = sync(params_roll)

The trainer's rollout-dtype parameters (``Run.rollout_params``: cast, or LoRA merged) keep
their PartitionSpecs and move onto the sampler mesh with one ``jax.device_put`` to the same
specs over the sampler's devices (the sampler's data / fsdp / tensor sizes may differ: a
dimension the sampler's mesh cannot split evenly is a ValueError naming the leaf). The copy is
timed to completion (``block_until_ready``) and its bytes counted (global sizes; every byte
leaves the trainer's chips once). With several processes JAX cannot reshard between different
device sets across hosts (jax 0.10-0.12), so the sync goes through the hosts: every process
gathers the tree (``multihost.to_host``, a collective) and places its own shards on the sampler
mesh (``multihost.to_global``); the same values, by a slower path. Several replicas' meshes
(a list) each receive the whole tree; the host gather is done once.
"""
from __future__ import annotations

import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.infra import multihost, sharding


def target_shardings(tree, mesh):
    """Each leaf's NamedSharding spec on ``mesh`` (replicated for a leaf without one)."""
    def one(path, x):
        spec = x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else P()
        for dim, entry in zip(x.shape, spec):
            if entry is not None and dim % sharding.axis_size(mesh, entry):
                raise ValueError(
                    f"weight sync: {jax.tree_util.keystr(path)} of shape {tuple(x.shape)} is "
                    f"split by {spec} but the sampler mesh {dict(mesh.shape)} cannot split "
                    f"its dimension {dim} evenly; choose sampler_mesh sizes that divide it")
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, tree)


class WeightSync:
    """Copies parameter trees onto ``mesh`` (the sampler's; or a list of meshes, one copy on
    each), keeping their specs."""

    def __init__(self, mesh):
        self.single = not isinstance(mesh, (list, tuple))
        self.meshes = [mesh] if self.single else list(mesh)
        self._shardings = None

    def __call__(self, params):
        """(params on the sampler mesh, or a list: one per mesh; {"async/sync_s",
        "async/sync_bytes"}: the bytes of one copy)."""
        if self._shardings is None:  # the tree's layout is fixed for a run
            self._shardings = [target_shardings(params, m) for m in self.meshes]
        t0 = time.perf_counter()
        if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
            out = [jax.device_put(params, s) for s in self._shardings]  # device to device
        else:  # several processes: JAX reshards across hosts only within one device set
            host = multihost.to_host(params)
            out = [multihost.to_global(host, s) for s in self._shardings]
        out = jax.block_until_ready(out)
        return out[0] if self.single else out, {
            "async/sync_s": time.perf_counter() - t0,
            "async/sync_bytes": float(sharding.nbytes(params))}
