"""The RL loop: rollout (mu) -> rewards -> advantages -> scoring -> updates -> log / eval / save.

Everything heavy is a jitted function from trustrl.rollout.sampler / trustrl.training.step; this
file is the plain Python loop that composes them (read it top to bottom).
"""
from __future__ import annotations

import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.core import advantages as adv_lib
from trustrl.infra import checkpoint as ckpt_lib
from trustrl.training import resume
from trustrl.infra import multihost, preemption, sharding, storage, workdir_lock
from trustrl.training import config_validation as cv
from trustrl.training import async_rollouts, evaluation, experiment, rlhf, step as ts
from trustrl.training.rewarding import rollout_rewards
from trustrl.training.rollout_source import RolloutSource
from trustrl.core import losses
from trustrl.infra.metrics import MetricWriter
from trustrl.rollout.record import FINISH_LENGTH, mismatch_stats, validate


def _mean_metrics(rounds: list[dict]) -> dict:
    """Each key's mean over the sampling rounds that logged it."""
    keys = {k for m in rounds for k in m}
    return {k: float(np.mean([m[k] for m in rounds if k in m])) for k in sorted(keys)}


def _collect(env, sampler, params_roll, prompt_iter, key, cfg, mesh, reward=None):
    """Samples one iteration's groups; with dynamic sampling, keeps only groups whose rewards
    differ and refills (a bounded number of rounds) to a fixed batch size. Returns the rollout
    on the devices, its host copy (numpy, gathered from every process), the examples, the
    rewards and extra metrics."""
    g, n = cfg.rollout.group_size, cfg.rollout.prompts_per_iter
    kept_ex, kept_r, kept_rew, rounds = [], [], [], []
    for round_ in range(1 + (cfg.rollout.max_refill_rounds if cfg.rollout.dynamic_sampling else 0)):
        examples = next(prompt_iter)
        key, sub = jax.random.split(key)
        r = sampler.generate(params_roll, env.encode_prompts(examples), g, sub)
        host = multihost.to_host(r)
        rew, rew_metrics = rollout_rewards(env, host, examples, g, cfg, reward)
        rounds.append(rew_metrics)
        if not cfg.rollout.dynamic_sampling:
            return r, host, examples, rew, rew_metrics
        informative = rew.reshape(-1, g).std(axis=1) > 0
        for i in np.flatnonzero(informative):
            kept_ex.append(examples[i])
            kept_r.append(jax.tree.map(lambda x: x[i * g:(i + 1) * g], host))
            kept_rew.append(rew[i * g:(i + 1) * g])
        if len(kept_ex) >= n:
            break
    if len(kept_ex) < n:  # not enough informative groups: top up with the last round's groups
        for i in np.flatnonzero(~informative)[: n - len(kept_ex)]:
            kept_ex.append(examples[i])
            kept_r.append(jax.tree.map(lambda x: x[i * g:(i + 1) * g], host))
            kept_rew.append(rew[i * g:(i + 1) * g])
    host = jax.tree.map(lambda *xs: np.concatenate(xs[:n]), *kept_r)
    host = host.replace(group_index=np.repeat(np.arange(n, dtype=np.int32), g))
    r = multihost.to_global(host, jax.tree.map(
        lambda x: sharding.batch_sharding(mesh, x.ndim), host))
    return r, host, kept_ex[:n], np.concatenate(kept_rew[:n]), {
        "rollout/refill_rounds": round_, **_mean_metrics(rounds)}


def _kl_penalty(cfg, run, batch, host_r, rewards):
    """rewards - kl_coef * KL(mu || pi_ref) per response (trustrl.training.rlhf.sequence_kl),
    pi_ref's log-probs from the trainer's scoring pass on the reference parameters; returns
    (rewards, advantages [B] float32, metrics)."""
    ref_logp = sharding.cpu_sync(run.score(run.policy_params(run.reference), batch))
    kl = rlhf.sequence_kl(host_r.rollout_logp, multihost.to_host(ref_logp),
                          multihost.to_host(batch["response_mask"]))
    rewards = (rewards - np.float32(cfg.reward_model.kl_coef) * kl).astype(np.float32)
    adv = np.asarray(adv_lib.compute_advantages(rewards, cfg.rollout.group_size,
                                                cfg.loss.advantage), np.float32)
    return rewards, adv, {"reward/kl_ref_mean": float(kl.mean()),
                          "reward/kl_ref_max": float(kl.max())}


