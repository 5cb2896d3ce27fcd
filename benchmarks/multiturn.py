"""Multi-turn rollouts (issue 30's two goals): throughput against a single-turn rollout, and
no re-prefill (every token of an episode processed once).

Run:
    python benchmarks/multiturn.py           # the CPU default model, 64 episodes, ~2 min
    python benchmarks/multiturn.py --limits 3,6,40 --hidden 256   # one workload, d = 256
    python benchmarks/multiturn.py --quick   # a tiny model, 8 episodes, seconds (the smoke test)

Same process, same model, batch and sampler settings (temperature, recorded top-K, rollout
precision). The multi-turn rollout (trustrl.rollout.multiturn.MultiTurnSampler) plays
``--env`` episodes (trustrl:guess_sum: an addition question, "higher" / "lower" feedback
until right) under each of --limits (max turns, max tokens per turn, max trajectory tokens;
default: configs/environments.py's CPU demo, 3, 6, 40, and longer turns, 4, 32, 160), on a
byte-level BPE tokenizer trained on the task's text (split digits, as the CPU configs). The
model is random
(configs/default.py's shape: 4 layers, d = 128, or --hidden / --layers): it rarely emits the
end-of-turn token, so most turns stop at the per-turn limit and most episodes play every turn;
the observation tokens make the rows drift out of step, hence several host round trips per
turn. The single-turn rollouts (trustrl.rollout.sampler.Sampler, EOS off so every row generates
exactly max_new_tokens) start from the same first prompts:

    single-turn, same policy tokens   max_new_tokens = the multi-turn run's policy tokens per
                                      episode (rounded): the baseline of goal 1
    single-turn, same loop steps      max_new_tokens = the multi-turn loop's steps: the same
                                      number of one-token model steps on the same batch, so the
                                      time difference is the multi-turn machinery's (host round
                                      trips, environment steps, observation appends)

Goal 1 (throughput): policy tokens / s of each (median of --repeats interleaved calls after one
warm-up call each that compiles) and "time / policy token vs single-turn": the baseline's tok/s
over the row's (issue 30's goal: multi-turn <= 1.3). The multi-turn call is split into the
prompt prefill, the jitted loop (each call blocked on), TokenEnv.step (timed by a subclass:
decode of the policy's ids, the environment, encode of the observation) and the rest of the
host's work (device -> host copies, the observation chunks, the trajectory record). Host round
trips = ``counts.exits``, loop steps = ``counts.steps``.

Goal 2 (no re-prefill): per episode, the tokens the model processed (``Trajectories.processed``:
prefill + one decode step per trajectory token) equal the prompt length + the trajectory length
(asserted for every episode; the trajectory length read off the rollout: the last policy
token's column + 1), beside what a re-prefilling implementation would process: every turn
re-processes its whole prefix (the prompt and every earlier turn and observation) and then
generates its policy tokens.

Measured 2026-12-06, commit 4b815a5 (the row-indexed cache: observations appended as one
chunk per host exit), on this repository's CPU VM (2 cores of an AMD EPYC, 23 GiB, Python 3.11,
jax 0.10.2, CPU backend) while another job compiled on it (load average 2-3.8: the timings are
noisy), `python benchmarks/multiturn.py` (the defaults; ~1 min): 4 layers, d = 128, V = 278
(random weights), bf16 rollout, 64 episodes of trustrl:guess_sum (8 seeds x 8), T = 1.0,
recorded top-K 20, median of 5:

    Goal 1: limits, rollout           policy  loop  host  median  policy   ms /  time / policy
                                      tokens steps trips      s   tok/s   step  token vs single
    3 x 6, 40  single, same policy     1,088    17     1  0.079  13,712   4.67  1.00x
               single, same steps      1,152    18     1  0.085  13,514   4.74  1.01x
               multi-turn              1,066    18     4  0.181   5,891  10.05  2.33x
    4 x 32,    single, same policy     7,808   122     1  0.708  11,032   5.80  1.00x
    160        single, same steps      8,192   128     1  0.716  11,441   5.59  0.96x
               multi-turn              7,796   128     5  1.087   7,175   8.49  1.54x

    multi-turn call split: 3 x 6, 40: prefill 14%, jitted loop (with the appends) 68%,
    TokenEnv.step 2%, other host work 16% (5.6 policy tokens / turn, 1.39 observation tokens
    per policy token); 4 x 32, 160: prefill 2%, loop 96%, TokenEnv.step 1%, other host 2%
    (30.5 / turn, 0.26 obs / policy).

    Goal 2 (per episode, mean)   prompt  trajectory  processed  re-prefilling  naive / processed
    3 x 6, 40                      15.0        39.8       54.8          114.1              2.08x
    4 x 32, 160                    15.0       153.3      168.3          426.4              2.53x
    processed == prompt + trajectory for all 64 episodes of both (asserted).

With the round region (the loop writes at one shared column; trustrl/rollout/multiturn.py's
docstring), 2026-12-08, idle VM, five runs of each against the code before it (three
alternating): multi-turn / single-turn 2.14-2.28x (median 2.19x) at 3 x 6, 40 and 1.49-1.78x
(1.57x) at 4 x 32, 160, against 2.25-2.59x (2.38x) and 1.81-2.32x (1.96x) before. Goal 1 is
still missed at both limits.

Rerun at d8716f5 (bf16 cache writes as bit copies on CPU: the single-turn baseline ~1.9x
faster, the multi-turn call 0.99-1.20x in benchmarks/cache_writes.py's A/B), 2026-12-08, idle VM
(the study paused), defaults:

    3 x 6, 40    single, same policy  1,088 tokens  17 steps  0.044 s   2.56 ms / step   1.00x
                 single, same steps   1,152         18        0.047     2.64             1.03x
                 multi-turn           1,066         18        0.107     5.95             2.51x
    4 x 32, 160  single, same policy  7,808        122        0.337     2.76             1.00x
                 single, same steps   8,192        128        0.323     2.52             0.91x
                 multi-turn           7,796        128        0.609     4.76             1.81x

    split: 3 x 6, 40: prefill 12%, loop 73%, TokenEnv.step 3%, other host 12%; 4 x 32, 160:
    prefill 2%, loop 94%, TokenEnv.step 1%, other host 3%. Goal 1 missed at both limits: the
    row-indexed cache's per-row scatter still costs XLA:CPU a copy of every layer's cache per
    step (docs/environments.md).

Rerun at 238f8fc (the cache written as (row, kv head, column) triples, bit-identical), idle VM:
2.35x and 1.40x (multi-turn 0.110 s vs 0.048 s; 0.734 s vs 0.524 s).
Seven runs of 4b815a5 on the same VM gave 2.13-2.43x (3 x 6, 40) and 1.16-1.54x (4 x 32, 160):
goal 1 (<= 1.3x) is met only in some runs of the longer turns and NOT at the CPU demo's limits.
The loop now takes as many steps as the single-turn baseline (18 vs 17, 128 vs 122) and
returns to the host once per turn (4, 5 round trips); environment steps are 1-4% of the call.
What remains is the observations' compute: at the demo's limits they outnumber the policy
tokens 1.39 : 1, and one [64, 16]-token append costs ~18 ms on this CPU, about 8 decode steps
(a CPU prefills only ~2x more tokens per second than it decodes; an accelerator's decode is
memory-bound, its appends relatively cheaper: not measured). The design before (the
observation fed one token per loop step, 40 and 160 steps) measured 3.73x and 2.42x.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from trustrl.data import environments as envs_lib, tasks  # noqa: E402
from trustrl.data import tokenizer as tok_lib  # noqa: E402
from trustrl.model import policy, transformer as M  # noqa: E402
from trustrl.rollout import multiturn  # noqa: E402
from trustrl.rollout.sampler import Sampler, SamplerConfig  # noqa: E402


class TimedTokenEnv(envs_lib.TokenEnv):
    """A TokenEnv whose step() adds its wall time to ``clock["env"]``."""

    def __init__(self, env, tokenizer, template, clock):
        super().__init__(env, tokenizer, template)
        self.clock = clock

    def step(self, action_ids, ended=True):
        t = time.perf_counter()
        out = super().step(action_ids, ended)
        self.clock["env"] += time.perf_counter() - t
        return out


def _timed(fn, clock, name):
    """fn, blocking on its result and adding the wall time to clock[name]."""
    def wrapped(*args, **kwargs):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        clock[name] += time.perf_counter() - t
        return out
    return wrapped


def instrument(sampler: multiturn.MultiTurnSampler, clock: dict):
    """Times the sampler's jitted prefill and loop (the host blocks on both right after anyway:
    the loop's state is copied to the host at each exit)."""
    sampler._prefill = _timed(sampler._prefill, clock, "prefill")
    loop_fn = sampler._loop_fn
    sampler._loop_fn = lambda eot: _timed(loop_fn(eot), clock, "loop")


