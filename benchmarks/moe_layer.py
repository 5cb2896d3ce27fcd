"""MoE layer forward + backward on CPU: the grouped-matmul experts vs a dense MLP of the same
active size vs the dense one-hot reference, in one process.

Run:
    python benchmarks/moe_layer.py             # the 30B-A3B-like shape below, ~1 minute
    python benchmarks/moe_layer.py --quick     # tiny shapes, seconds (the test runs this)

Shape: Qwen3-30B-A3B's MoE layer (hidden 2,048, 128 experts, top-8, moe_intermediate_size 768)
scaled to 2 CPU cores: hidden and expert width divided by 4 (512, 192), the 128 experts and
top-8 kept (the same sparsity, 1/16 of the experts per token, and the same number of groups),
2,048 tokens (128 (token, expert) pairs per expert on average), float32.

Rows (each: jax.jit of the gradient of sum(layer(x) * probe) with respect to the input and
every weight, so forward + backward; the best of --repeats interleaved calls after a warm-up):
  ragged (blocked)     model/moe.py's default on CPU: float32 router, top-8, the pairs sorted by
                       expert, three grouped matmuls (grouped_matmul backend "blocked": a loop
                       over row tiles of one expert each, custom VJP) and the weighted sum;
  ragged (ragged_dot)  the same with jax.lax.ragged_dot, which XLA:CPU lowers to a dense
                       [rows, experts * K] product (every expert on every row);
  dense MLP            a SwiGLU MLP with the experts' ACTIVE parameters: intermediate size
                       top_k * moe_intermediate_size (1,536), no router: the ratios' baseline;
  one-hot reference    moe.experts(impl="dense"): every expert on every token, weighted by the
                       [N, X] gate matrix (the tests' reference).

Measured (2026-12-06, this repository's CPU VM: 2 cores of an AMD EPYC, 23 GiB, jax 0.10.2,
shared with other sessions; commands as above, --repeats 5, load average ~2):

    | layer (fwd + bwd)              | ms     | vs dense MLP |
    | ragged (blocked)               |  672.9 |  3.65x |
    | dense MLP (same active params) |  184.5 |  1.00x |
    | one-hot reference              | 4997.9 | 27.09x |
    ragged (ragged_dot) left out: XLA:CPU would build a 4.0 GiB [N * k, X * E] operand

  and pinned to one core (taskset -c 0, --repeats 3): 867.8 / 313.5 / 8397.8 ms (2.77x, 26.79x).
  So the grouped matmul is 7-10x faster than the one-hot reference but NOT within the issue's
  1.5x of the dense MLP on this CPU: its ~130-row groups run as 64-row tiles in a sequential
  loop (one matmul of [64, 512] x [512, 192] at a time, which XLA:CPU does not spread over
  both cores, and which is ~1.5x slower per row than one large matmul even on one core), while
  the dense MLP is three large matmuls. Measured pieces (same VM): a loop of 64-row tile
  matmuls is 1.5-2.3x one [16384, 512] x [512, 192] matmul; the gathers / scatters that sort
  and unsort the pairs are ~3 % of the layer.

Tried and dropped (2026-12-07, same VM, two other CPU jobs running: ratios only roughly
comparable): a "padded" dropless backend, each expert's first ceil(N k / X) pairs (rounded to 8)
as one batched [X, C, E] einsum and only the pairs past that through the blocked loop.
`--tokens 2048`: padded 3.15x, blocked 2.73x; `--tokens 16384 --no_reference --repeats 2`:
padded 2.31x, blocked 2.40x. A batched [128, 128, 512] x [128, 512, 192] einsum alone took
2.0x one matmul of the same flops (47 vs 24 ms), at 1,024 rows per expert 0.86x. At 16,384
tokens the layer is bound by memory traffic, not by its matmuls: the sorted pairs [N k, E] (and
their outputs and cotangents) are k = 8 copies of the hidden states, about 2.5x the float32
activation bytes of the dense MLP's [N, k F] intermediates, and on this VM one pass over a
[131072, 512] float32 array takes ~135 ms (an elementwise op), a row gather of it ~160-230 ms.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from trustrl.model import moe  # noqa: E402

# (tokens, hidden, experts, top_k, moe_intermediate): 30B-A3B is (-, 2048, 128, 8, 768)
FULL = (2048, 512, 128, 8, 192)
QUICK = (64, 32, 8, 2, 16)
RAGGED_DOT_MAX_BYTES = 2 ** 30  # the ragged_dot row is left out above (the 23 GiB VM)


def moe_layer(impl: str, gmm: str = "auto"):
    """x [N, E], (router [E, X], w_gate, w_up [X, E, F], w_down [X, F, E]) -> [N, E] float32."""
    def f(x, router, w_gate, w_up, w_down, k):
        probs = moe.router_probs(x, router)
        weights, ids = moe.route(probs, k, norm_topk_prob=True)
        return moe.experts(x, ids, weights, w_gate, w_up, w_down, impl=impl, gmm=gmm)
    return f


def dense_mlp(x, w_gate, w_up, w_down):
    """SwiGLU, float32 accumulation like the experts."""
    h = jnp.dot(x, w_gate, preferred_element_type=jnp.float32)
    u = jnp.dot(x, w_up, preferred_element_type=jnp.float32)
    return jnp.dot(jax.nn.silu(h) * u, w_down, preferred_element_type=jnp.float32)


def inputs(shape, seed: int = 0):
    n, e, x, k, f = shape
    keys = jax.random.split(jax.random.key(seed), 9)
    s = 0.02
    return dict(
        x=jax.random.normal(keys[0], (n, e)),
        probe=jax.random.normal(keys[1], (n, e)),
        moe=(jax.random.normal(keys[2], (e, x)),
             jax.random.normal(keys[3], (x, e, f)) * s, jax.random.normal(keys[4], (x, e, f)) * s,
             jax.random.normal(keys[5], (x, f, e)) * s),
        mlp=(jax.random.normal(keys[6], (e, k * f)) * s,
             jax.random.normal(keys[7], (e, k * f)) * s,
             jax.random.normal(keys[8], (k * f, e)) * s))


def step_fns(shape, arrays, reference: bool = True):
    """name -> no-argument callable: one jitted forward + backward."""
    k = shape[3]
    x, probe = arrays["x"], arrays["probe"]

    def grad_of(fn, params):
        loss = lambda x, *p: jnp.sum(fn(x, *p) * probe)
        g = jax.jit(jax.grad(loss, argnums=tuple(range(len(params) + 1))))
        return lambda: g(x, *params)

    moe_fn = lambda impl, gmm="auto": (lambda x, *p: moe_layer(impl, gmm)(x, *p, k))
    runs = {"ragged (blocked)": grad_of(moe_fn("ragged", "blocked"), arrays["moe"])}
    if ragged_dot_bytes(shape) <= RAGGED_DOT_MAX_BYTES:
        runs["ragged (ragged_dot)"] = grad_of(moe_fn("ragged", "ragged_dot"), arrays["moe"])
    runs["dense MLP (same active params)"] = grad_of(dense_mlp, arrays["mlp"])
    if reference:
        runs["one-hot reference"] = grad_of(moe_fn("dense"), arrays["moe"])
    return runs


def ragged_dot_bytes(shape) -> int:
    """The float32 [N * k, X * E] operand XLA:CPU's ragged_dot builds for the gate projection."""
    n, e, x, k, _ = shape
    return n * k * x * e * 4


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (the smoke test)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=0, help="tokens N (default: the shape's)")
    p.add_argument("--no_reference", action="store_true",
                   help="leave out the one-hot reference row (14x the dense MLP's flops and "
                        "more; the blocked backend is then the gradients' reference)")
    args = p.parse_args(argv)
    shape = QUICK if args.quick else FULL
    if args.tokens:
        shape = (args.tokens,) + shape[1:]
    n, e, x, k, f = shape
    arrays = inputs(shape)
    runs = step_fns(shape, arrays, reference=not args.no_reference)
    best, outs = bench_common.best_of(runs, args.repeats)
    # the grouped matmuls' gradients equal the one-hot reference's (same routing), or without
    # it the "blocked" backend's (itself tested against the reference)
    ref_name = "ragged (blocked)" if args.no_reference else "one-hot reference"
    ref = outs[ref_name]
    for name in [r for r in runs if r.startswith("ragged") and r != ref_name]:
        for a, b in zip(outs[name], ref):
            err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
            if err > 1e-4:
                raise AssertionError(f"{name} gradient differs from the one-hot reference: {err}")
    base = best["dense MLP (same active params)"]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}, {os.cpu_count()} CPUs); float32, forward + backward")
    print(f"{n} tokens, hidden {e}, {x} experts, top-{k}, moe_intermediate {f} (dense MLP: "
          f"intermediate {k * f}); best of {args.repeats}")
    print("| layer (fwd + bwd) | ms | vs dense MLP |")
    print("|---|---|---|")
    rows = []
    for name, sec in best.items():
        rows.append((name, sec * 1e3, sec / base))
        print(f"| {name} | {sec * 1e3:.1f} | {sec / base:.2f}x |")
    if "ragged (ragged_dot)" not in best:
        print(f"ragged (ragged_dot) left out: XLA:CPU would build a "
              f"{ragged_dot_bytes(shape) / 2 ** 30:.1f} GiB [N * k, X * E] operand per matmul")
    return rows


if __name__ == "__main__":
    main()
