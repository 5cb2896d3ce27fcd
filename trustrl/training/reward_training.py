"""Bradley-Terry reward-model training from preference pairs (trustrl.tools.train_reward_model).

    params, rm_cfg, tokenizer, metrics = train(cfg, workdir)   # configs/reward_model.py
    export(params, rm_cfg, tokenizer, out)   # a *ForSequenceClassification directory

The base is a Hugging Face causal LM directory (``base.hf_dir``: any trustrl policy exported
with ``trustrl.tools.export --format=merged`` is one) or a fresh trustrl decoder built from
``base``'s fields; its vocabulary head is dropped and a scalar score head added
(``trustrl.reward_model.from_policy``). Each pair (prompt, chosen, rejected) is rendered twice
with the reward model's own template (``trustrl.training.rlhf.render``: the tokenizer's chat
template, the one the RL run re-renders with) and scored at the last token; the loss is
``trustrl.core.preference.bradley_terry_loss`` (-log sigmoid(s_chosen - s_rejected)), AdamW with
the RL optimizer's schedule (``optim``). Held-out pair accuracy (chosen scored above rejected) is
logged before training, every ``train.eval_every`` steps and at the end, to
``WORKDIR/metrics.jsonl``. Without ``tokenizer.path`` a byte-level BPE is trained on the pairs'
text and given the "plain" role-prefix chat template (trustrl.data.tokenizer.FALLBACK_TEMPLATES).
"""
from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np
import optax

from trustrl.core.preference import bradley_terry_loss
from trustrl.data import preferences
from trustrl.data.tokenizer import FALLBACK_TEMPLATES, Tokenizer, train_bpe
from trustrl.infra import multihost, sharding
from trustrl.infra.metrics import MetricWriter
from trustrl.model import hf, reward_model
from trustrl.model.transformer import ModelConfig, init_params
from trustrl.training import optim, rlhf


def tokenizer_for(cfg, pairs) -> Tokenizer:
    """tokenizer.path (with its chat template), base.hf_dir's tokenizer, or a BPE trained on the
    pairs' text with the plain role-prefix template."""
    path = cfg.tokenizer.path or cfg.base.hf_dir
    if path:
        tok = Tokenizer.from_dir(path)
    else:
        texts = [f"{p['prompt']} {p['chosen']} {p['rejected']}" for p in pairs]
        texts += ["user: assistant: \n"]
        tok = train_bpe(texts, cfg.tokenizer.vocab_size, save_dir=None,
                        split_digits=cfg.tokenizer.get("split_digits", True))
    if tok.chat_template is None:
        tok.chat_template = FALLBACK_TEMPLATES["plain"]
        tok.config["chat_template"] = tok.chat_template
    return tok


def base_model(cfg, vocab_size: int, key, mesh):
    """(ModelConfig, params) of the base policy: base.hf_dir, or fresh from base's fields."""
    dtype = cfg.train.dtype
    if cfg.base.hf_dir:
        return hf.load_hf_dir(cfg.base.hf_dir, mesh=mesh, param_dtype="float32", dtype=dtype)
    b = cfg.base
    model_cfg = ModelConfig(vocab_size=vocab_size, hidden_size=b.hidden_size,
                            intermediate_size=b.intermediate_size, num_layers=b.num_layers,
                            num_heads=b.num_heads, num_kv_heads=b.num_kv_heads,
                            head_dim=b.head_dim, tie_word_embeddings=True, dtype=dtype)
    return model_cfg, init_params(model_cfg, key, mesh)


def encode_pairs(tokenizer, pairs, *, max_length: int, template: str = "chat"):
    """(chosen ids, rejected ids, truncated count) of the rendered pairs."""
    prompts = [p["prompt"] for p in pairs]
    chosen, tc = rlhf.encode(tokenizer, prompts, [p["chosen"] for p in pairs],
                             template=template, max_length=max_length)
    rejected, tr = rlhf.encode(tokenizer, prompts, [p["rejected"] for p in pairs],
                               template=template, max_length=max_length)
    return chosen, rejected, int(tc.sum() + tr.sum())


def pad_rows(ids, width: int, pad_id: int):
    """tokens, positions, valid [N, width] of right-padded rows."""
    tokens = np.full((len(ids), width), pad_id, np.int32)
    valid = np.zeros((len(ids), width), bool)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = x
        valid[i, :len(x)] = True
    return tokens, rlhf.positions_of(valid), valid


def loss_fn(params, rm_cfg, batch):
    """The Bradley-Terry loss of a batch whose first half of rows are the chosen responses and
    second half the rejected ones (same order)."""
    s = reward_model.score(params, rm_cfg, batch["tokens"], batch["positions"], batch["valid"])
    n = s.shape[0] // 2
    return bradley_terry_loss(s[:n], s[n:])


