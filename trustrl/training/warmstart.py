"""Supervised warm start: a few hundred next-token steps on worked examples before RL.

A randomly initialised tiny model never produces a correct answer, so RL from scratch has no
signal. The warm start trains on (formatted prompt, " answer<eos>") pairs (with task filler:
" <filler words>\nAnswer: answer<eos>") with the loss on the response tokens, then stops early,
on the loss of the answer part, on purpose: the base policy should solve a fraction of the
problems, leaving room for RL. The result is cached under ``warmstart.cache_dir`` keyed by
everything it depends on (model, tokenizer vocabulary, task, warm-start settings, seed), so every
run of a sweep starts from the identical base without paying for it again. Each cache entry has
an integrity record (size and sha256, trustrl.infra.integrity) checked when it is read: a damaged
entry,
or one without a record, is reported, kept aside (renamed ``*.damaged-<time>``) and trained again.
"""
from __future__ import annotations

import hashlib
import json

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trustrl.infra import integrity, multihost, sharding, storage
from trustrl.model import policy
from trustrl.data import tasks
from trustrl.model.vocab_head import token_logp_and_entropy


def cache_key(cfg, env, model_cfg) -> str:
    vocab = env.tokenizer.backend.to_str()
    task = {k: v for k, v in cfg.task.to_dict().items()  # the training-set filter runs after
            if not k.startswith(("filter_", "solve_band_"))}
    tok = env.tokenizer  # the special ids live in tokenizer_config.json, not in the vocab
    blob = json.dumps({"model": repr(model_cfg), "task": task,
                       # warmstart.dtype is in model_cfg already (the base's compute dtype)
                       "warmstart": {k: v for k, v in cfg.warmstart.items()
                                     if k not in ("cache_dir", "dtype")},
                       "hf_dir": cfg.model.hf_dir,
                       "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
                       "special_ids": [tok.bos_id, tok.eos_id, tok.pad_id]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_pairs(env, examples, filler=None, seed: int = 0):
    """(prompt ids, worked-answer ids + eos, where the answer part starts) per example.

    Without filler the worked answer is " <answer>". With ``filler`` (a trustrl.data.tasks filler
    config: lexicon, zipf, min_words, max_words) it is " <filler words>\nAnswer: <answer>": the
    filler is drawn per example from ``seed``; the start index marks the answer part, on which
    the warm start's stopping loss is measured (the filler is irreducibly random)."""
    eos = env.tokenizer.eos_id
    if eos is None:
        raise ValueError("the warm start needs a tokenizer with an eos token")
    prompts = env.encode_prompts(examples)
    rng = np.random.default_rng([seed, 3])
    answers, starts = [], []
    for ex in examples:
        head = []
        if filler is not None:
            head = env.tokenizer.encode(" " + tasks.filler_text(rng, **filler))
            tail = env.tokenizer.encode("\nAnswer: " + ex["answer"]) + [eos]
        else:
            tail = env.tokenizer.encode(" " + ex["answer"]) + [eos]
        answers.append(head + tail)
        starts.append(len(head))
    return prompts, answers, starts


def make_batch(prompts, answers, starts=None):
    """Left-padded prompts [B, P] + right-padded answers [B, N] in the Rollout layout;
    ``answer_mask`` marks the tokens from ``starts`` (default 0) on."""
    p = max(map(len, prompts))
    n = max(map(len, answers))
    b = len(prompts)
    starts = starts or [0] * b
    ptok, pmask = np.zeros((b, p), np.int32), np.zeros((b, p), np.int32)
    rtok, rmask = np.zeros((b, n), np.int32), np.zeros((b, n), np.float32)
    amask = np.zeros((b, n), np.float32)
    for i, (pr, an, st) in enumerate(zip(prompts, answers, starts)):
        ptok[i, p - len(pr):], pmask[i, p - len(pr):] = pr, 1
        rtok[i, :len(an)], rmask[i, :len(an)] = an, 1
        amask[i, st:len(an)] = 1
    tokens = np.concatenate([ptok, rtok], 1)
    valid = np.concatenate([pmask, np.ones_like(rtok)], 1)
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    return dict(tokens=tokens, valid=valid, positions=positions, response_tokens=rtok,
                response_mask=rmask, answer_mask=amask)


def sft_loss(params, model_cfg, batch):
    """Mean NLL over all worked-answer tokens (the training loss) and, as aux, over the answer
    part only (the stopping criterion)."""
    n = batch["response_tokens"].shape[1]
    logits = policy.response_logits(params, model_cfg, batch["tokens"], batch["positions"],
                                    batch["valid"], num_response=n)
    logp, _ = token_logp_and_entropy(logits, batch["response_tokens"])
    m, a = batch["response_mask"], batch["answer_mask"]
    return (-jnp.sum(logp * m) / jnp.maximum(m.sum(), 1.0),
            -jnp.sum(logp * a) / jnp.maximum(a.sum(), 1.0))


def train_sft(params, model_cfg, env, examples, *, steps, batch_size, learning_rate, seed, mesh,
              target_loss: float = 0.0, filler=None):
    """Up to ``steps`` AdamW steps (warmup 10%, then constant) on random batches of ``examples``;
    stops early once the mean answer-part loss of the last 20 steps is below ``target_loss``
    (0: never). Returns (params, answer-part losses).

    Stopping on the loss rather than a step count gives a base of the same quality whatever the
    initialisation: small models learn arithmetic in a sharp phase transition whose step varies
    with the seed."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(steps // 10, 1)),
                              optax.constant_schedule(learning_rate)], [max(steps // 10, 1)]),
        weight_decay=0.0))
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, opt_state, batch):
        (_, answer_loss), grads = jax.value_and_grad(sft_loss, has_aux=True)(
            params, model_cfg, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, answer_loss

    prompts, answers, starts = encode_pairs(env, examples, filler, seed)
    p_len, a_len = max(map(len, prompts)), max(map(len, answers))
    rng = np.random.default_rng(seed)
    shard = sharding.batch_sharding(mesh)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(examples), batch_size)
        # pad every batch to the global maxima: one compiled shape for the whole warm start
        batch = make_batch([prompts[i] for i in idx], [answers[i] for i in idx],
                           [starts[i] for i in idx])
        batch = _pad_to(batch, p_len, a_len)
        batch = multihost.to_global(batch, shard)
        params, opt_state, loss = sharding.cpu_sync(step(params, opt_state, batch))
        losses.append(float(loss))
        if len(losses) % 250 == 0:
            print(f"warm start: step {len(losses)}, answer loss {np.mean(losses[-20:]):.3f}",
                  flush=True)
        if target_loss > 0 and len(losses) >= 20 and np.mean(losses[-20:]) < target_loss:
            break
    return params, losses


def _pad_to(batch, p_len, a_len):
    """Left-pads the prompt part to p_len and right-pads the response part to a_len."""
    p = batch["tokens"].shape[1] - batch["response_tokens"].shape[1]
    n = batch["response_tokens"].shape[1]
    lp, rn = p_len - p, a_len - n
    out = {}
    for k in ("tokens", "valid"):
        x = batch[k]
        right_fill = 1 if k == "valid" else 0
        out[k] = np.concatenate([np.zeros((x.shape[0], lp), x.dtype), x,
                                 np.full((x.shape[0], rn), right_fill, x.dtype)], 1)
    out["positions"] = np.maximum(np.cumsum(out["valid"], 1) - 1, 0).astype(np.int32)
    out["response_tokens"] = np.pad(batch["response_tokens"], ((0, 0), (0, rn)))
    for k in ("response_mask", "answer_mask"):
        out[k] = np.pad(batch[k], ((0, 0), (0, rn)))
    return out


def warm_start(cfg, env, model_cfg, params, mesh):
    """Returns warm-started params, loading them from the cache when present."""
    ws = cfg.warmstart
    if env.tokenizer.eos_id is None:  # checked before the cache: a cached base would hide it
        raise ValueError("the warm start needs a tokenizer with an eos token (eos_token in "
                         "tokenizer_config.json); this one has none")
    path = None
    if ws.cache_dir:
        path = storage.join(ws.cache_dir, f"warmstart-{cache_key(cfg, env, model_cfg)}.msgpack")
        multihost.sync("trustrl_warmstart_cache")  # every process sees the same cache state
        if storage.exists(path):
            cached = _load_cached(path, params)
            if cached is not None:
                return cached
    examples = [env.train[i] for i in range(len(env.train))]
    params, losses = train_sft(params, model_cfg, env, examples, steps=ws.steps,
                               batch_size=ws.batch_size, learning_rate=ws.learning_rate,
                               seed=ws.seed, mesh=mesh, target_loss=ws.target_loss,
                               filler=tasks.filler_config(cfg.task))
    print(f"warm start: {len(losses)} steps, loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}")
    if path is not None:
        host = multihost.to_host(params)  # a collective: params may span several processes
        if multihost.is_primary():
            storage.makedirs(ws.cache_dir)
            blob = flax.serialization.msgpack_serialize(host)
            # atomic, then its record: an entry without one is not trusted (see _load_cached)
            integrity.write_file(path, blob)
    return params


def _load_cached(path, params):
    """The cached params placed like ``params``, or None (reported) when the file does not match
    its integrity record (or has none), is unreadable, or does not match params' tree and
    shapes: the caller trains the warm start again. The rejected file is kept aside (process 0
    renames it to ``*.damaged-<time>``, with its record), never deleted or overwritten."""
    try:
        host = flax.serialization.msgpack_restore(integrity.read_file(path, "warm-start cache"))
        host = flax.serialization.from_state_dict(params, host)
        bad = [jax.tree_util.keystr(k) for (k, x), ref in zip(
            jax.tree_util.tree_leaves_with_path(host), jax.tree.leaves(params))
            if np.shape(x) != ref.shape]
        if bad:
            raise ValueError(f"shapes differ from the model's at {', '.join(bad[:3])}")
        if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(host)):
            raise ValueError("it holds non-finite values")
    except Exception as e:  # noqa: BLE001 - msgpack / flax raise assorted types for bad bytes
        # every process read the same bytes (and so fails alike) before process 0 renames them
        multihost.sync("trustrl_warmstart_rejected")
        aside = f"; kept it as {integrity.keep_aside(path)}" if multihost.is_primary() else ""
        why = str(e) if isinstance(e, integrity.IntegrityError) else f"{type(e).__name__}: {e}"
        print(f"warm start: ignoring cache {path}, training again: {why}{aside}", flush=True)
        return None
    print(f"warm start: loaded {path}")
    return jax.tree.map(lambda x, ref: multihost.to_global(np.asarray(x, ref.dtype), ref.sharding),
                        host, params)
