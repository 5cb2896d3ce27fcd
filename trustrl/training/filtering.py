"""Training-set filtering by the base policy's solve rate (the paper's sanity-test construction).

Each of the first ``task.filter_pool`` training problems is sampled ``task.filter_samples``
times from the base policy (the warm-started parameters, in the trainer's precision, at the
rollout temperature); problems solved at a rate in [solve_band_low, solve_band_high] are kept.
The sampling key comes from ``warmstart.seed``, not the RL seed, so every run of a sweep trains
on the same problems; the kept indices are cached beside the warm start, with an integrity
record (trustrl.infra.integrity): a damaged cache entry, or one without a record, is reported, kept
aside and computed again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np

from trustrl.infra import integrity, multihost, sharding, storage
from trustrl.model import policy
from trustrl.rollout.sampler import Sampler


def solve_rates(env, sampler, params, examples, samples: int, key, chunk: int) -> np.ndarray:
    """Fraction of ``samples`` responses per example that the verifier marks correct. Examples
    are sampled ``chunk`` prompts at a time (a trailing partial chunk is padded by repeats)."""
    rates = []
    for start in range(0, len(examples), chunk):
        part = list(examples[start:start + chunk])
        n = len(part)
        part += [part[-1]] * (chunk - n)  # one compiled shape
        key, sub = jax.random.split(key)
        r = sampler.generate(params, env.encode_prompts(part), samples, sub)
        rew = env.score(env.decode_responses(r), [ex["answer"] for ex in part
                                                  for _ in range(samples)])
        correct = (rew >= env.correct_threshold).reshape(chunk, samples)
        rates.append(correct.mean(1)[:n])
    return np.concatenate(rates)


def _cache_path(cfg, warm_key: str) -> str | None:
    if not cfg.warmstart.cache_dir:
        return None
    t = cfg.task
    blob = json.dumps({"warmstart": warm_key, "samples": t.filter_samples, "pool": t.filter_pool,
                       "band": [t.solve_band_low, t.solve_band_high],
                       "temperature": cfg.rollout.temperature,
                       "max_new_tokens": cfg.rollout.max_new_tokens,
                       "seed": cfg.warmstart.seed}, sort_keys=True)
    name = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return storage.join(cfg.warmstart.cache_dir, f"filter-{name}.json")


def filter_train(cfg, env, model_cfg, sampler_cfg, params, mesh, warm_key: str) -> dict:
    """{"kept": indices into env.train, "rates": solve rates of the pool, ...}; cached."""
    path = _cache_path(cfg, warm_key)
    multihost.sync("trustrl_filter_cache")  # every process sees the same cache state
    if path and storage.exists(path):
        out = _load_cached(path)
        if out is not None:
            return out
    t = cfg.task
    pool = [env.train[i] for i in range(min(t.filter_pool, len(env.train)))]
    sampler = Sampler(policy.decode_model(model_cfg),
                      dataclasses.replace(sampler_cfg, record_topk=0),
                      batch_sharding=sharding.batch_sharding(mesh))
    rates = solve_rates(env, sampler, params, pool, t.filter_samples,
                        jax.random.fold_in(jax.random.key(cfg.warmstart.seed), 17),
                        cfg.rollout.prompts_per_iter)
    kept = np.flatnonzero((rates >= t.solve_band_low) & (rates <= t.solve_band_high))
    if kept.size == 0:
        raise ValueError(
            f"no training problem has a base solve rate in [{t.solve_band_low}, "
            f"{t.solve_band_high}] (pool {len(pool)}, mean rate {rates.mean():.3f}); widen the "
            f"band, change the warm start (warmstart.target_loss) or the task difficulty")
    out = {"kept": kept.tolist(), "rates": rates.round(4).tolist(),
           "pool_mean_rate": float(rates.mean()), "kept_mean_rate": float(rates[kept].mean())}
    print(f"filter: kept {kept.size}/{len(pool)} problems with solve rate in "
          f"[{t.solve_band_low}, {t.solve_band_high}] (mean {rates.mean():.3f} -> "
          f"{rates[kept].mean():.3f})")
    if path and multihost.is_primary():
        storage.makedirs(storage.dirname(path))
        integrity.write_file(path, json.dumps(out))  # atomic, then its integrity record
    return out


def _load_cached(path: str) -> dict | None:
    """The cached filter, or None (reported in one line naming the file) when it does not match
    its integrity record, has none, or is not a filter: then process 0 keeps it aside (renamed
    ``*.damaged-<time>``, never deleted) and the filter is computed again and re-cached."""
    try:
        out = json.loads(integrity.read_file(path, "training-set filter cache").decode("utf-8"))
        if not isinstance(out, dict) or not isinstance(out.get("kept"), list) or not all(
                isinstance(i, int) and i >= 0 for i in out["kept"]) or not out["kept"]:
            raise ValueError("it holds no list of kept problem indices")
    except (integrity.IntegrityError, UnicodeDecodeError, ValueError) as e:
        multihost.sync("trustrl_filter_rejected")  # every process has read it before the rename
        aside = f"; kept it as {integrity.keep_aside(path)}" if multihost.is_primary() else ""
        why = str(e) if isinstance(e, integrity.IntegrityError) else f"{type(e).__name__}: {e}"
        print(f"filter: ignoring cache {path}, computing the filter again: {why}{aside}",
              flush=True)
        return None
    print(f"filter: loaded {path}")
    return out
