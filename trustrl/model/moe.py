"""Mixture-of-experts math (Qwen3-MoE, Hugging Face ``Qwen3MoeSparseMoeBlock``): routing, the
experts as a grouped matmul, the load-balancing loss and load statistics. Pure functions of
arrays; the Flax layer that owns the parameters is ``transformer.MoeMlp``.

Routing (per token, in float32 whatever the compute dtype: the authors' ``moe_router_dtype=fp32``):

    p = softmax(x @ W_router)          [X experts]
    ids, w = top_k(p, k)               w renormalised to sum 1 when norm_topk_prob
    y = sum_j w_j * down_e(silu(gate_e(x)) * up_e(x)),   e = ids_j

Rollout routing replay (R3): the experts come from the rollout engine (``ids`` recorded by the
sampler) and the weights from THIS router's softmax at those ids, renormalised the same way
(``replayed_weights``), so the router keeps its gradient. Gathering the weights from the top-k
values of another routing (or stopping their gradient) would silently zero it.

Experts (``experts``): "ragged" sorts the N * k (token, expert) pairs by expert and runs each
projection as one ``jax.lax.ragged_dot`` (dropless: no token is dropped); "dense" is the
reference that runs every expert on every token and weights the results with the [N, X] gate
matrix; "capacity" gives every expert a fixed buffer of ``capacity`` rows (fixed shapes; pairs
past an expert's capacity are dropped, counted by ``dropped``).

LoRA on the experts (trustrl.model.lora): any of w_gate / w_up / w_down may be an
``Adapted(w, a, b, scale)``, one adapter per expert (a [X, in, r], b [X, r, out]); every
implementation then computes ``x @ w_e + scale (x @ a_e) @ b_e`` for each pair's expert e, the
adapter's two products as grouped matmuls of their own (never the [X, in, out] product).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

import flax.struct

from trustrl.infra import sharding as sharding_lib

IMPLS = ("ragged", "dense", "capacity")
GMM_BACKENDS = ("auto", "ragged_dot", "blocked")


def router_probs(x, w_router):
    """Routing probabilities [N, X] float32 from hidden states [N, E] and the router [E, X]."""
    logits = jnp.dot(x.astype(jnp.float32), w_router.astype(jnp.float32),
                     preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


def _normalise(w, norm_topk_prob: bool):
    return w / jnp.sum(w, axis=-1, keepdims=True) if norm_topk_prob else w


def route(probs, k: int, norm_topk_prob: bool):
    """(weights [N, k] float32, ids [N, k] int32): the k most probable experts per token."""
    w, ids = jax.lax.top_k(probs, k)
    return _normalise(w, norm_topk_prob), ids.astype(jnp.int32)


def replayed_weights(probs, ids, norm_topk_prob: bool):
    """The gate weights [N, k] of recorded experts ``ids`` [N, k] under this router's ``probs``:
    differentiable in ``probs`` (R3 keeps the router's gradient)."""
    w = jnp.take_along_axis(probs, ids.astype(jnp.int32), axis=-1)
    return _normalise(w, norm_topk_prob)


@flax.struct.dataclass
class Adapted:
    """An expert projection with a LoRA adapter per expert: w [X, in, out], a [X, in, r],
    b [X, r, out]; the product is ``x @ w + scale (x @ a) @ b`` (``scale``: alpha / r)."""
    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    @property
    def shape(self):
        return self.w.shape


def _project(x, w, mm, dtype):
    """``mm(x, w)`` (a float32 [.., out] product) for a plain or ``Adapted`` expert weight: the
    adapter's products through the same ``mm``, its rank-r activations in ``dtype``."""
    if not isinstance(w, Adapted):
        return mm(x, w)
    h = mm(x, w.a.astype(dtype)).astype(dtype)
    return mm(x, w.w) + w.scale * mm(h, w.b.astype(dtype))


def _swiglu(x, w_gate, w_up, w_down, dtype):
    """Every expert's SwiGLU on its rows: x [X, M, E] (or [1, M, E]: the same rows for all)
    -> [X, M, E] float32 (float32 accumulation)."""
    x = jnp.broadcast_to(x, (w_gate.shape[0],) + x.shape[1:]).astype(dtype)
    mm = lambda a, w: jnp.einsum("xmi,xio->xmo", a, w, preferred_element_type=jnp.float32)
    h = _project(x, w_gate, mm, dtype)
    u = _project(x, w_up, mm, dtype)
    a = (jax.nn.silu(h) * u).astype(dtype)
    return _project(a, w_down, mm, dtype)


def _varying_like(x, *refs):
    """``x`` cast to vary over the mesh axes any of ``refs`` varies over (inside a shard_map
    with check_vma, a loop carry must have its body's type); a no-op outside a shard_map."""
    axes = set()
    for r in refs:
        axes |= set(getattr(getattr(jax.typeof(r), "manual_axis_type", None), "varying", ()))
    axes -= set(getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", ()))
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def _group_loop(group_sizes, blocks: tuple, tile, init, per_group=None):
    """``init`` through ``tile(block, masked, g, row, rows, carry)`` for the tiles that cover
    every group g's rows, the groups in order: as many full tiles of ``blocks[0]`` rows as fit,
    then of ``blocks[1]``, ..., and the rest in tiles of ``blocks[-1]`` rows, the last one
    partial (``masked``: only its first ``rows`` rows belong to g). So a group wastes under
    ``blocks[-1]`` rows while most rows go through the tallest tiles. ``per_group(g, carry,
    tiles)`` wraps a group's tiles (default: none)."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)

    def group(g, carry):
        def tiles(c):
            row, left = ends[g] - sizes[g], sizes[g]
            for i, b in enumerate(blocks):
                masked = i == len(blocks) - 1
                count = (left + b - 1) // b if masked else left // b
                c = jax.lax.fori_loop(
                    0, count, lambda j, c, b=b, row=row, left=left, masked=masked: tile(
                        b, masked, g, row + j * b, left - j * b, c), c)
                row, left = row + count * b, left - count * b
            return c
        return tiles(carry) if per_group is None else per_group(g, carry, tiles)

    return jax.lax.fori_loop(0, sizes.shape[0], group, init)


def _gmm_loop(lhs, rhs, group_sizes, blocks: tuple, transpose_rhs: bool):
    """out[r] = lhs[r] @ rhs[g(r)] (``rhs[g].T`` when transpose_rhs) for the rows r of each
    group, 0 past them: loops over the groups and their row tiles (``_group_loop``), so the work
    is about sum_g size_g rows of [rows, K] x [K, N], not every group on every row."""
    m, kdim = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    pad = blocks[-1]
    lhs = jnp.concatenate([lhs, jnp.zeros((pad, kdim), lhs.dtype)])  # no clamped slices
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def tile(block, masked, g, row, rows, out):
        # a partial tile's rows past its group are written too: the next group's tiles (the
        # groups go in order) write over them, and the rows past the last group are zeroed below
        a = jax.lax.dynamic_slice_in_dim(lhs, row, block, 0)
        w = jax.lax.dynamic_index_in_dim(rhs, g, 0, keepdims=False)
        y = jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out, y, row, 0)

    out = _varying_like(jnp.zeros((m + pad, n), jnp.float32), lhs, rhs, group_sizes)
    out = _group_loop(group_sizes, blocks, tile, out)[:m]
    total = jnp.sum(group_sizes.astype(jnp.int32))
    return jnp.where(jnp.arange(m, dtype=jnp.int32)[:, None] < total, out, 0.0)


def _tgmm_loop(lhs, dout, group_sizes, groups: int, blocks: tuple):
    """The weight gradient of ``_gmm_loop``: out[g] = sum_{r in g} lhs[r]^T dout[r], [G, K, N]
    float32 (a group without rows gets 0); a group's tiles accumulate in one [K, N] carry."""
    m, kdim = lhs.shape
    n = dout.shape[1]
    pad = blocks[-1]
    lhs = jnp.concatenate([lhs, jnp.zeros((pad, kdim), lhs.dtype)])
    dout = jnp.concatenate([dout, jnp.zeros((pad, n), dout.dtype)])

    def tile(block, masked, g, row, rows, acc):
        a = jax.lax.dynamic_slice_in_dim(lhs, row, block, 0)
        d = jax.lax.dynamic_slice_in_dim(dout, row, block, 0)
        if masked:
            live = jnp.arange(block, dtype=jnp.int32)[:, None] < rows
            d = jnp.where(live, d, jnp.zeros_like(d))
        return acc + jax.lax.dot_general(a, d, (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    zero = _varying_like(jnp.zeros((kdim, n), jnp.float32), lhs, dout, group_sizes)

    def per_group(g, out, tiles):
        return jax.lax.dynamic_update_index_in_dim(out, tiles(zero), g, 0)

    out = _varying_like(jnp.zeros((groups, kdim, n), jnp.float32), lhs, dout, group_sizes)
    return _group_loop(group_sizes, blocks, tile, out, per_group)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_blocked(lhs, rhs, group_sizes, blocks):
    return _gmm_loop(lhs, rhs, group_sizes, blocks, False)


def _gmm_blocked_fwd(lhs, rhs, group_sizes, blocks):
    return _gmm_loop(lhs, rhs, group_sizes, blocks, False), (lhs, rhs, group_sizes)


def _gmm_blocked_bwd(blocks, res, g):
    # the cotangent enters the matmuls in the inputs' dtype (float32 accumulation), as the
    # forward's inputs do
    lhs, rhs, group_sizes = res
    g = g.astype(lhs.dtype)
    d_lhs = _gmm_loop(g, rhs, group_sizes, blocks, True).astype(lhs.dtype)
    d_rhs = _tgmm_loop(lhs, g, group_sizes, rhs.shape[0], blocks).astype(rhs.dtype)
    return d_lhs, d_rhs, None


_gmm_blocked.defvjp(_gmm_blocked_fwd, _gmm_blocked_bwd)


def gmm_backend(name: str = "auto") -> str:
    """The grouped-matmul backend ``name`` resolves to: "auto" is "ragged_dot" on TPU (XLA's
    native ragged dot) and "blocked" elsewhere (jax 0.10 - 0.12 lower ``ragged_dot`` on CPU,
    and on GPU without a cuDNN / Triton path, to a dense [rows, groups * K] product: every
    expert on every row, the one-hot reference's cost)."""
    if name not in GMM_BACKENDS:
        raise ValueError(f"unknown grouped-matmul backend {name!r}; valid: {GMM_BACKENDS}")
    if name != "auto":
        return name
    return "ragged_dot" if _target_platform() == "tpu" else "blocked"


def _target_platform() -> str:
    """The platform of the ``jax.set_mesh`` mesh (a TPU topology's compile-only devices
    included), else the default backend (as ``attention.target_platform``)."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def block_rows(rows: int) -> tuple:
    """Tile heights of the "blocked" grouped matmul (``_group_loop``): 256, 64 and 16 rows, the
    ones taller than ``rows`` left out (a group wastes under 16 rows)."""
    return tuple(b for b in (256, 64) if b <= rows) + (16,)


def grouped_matmul(lhs, rhs, group_sizes, *, backend: str = "auto", block: int = 0):
    """``jax.lax.ragged_dot``'s contract, float32 out: lhs [M, K] holds the rows of group 0,
    then group 1, ... (``group_sizes`` [G] int32, sum <= M); rhs [G, K, N]; row r of the
    result is lhs[r] @ rhs[group of r], and 0 past sum(group_sizes). Differentiable in lhs and
    rhs. ``backend``: ``GMM_BACKENDS`` (see ``gmm_backend``); ``block``: the "blocked" tiles'
    one height (0: ``block_rows``' several)."""
    if gmm_backend(backend) == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    blocks = (int(block),) if block else block_rows(lhs.shape[0])
    # inside a shard_map the custom VJP's cotangents vary like the union of its inputs: cast
    # the inputs to it first (the cast's transpose then sums e.g. a weight gradient over the
    # batch axes it is replicated on)
    args = (lhs, rhs, group_sizes.astype(jnp.int32))
    lhs, rhs, group_sizes = (_varying_like(a, *args) for a in args)
    return _gmm_blocked(lhs, rhs, group_sizes, blocks)


def _ragged(x, ids, weights, w_gate, w_up, w_down, dtype, *, first_expert=0, backend="auto"):
    """The experts ``first_expert`` .. ``first_expert + w_gate.shape[0] - 1`` (all of them by
    default) on the pairs routed to them; pairs routed to other experts contribute 0 (the
    expert-parallel layer sums the shards)."""
    n, k = ids.shape
    local = w_gate.shape[0]
    flat = ids.reshape(-1) - first_expert
    mine = (flat >= 0) & (flat < local)
    key = jnp.where(mine, flat, local)  # pairs of other experts sort last, outside every group
    order = jnp.argsort(key, stable=True)  # the (token, slot) pairs grouped by expert
    xs = jnp.take(x, order // k, axis=0).astype(dtype)
    sizes = jnp.bincount(key, length=local + 1)[:local].astype(jnp.int32)
    def mm(a, w):
        return grouped_matmul(a, w, sizes, backend=backend)

    a = (jax.nn.silu(_project(xs, w_gate, mm, dtype)) * _project(xs, w_up, mm, dtype)).astype(
        dtype)
    ys = _project(a, w_down, mm, dtype)  # [N * k, E] float32, expert-sorted; 0 elsewhere
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    y = jnp.take(ys, inverse, axis=0).reshape(n, k, -1)  # back to token order
    mine = mine.reshape(n, k)
    y = jnp.where(mine[..., None], y, 0.0)  # whatever a backend leaves past the groups
    w = jnp.where(mine, weights, 0.0).astype(jnp.float32)
    return jnp.einsum("nke,nk->ne", y, w)


class ExpertParallel(NamedTuple):
    """The mesh layout of the experts (``expert_parallel``): mesh axes (tuples, major first)."""
    batch_axes: tuple  # the tokens' batch dimension ([B, T, E] rows) is split over these
    expert_axes: tuple  # the experts ([X, E, F] dim 0) are split over these
    mlp_axes: tuple  # the experts' intermediate dimension F is split over these
    gather_axes: tuple  # batch axes that also split experts: tokens all-gathered over them
    sum_axes: tuple  # partial outputs summed over these (expert axes off the batch, mlp axes)

    def specs(self):
        """(tokens [B, T, *], gate / up [X, E, F], down [X, F, E]) PartitionSpecs."""
        ax = lambda t: None if not t else (t[0] if len(t) == 1 else t)
        return (P(ax(self.batch_axes), None, None),
                P(ax(self.expert_axes), None, ax(self.mlp_axes)),
                P(ax(self.expert_axes), ax(self.mlp_axes), None))


def _flat(axes) -> tuple:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def expert_parallel(mesh, batch: int, num_experts: int, moe_intermediate: int,
                    rules=sharding_lib.LOGICAL_RULES) -> ExpertParallel | None:
    """The layout ``sharded_experts`` runs on ``mesh`` (None: no mesh, a one-device or manual
    mesh, or a batch that the batch axes do not divide; the caller then runs ``experts``
    unsharded, with the same values).

    The expert weights are laid out as ``transformer.param_shardings`` lays them out: the
    "expert" and "mlp" logical axes through ``rules``, a dimension its mesh axes do not divide
    replicated (then every device holds all experts and only the batch is split); the
    "expert_embed" axis is not split inside the layer (the default rules replicate it)."""
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    if any(t == AxisType.Manual for t in getattr(mesh, "axis_types", ())):
        return None  # already inside a shard_map
    sizes = dict(mesh.shape)
    spec = sharding_lib.logical_to_spec(("expert", "expert_embed", "mlp"), rules)

    def fit(axes, dim):
        axes = tuple(a for a in _flat(axes) if a in sizes)
        return axes if dim % math.prod(sizes[a] for a in axes) == 0 else ()

    batch_axes = tuple(a for a in sharding_lib.BATCH_AXES if a in sizes)
    if batch % math.prod(sizes[a] for a in batch_axes):
        return None
    expert_axes, mlp_axes = fit(spec[0], num_experts), fit(spec[2], moe_intermediate)
    gather = tuple(a for a in batch_axes if a in expert_axes)
    summed = tuple(a for a in expert_axes if a not in batch_axes) + mlp_axes
    return ExpertParallel(batch_axes, expert_axes, mlp_axes, gather, summed)


def sharded_experts(plan: ExpertParallel, mesh, x, ids, weights, w_gate, w_up, w_down, *,
                    dtype=None, gmm: str = "auto"):
    """``experts`` (impl "ragged") with expert parallelism, inside a ``jax.shard_map``:
    x [B, T, E]; ids, weights [B, T, k] -> [B, T, E] float32, laid out as ``plan``.

    Each device all-gathers the tokens (and their routes) of the devices that share its batch
    rows but hold other experts (``plan.gather_axes``), runs ITS experts on the (token, expert)
    pairs routed to them (grouped matmuls with group sizes for its experts only; pairs routed
    elsewhere contribute 0) with its slice of the intermediate dimension, and the partial
    outputs are reduce-scattered back to the batch layout (``psum_scatter``) and summed over
    ``plan.sum_axes`` (``psum``). No device ever holds another device's expert weights; the
    weight gradients come back in the weights' own layout."""
    dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    tok, w_in, w_out = plan.specs()

    def body(x, ids, weights, w_gate, w_up, w_down):
        if plan.gather_axes:
            x, ids, weights = (jax.lax.all_gather(a, plan.gather_axes, axis=0, tiled=True)
                               for a in (x, ids, weights))
        # vary like the local experts before the token gather: the gather's transpose must
        # sum the tokens' cotangent over every axis the experts split (jax 0.10 leaves that
        # out for a gather whose indices alone vary)
        experts_leaves = jax.tree.leaves((w_gate, w_down))
        x, weights = (_varying_like(a, *experts_leaves) for a in (x, weights))
        b, t, e = x.shape
        k = ids.shape[-1]
        first = (jax.lax.axis_index(plan.expert_axes) * w_gate.shape[0] if plan.expert_axes
                 else 0)
        y = _ragged(x.reshape(b * t, e), ids.reshape(b * t, k), weights.reshape(b * t, k),
                    w_gate, w_up, w_down, dtype, first_expert=first,
                    backend=gmm).reshape(b, t, e)
        if plan.gather_axes:
            y = jax.lax.psum_scatter(y, plan.gather_axes, scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, plan.sum_axes) if plan.sum_axes else y

    def spec(w, w_spec, down: bool):  # an adapter's expert / mlp axes as its weight's
        if not isinstance(w, Adapted):
            return w_spec
        exp, mlp = w_spec[0], (w_spec[1] if down else w_spec[2])
        return Adapted(w=w_spec, a=P(exp, mlp if down else None, None),
                       b=P(exp, None, None if down else mlp), scale=w.scale)

    in_specs = (tok, tok, tok, spec(w_gate, w_in, False), spec(w_up, w_in, False),
                spec(w_down, w_out, True))
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                         out_specs=tok)(x, ids, weights, w_gate, w_up, w_down)


def _dense(x, ids, weights, w_gate, w_up, w_down, dtype):
    num_experts = w_gate.shape[0]
    gates = jnp.einsum("nkx,nk->nx", jax.nn.one_hot(ids, num_experts, dtype=jnp.float32),
                       weights.astype(jnp.float32))  # [N, X], zero off the chosen experts
    y = _swiglu(x.astype(dtype)[None], w_gate, w_up, w_down, dtype)  # [X, N, E]
    return jnp.einsum("xne,nx->ne", y, gates)


def capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Rows per expert in "capacity" mode: ceil(factor * N * k / X) (at least 1)."""
    return max(1, math.ceil(factor * num_tokens * k / num_experts))


def _slots(ids, num_experts: int, cap: int):
    """Each (token, slot) pair's row in its expert's buffer, and whether it fits (first come,
    first served in token order)."""
    flat = ids.reshape(-1)
    one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    row = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    return flat, row, row < cap


def _capacity(x, ids, weights, w_gate, w_up, w_down, dtype, cap):
    n, k = ids.shape
    num_experts, e = w_gate.shape[0], x.shape[-1]
    flat, row, keep = _slots(ids, num_experts, cap)
    tok = jnp.arange(n * k) // k
    # dropped pairs are sent to a scratch row past the end and never read back
    dest = jnp.where(keep, flat * cap + row, num_experts * cap)
    buf = jnp.zeros((num_experts * cap + 1, e), dtype).at[dest].set(x[tok].astype(dtype))
    y = _swiglu(buf[:-1].reshape(num_experts, cap, e), w_gate, w_up, w_down, dtype)
    y = jnp.concatenate([y.reshape(num_experts * cap, e), jnp.zeros((1, e), y.dtype)])
    pair = jnp.take(y, dest, axis=0) * (weights.reshape(-1) * keep)[:, None]
    return pair.reshape(n, k, e).sum(axis=1)


def experts(x, ids, weights, w_gate, w_up, w_down, *, impl: str = "ragged", dtype=None,
            capacity_rows: int = 0, gmm: str = "auto"):
    """sum_j weights[:, j] * expert_{ids[:, j]}(x): [N, E] float32.

    x [N, E]; ids, weights [N, k]; w_gate, w_up [X, E, F]; w_down [X, F, E]. ``dtype``: the
    matmuls' input dtype (default x's); products accumulate in float32. ``capacity_rows``:
    the per-expert buffer of impl="capacity". ``gmm``: impl="ragged"'s grouped-matmul backend
    (``GMM_BACKENDS``)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; valid: {IMPLS}")
    dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    if impl == "ragged":
        return _ragged(x, ids, weights, w_gate, w_up, w_down, dtype, backend=gmm)
    if impl == "dense":
        return _dense(x, ids, weights, w_gate, w_up, w_down, dtype)
    if capacity_rows < 1:
        raise ValueError(f"impl='capacity' needs capacity_rows >= 1, got {capacity_rows}")
    return _capacity(x, ids, weights, w_gate, w_up, w_down, dtype, capacity_rows)


def dropped(ids, num_experts: int, cap: int, mask=None):
    """Fraction of (token, slot) pairs past their expert's capacity (over ``mask``ed tokens)."""
    _, _, keep = _slots(ids, num_experts, cap)
    m = jnp.ones(ids.shape, jnp.float32) if mask is None else jnp.broadcast_to(
        mask.reshape(-1, 1).astype(jnp.float32), ids.shape)
    return jnp.sum((~keep).astype(jnp.float32) * m.reshape(-1)) / jnp.maximum(jnp.sum(m), 1.0)


def load_sums(probs, ids, mask):
    """Per-expert sums of one layer over its valid tokens: (top-k assignments [X], routing
    probability [X], valid tokens []): what ``load_balancing_loss`` and ``load_stats`` reduce.
    probs [N, X]; ids [N, k]; mask [N]."""
    m = mask.reshape(-1).astype(jnp.float32)
    num_experts = probs.shape[-1]
    counts = jnp.einsum("nkx,n->x", jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), m)
    return counts, jnp.einsum("nx,n->x", probs.astype(jnp.float32), m), jnp.sum(m)


def load_balancing_loss(counts, prob_sums, tokens):
    """Hugging Face's ``load_balancing_loss_func`` (Switch Transformer eq. 4-6) from the sums of
    ``load_sums`` added over every MoE layer: X * sum_x (counts_x / T) * (prob_sums_x / T),
    T the valid tokens of all layers together."""
    num_experts = counts.shape[-1]
    t = jnp.maximum(tokens, 1.0)
    return num_experts * jnp.sum((counts / t) * (prob_sums / t))


def load_stats(counts, tokens, k: int) -> dict:
    """Max and mean tokens per expert of one layer, and max / mean (1: perfectly balanced)."""
    mean = tokens * k / counts.shape[-1]
    mx = jnp.max(counts)
    return {"max": mx, "mean": mean, "imbalance": mx / jnp.maximum(mean, 1e-9)}