def _check_storage(cfg, workdir: str):
    """Fails before any expensive work when a directory the run writes is read-only or full."""
    dirs = {workdir: "workdir", storage.join(workdir, "checkpoints"): "checkpoint directory"}
    if cfg.warmstart.steps > 0 and cfg.warmstart.cache_dir:
        dirs[cfg.warmstart.cache_dir] = "warmstart.cache_dir"
    for path, what in dirs.items():
        storage.check_writable(path, what)
        storage.check_free_space(path, storage.MIN_FREE_BYTES, f"the run's outputs ({what})")


def train(cfg, workdir: str, *, allow_config_change: bool = False):
    """Runs (or resumes) cfg in workdir. Returns (final TrainState, last iteration's metrics).

    The workdir is locked for the run (trustrl.infra.workdir_lock; process 0 holds it, every process
    learns whether it got it); a resume is checked against the run's recorded config
    (resume.check_resume, ``allow_config_change`` as the CLI flag), and the config is
    recorded only once the checkpoint is restored, just before the first iteration."""
    storage.check_writable(workdir, "workdir")  # read-only / below a file: named, before the lock
    lock = contextlib.ExitStack()
    with lock, multihost.PeerWatch():
        error = None
        if multihost.is_primary():
            try:
                lock.enter_context(workdir_lock.hold(workdir))
            except workdir_lock.WorkdirLocked as e:
                error = str(e)
        status = multihost.exchange("workdir_lock", error or "")[0]
        if status:
            raise workdir_lock.WorkdirLocked(status)
        notices, changes, _ = resume.check_resume(cfg, workdir, allow_config_change)
        for line in notices:
            print(line, flush=True)
        _check_storage(cfg, workdir)
        mesh, sampler_meshes = async_rollouts.meshes(cfg)  # a split layout's sampler replicas
        # under the mesh, the model's activation sharding constraints apply (batch over data+fsdp)
        with jax.set_mesh(mesh):
            run = experiment.build(cfg, workdir, mesh, sampler_meshes)  # data, model, ..
            if jax.process_count() > 1:  # every process built or read the same examples
                multihost.check_agree("data", {"data (sha256 of the train / test examples)":
                                               experiment.data_fingerprint(run.env)})
            return _run(cfg, workdir, run, changes)


def _run(cfg, workdir, run, changes=()):
    ckpt = ckpt_lib.Checkpointer(workdir, cfg.checkpoint.max_to_keep)
    state, key, start = run.state, run.key, 0
    if ckpt.latest_step() is not None:
        state, host = ckpt.restore(state)
        experiment.check_base(run, host.get("lora_base"), ckpt.directory)
        key = jax.random.wrap_key_data(jnp.asarray(np.asarray(host["key"], np.uint32)))
        start = host["iteration"]
        run.prompt_iter.restore(host["data"])
        if run.reward is not None and "reward_norm" in host:  # the running normalisation
            run.reward.moments = rlhf.RunningMoments(**host["reward_norm"])
        print(f"resumed from {ckpt.directory} at iteration {start}")
    ckpt.check_space(state)
    if multihost.is_primary():  # the run has started: its config (and accepted changes) now
        resume.record_config(cfg, workdir, changes, start if changes else None)
    multihost.sync("trustrl_config_recorded")
    writer = MetricWriter(workdir, cfg.log.tensorboard, resume_step=start)  # drops replayed rows
    if start == 0 and cfg.eval.every:
        # step 0: the base before any update, the reference of every later eval. Its key is
        # folded off the run's key (not split from it), so the RL trajectory is unchanged.
        base = sharding.cpu_sync(run.rollout_params(state.params))
        writer.write(0, evaluation.evaluate(run, base, jax.random.fold_in(key, 0), cfg))
    bar = None
    if cfg.log.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.train.iterations, initial=start, desc="rl", dynamic_ncols=True)
    # SIGTERM: the iteration in flight finishes, is checkpointed, then Preempted is raised
    try:
        with preemption.Watcher() as watcher:
            out = _loop(cfg, run, ckpt, writer, bar, watcher, state, key, start)
    except preemption.Preempted:  # its checkpoint must be complete: closing errors count
        _close(bar, writer, ckpt)
        raise
    except BaseException:  # the first error is the one reported: closing must not replace it
        for close in (bar.close if bar is not None else None, writer.close, ckpt.close):
            try:
                if close is not None:
                    close()
            except Exception:  # noqa: BLE001, S110 - secondary to the error being raised
                pass
        raise
    _close(bar, writer, ckpt)
    return out


