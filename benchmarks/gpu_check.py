"""One prepared GPU check: train tokens/s and MFU vs transformers + sdpa, memory, rollout, head.

Run on a lent GPU (all of it fits in ~8 minutes on one H100 / H200-class device):
    python benchmarks/gpu_check.py                 # Qwen3-0.6B shape, 8 x 1,024 and 2 x 8,192
    python benchmarks/gpu_check.py --quick         # tiny shapes, any backend (the CPU test)

trustrl: jax.jit(value_and_grad) of the mean response log-prob through the real decoder (bf16
compute, fp32 master weights; attention "auto" = cuDNN on GPU, remat "full", scanned layers) with
random weights. torch: transformers' Qwen3ForCausalLM (attn_implementation="sdpa") under
torch.autocast(bfloat16), fp32 weights, cross_entropy(logits).backward(); skipped (with the reason
printed) when torch / transformers are not installed or have no CUDA on a GPU run. Tokens/s =
batch * length / median step time; MFU = 6 * N_params_matmul * tokens/s (+ the causal attention
term 6 * L * T * H * D per token) / peak bf16 FLOP/s (--peak_tflops, default 989: H100 / H200
SXM dense). Memory: the compiled train step's temp + argument + output bytes
(memory_analysis) and, on GPU, the device's peak_bytes_in_use after the steps.

Rollout (issue 14's GPU goal: >= 100k tokens/s): the sampler on the Qwen3-0.6B shape at the bf16
rollout precision, 256 rows x 256 new tokens after 64-token prompts, greedy, EOS off, recording
mu's top-K with K = 0 and K = 20, and int8 / fp8 weights at K = 20 (issue 15's GPU row); best of
2 interleaved calls after a warm-up.
Vocabulary head (issue 12's GPU row): plain / fused / loss-fused, forward + backward of the mean
log-prob at V = 151,936, d = 1,024, 8,192 tokens (benchmarks/vocab_head.py's functions).
MoE layer (issue 28's GPU row): forward + backward tokens/s of one Qwen3-30B-A3B MoE layer (hidden
2,048, 128 experts, top-8, moe_intermediate 768; 8,192 tokens; bf16): trustrl's router + experts
(benchmarks/moe_layer.py's function) with the "blocked" grouped matmul and with
jax.lax.ragged_dot (left out where XLA's dense lowering would not fit), against transformers'
Qwen3MoeSparseMoeBlock under bf16 autocast on the same device.

Results: not measured in the sessions that wrote this script (no GPU was lent to it); see
docs/performance.md.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmarks import train_memory  # noqa: E402
from trustrl.model import transformer as M  # noqa: E402
from trustrl.model.vocab_head import token_logp_and_entropy  # noqa: E402


def matmul_flops_per_token(cfg: M.ModelConfig, length: int) -> float:
    """Forward+backward FLOPs per token: 6 x matmul parameters + causal attention (QK^T, PV)."""
    e, h, k, d, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    per_layer = e * (h + 2 * k) * d + h * d * e + 3 * e * f
    dense = cfg.num_layers * per_layer + e * cfg.vocab_size
    attention = cfg.num_layers * 2 * 2 * h * d * length / 2  # causal: half the [T, T] tiles
    return 6 * dense + 3 * attention


def _median_time(fn, steps: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_trustrl(cfg: M.ModelConfig, batch: int, length: int, steps: int) -> dict:
    params = M.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
    valid = jnp.ones_like(tokens)
    positions = M.positions_from_mask(valid)

    def loss(p):
        logits = M.forward_logits(p, cfg, tokens[:, :-1], positions[:, :-1], valid[:, :-1])
        return -jnp.mean(token_logp_and_entropy(logits, tokens[:, 1:])[0])

    grad = jax.jit(jax.value_and_grad(loss))
    sec = _median_time(lambda: jax.block_until_ready(grad(params)), steps)
    return dict(tok_s=batch * length / sec, sec=sec)


def bench_torch(cfg: M.ModelConfig, batch: int, length: int, steps: int, device: str):
    """transformers + sdpa under bf16 autocast; None and a reason when it cannot run."""
    try:
        import torch
        import transformers
    except ImportError as e:
        return None, f"torch reference skipped: {e.name} is not installed"
    if device == "cuda" and not torch.cuda.is_available():
        return None, "torch reference skipped: torch has no CUDA device"
    hf_cfg = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=max(length, 64), attn_implementation="sdpa")
    model = transformers.Qwen3ForCausalLM(hf_cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 ids[:, 1:].flatten())
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    sec = _median_time(step, steps)
    return dict(tok_s=batch * length / sec, sec=sec), None


def bench_rollout(cfg: M.ModelConfig, rows: int, prompt: int, new_tokens: int) -> dict:
    """Sampler tokens/s, greedy, EOS off: bf16 at K = 0 and K = 20, int8 / fp8 weights at K = 20
    (issue 15's GPU row). Keys: (rollout dtype, K)."""
    from trustrl.model import policy
    from trustrl.rollout.sampler import Sampler, SamplerConfig
    import bench_common
    params = M.init_params(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (rows, prompt)).tolist()
    runs = {}
    for dtype, k in (("bfloat16", 0), ("bfloat16", 20), ("int8", 20), ("fp8", 20)):
        roll_cfg = policy.rollout_config(cfg, dtype)
        sampler = Sampler(policy.decode_model(roll_cfg), SamplerConfig(
            max_new_tokens=new_tokens, greedy=True, record_topk=k))
        runs[(dtype, k)] = (lambda s, p: lambda: jax.block_until_ready(
            s.generate(p, prompts, 1, jax.random.key(0))))(
                sampler, policy.cast_params(params, roll_cfg))
    t, _ = bench_common.best_of(runs, 2)
    return {k: rows * new_tokens / v for k, v in t.items()}


def bench_head(d: int, tokens: int, vocab: int) -> dict:
    """Seconds of forward + backward for the plain, fused and loss-fused vocabulary heads."""
    import bench_common
    import vocab_head
    args = vocab_head._args(tokens, d, vocab, False)
    runs = {k: (lambda f: lambda: jax.block_until_ready(f(*args)))(
        vocab_head._fn(k, "binary", True)) for k in ("plain", "fused", "loss_fused")}
    t, _ = bench_common.best_of(runs, 2)
    return t


def bench_moe(shape, steps: int, device: str) -> dict:
    """MoE layer forward + backward, tokens/s: trustrl ("blocked" / "ragged_dot" grouped
    matmul, bf16 inputs, float32 router) and transformers' Qwen3MoeSparseMoeBlock (None and
    the reason where it cannot run)."""
    import moe_layer
    n, e, x, k, f = shape
    a = moe_layer.inputs(shape)
    bf16 = lambda t: t.astype(jnp.bfloat16)
    xs, probe = bf16(a["x"]), a["probe"]
    router, w_gate, w_up, w_down = a["moe"]
    params = (router * 0.02, bf16(w_gate), bf16(w_up), bf16(w_down))
    out = {}
    for gmm in ("blocked", "ragged_dot"):
        if gmm == "ragged_dot" and moe_layer.ragged_dot_bytes(shape) // 2 > 8 * 2 ** 30:
            out[gmm] = None  # XLA's dense ragged_dot: a [N * k, X * E] bf16 operand
            continue
        layer = moe_layer.moe_layer("ragged", gmm)
        grad = jax.jit(jax.grad(lambda x_, *p: jnp.sum(layer(x_, *p, k) * probe),
                                argnums=(0, 1, 2, 3, 4)))
        sec = _median_time(lambda: jax.block_until_ready(grad(xs, *params)), steps)
        out[gmm] = n / sec
    try:
        import torch
        import transformers
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError as err:
        return dict(trustrl=out, torch=None, why=f"torch reference skipped: {err.name} is not "
                                                  f"installed")
    if device == "cuda" and not torch.cuda.is_available():
        return dict(trustrl=out, torch=None, why="torch reference skipped: no CUDA device")
    cfg = transformers.Qwen3MoeConfig(hidden_size=e, num_experts=x, num_experts_per_tok=k,
                                      moe_intermediate_size=f, norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(cfg).to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    h = torch.randn(1, n, e, device=device, requires_grad=True)
    t_probe = torch.randn(1, n, e, device=device)

    def step():
        block.zero_grad(set_to_none=True)
        h.grad = None
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            y = block(h)
        (y.float() * t_probe).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return dict(trustrl=out, torch=n / _median_time(step, steps), why=None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="peak bf16 TFLOP/s")
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if args.quick:
        cfg = train_memory.tiny()
        shapes, mem_shape, steps = [(2, 32), (1, 96)], (1, 32, 64), 2
        roll_shape, head_shape = (8, 8, 8), (32, 256, 2048)
        moe_shape = (64, 32, 8, 2, 16)
    else:
        cfg = train_memory.qwen3_06b()
        shapes, mem_shape, steps = [(8, 1024), (2, 8192)], (1, 1024, 7168), args.steps
        roll_shape, head_shape = (256, 64, 256), (1024, 8192, 151936)
        moe_shape = (8192, 2048, 128, 8, 768)  # Qwen3-30B-A3B's MoE layer
    device = "cuda" if on_gpu else "cpu"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"attention {cfg.attention} -> "
          f"{M.attention_lib.resolve(cfg.attention, shapes[0][1], cfg.compute_dtype)}", flush=True)
    rows = []
    print("| batch x length | trustrl tok/s | MFU | torch+sdpa tok/s | MFU | ratio |")
    print("|---|---|---|---|---|---|")
    for b, t in shapes:
        ours = bench_trustrl(cfg, b, t, steps)
        theirs, why = bench_torch(cfg, b, t, steps, device)
        flops = matmul_flops_per_token(cfg, t)
        mfu = lambda r: r["tok_s"] * flops / (args.peak_tflops * 1e12)
        row = dict(shape=(b, t), trustrl=ours, torch=theirs, mfu=mfu(ours))
        if theirs is None:
            print(f"| {b} x {t} | {ours['tok_s']:.0f} | {mfu(ours):.1%} | - | - | - |")
            print(why)
        else:
            print(f"| {b} x {t} | {ours['tok_s']:.0f} | {mfu(ours):.1%} | {theirs['tok_s']:.0f} | "
                  f"{mfu(theirs):.1%} | {ours['tok_s'] / theirs['tok_s']:.2f}x |")
        rows.append(row)
    mem = train_memory.measure_train_step(cfg, mem_shape)
    print(f"train step {mem_shape[0]} x ({mem_shape[1]} + {mem_shape[2]}): compiled temp "
          f"{mem['temp']:.2f} GiB, total {mem['total']:.2f} GiB, compile {mem['compile_s']:.1f} s")
    stats = jax.devices()[0].memory_stats() if on_gpu else None
    if stats:
        print(f"device peak_bytes_in_use {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")
    rollout = bench_rollout(cfg, *roll_shape)
    base = rollout[("bfloat16", 20)]
    print(f"rollout {roll_shape[0]} rows, {roll_shape[1]} + {roll_shape[2]} tokens, greedy: "
          f"bf16 K=0 {rollout[('bfloat16', 0)]:.0f} tok/s, K=20 {base:.0f} tok/s "
          f"({rollout[('bfloat16', 0)] / base:.2f}x slower with K=20); K=20 int8 "
          f"{rollout[('int8', 20)]:.0f} ({rollout[('int8', 20)] / base:.2f}x bf16), fp8 "
          f"{rollout[('fp8', 20)]:.0f} ({rollout[('fp8', 20)] / base:.2f}x)", flush=True)
    head = bench_head(*head_shape)
    print(f"vocab head d={head_shape[0]}, {head_shape[1]} tokens, V={head_shape[2]}, fwd+bwd: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / head['plain']:.2f}x)" for k, v in head.items()))
    moe = bench_moe(moe_shape, steps, device)
    ours = ", ".join(f"{k} {'-' if v is None else f'{v:.0f}'}" for k, v in moe["trustrl"].items())
    ref = moe["trustrl"]["blocked"] / moe["torch"] if moe["torch"] else None
    print(f"MoE layer {moe_shape[0]} tokens, hidden {moe_shape[1]}, {moe_shape[2]} experts top-"
          f"{moe_shape[3]}, F {moe_shape[4]}, fwd+bwd tok/s: trustrl {ours}; transformers "
          + (f"{moe['torch']:.0f} (blocked {ref:.2f}x)" if ref else f"- ({moe['why']})"),
          flush=True)
    return dict(rows=rows, memory=mem, rollout=rollout, head=head, moe=moe)


if __name__ == "__main__":
    main()
