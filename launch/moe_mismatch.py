"""A laptop-scale look at the paper's Fig. 2: does a mixture of experts widen the
training-inference mismatch, and does rollout routing replay (R3) close it?

    .venv/bin/python launch/moe_mismatch.py --workdir=workdirs/moe_mismatch --out=docs

Two policies of about the same active size on the default task (configs/default.py): the dense
tiny model (4 layers, width 128, SwiGLU 384) and an MoE with 8 experts, top-2, expert width 192
(2 x 192 = 384 active), each warm-started exactly as a run starts (experiment.build). With the SAME
weights in both engines, the rollout engine samples in bf16 (mu: the sampler's recorded log-probs)
and the fp32 trainer scores the same tokens (pi). Reported over the valid response tokens:
mean |pi - mu| (probabilities, the paper's mismatch curve), the spread of the ratio pi / mu
(std, and the fraction of tokens with |log ratio| > 0.05), and for the MoE the routing-flip rate
(the fraction of (token, MoE layer) pairs whose expert set differs between the bf16 and the fp32
forward) and the same statistics with R3 (the fp32 trainer replays the bf16 routing: its own
router's gate weights at the replayed experts). The bf16 routing is recomputed by a bf16
teacher-forced forward of the sampled sequences (the sampler's KV-cache decode computes the same
function; trustrl.rollout records it directly when rollout routing recording is on).

Writes OUT/moe_mismatch.md (the table and the command).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from trustrl.model import policy  # noqa: E402
from trustrl.model import transformer as M  # noqa: E402
from trustrl.model import vocab_head  # noqa: E402
from trustrl.training import experiment  # noqa: E402

MOE = dict(family="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=192,
           norm_topk_prob=True)


def _cfg(moe: bool, seed: int):
    cfg = default.get_config()
    cfg.seed = seed
    if moe:
        for k, v in MOE.items():
            cfg.model[k] = v
    return cfg


def _response_logp(params, model_cfg, r, temperature, routes=None):
    """log pi of the sampled response tokens, fp32 trainer forward (optionally replaying)."""
    logits = policy.response_logits(params, model_cfg, r.tokens, r.positions, r.valid_mask,
                                    num_response=r.response_tokens.shape[1],
                                    temperature=temperature, routes=routes)
    return vocab_head.token_logp_and_entropy(logits, r.response_tokens)[0]


def _stats(logp, mu_logp, mask) -> dict:
    m = np.asarray(mask, bool)
    lp, lmu = np.asarray(logp, np.float64)[m], np.asarray(mu_logp, np.float64)[m]
    ratio = np.exp(lp - lmu)
    return {"abs_diff": float(np.mean(np.abs(np.exp(lp) - np.exp(lmu)))),
            "ratio_std": float(np.std(ratio)),
            "far": float(np.mean(np.abs(lp - lmu) > 0.05)), "tokens": int(m.sum())}


def measure(moe: bool, seed: int, workdir: str, batches: int) -> dict:
    cfg = _cfg(moe, seed)
    run = experiment.build(cfg, os.path.join(workdir, f"{'moe' if moe else 'dense'}-{seed}"))
    params, roll = run.state.params, run.rollout_params(run.state.params)
    temp = float(cfg.rollout.temperature)
    key = jax.random.key(seed)
    rows = {"off": [], "on": [], "flip": [], "flipped_tok": [], "kept_tok": []}
    for b in range(batches):
        examples = next(run.prompt_iter)
        r = run.sampler.generate(roll, run.env.encode_prompts(examples), cfg.rollout.group_size,
                                 jax.random.fold_in(key, b))
        mask = np.asarray(r.response_mask)
        pi = _response_logp(params, run.model_cfg, r, temp)
        rows["off"].append((np.asarray(pi), np.asarray(r.rollout_logp), mask))
        if not moe:
            continue
        args = (r.tokens, r.positions, r.valid_mask)
        _, mu_moe = M.forward_moe(roll, run.rollout_cfg, *args)
        _, pi_moe = M.forward_moe(params, run.model_cfg, *args)
        n, p = r.response_tokens.shape[1], r.tokens.shape[1] - r.response_tokens.shape[1]
        # the positions whose outputs predict the response tokens: P-1 .. P+N-2
        ids_mu = np.sort(np.asarray(mu_moe["ids"])[:, p - 1:p - 1 + n], axis=-1)
        ids_pi = np.sort(np.asarray(pi_moe["ids"])[:, p - 1:p - 1 + n], axis=-1)
        flip = np.any(ids_mu != ids_pi, axis=-1)  # [B, N, M]
        rows["flip"].append(flip[mask.astype(bool)].mean())
        any_flip = flip.any(-1)
        rows["flipped_tok"].append((np.asarray(pi), np.asarray(r.rollout_logp),
                                    mask * any_flip))
        rows["kept_tok"].append((np.asarray(pi), np.asarray(r.rollout_logp), mask * ~any_flip))
        pi_r3 = _response_logp(params, run.model_cfg, r, temp, routes=mu_moe["ids"])
        rows["on"].append((np.asarray(pi_r3), np.asarray(r.rollout_logp), mask))

    def pooled(name):
        if not rows[name]:
            return None
        return _stats(*(np.concatenate([x[i] for x in rows[name]]) for i in range(3)))

    out = {"R3 off": pooled("off")}
    if moe:
        out.update({"R3 on": pooled("on"), "flip_rate": float(np.mean(rows["flip"])),
                    "tokens with a flip": pooled("flipped_tok"),
                    "tokens without": pooled("kept_tok")})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="workdirs/moe_mismatch")
    p.add_argument("--out", default="docs")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batches", type=int, default=4, help="sampler calls per model and seed")
    args = p.parse_args(argv)
    lines = [f"| model | seed | mean abs(pi - mu) | std(pi / mu) | abs(log ratio) > 0.05 | "
             f"routing flips | tokens |", "|---|---|---|---|---|---|---|"]

    def row(name, seed, s, flips="-"):
        return (f"| {name} | {seed} | {s['abs_diff']:.2e} | {s['ratio_std']:.2e} | "
                f"{s['far']:.2%} | {flips} | {s['tokens']} |")

    for seed in range(args.seeds):
        for moe in (False, True):
            res = measure(moe, seed, args.workdir, args.batches)
            print(seed, "moe" if moe else "dense", res, flush=True)
            if not moe:
                lines.append(row("dense", seed, res["R3 off"]))
                continue
            lines.append(row("MoE, R3 off", seed, res["R3 off"], f"{res['flip_rate']:.2%}"))
            lines.append(row("MoE, R3 on", seed, res["R3 on"]))
            for part in ("tokens with a flip", "tokens without"):
                if res[part]["tokens"]:
                    lines.append(row(f"MoE, R3 off, {part}", seed, res[part]))
    text = "\n".join([
        "# MoE training-inference mismatch at laptop scale (launch/moe_mismatch.py)", "",
        f"Generated {datetime.date.today()} by `python launch/moe_mismatch.py "
        f"--seeds={args.seeds} --batches={args.batches}` (jax {jax.__version__}, "
        f"{jax.devices()[0].platform}); see the script's docstring for what is measured.", "",
        *lines, ""])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "moe_mismatch.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
