"""bf16 KV-cache writes on XLA:CPU: bit copies (transformer.bitwise_on_cpu) against float writes.

Run:
    python benchmarks/cache_writes.py                        # the CPU default model shape, ~3 min
    python benchmarks/cache_writes.py --smollm2-dir DIR      # + SmolLM2-135M (real weights, DIR from
                                                             #   `python -m trustrl.tools.get_smollm2 DIR`)
    python benchmarks/cache_writes.py --quick                # tiny sizes, seconds (the smoke test)

XLA:CPU has no bf16 scatter or dynamic_update_slice: it converts the whole buffer to float32,
writes, and converts back, so every decode step of a bf16 rollout passed twice over every layer's
KV cache (and never updated it in place). trustrl writes the caches' bit patterns (uint16)
instead on CPU: the same values bit for bit (asserted below on every workload), no round trip.

Same process, same model, prompts, sampler settings and key: each workload runs twice, once with
the float writes (``transformer.bitwise_on_cpu`` patched to the plain write while its programs are
traced) and once with the bit copies; the median of --repeats interleaved calls after a warm-up
call each (compile excluded). Rollouts in bf16 (policy.rollout_config(cfg, "bfloat16")); fp32
caches are not affected (their writes are native).

    single-turn   Sampler.generate: the prompts, EOS off, exactly --new-tokens per row
    multi-turn    MultiTurnSampler.run on trustrl:guess_sum at benchmarks/multiturn.py's limits

Measured: see the table in docs/performance.md ("bf16 KV-cache writes on CPU").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multiturn as mt_bench  # noqa: E402  benchmarks/multiturn.py: tokenizer, model, limits
from trustrl.data import environments as envs_lib  # noqa: E402
from trustrl.model import policy, transformer as M  # noqa: E402
from trustrl.rollout import multiturn  # noqa: E402
from trustrl.rollout.sampler import Sampler, SamplerConfig  # noqa: E402

BITS = M.bitwise_on_cpu


def float_writes(write):
    """The writes before bitwise_on_cpu: on the floats, the updates cast to the buffer's dtype."""
    return lambda buf, *updates: write(buf, *(u.astype(buf.dtype) for u in updates))


def traced_with(writes, fn):
    """Calls ``fn`` (a warm-up call that traces and compiles) with bitwise_on_cpu = ``writes``."""
    M.bitwise_on_cpu = writes
    try:
        return jax.block_until_ready(fn())
    finally:
        M.bitwise_on_cpu = BITS


def single_turn(args, roll, params, vocab):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, vocab, args.prompt_len) for _ in range(args.batch)]
    cfg = SamplerConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                        record_topk=args.record_topk)
    key = jax.random.key(1)
    calls = {}
    for name, writes in (("float writes", float_writes), ("bit copies", BITS)):
        s = Sampler(policy.decode_model(roll), cfg)
        calls[name] = lambda s=s: s.generate(params, prompts, 1, key)
        traced_with(writes, calls[name])
    return calls, lambda r: (r.response_tokens, r.rollout_logp, r.rollout_topk_logp)


def multi_turn(args, tok, roll, params, limits: str):
    mt = mt_bench.parse_limits(limits)
    template = envs_lib.TurnTemplate("plain")
    episodes, group = args.episodes, 8
    seeds = list(range(episodes // group))
    scfg = SamplerConfig(temperature=1.0, record_topk=args.record_topk)
    key = jax.random.key(1)
    calls = {}
    for name, writes in (("float writes", float_writes), ("bit copies", BITS)):
        envs = [envs_lib.TokenEnv(envs_lib.make("trustrl:guess_sum"), tok, template)
                for _ in range(episodes)]
        s = multiturn.MultiTurnSampler(policy.decode_model(roll), scfg, mt)
        calls[name] = lambda s=s, envs=envs: s.run(params, envs, seeds, group, key)
        traced_with(writes, calls[name])
    return calls, lambda out: (out[0].response_tokens, out[0].rollout_logp,
                               out[0].rollout_topk_logp)


def measure(calls, outputs, repeats):
    """Median seconds of each call (interleaved) and whether their outputs are identical."""
    outs = {k: jax.device_get(outputs(jax.block_until_ready(f()))) for k, f in calls.items()}
    a, b = outs.values()
    same = all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}, same


def models(args, tok):
    """(name, rollout config, bf16 params, tokenizer or None) of each model measured."""
    out = []
    for hidden in args.hidden:
        ns = argparse.Namespace(quick=args.quick, hidden=hidden, layers=args.layers,
                                dtype="bfloat16")
        cfg, roll, params = mt_bench.model(ns, tok.vocab_size)
        out.append((f"{cfg.num_layers}L d={cfg.hidden_size} V={cfg.vocab_size}", roll, params,
                    tok))
    if args.smollm2_dir:  # single-turn only: random prompts, no tokenizer needed
        from trustrl.model import hf
        cfg, params = hf.load_hf_dir(args.smollm2_dir)
        roll = policy.rollout_config(cfg, "bfloat16")
        out.append(("SmolLM2-135M", roll, policy.cast_params(params, roll), None))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--limits", nargs="+", default=["3,6,40", "4,32,160"])
    p.add_argument("--record-topk", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smollm2-dir", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.batch, args.new_tokens, args.episodes = [32], 4, 8, 16
        args.limits, args.repeats, args.record_topk = ["2,4,16"], 1, 4
    tok = mt_bench.tokenizer(278, 2)
    rows = []
    for name, roll, params, mtok in models(args, tok):
        work = [(f"single-turn, {args.batch} x {args.new_tokens} tokens",
                 single_turn(args, roll, params, roll.vocab_size))]
        if mtok is tok:  # the multi-turn task's tokenizer
            work += [(f"multi-turn {lim}, {args.episodes} episodes",
                      multi_turn(args, tok, roll, params, lim)) for lim in args.limits]
        for wname, (calls, outputs) in work:
            sec, same = measure(calls, outputs, args.repeats)
            rows.append(dict(model=name, workload=wname, floats=sec["float writes"],
                             bits=sec["bit copies"], same=same))
            print(f"  {name}, {wname}: {sec}", flush=True)
    print(f"\nbf16 rollouts on {jax.default_backend()} (jax {jax.__version__}), median of "
          f"{args.repeats}, interleaved\n")
    print("| model | workload | float writes s | bit copies s | speed-up | same tokens and "
          "log-probs |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['workload']} | {r['floats']:.3f} | {r['bits']:.3f} | "
              f"{r['floats'] / r['bits']:.2f}x | {r['same']} |")
    return rows


if __name__ == "__main__":
    main()
