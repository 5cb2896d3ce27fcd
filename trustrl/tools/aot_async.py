"""aot_check for a split layout (sampler_mesh.devices > 0; train.mode "async" or "sync"): each
side compiled on its own devices of the topology, and checked against its chips' memory.

    python -m trustrl.tools.aot_check --config=configs/qwen3_tpu.py:async --topology=v5p:2x4x4

The topology's devices split as the run splits them (trustrl.training.async_rollouts:
the sampler takes the same number of chips of every host). The sampler side compiles the
rollout program on ``sampler_mesh``'s layout and holds the rollout parameters twice at its
peak (the version it samples with, and the next one while a weight sync arrives); the
trainer side compiles everything else (init, score pass, train step, evaluation) on ``mesh``'s
layout and holds the train state, but not the sampler's KV cache. Rows are named
"sampler:PHASE" / "trainer:PHASE" in the report.
"""
from __future__ import annotations


def split_check(cfg, devices, *, check, log=print, phases, **kw) -> list:
    """Rows of ``check`` (aot_check.check) for both sides of cfg's split layout."""
    from trustrl.infra import sharding
    from trustrl.training import async_rollouts
    t_mesh, s_meshes = async_rollouts.meshes(cfg, devices)  # the run's split, its errors
    trainer, sampler = list(t_mesh.devices.flat), list(s_meshes[0].devices.flat)
    s_cfg = cfg.copy_and_resolve_references()
    s_cfg.mesh = {a: cfg.sampler_mesh[a] for a in sharding.MESH_AXES}
    replicas = len(s_meshes)  # identical: the first one's program is every replica's
    s_cfg.rollout.prompts_per_iter = cfg.rollout.prompts_per_iter // replicas
    rows = []
    log(f"sampler: {len(sampler)} chips, mesh {dict(s_cfg.mesh)}"
        + (f" (replica 1 of {replicas}, {s_cfg.rollout.prompts_per_iter} prompts each)"
           if replicas > 1 else ""))
    if "rollout" in phases:
        rows += [{**r, "phase": f"sampler:{r['phase']}"} for r in check(
            s_cfg, sampler, phases=("rollout",), side="sampler", log=log, **kw)]
    log(f"trainer: {len(trainer)} chips, mesh {dict(cfg.mesh)}")
    rest = tuple(p for p in phases if p != "rollout")
    rows += [{**r, "phase": f"trainer:{r['phase']}"} for r in check(
        cfg, trainer, phases=rest, side="trainer", log=log, **kw)]
    return rows