def make_step(rm_cfg, tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: loss_fn(p, rm_cfg, batch), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "bt/grad_norm": optax.tree.norm(grads)}
    return step


def _place(mesh, arrays):
    return {k: multihost.to_global(v, sharding.batch_sharding(mesh, v.ndim))
            for k, v in arrays.items()}


def _rows(chosen, rejected, idx, width, pad_id):
    tokens, positions, valid = pad_rows([chosen[i] for i in idx] + [rejected[i] for i in idx],
                                        width, pad_id)
    return {"tokens": tokens, "positions": positions, "valid": valid}


def accuracy(params, rm_cfg, chosen, rejected, pad_id, mesh, batch_size) -> dict:
    """Held-out pair accuracy (ties count 1/2) and mean margin, scored in batches of
    ``batch_size`` rows sorted by length, as an RL run scores (rlhf.score_ids)."""
    s = rlhf.score_ids(reward_model.score_program(rm_cfg, mesh), params, chosen + rejected,
                       pad_id=pad_id, mesh=mesh, bucket=16, batch_size=batch_size)
    sc, sr = s[:len(chosen)], s[len(chosen):]
    acc = np.where(sc > sr, 1.0, np.where(sc == sr, 0.5, 0.0))
    return {"eval/accuracy": float(acc.mean()), "eval/margin_mean": float((sc - sr).mean()),
            "eval/num_pairs": len(sc)}


def train(cfg, workdir: str, mesh=None):
    """Trains the reward model of ``cfg`` (configs/reward_model.py); returns (params, reward
    model config, tokenizer, last metrics)."""
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    data_dir = cfg.pairs.get("data_dir", "") or os.path.join(workdir, "data")
    train_pairs = preferences.load_pairs(cfg.pairs, "train", data_dir)
    test_pairs = preferences.load_pairs(cfg.pairs, "test", data_dir)
    tokenizer = tokenizer_for(cfg, [train_pairs[i] for i in range(min(len(train_pairs), 5000))])
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    key = jax.random.key(cfg.seed)
    k_base, k_head = jax.random.split(key)
    with jax.set_mesh(mesh):
        model_cfg, base = base_model(cfg, tokenizer.vocab_size, k_base, mesh)
        rm_cfg, params = reward_model.from_policy(model_cfg, base, k_head, pad_token_id=pad_id)
        del base
        max_length = int(cfg.train.max_length)
        chosen, rejected, cut = encode_pairs(tokenizer, list(train_pairs), max_length=max_length)
        t_chosen, t_rejected, t_cut = encode_pairs(tokenizer, list(test_pairs),
                                                   max_length=max_length)
        longest = max(len(x) for x in chosen + rejected + t_chosen + t_rejected)
        width = 16 * math.ceil(longest / 16)
        tx = optim.make_optimizer(cfg.optim, int(cfg.train.steps))
        opt_state = tx.init(params)
        step = make_step(rm_cfg, tx)
        writer = MetricWriter(workdir, tensorboard=False, resume_step=0)
        evaluate = functools.partial(accuracy, rm_cfg=rm_cfg, chosen=t_chosen,
                                     rejected=t_rejected, pad_id=pad_id, mesh=mesh,
                                     batch_size=2 * int(cfg.train.batch_size))
        metrics = {**evaluate(params), "data/truncated_train": cut, "data/truncated_test": t_cut,
                   "data/train_pairs": len(chosen)}
        writer.write(0, metrics)
        rng = np.random.default_rng(int(cfg.seed))
        bsz, order, pos = int(cfg.train.batch_size), rng.permutation(len(chosen)), 0
        for i in range(int(cfg.train.steps)):
            if pos + bsz > len(order):
                order, pos = rng.permutation(len(chosen)), 0
            idx = order[pos:pos + bsz]
            pos += bsz
            params, opt_state, m = step(params, opt_state,
                                        _place(mesh, _rows(chosen, rejected, idx, width, pad_id)))
            m = {k: float(v) for k, v in sharding.cpu_sync(m).items()}
            if not all(math.isfinite(v) for v in m.values()):
                raise FloatingPointError(f"reward model training step {i + 1}: non-finite "
                                         f"metrics {m}")
            last = i + 1 == int(cfg.train.steps)
            if (cfg.train.eval_every and (i + 1) % cfg.train.eval_every == 0) or last:
                m.update(evaluate(params))
            writer.write(i + 1, m)
            metrics = m
        writer.close()
    return params, rm_cfg, tokenizer, metrics


def export(params, rm_cfg, tokenizer: Tokenizer, out: str) -> str:
    """A Hugging Face *ForSequenceClassification directory (weights, config, tokenizer) that
    transformers and ``trustrl.reward_model.load_hf_dir`` load with the same scores."""
    reward_model.save_hf_dir(params, rm_cfg, out)
    tokenizer.save(out)
    return out