def _close(bar, writer, ckpt):
    if bar is not None:
        bar.close()
    writer.close()
    ckpt.close()


def routing_program(cfg, model_cfg, mesh):
    """The jitted ``step.routing_metrics`` of a mixture-of-experts run (None for a dense model):
    routing mismatch between the rollout's recorded experts and the trainer's own routing, and
    the pi-mu mismatch split by it, every iteration whose rollout recorded its experts."""
    if not model_cfg.sparse_layers:
        return None
    return jax.jit(functools.partial(
        ts.routing_metrics, model_cfg=model_cfg, temperature=float(cfg.rollout.temperature),
        mesh=mesh, microbatches=cv.score_microbatches(cfg),
        routing_replay=bool(cfg.model.get("routing_replay", False))))


def _loop(cfg, run, ckpt, writer, bar, watcher, state, key, start):
    """The iterations start .. cfg.train.iterations; returns (state, last metrics)."""
    need_old = losses.METHODS[cfg.loss.method].needs_old_logp
    replay = bool(cfg.model.get("routing_replay", False))
    routing = routing_program(cfg, run.model_cfg, run.mesh)
    source = RolloutSource(cfg, run)  # the dial's staleness and rollout.mu
    if source.history is not None and start:
        print(f"rollout.mismatch.staleness={source.history.capacity - 1}: the parameter history "
              f"is not checkpointed; it refills from the restored parameters (rollout/staleness "
              f"logs the actual staleness)", flush=True)
    producer = None
    if run.sampler_replicas is not None:  # rollouts from the sampler replicas (sync or async)
        producer = async_rollouts.RolloutProducer(cfg, run, functools.partial(
            _collect_on_sampler, cfg, run), start, key)
    try:
        if producer is None:
            return _iterations(cfg, run, ckpt, writer, bar, watcher, state, key, start, source,
                               producer, need_old, replay, routing)
        # the trainer's own default device; the key made anew there (uncommitted, same bits)
        with jax.default_device(async_rollouts.local_device(run.mesh)):
            key = jax.random.wrap_key_data(jnp.asarray(np.asarray(jax.random.key_data(key))))
            return _iterations(cfg, run, ckpt, writer, bar, watcher, state, key, start, source,
                               producer, need_old, replay, routing)
    finally:
        if producer is not None:
            producer.close()


def _collect_on_sampler(cfg, run, params, key, version):
    """One iteration's rollout on this process's sampler replicas (async_rollouts): (Parts,
    examples, extra metrics). One replica: ``_collect`` (dynamic sampling included). Several:
    replica r samples prompts r * P / R .. (r + 1) * P / R with fold_in(key, r) (the key of
    ``_collect``'s first round); every replica's call is dispatched before any is read."""
    replicas = run.sampler_replicas
    if int(cfg.sampler_mesh.get("replicas", 1)) == 1:  # one mesh (it may span the processes)
        (r, mesh, sampler), = replicas
        _, host, examples, rewards, extra = _collect(run.env, sampler, params[0],
                                                     run.prompt_iter, key, cfg, mesh, run.reward)
        parts = [_part(r, sampler, host, rewards, version)]
    else:
        examples, g = next(run.prompt_iter), cfg.rollout.group_size
        n = len(examples) // int(cfg.sampler_mesh.replicas)
        _, sub = jax.random.split(key)
        outs, parts, extra = [], [], {}
        for (r, mesh, sampler), p in zip(replicas, params):
            k = jax.device_put(jax.random.fold_in(sub, r), NamedSharding(mesh, P()))
            with jax.set_mesh(mesh), jax.default_device(async_rollouts.local_device(mesh)):
                outs.append(sampler.generate(p, run.env.encode_prompts(
                    examples[r * n:(r + 1) * n]), g, k))
        for (r, _, sampler), out in zip(replicas, outs):
            host = multihost.to_host(out)  # this process's devices only: no collective
            rewards, _ = rollout_rewards(run.env, host, examples[r * n:(r + 1) * n], g, cfg,
                                         run.reward)
            parts.append(_part(r, sampler, host, rewards, version))
    if not cfg.rollout.get("keep_kv_cache", False):
        for _, _, sampler in replicas:
            sampler.release()
    return parts, examples, extra


