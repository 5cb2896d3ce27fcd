"""Rollouts from a sampler sub-mesh: train.mode="async", and "sync" on a split layout.

With ``sampler_mesh.devices`` > 0 the run's devices split into a trainer mesh (``mesh``'s
layout over the rest) and ``sampler_mesh.replicas`` sampler meshes (``sampler_mesh``'s layout
each), inside the same multi-controller program (no Pathways). Replica r samples prompts
r * P / R .. (r + 1) * P / R of each iteration; with several processes each replica lies on one
process, so the sampler thread never runs a cross-process program (a single sampler mesh may
span the processes in sync mode; in async its collectives beside the trainer's deadlocked on
CPU). The loop takes each iteration's rollout from a ``RolloutProducer`` and hands it the
trainer's parameters after its updates:

    producer = RolloutProducer(cfg, run, collect, start, key)
    producer.publish(start, state)          # version `start`: the parameters the run starts at
    item = producer.take(it)                # iteration it's rollout (blocks until it is there)
    ... score and updates on the trainer mesh ...
    producer.publish(it + 1, state)         # every train.sync_every iterations (and the last)
    producer.close()

Versions. Version v is the trainer's parameters after v iterations (their rollout dtypes, cast
on the trainer mesh, then ``WeightSync`` onto every replica). The rollout of iteration j may
use version v only if j - v <= train.max_staleness: the producer waits for one (back-pressure)
instead of sampling staler data, so at most max_staleness + 1 rollouts are ever queued and
nothing is dropped. Of the allowed versions published when it starts the rollout it takes the
newest (train.rollout_version="newest": the freshest; which one depends on timing) or the
oldest ("scheduled": rollout j gets the first published version >= j - max_staleness,
whatever the timing, so a run is reproducible and every process picks the same one; the
sampler keeps the newer versions until their rollouts). Every row of a rollout records its
version (``Item.version``). With train.partial_rollouts = C > 0 (async) the rollout is decoded
in segments of C tokens and a row still generating when a newer version is published
continues with it (trustrl.rollout.partial): ``Item.token_versions`` records every token's
version, so its mu stays the exact anchor per token, and ``Item.version`` is the oldest (the
bound applies to it).

mode="async" runs the producer in a host thread: it samples iteration j + 1.. on the sampler
mesh while the trainer updates on iteration j (JAX's dispatch releases the GIL while the
programs run; each thread sets its own mesh context). mode="sync" calls the same producer
inline, after the publish, so a sync run on a split layout is the sequential baseline of the
same layout, and async with max_staleness 0 equals it bitwise (tests/training/test_async.py).

Keys and data. The producer follows the loop's key chain (4-way split per iteration, the
rollout key second) from the run's (or the checkpoint's) key, and owns the prompt iterator; each
item carries the iterator's state after it, which the loop checkpoints. A resume therefore
regenerates the rollouts that were in flight from the restored parameters and data position,
deterministically (in flight = sampled, not yet trained on; they are not saved).

Several processes. Each process samples its own replicas; the trainer thread joins every
replica's rows in ``take`` (``gather_parts``: the prompt width agreed through the coordination
service, then one all-gather over the trainer's mesh), so every cross-process program is the
trainer's, in the same order on every process.

Benchmark-only: ``train.emulate_sample_s`` / ``train.emulate_train_s`` sleep inside the sample
and train phases (device time that takes no CPU; benchmarks/async_rl.py).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.core import losses
from trustrl.infra import multihost, sharding
from trustrl.rollout.weight_sync import WeightSync

MODES = ("sync", "async")
# which allowed version a rollout samples with (train.rollout_version): the newest published
# when it starts (timing decides), or the oldest the bound allows (a fixed schedule)
VERSIONS = ("newest", "scheduled")
_POLL_S = 0.05  # how often a waiting thread looks at the stop flag


def split_devices(n_sampler: int, devices) -> tuple[list, list]:
    """(trainer devices, sampler devices): the sampler takes the first n_sampler / P devices of
    each of the P processes (so both meshes span every process)."""
    by_proc = collections.defaultdict(list)
    for d in devices:
        by_proc[d.process_index].append(d)
    if n_sampler % len(by_proc):
        raise ValueError(f"sampler_mesh.devices={n_sampler} is not divisible by the "
                         f"{len(by_proc)} processes (each gives the sampler the same number)")
    k = n_sampler // len(by_proc)
    sampler = [d for p in sorted(by_proc) for d in by_proc[p][:k]]
    trainer = [d for p in sorted(by_proc) for d in by_proc[p][k:]]
    return trainer, sampler


def replica_groups(sampler: list, replicas: int) -> list[list]:
    """``sampler`` (split_devices' order: each process's devices together) in ``replicas``
    groups of equal size; with several processes each group lies on one process (a multiple of
    the process count), replica r on process r // (replicas / processes). One replica may span
    the processes."""
    if replicas == 1:
        return [list(sampler)]
    procs = sorted({d.process_index for d in sampler})
    if replicas % len(procs):
        raise ValueError(f"sampler_mesh.replicas={replicas} is not a multiple of the "
                         f"{len(procs)} processes (each process hosts the same number of "
                         f"whole replicas)")
    if len(sampler) % replicas:
        raise ValueError(f"sampler_mesh.replicas={replicas} does not divide the sampler's "
                         f"{len(sampler)} devices")
    size = len(sampler) // replicas
    return [sampler[i:i + size] for i in range(0, len(sampler), size)]


def sampler_device_count(spec, n_devices: int) -> int:
    """sampler_mesh.devices: a count (a whole number >= 1), or a fraction in (0, 1) of the
    devices (rounded; at least 1)."""
    spec = float(spec)
    return max(1, round(spec * n_devices)) if 0 < spec < 1 else int(spec)


def meshes(cfg, devices=None):
    """(trainer mesh, None) without a split layout, else (trainer mesh, the sampler replicas'
    meshes: a tuple of sampler_mesh.replicas meshes of ``sampler_mesh``'s layout each) over
    ``devices`` (default jax.devices())."""
    devices = list(jax.devices() if devices is None else devices)
    n = sampler_device_count(cfg.sampler_mesh.devices, len(devices)) if split(cfg) else 0
    if not n:
        return sharding.make_mesh(cfg.mesh, devices), None
    if not 0 < n < len(devices):
        raise ValueError(f"sampler_mesh.devices={cfg.sampler_mesh.devices} gives the sampler "
                         f"{n} of {len(devices)} devices; it needs at least 1 and must leave "
                         f"the trainer at least 1")
    replicas = int(cfg.sampler_mesh.get("replicas", 1))
    procs = len({d.process_index for d in devices})
    if cfg.train.mode == "async" and procs > 1:
        if replicas % procs:
            raise ValueError(
                f"train.mode='async' with {procs} processes needs sampler replicas that each "
                f"lie on one process: sampler_mesh.replicas={replicas} must be a multiple of "
                f"{procs}. One sampler mesh across the processes would run its collectives "
                f"beside the trainer's, which deadlocked on CPU (docs/async_rl.md)")
        if cfg.train.get("rollout_version", "newest") != "scheduled":
            raise ValueError(
                f"train.mode='async' with {procs} processes needs train.rollout_version="
                f"'scheduled' (got {cfg.train.get('rollout_version', 'newest')!r}): every "
                f"process must sample each rollout with the same version, and the newest one "
                f"a process has seen depends on its timing")
    trainer, sampler = split_devices(n, devices)
    groups = replica_groups(sampler, replicas)
    axes = {a: cfg.sampler_mesh[a] for a in sharding.MESH_AXES}
    try:
        t_mesh = sharding.make_mesh(cfg.mesh, trainer)
    except ValueError as e:
        raise ValueError(f"mesh does not fit the trainer's {len(trainer)} devices "
                         f"({len(devices)} minus sampler_mesh.devices={n}): {e}") from None
    try:
        s_meshes = tuple(sharding.make_mesh(axes, g) for g in groups)
    except ValueError as e:
        what = f"each of the {replicas} replicas' {len(groups[0])}" if replicas > 1 else \
            f"the sampler's {n}"
        raise ValueError(f"sampler_mesh does not fit {what} devices: {e}") from None
    rows = int(cfg.rollout.prompts_per_iter) // replicas * int(cfg.rollout.group_size)
    shards = math.prod(s_meshes[0].shape[a] for a in ("data", "fsdp"))
    if rows % shards:
        raise ValueError(f"each sampler replica's {rows} rows (rollout.prompts_per_iter / "
                         f"sampler_mesh.replicas x rollout.group_size) do not split over its "
                         f"batch axes (data x fsdp = {shards})")
    return t_mesh, s_meshes


def own_replicas(s_meshes) -> list:
    """[(replica index, mesh)] of the replicas with devices of this process (every process
    shares a single replica that spans them)."""
    me = jax.process_index()
    return [(r, m) for r, m in enumerate(s_meshes)
            if any(d.process_index == me for d in m.devices.flat)]


def split(cfg) -> bool:
    """Whether cfg splits its devices (sampler_mesh.devices > 0; always for mode="async")."""
    sm = cfg.get("sampler_mesh")
    return sm is not None and bool(sm.get("devices", 0))


def local_device(mesh):
    """This process's first device of ``mesh``: a thread's default device, so that the
    arrays it makes without a sharding (keys, permutations, scalars) and the programs on them
    stay on its own mesh. On another mesh's device they would queue behind that mesh's
    programs; with several processes behind a program that waits for this thread's peer, a
    deadlock (the trainer's keys on a sampler device did)."""
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


@dataclasses.dataclass
class Part:
    """One sampler replica's share of a rollout (prompts r * P / R .. (r + 1) * P / R of the
    iteration's P prompts, every row of their groups), on the host."""
    replica: int
    host: Any             # trustrl.rollout.record.Rollout (numpy)
    rewards: Any          # [b] float32
    version: int          # the version of its first tokens (the oldest)
    token_versions: Any = None  # partial rollouts: [b, N] int32, -1 outside the response


@dataclasses.dataclass
class Item:
    iteration: int
    parts: list           # this process's replicas' Parts (the trainer joins every process's)
    examples: list        # the iteration's prompts (every replica's)
    extra: dict
    data_state: dict      # the prompt iterator's state after this rollout (checkpointed)
    sample_s: float       # sampling (and rewards) wall time
    wait_s: float         # the producer's wait for an allowed version before sampling
    # set when the trainer takes it (RolloutProducer.take: every replica's rows joined)
    version: int = -1     # the trainer iterations in the parameters of its oldest tokens
    host: Any = None      # the rollout (numpy; trustrl.rollout.record.Rollout)
    rewards: Any = None
    # partial rollouts (train.partial_rollouts): the version of every response token [B, N]
    # (-1 outside the response); ``version`` is then the oldest, the one the bound applies to
    token_versions: Any = None


def join_parts(parts: list, group_size: int, width: int = 0):
    """(host Rollout, rewards, per-row versions [B] int32, token versions or None) of
    replica-ordered Parts: prompts left-padded to the widest part's width (or ``width``; the
    routed experts' prompt columns too), rows concatenated, group_index renumbered."""
    width = max([width] + [p.host.prompt_tokens.shape[1] for p in parts])
    if len(parts) == 1 and parts[0].host.prompt_tokens.shape[1] == width:  # as sampled
        p = parts[0]
        return p.host, p.rewards, np.full(len(p.rewards), p.version, np.int32), \
            p.token_versions

    def pad(p):
        extra = width - p.host.prompt_tokens.shape[1]
        if not extra:
            return p.host
        left = lambda x: None if x is None else np.pad(x, [(0, 0), (extra, 0)] + [(0, 0)] * (
            x.ndim - 2))
        return p.host.replace(prompt_tokens=left(p.host.prompt_tokens),
                              prompt_mask=left(p.host.prompt_mask),
                              routed_experts=left(p.host.routed_experts))

    host = _renumbered(jax.tree.map(lambda *xs: np.concatenate(xs), *[pad(p) for p in parts]),
                       group_size)
    rewards = np.concatenate([p.rewards for p in parts]).astype(np.float32)
    versions = np.concatenate([np.full(len(p.rewards), p.version, np.int32) for p in parts])
    tv = None
    if parts[0].token_versions is not None:
        tv = np.concatenate([p.token_versions for p in parts]).astype(np.int32)
    return host, rewards, versions, tv


def gather_parts(parts: list, group_size: int, mesh, name: str):
    """``join_parts`` of every process's Parts, on every process, from each process's own
    (``parts``): the prompt width agreed through the coordination service (``name``: new for
    each call), this process's rows joined at it, then gathered by an all-gather over ``mesh``
    (the trainer's; a collective that the trainer thread runs, in the same order on every
    process). Replica r lies on process r // (R / P), so process order is replica order."""
    width = max(int(w) for w in multihost.exchange(
        f"{name}/width", str(max(p.host.prompt_tokens.shape[1] for p in parts))))
    host, rewards, versions, tv = join_parts(parts, group_size, width)
    got = multihost.gather_rows({"host": host, "rewards": rewards, "versions": versions,
                                 "token_versions": tv}, mesh)
    return (_renumbered(got["host"], group_size), got["rewards"], got["versions"],
            got["token_versions"])


def _renumbered(host, group_size: int):
    """``host`` with group_index 0, 0, .., 1, 1, .. (group_size rows each)."""
    b = host.response_tokens.shape[0]
    return host.replace(group_index=np.repeat(np.arange(b // group_size, dtype=np.int32),
                                              group_size))


@dataclasses.dataclass
class Versioned:
    """What a partial rollout's segments ask for the newest weights (trustrl.rollout.partial):
    ``current() -> (version, parameters on the sampler mesh)``."""
    current: Callable


class _Stopped(Exception):
    pass


class RolloutProducer:
    """Samples iterations start.. on the sampler replicas (see the module docstring)."""

    def __init__(self, cfg, run, collect: Callable, start: int, key):
        """``collect(parameters, key) -> (parts, examples, extra metrics)``: one iteration's
        rollout on this process's sampler replicas (loop._collect_on_sampler); ``parameters``
        one tree (or Versioned) per replica of ``run.sampler_replicas``."""
        self.cfg, self.run, self.collect = cfg, run, collect
        self.asynchronous = cfg.train.mode == "async"
        self.max_staleness = int(cfg.train.max_staleness) if self.asynchronous else 0
        self.sync_every = int(cfg.train.sync_every) if self.asynchronous else 1
        self.scheduled = (self.asynchronous
                          and cfg.train.get("rollout_version", "newest") == "scheduled")
        self.emulate_s = float(cfg.train.get("emulate_sample_s", 0.0))
        self.partial = int(cfg.train.get("partial_rollouts", 0)) > 0 and self.asynchronous
        self.replicas = int(cfg.sampler_mesh.get("replicas", 1))
        self.group_size = int(cfg.rollout.group_size)
        # the train step reads a rollout's own parameters only for the full-vocabulary
        # divergences (mu recomputed from them); otherwise the trainer keeps just the newest
        self.keep_versions = losses.method_spec(cfg.loss.method).divergence == "full"
        meshes = [m for _, m, _ in run.sampler_replicas]
        self.weight_sync = WeightSync(meshes)
        # the key chain runs on the first replica's mesh (threefry: the same bits anywhere)
        self._key = jax.random.wrap_key_data(jax.device_put(
            np.asarray(jax.random.key_data(key)), NamedSharding(meshes[0], P())))
        self._next, self._end = start, int(cfg.train.iterations)
        self._cond = threading.Condition()
        # version -> its parameters on each replica: the newest only, or (scheduled) every
        # version a later rollout may still be given
        self._published = collections.OrderedDict()
        self._trainer_params = {}    # version -> the same parameters on the trainer mesh
        self._items = collections.OrderedDict()
        self._error = None
        self._stop = False
        self._thread = None
        self.counts = collections.Counter()  # version lag -> rollouts trained on

    # -- trainer side -------------------------------------------------------------------------
    def due(self, version: int) -> bool:
        """Whether the trainer publishes after ``version`` iterations."""
        return version % self.sync_every == 0 or version == self._end

    def publish(self, version: int, state) -> dict:
        """Syncs the trainer's parameters after ``version`` iterations to the sampler replicas;
        returns the sync's metrics. Starts the producer thread on the first call (async)."""
        params = sharding.cpu_sync(self.run.rollout_params(state.params))
        on_sampler, metrics = self.weight_sync(params)
        metrics["async/sync_bytes"] *= self.replicas  # every replica receives the whole tree
        with self._cond:
            if not self.scheduled:
                self._published.clear()
            self._published[version] = on_sampler
            if not self.keep_versions:
                self._trainer_params.clear()
            self._trainer_params[version] = params
            self._cond.notify_all()
        if self.asynchronous and self._thread is None:
            self._thread = threading.Thread(target=self._produce_all, name="trustrl-sampler",
                                            daemon=True)
            self._thread.start()
        return metrics

    def take(self, it: int):
        """(Item of iteration it, every replica's rows joined, the rollout parameters on the
        trainer mesh for the train step: those of its version for the full-vocabulary
        divergences, else the newest, which the step does not read; metrics). Blocks in async
        mode until the producer has it; raises the producer's error. With replicas on several
        processes the rows are gathered here, by the trainer's thread (a collective on the
        trainer's mesh: the sampler thread never runs one)."""
        t0 = time.perf_counter()
        if not self.asynchronous:
            self._produce(it)
        with self._cond:
            while it not in self._items and self._error is None:
                self._cond.wait(_POLL_S)
            if self._error is not None:
                raise RuntimeError(f"the sampler thread failed at iteration "
                                   f"{self._error[0]}: {self._error[1]!r}") from self._error[1]
            item = self._items.pop(it)
            queued = len(self._items)
            self._cond.notify_all()
        if len(item.parts) < self.replicas:  # the other processes' replicas: gather
            joined = gather_parts(item.parts, self.group_size, self.run.mesh, f"rollout/{it}")
        else:
            joined = join_parts(item.parts, self.group_size)
        item.host, item.rewards, versions, item.token_versions = joined
        item.version = int(versions.min())
        with self._cond:
            if self.keep_versions:
                params = self._trainer_params[item.version]
                for v in [v for v in self._trainer_params if v < item.version]:
                    del self._trainer_params[v]  # later rollouts never use older versions
            else:  # (unused by the train step: see keep_versions)
                params = self._trainer_params[max(self._trainer_params)]
        lag = it - item.version
        self.counts[lag] += 1
        partial = {}
        if item.token_versions is not None:
            v = item.token_versions
            on = v >= 0
            span = np.where(on, v, -1).max(1) - np.where(on, v, np.iinfo(np.int32).max).min(1)
            partial = {"async/partial_rows": float((span > 0).sum()),
                       "async/token_lag_mean": float((it - v[on]).mean()) if on.any() else 0.0}
        busy = item.sample_s
        metrics = {"async/version_lag": float(lag), "async/queued": float(queued),
                   "async/trainer_wait_s": time.perf_counter() - t0 if self.asynchronous else 0.0,
                   "async/sampler_idle_frac": item.wait_s / max(item.wait_s + busy, 1e-9),
                   "time/sample_s": busy, **partial,
                   **{f"async/lag_count/{k}": float(n) for k, n in sorted(self.counts.items())}}
        return item, params, metrics

    def close(self):
        """Stops the producer (it finishes the program it is in) and waits for it."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    # -- producer side ------------------------------------------------------------------------
    def _allowed(self, j: int):
        """The version rollout j samples with (None while none is allowed yet): of the
        published versions within the bound, the newest, or (scheduled) the oldest."""
        ok = [v for v in self._published if j - v <= self.max_staleness]
        if not ok:
            return None
        return min(ok) if self.scheduled else max(ok)

    def _newest(self, replica: int):
        """(version, replica's parameters) published last: a partial rollout's next segment
        continues with them."""
        with self._cond:
            v = max(self._published)
            return v, self._published[v][replica]

    def _segments(self, replica: int, version: int, params):
        """``current()`` of a partial rollout's replica: its first call (the first segment)
        gives the version chosen for the rollout, every later call the newest published."""
        first = [True]

        def current():
            if first[0]:
                first[0] = False
                return version, params
            return self._newest(replica)
        return current

    def _produce_all(self):
        try:
            while self._next < self._end:
                self._produce(self._next)
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, which raises it
            with self._cond:
                self._error = (self._next, e)
                self._cond.notify_all()

    def _produce(self, j: int):
        """Samples iteration j under the first replica's mesh context and default device (each
        replica's calls set their own): in the producer thread (async), or inline in the
        trainer's (sync)."""
        if j != self._next:
            raise RuntimeError(f"rollout of iteration {j} requested, the producer is at "
                               f"{self._next}")
        mesh = self.run.sampler_replicas[0][1]
        with jax.set_mesh(mesh), jax.default_device(local_device(mesh)):
            self._sample(j)

    def _sample(self, j: int):
        self._key, k_roll, _, _ = jax.random.split(self._key, 4)  # the loop's key chain
        t0 = time.perf_counter()
        with self._cond:  # back-pressure: wait for an allowed version
            while not self._stop and self._allowed(j) is None:
                self._cond.wait(_POLL_S)
            if self._stop:
                raise _Stopped
            version = self._allowed(j)
            params = self._published[version]
            for v in [v for v in self._published if v < version]:
                del self._published[v]  # later rollouts never use older versions
        t1 = time.perf_counter()
        if self.partial:  # the first segment: the version chosen; each later one: the newest
            params = [Versioned(self._segments(i, version, p)) for i, p in enumerate(params)]
        parts, examples, extra = self.collect(params, k_roll, version)
        if self.emulate_s:
            time.sleep(self.emulate_s)
        item = Item(j, parts, examples, extra, self.run.prompt_iter.state(),
                    time.perf_counter() - t1, t1 - t0)
        with self._cond:
            self._items[j] = item
            self._next = j + 1
            self._cond.notify_all()
