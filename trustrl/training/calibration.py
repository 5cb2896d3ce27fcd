"""Measures the training-inference mismatch a config's dial produces on its base policy
(trustrl.rollout.mismatch; the CLI is trustrl.tools.calibrate_mismatch).

The run is built as ``trustrl.main`` builds it (tokenizer, data, warm start, training-set
filter: the base an RL run would start from). ``batches`` iterations' rollouts are sampled with
the run's rollout sampler (precision, noise and traps as configured) from the base's rollout
parameters; with staleness k the trainer then takes k optimizer steps (the run's own train
step, on the first rollout's minibatches in turn, as a run's first iterations would), so pi is
the policy k steps later while the rollouts stay the base's: the mismatch of a run's k-th step.
rollout.mu="rescored" replaces mu as the run does. pi is the trainer's forward (the score
program) on the sampled tokens.
"""
from __future__ import annotations

import jax
import numpy as np

from trustrl.core import advantages as adv_lib, losses
from trustrl.infra import multihost, sharding
from trustrl.rollout import mismatch
from trustrl.rollout.record import mismatch_by_mu, mismatch_stats
from trustrl.training import experiment, step as ts
from trustrl.training.rewarding import rollout_rewards
from trustrl.training.rollout_source import RolloutSource


def calibrate(cfg, workdir: str, *, batches: int = 2, seed: int = 0) -> dict:
    """{"settings", "summary" (mismatch_stats + max_ratio + tokens), "by_mu" (mismatch_by_mu
    rows)} of ``cfg``'s dial on its base policy, over ``batches`` iterations' rollouts."""
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        run = experiment.build(cfg, workdir, mesh)
        if run.episodes is not None:
            raise ValueError("calibrate_mismatch measures single-turn task rollouts; env.id "
                             "(multi-turn episodes) is not supported")
        g, k = cfg.rollout.group_size, int(mismatch.settings(cfg)["staleness"])
        state, source = run.state, RolloutSource(cfg, run)
        params_roll, _ = source.start(state)  # the base (nothing stored yet: step 0)
        key = jax.random.key(seed)
        rolls = []
        for b in range(batches):
            examples = next(run.prompt_iter)
            r = run.sampler.generate(params_roll, run.env.encode_prompts(examples), g,
                                     jax.random.fold_in(key, b))
            rolls.append((r, examples))
        run.sampler.release()
        if k:  # k optimizer steps on the first rollout's minibatches (params_roll stays mu)
            r, examples = rolls[0]
            host = multihost.to_host(r)
            rewards = rollout_rewards(run.env, host, examples, g, cfg, run.reward)[0]
            adv = np.asarray(adv_lib.compute_advantages(rewards, g, cfg.loss.advantage),
                             np.float32)
            batch = ts.rollout_batch(r, multihost.to_global(
                adv, sharding.batch_sharding(run.mesh, adv.ndim)))
            batch, _ = source.rescore(batch, host)
            batch.pop("routed_experts", None)
            if losses.METHODS[cfg.loss.method].needs_old_logp:
                batch["old_logp"] = sharding.cpu_sync(
                    run.score(run.policy_params(state.params), batch))
            parts = np.array_split(np.arange(batch["tokens"].shape[0]), cfg.train.minibatches)
            for i in range(k):
                rows = parts[i % len(parts)]
                mb = sharding.cpu_sync(jax.tree.map(lambda x, rows=rows: x[rows], batch))
                state = sharding.cpu_sync(run.train_step(state, mb, params_roll, run.frozen))[0]
        pi, mu, masks = [], [], []
        for r, _ in rolls:
            host = multihost.to_host(r)
            batch, host = source.rescore(ts.rollout_batch(r, np.zeros(r.tokens.shape[0],
                                                                      np.float32)), host)
            batch.pop("routed_experts", None)
            pi.append(multihost.to_host(sharding.cpu_sync(
                run.score(run.policy_params(state.params), batch))))
            mu.append(np.asarray(host.rollout_logp))
            masks.append(np.asarray(host.response_mask))
    pi, mu, mask = (np.concatenate(x) for x in (pi, mu, masks))
    summary = {k_: float(v) for k_, v in mismatch_stats(pi, mu, mask).items()}
    d = (pi - mu)[mask > 0]
    summary["rollout/max_ratio"] = float(np.exp(np.abs(d).max())) if d.size else float("nan")
    summary["tokens"] = int((mask > 0).sum())
    return {"settings": {"rollout.dtype": cfg.rollout.dtype, "rollout.mu": cfg.rollout.mu,
                         **{f"rollout.mismatch.{n}": v for n, v in
                            mismatch.settings(cfg).items()}},
            "summary": summary, "by_mu": mismatch_by_mu(pi, mu, mask)}


def format_report(result: dict) -> str:
    """The calibration as text: the settings, the summary line, the per-mu-bucket table."""
    s = result["summary"]
    lines = ["settings: " + ", ".join(f"{k}={v}" for k, v in result["settings"].items()),
             f"tokens {s['tokens']}: mean |pi - mu| {s['rollout/mismatch_mean']:.3e}, "
             f"max (pi - mu) {s['rollout/mismatch_max']:.3e}, min (pi - mu) "
             f"{s['rollout/mismatch_min']:.3e}, max |log pi - log mu| "
             f"{s['rollout/logp_absdiff_max']:.3e}, max ratio max(pi/mu, mu/pi) "
             f"{s['rollout/max_ratio']:.4g}",
             "| mu bucket | tokens | share | mean abs(pi-mu) | mean abs(log pi - log mu) | "
             "max ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for b in result["by_mu"]:
        lines.append(f"| [{b['mu_low']:g}, {b['mu_high']:g}) | {b['tokens']} | "
                     f"{b['share']:.3f} | {b['mean_abs_diff']:.3e} | "
                     f"{b['mean_abs_log_ratio']:.3e} | {b['max_ratio']:.4g} |")
    return "\n".join(lines)