def _part(r, sampler, host, rewards, version):
    """Replica r's Part; a partial rollout's versions from its sampler (each replica has its
    own)."""
    if hasattr(sampler, "last_versions"):
        return async_rollouts.Part(r, host, rewards, sampler.first_version,
                                   sampler.last_versions)
    return async_rollouts.Part(r, host, rewards, version)


def _rollout(cfg, run, source, producer, state, it, k_roll, evaluates):
    """Iteration it's rollout on the trainer mesh: (rollout, host copy, examples, rewards, extra
    metrics, advantages, its rollout parameters, source metrics, the rollout parameters of the
    policy at the iteration's start for evaluation on a split layout, the producer's Item)."""
    g = cfg.rollout.group_size
    if producer is not None:  # sampled on the sampler mesh, with a version <= it
        item, params_roll, metrics = producer.take(it)
        metrics["rollout/staleness"] = float((it - item.version) * int(cfg.train.epochs)
                                             * int(cfg.train.minibatches))  # optimizer steps
        r = multihost.to_global(item.host, jax.tree.map(
            lambda x: sharding.batch_sharding(run.mesh, x.ndim), item.host))
        adv = adv_lib.compute_advantages(item.rewards, g, cfg.loss.advantage)
        eval_roll = sharding.cpu_sync(run.rollout_params(state.params)) if evaluates else None
        return (r, item.host, item.examples, item.rewards, item.extra, adv, params_roll,
                metrics, eval_roll, item)
    params_roll, metrics = source.start(state)
    if run.episodes is not None:  # environment episodes (multi-turn); rewards: returns
        r, host_r, examples, rewards, extra, adv = run.episodes.collect(
            params_roll, run.prompt_iter, k_roll, run.mesh)
    else:
        r, host_r, examples, rewards, extra = _collect(run.env, run.sampler, params_roll,
                                                       run.prompt_iter, k_roll, cfg, run.mesh,
                                                       run.reward)
        adv = adv_lib.compute_advantages(rewards, g, cfg.loss.advantage)
    if not cfg.rollout.get("keep_kv_cache", False):  # not on the chips during the update
        run.sampler.release()
    return r, host_r, examples, rewards, extra, adv, params_roll, metrics, None, None


