"""Reward-model scoring throughput vs the trainer's scoring pass (issue 31's goal: >= 0.8x).

Run:
    python benchmarks/reward_model.py             # ~2 minutes on 2 CPU cores
    python benchmarks/reward_model.py --quick     # tiny shapes, seconds (tests/test_benchmarks.py)

Both sides are one forward pass of the same decoder shape over the same number of rows, in one
process on a one-device CPU mesh, fp32 (the CPU configs' dtype), best of --repeats interleaved
calls after a warm-up (bench_common.best_of):

  score pass     trustrl.training.step.score, jitted as the run jits it (experiment.score_program):
                 the policy's log-probs of every response token (trunk + fused vocabulary head),
                 on B rows of P + N tokens already on the device (what the loop hands it);
  RM, program    trustrl.reward_model.score_program on the same B rows re-rendered by the reward
                 model (its own tokenizer and chat template), already tokenised and packed;
  RM, end to end what the loop calls every iteration: RewardModelReward.scores(prompts, texts):
                 render with the reward model's chat template, tokenise (its BPE, trained on
                 other text than the policy's), truncate, sort / bucket / pad, score, gather.
Throughput = tokens scored per second (each side's own token count: the reward model's rendering
adds its template's markers and tokenises the text differently, so the counts differ); ratio =
RM tokens/s / score-pass tokens/s.

Measured 2026-12-07 on this repository's CPU VM (2 cores of an AMD EPYC, 23 GiB, jax 0.10.2,
load average 0.6 at the start), commit 5ae10d1 + this script, `python benchmarks/reward_model.py`
(64 rows, 4 layers, d = 256, fp32); goal >= 0.8x met:

    | pass | tokens | best ms | tokens/s | x score pass |
    |---|---|---|---|---|
    | score pass | 20664 | 2799.7 | 7,381 | 1.00x |
    | RM, program | 22996 | 3330.6 | 6,905 | 0.94x |
    | RM, end to end | 22996 | 3374.0 | 6,816 | 0.92x |
    host work of the end-to-end call (render, tokenise, pack, gather): 43.4 ms (1% of it)

The reward model's row is one batch padded to 448 columns (bucket 64): 28,672 slots for its
22,996 tokens, against the score pass's 23,424 for 20,664; reward_model.batch_size splits the
rows by length and pads less.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.bench_common import best_of  # noqa: E402
from trustrl import reward_model  # noqa: E402
from trustrl.data import tasks  # noqa: E402
from trustrl.data.tokenizer import FALLBACK_TEMPLATES, train_bpe  # noqa: E402
from trustrl.infra import sharding  # noqa: E402
from trustrl.model.transformer import ModelConfig, init_params  # noqa: E402
from trustrl.training import rlhf, step as ts  # noqa: E402


def _texts(rng, lexicon, n, words):
    return [" ".join(rng.choice(lexicon, size=words)) for _ in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt_words", type=int, default=24)
    p.add_argument("--response_words", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.prompt_words, a.response_words, a.repeats = 4, 4, 8, 1
    rng = np.random.default_rng(0)
    lexicon = tasks.make_lexicon(400, seed=0)
    corpus = _texts(rng, lexicon, 4000, 12)
    vocab = 300 if a.quick else 512
    policy_tok = train_bpe(corpus, vocab, save_dir=None)  # two tokenizers: the policy's and
    rm_tok = train_bpe(corpus[::-1][:3000] + ["user: assistant: \n"], vocab - 20,  # the RM's
                       save_dir=None)
    rm_tok.chat_template = FALLBACK_TEMPLATES["chatml"]
    shape = (dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                  num_kv_heads=4, head_dim=8) if a.quick else
             dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                  num_kv_heads=4, head_dim=32))
    policy_cfg = ModelConfig(vocab_size=policy_tok.vocab_size, tie_word_embeddings=True, **shape)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])

    prompts = _texts(rng, lexicon, a.rows, a.prompt_words)
    responses = _texts(rng, lexicon, a.rows, a.response_words)
    p_ids = [policy_tok.encode(x) for x in prompts]
    r_ids = [policy_tok.encode(" " + x) for x in responses]
    plen, rlen = max(map(len, p_ids)), max(map(len, r_ids))
    with jax.set_mesh(mesh):
        # the trainer's scoring pass: left-padded prompts + right-padded responses, as Rollout
        tokens = np.zeros((a.rows, plen + rlen), np.int32)
        valid = np.zeros_like(tokens)
        resp = np.zeros((a.rows, rlen), np.int32)
        for i, (pi, ri) in enumerate(zip(p_ids, r_ids)):
            tokens[i, plen - len(pi):plen] = pi
            tokens[i, plen:plen + len(ri)] = ri
            valid[i, plen - len(pi):plen + len(ri)] = 1
            resp[i, :len(ri)] = ri
        batch = {"tokens": jnp.asarray(tokens), "valid": jnp.asarray(valid),
                 "positions": jnp.asarray(np.maximum(np.cumsum(valid, 1) - 1, 0), jnp.int32),
                 "response_tokens": jnp.asarray(resp)}
        params = init_params(policy_cfg, jax.random.key(0), mesh)
        score_pass = jax.jit(functools.partial(ts.score, model_cfg=policy_cfg, mesh=mesh))
        pass_tokens = int(valid.sum())

        rm_cfg, rm_params = reward_model.from_policy(
            ModelConfig(vocab_size=rm_tok.vocab_size, tie_word_embeddings=True, **shape),
            init_params(ModelConfig(vocab_size=rm_tok.vocab_size, tie_word_embeddings=True,
                                    **shape), jax.random.key(1), mesh),
            jax.random.key(2), pad_token_id=rm_tok.pad_id)
        cfg = ml_collections.ConfigDict({
            "reward_model": {"hf_dir": "", "template": "chat", "max_length": 4096,
                             "truncation": "right", "batch_size": 0, "bucket": 64,
                             "normalize": "none", "clip": 0.0, "length_penalty": 0.0},
            "rollout": {"max_new_tokens": rlen}})
        program = reward_model.score_program(rm_cfg, mesh)
        reward = rlhf.RewardModelReward(cfg, mesh, (rm_cfg, rm_params, program), rm_tok)
        ids, _ = rlhf.encode(rm_tok, prompts, responses, max_length=4096)
        (_, rm_tokens, rm_valid), = rlhf.pack(ids, pad_id=reward.pad_id, bucket=64)
        rm_args = (jnp.asarray(rm_tokens), jnp.asarray(rlhf.positions_of(rm_valid)),
                   jnp.asarray(rm_valid))
        rm_count = int(sum(map(len, ids)))
        best, outs = best_of({
            "score pass": lambda: score_pass(params, batch),
            "RM, program": lambda: program(rm_params, *rm_args),
            "RM, end to end": lambda: reward.scores(prompts, responses)[0]}, a.repeats)
    # the end-to-end scores are the program's, in the caller's row order
    order = np.argsort([len(x) for x in ids], kind="stable")
    np.testing.assert_allclose(np.asarray(outs["RM, end to end"])[order],
                               np.asarray(outs["RM, program"]), rtol=1e-5, atol=1e-5)
    counts = {"score pass": pass_tokens, "RM, program": rm_count, "RM, end to end": rm_count}
    base = pass_tokens / best["score pass"]
    rows = []
    print(f"\n{a.rows} rows; score pass {pass_tokens} tokens ({plen} + {rlen} columns), reward "
          f"model {rm_count} tokens ({rm_tokens.shape[1]} columns); {shape['num_layers']} "
          f"layers, d={shape['hidden_size']}, fp32, {jax.devices()[0].platform}\n")
    print("| pass | tokens | best ms | tokens/s | x score pass |")
    print("|---|---|---|---|---|")
    for name, t in best.items():
        tps = counts[name] / t
        rows.append({"pass": name, "tokens": counts[name], "ms": 1e3 * t, "tps": tps,
                     "ratio": tps / base})
        print(f"| {name} | {counts[name]} | {1e3 * t:.1f} | {tps:,.0f} | {tps / base:.2f}x |")
    host = best["RM, end to end"] - best["RM, program"]
    print(f"\nhost work of the end-to-end call (render, tokenise, pack, gather): "
          f"{1e3 * host:.1f} ms ({100 * host / best['RM, end to end']:.0f}% of it)")
    return rows


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