def tokenizer(vocab: int, difficulty: int):
    """A byte-level BPE (split digits) trained on the task's and the environment's text."""
    rng = np.random.default_rng(0)
    texts = []
    for _ in range(2000):
        ex = tasks.arithmetic_example(rng, difficulty, "+")
        texts.append(f"Question: {ex['prompt']}\nAnswer: {ex['answer']}")
    texts += ["\nhigher\nAnswer:", "\nlower\nAnswer:", "\ninvalid\nAnswer:"] * 200
    return tok_lib.train_bpe(texts, vocab, split_digits=True)


def model(args, vocab: int):
    if args.quick:
        cfg = M.ModelConfig.tiny(vocab_size=vocab)
    else:
        heads = max(args.hidden // 32, 1)
        cfg = M.ModelConfig(vocab_size=vocab, hidden_size=args.hidden,
                            intermediate_size=3 * args.hidden, num_layers=args.layers,
                            num_heads=heads, num_kv_heads=max(heads // 2, 1), head_dim=32,
                            tie_word_embeddings=True)
    params = M.init_params(cfg, jax.random.key(0))
    roll = policy.rollout_config(cfg, args.dtype)
    return cfg, roll, policy.cast_params(params, roll)


def reprefill_count(prompt_len, turn_index, mask) -> int:
    """Tokens a re-prefilling implementation processes for one episode: each turn k prefills
    its whole prefix (the prompt, then every column before the turn's first policy token) and
    decodes its policy tokens."""
    total = 0
    for k in range(int(turn_index.max()) + 1):
        cols = np.flatnonzero((turn_index == k) & mask)
        if cols.size:
            total += prompt_len + int(cols[0]) + cols.size
    return total


def parse_limits(spec: str) -> multiturn.MultiTurnConfig:
    """"TURNS,TURN_TOKENS,TOTAL" -> MultiTurnConfig (max_turns, max_turn_tokens,
    max_total_tokens)."""
    try:
        turns, turn_tokens, total = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--limits {spec!r}: expected TURNS,TURN_TOKENS,TOTAL (three ints, "
                         f"e.g. 3,6,40)") from None
    return multiturn.MultiTurnConfig(max_turns=turns, max_turn_tokens=turn_tokens,
                                     max_total_tokens=total)


def measure(args, tok, roll, params, mt: multiturn.MultiTurnConfig):
    """Goal 1's rows and goal 2's per-episode counts for one set of turn limits."""
    scfg = SamplerConfig(temperature=args.temperature, record_topk=args.record_topk)
    clock = dict(prefill=0.0, loop=0.0, env=0.0)
    template = envs_lib.TurnTemplate("plain")
    envs = [TimedTokenEnv(envs_lib.make(args.env), tok, template, clock)
            for _ in range(args.episodes)]
    seeds = list(range(args.episodes // args.group_size))
    mts = multiturn.MultiTurnSampler(policy.decode_model(roll), scfg, mt)
    instrument(mts, clock)
    key = jax.random.key(1)

    # the multi-turn run first (compiles; its size sets the single-turn lengths)
    r, traj = mts.run(params, envs, seeds, args.group_size, key)
    counts = mts.counts
    mask = np.asarray(r.response_mask) > 0
    policy_tokens = int(mask.sum())
    prompts = [envs_lib.TokenEnv(envs_lib.make(args.env), tok, template).reset(s) for s in seeds]
    same_tokens = max(round(policy_tokens / args.episodes), 1)
    singles = {
        "single-turn, same policy tokens": Sampler(policy.decode_model(roll), SamplerConfig(
            max_new_tokens=same_tokens, temperature=args.temperature,
            record_topk=args.record_topk)),
        "single-turn, same loop steps": Sampler(policy.decode_model(roll), SamplerConfig(
            max_new_tokens=counts.steps, temperature=args.temperature,
            record_topk=args.record_topk))}

    runs = {name: (lambda s=s: s.generate(params, prompts, args.group_size, key))
            for name, s in singles.items()}
    runs["multi-turn"] = lambda: mts.run(params, envs, seeds, args.group_size, key)
    outs = {k: jax.block_until_ready(f()) for k, f in runs.items()}  # warm-up (compiles)
    times = {k: [] for k in runs}
    shares = []
    for _ in range(args.repeats):  # interleaved: load changes hit every variant alike
        for k, f in runs.items():
            for c in clock:
                clock[c] = 0.0
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
            if k == "multi-turn":
                host = times[k][-1] - sum(clock.values())
                shares.append(dict(clock, host=host))

    assert mts.counts == counts, (mts.counts, counts)  # every call played the same episodes
    rows = []
    for k in runs:
        sec = float(np.median(times[k]))
        if k == "multi-turn":
            tokens, steps, exits = policy_tokens, counts.steps, counts.exits
        else:
            tokens = int(np.asarray(outs[k].response_mask).sum())
            steps, exits = singles[k].cfg.max_new_tokens, 1
        rows.append(dict(rollout=k, policy_tokens=tokens, steps=steps, exits=exits, seconds=sec,
                         tok_s=tokens / sec, ms_step=1e3 * sec / steps))
    base = rows[0]["tok_s"]
    for row in rows:
        row["ratio"] = base / row["tok_s"]
    breakdown = {c: float(np.median([s[c] for s in shares])) for c in shares[0]}

    # goal 2: every episode's tokens processed once
    prompt_len = np.asarray(r.prompt_mask).sum(axis=1)
    traj_len = np.asarray([np.flatnonzero(m)[-1] + 1 if m.any() else 0 for m in mask])
    assert (traj.processed == prompt_len + traj_len).all(), (traj.processed, prompt_len,
                                                              traj_len)
    assert counts.prefill_tokens == int(prompt_len.sum())
    assert ((traj.turn_index >= 0).sum(axis=1) == traj_len).all()
    naive = np.asarray([reprefill_count(int(p), ti, m) for p, ti, m in
                        zip(prompt_len, traj.turn_index, mask)])
    episodes = dict(prompt=prompt_len, policy=mask.sum(axis=1), trajectory=traj_len,
                    processed=traj.processed, naive=naive, turns=traj.num_turns)
    limits = f"{mt.max_turns} x {mt.max_turn_tokens}, {mt.max_total_tokens}"
    return dict(limits=limits, rows=rows, breakdown=breakdown, episodes=episodes,
                counts=counts, metrics=traj.metrics(mask))


def report(args, cfg, outs):
    """Prints goal 1's and goal 2's tables (one block of rows per set of limits)."""
    b = args.episodes
    print(f"model: {cfg.num_layers} layers, d={cfg.hidden_size}, V={cfg.vocab_size} (random), "
          f"rollout {args.dtype}; {b} episodes of {args.env} ({b // args.group_size} seeds x "
          f"{args.group_size}), T = {args.temperature}, recorded top-K {args.record_topk}; "
          f"limits = max turns x max turn tokens, max trajectory tokens; median of "
          f"{args.repeats}; {jax.default_backend()}, jax {jax.__version__}\n")
    print("Goal 1: throughput (time / policy token vs single-turn; issue 30's goal <= 1.3)\n")
    print("| limits | rollout | policy tokens | loop steps | host round trips | median s | "
          "policy tok/s | ms / step | time / policy token vs single-turn |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for out in outs:
        for r in out["rows"]:
            print(f"| {out['limits']} | {r['rollout']} | {r['policy_tokens']:,} | {r['steps']} | "
                  f"{r['exits']} | {r['seconds']:.3f} | {r['tok_s']:,.0f} | "
                  f"{r['ms_step']:.2f} | {r['ratio']:.2f}x |")
    print()
    for out in outs:
        bd, m = out["breakdown"], out["metrics"]
        total = sum(bd.values())
        print(f"{out['limits']}: multi-turn call, median split: " + ", ".join(
            f"{name} {1e3 * bd[key]:.1f} ms ({100 * bd[key] / total:.0f}%)"
            for key, name in (("prefill", "prefill"), ("loop", "jitted loop"),
                              ("env", "TokenEnv.step"), ("host", "other host work"))))
        print(f"    episodes: {m['episode/turns_mean']:.2f} turns, "
              f"{m['episode/tokens_per_turn']:.1f} policy tokens / turn, observation / policy "
              f"tokens {m['episode/obs_policy_ratio']:.2f}")
    print("\nGoal 2: no re-prefill (processed = prompt + trajectory, asserted for every "
          "episode)\n")
    print("| limits | episodes | prompt tokens | trajectory tokens (policy + obs) | processed "
          "(prefill + decode) | re-prefilling (naive) | naive / processed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for out in outs:
        ep = out["episodes"]
        for name, f in (("mean per episode", np.mean), ("all", np.sum)):
            print(f"| {out['limits']} | {name} | {f(ep['prompt']):,.1f} | "
                  f"{f(ep['trajectory']):,.1f} | {f(ep['processed']):,.1f} | "
                  f"{f(ep['naive']):,.1f} | {f(ep['naive']) / f(ep['processed']):.2f}x |")
        out["naive_ratio"] = float(ep["naive"].sum() / ep["processed"].sum())
    for out in outs:
        ep = out["episodes"]
        same = bool((ep["processed"] == ep["prompt"] + ep["trajectory"]).all())
        print(f"\n{out['limits']}: processed == prompt + trajectory for all "
              f"{len(ep['prompt'])} episodes: {same}", end="")
    print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 8 episodes (smoke test)")
    p.add_argument("--env", default="trustrl:guess_sum",
                   choices=["trustrl:guess_sum", "trustrl:guess_number"])
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=278, help="BPE size (configs/default.py)")
    p.add_argument("--difficulty", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", help="rollout precision (configs' default)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--record-topk", type=int, default=20)
    p.add_argument("--limits", nargs="+", default=["3,6,40", "4,32,160"],
                   help="TURNS,TURN_TOKENS,TOTAL per workload (default: configs/"
                        "environments.py's CPU demo, and longer turns)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        args.episodes, args.group_size, args.repeats, args.record_topk = 8, 2, 2, 4
        args.limits = ["3,6,40"]
    if args.episodes % args.group_size:
        raise ValueError(f"--episodes {args.episodes} is not a multiple of --group-size "
                         f"{args.group_size}")
    limits = [parse_limits(x) for x in args.limits]
    tok = tokenizer(args.vocab, args.difficulty)
    cfg, roll, params = model(args, tok.vocab_size)
    outs = [measure(args, tok, roll, params, mt) for mt in limits]
    report(args, cfg, outs)
    return outs


if __name__ == "__main__":
    main()