def _iterations(cfg, run, ckpt, writer, bar, watcher, state, key, start, source, producer,
                need_old, replay, routing):
    if producer is not None:
        producer.publish(start, state)  # the parameters the run starts (or resumes) at
    metrics = {}
    for it in range(start, cfg.train.iterations):
        t0 = time.perf_counter()
        key, k_roll, k_perm, k_eval = jax.random.split(key, 4)
        last = it + 1 == cfg.train.iterations
        evaluates = cfg.eval.every and ((it + 1) % cfg.eval.every == 0 or last)
        (r, host_r, examples, rewards, extra, adv, params_roll, source_metrics,
         eval_roll, item) = _rollout(cfg, run, source, producer, state, it, k_roll, evaluates)
        validate(host_r, run.model_cfg.vocab_size)
        if cfg.rollout.overlong == "filter":
            r = r.replace(
                response_mask=r.response_mask * (r.finish_reason != FINISH_LENGTH)[:, None])
        t_roll = time.perf_counter()
        adv = np.asarray(adv, np.float32)  # [B], or [B, N] per turn
        advantages = multihost.to_global(  # identical on every process; each places its rows
            adv, sharding.batch_sharding(run.mesh, adv.ndim))
        batch, host_r = source.rescore(ts.rollout_batch(r, advantages), host_r)
        # the recorded experts reach the score pass and the train step only when they replay
        # them (the programs' inputs are a dense run's otherwise); the routing metrics read them
        routed = batch.pop("routed_experts", None)
        if replay and routed is not None:  # without: the score pass / train step name it
            batch["routed_experts"] = routed
        old_logp = None
        if cfg.train.score_pass or need_old:
            old_logp = (batch["rollout_logp"] if source.reuses_score else  # the same pass
                        sharding.cpu_sync(run.score(run.policy_params(state.params), batch)))
            metrics = dict(mismatch_stats(old_logp, batch["rollout_logp"], r.response_mask))
            if source.rescored:  # what the rescoring replaced: the sampler's own mismatch
                metrics["rollout/sampler_mismatch_mean"] = mismatch_stats(
                    old_logp, r.rollout_logp, r.response_mask)["rollout/mismatch_mean"]
            if run.episodes is not None:  # and per turn of the episodes
                metrics.update(run.episodes.turn_mismatch(old_logp, host_r))
            if need_old:
                batch["old_logp"] = old_logp
        else:
            metrics = {}
        metrics.update(source_metrics)
        if run.reference is not None:  # RLHF's KL-to-reference penalty, then the advantages
            rewards, adv, kl_metrics = _kl_penalty(cfg, run, batch, host_r, rewards)
            metrics.update(kl_metrics)
            batch["advantages"] = multihost.to_global(
                adv, sharding.batch_sharding(run.mesh, adv.ndim))
        if routing is not None and routed is not None:
            metrics.update(sharding.cpu_sync(routing(
                run.policy_params(state.params), {**batch, "routed_experts": routed}, old_logp)))
        t_score = time.perf_counter()
        step_metrics = []
        bsz = batch["tokens"].shape[0]
        for epoch in range(cfg.train.epochs):
            perm = multihost.to_host(jax.random.permutation(jax.random.fold_in(k_perm, epoch), bsz))
            for idx in np.array_split(perm, cfg.train.minibatches):
                mb = sharding.cpu_sync(jax.tree.map(lambda x: x[idx], batch))
                state, m = sharding.cpu_sync(run.train_step(state, mb, params_roll, run.frozen))
                source.stepped(state)
                step_metrics.append(m)
        jax.block_until_ready(state)
        if cfg.train.get("emulate_train_s", 0.0):  # benchmark-only: device time without CPU
            time.sleep(float(cfg.train.emulate_train_s))
        if producer is not None and producer.due(it + 1):
            metrics.update(producer.publish(it + 1, state))
        t_update = time.perf_counter()
        metrics.update({k: np.mean([float(m[k]) for m in step_metrics]) for k in step_metrics[0]})
        metrics["train/skipped"] = float(sum(float(m["train/skipped"]) for m in step_metrics))
        n_resp = multihost.to_host(r.response_mask).sum(1)  # after the overlong filter
        n_tok = int(n_resp.sum())
        metrics.update({
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "response/length_mean": float(n_resp.mean()),
            "response/truncated_frac": float((host_r.finish_reason == FINISH_LENGTH).mean()),
            "time/rollout_s": t_roll - t0, "time/score_s": t_score - t_roll,
            "time/update_s": t_update - t_score, "time/iteration_s": t_update - t0,
            "time/tokens_per_s": n_tok / max(t_update - t0, 1e-9),
            "train/optimizer_steps": int(state.step), "train/skipped_total": int(state.skipped),
            **extra})
        if evaluates:
            metrics.update(evaluation.evaluate(
                run, eval_roll if producer is not None else source.eval_params(params_roll),
                k_eval, cfg))
        writer.write(it + 1, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                            mismatch=f"{metrics.get('rollout/mismatch_mean', float('nan')):.1e}")
        stop = not last and watcher.should_stop(it + 1)
        workdir_lock.check(ckpt.workdir)  # a lease lost to another run: stop before saving
        if (cfg.checkpoint.every and (it + 1) % cfg.checkpoint.every == 0) or last or stop:
            host = {"iteration": it + 1,  # a split layout's producer has sampled further
                    "data": run.prompt_iter.state() if producer is None else item.data_state,
                    "key": np.asarray(jax.random.key_data(key)).tolist(),
                    "config": cfg.to_dict()}  # what config.json says
            if run.base_id is not None:  # LoRA: the adapters' base, checked on restore
                host["lora_base"] = run.base_id
            if run.reward is not None:  # RLHF: the running reward normalisation's moments
                host["reward_norm"] = run.reward.moments.state()
            ckpt.save(it + 1, state, host)
        if stop:
            raise preemption.Preempted(it + 1, watcher.received)
    return state, metrics
