"""Orbax checkpoints of the full training state.

Saved: the device state pytree (params, optimizer state, step, skipped count) restored straight
into its shardings, plus a small JSON of host state (iteration, data-iterator position and
shuffle seed, the RNG key data, anything else the loop needs to continue bit-for-bit). Saves are atomic (Orbax
writes to a temporary directory and renames), so an interrupted save never corrupts the latest
good checkpoint.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, host_state: dict, *, wait: bool = True):
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state)))
        if wait:
            self.manager.wait_until_finished()

    def restore(self, abstract_state, step: int | None = None):
        """Restores (state, host_state). ``abstract_state``: a pytree of ShapeDtypeStruct with
        shardings (e.g. jax.eval_shape of the init, with .sharding set) or concrete arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
        return out.state, out.host

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
