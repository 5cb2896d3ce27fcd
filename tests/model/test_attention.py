"""Attention backends == the einsum reference (value and gradient) on padded GQA batches."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.model import attention as A

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")


def _batch(t=37, h=4, k=2, d=16, seed=0, dtype=jnp.float32):
    """3 rows: full, left-padded prompt + right-padded response, mostly padding."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (3, t, h, d))
    kk = jax.random.normal(keys[1], (3, t, k, d))
    v = jax.random.normal(keys[2], (3, t, k, d))
    valid = np.zeros((3, t), bool)
    valid[0] = True
    valid[1, t // 4: t - 5] = True  # left pads, real tokens, right pads
    valid[2, t - 3:] = True
    w = jax.random.normal(keys[3], (3, t, h, d)) * valid[:, :, None, None]  # loss on real rows
    return (q.astype(dtype), kk.astype(dtype), v.astype(dtype)), jnp.asarray(valid), w


def _value_and_grads(fn, qkv, valid, w):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, valid).astype(jnp.float32) * w)
    out = jax.jit(fn)(*qkv, valid)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*qkv)
    return out * valid[:, :, None, None], grads


BACKENDS = {
    "blockwise_4": functools.partial(A.blockwise_attention, block_size=4),
    "blockwise_16": functools.partial(A.blockwise_attention, block_size=16),
    "blockwise_64": functools.partial(A.blockwise_attention, block_size=64),  # one tile
    # the cuDNN wrapper (left -> right padding rotation, sequence lengths) through jax's XLA path
    "cudnn_wrapper": functools.partial(A.cudnn_attention, implementation="xla"),
}


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("t,h,k", [(37, 4, 2), (16, 6, 1), (9, 2, 2)])
def test_backend_equals_xla_fp32(name, t, h, k):
    qkv, valid, w = _batch(t, h, k)
    want, want_g = _value_and_grads(A.xla_attention, qkv, valid, w)
    got, got_g = _value_and_grads(BACKENDS[name], qkv, valid, w)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for a, b, what in zip(got_g, want_g, "qkv"):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"d{what}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blockwise_16", "cudnn_wrapper"])
def test_backend_bf16_error_within_the_references_own(name):
    qkv32, valid, w = _batch(48, 4, 2)
    exact, exact_g = _value_and_grads(A.xla_attention, qkv32, valid, w)
    qkv16 = tuple(x.astype(jnp.bfloat16) for x in qkv32)
    ref, ref_g = _value_and_grads(A.xla_attention, qkv16, valid, w)
    got, got_g = _value_and_grads(BACKENDS[name], qkv16, valid, w)
    assert got.dtype == jnp.bfloat16
    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    ref_err = err(ref, exact)
    assert ref_err > 1e-4  # bf16 really is coarser (else the bound below says nothing)
    assert err(got, exact) <= 1.5 * ref_err, (err(got, exact), ref_err)
    for a, r, e in zip(got_g, ref_g, exact_g):
        assert err(a, e) <= 1.5 * err(r, e), (err(a, e), err(r, e))


def test_splash_interpret_equals_xla():
    """The TPU kernel's own code, run by the Pallas interpreter on CPU (slow: tiny shapes)."""
    qkv, valid, w = _batch(40, 4, 2)
    want, want_g = _value_and_grads(A.xla_attention, qkv, valid, w)
    fn = functools.partial(A.splash_attention, interpret=True)
    got, got_g = _value_and_grads(fn, qkv, valid, w)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", [(8, 4), (4, 2)])  # (4, 2): kv heads do not divide tensor=4
def test_splash_under_shard_map_equals_blockwise_on_a_2x4_mesh(heads):
    """Under a (fsdp=2, tensor=4) mesh the splash kernel runs inside a shard_map (a Mosaic
    kernel cannot be partitioned by XLA): rows split over fsdp, heads over tensor where they
    divide; values and gradients equal the blockwise reference (Pallas interpret mode)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from trustrl.infra import sharding
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
    qkv, valid, w = _batch(40, *heads)
    qkv = tuple(jnp.concatenate([x, x[::-1] * 0.5]) for x in qkv)  # 6 rows: 3 per fsdp shard
    valid, w = jnp.concatenate([valid, valid[::-1]]), jnp.concatenate([w, w[::-1]])
    want, want_g = _value_and_grads(functools.partial(A.blockwise_attention, block_size=16),
                                    qkv, valid, w)
    fn = functools.partial(A.attend, backend="splash")
    with jax.set_mesh(mesh):
        assert A.target_platform() == "cpu"  # the mesh's devices: interpret mode here
        place = lambda x: jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
        qkv, valid, w = tuple(map(place, qkv)), place(valid), place(w)
        got, got_g = _value_and_grads(fn, qkv, valid, w)
        jaxpr = str(jax.make_jaxpr(fn)(*qkv, valid))
    assert "shard_map" in jaxpr
    assert A.splash_specs(mesh, qkv[0].shape, qkv[1].shape)[0] == P(
        sharding.BATCH_AXES, None, "tensor" if heads == (8, 4) else None, None)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


@on_gpu
def test_cudnn_equals_xla_on_gpu():
    qkv32, valid, w = _batch(64, 4, 2, d=64)
    exact, _ = _value_and_grads(A.xla_attention, qkv32, valid, w)
    qkv16 = tuple(x.astype(jnp.bfloat16) for x in qkv32)
    ref, _ = _value_and_grads(A.xla_attention, qkv16, valid, w)
    got, _ = _value_and_grads(A.cudnn_attention, qkv16, valid, w)
    ref_err = float(jnp.max(jnp.abs(ref.astype(jnp.float32) - exact)))
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - exact))) <= 1.5 * ref_err


def test_cudnn_wrapper_poisons_rows_with_a_hole():
    qkv, valid, _ = _batch(12, 2, 1)
    holed = valid.at[0, 5].set(False)  # row 0: real tokens no longer contiguous
    out = A.cudnn_attention(*qkv, holed, implementation="xla")
    assert bool(jnp.all(jnp.isnan(out[0])))
    assert bool(jnp.all(jnp.isfinite(out[1:])))


@pytest.mark.slow
def test_fully_padded_rows_stay_finite():
    qkv, valid, w = _batch(20, 4, 2)
    valid = valid.at[2].set(False)
    for fn in (A.xla_attention, BACKENDS["blockwise_4"]):
        out, grads = _value_and_grads(fn, qkv, valid, w)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))


def test_blockwise_backward_stores_nothing_quadratic():
    """Compiled temp memory of value_and_grad at T = 4096: xla holds [T, T] float32 scores and
    probabilities (2 heads: 128 MiB each); blockwise only tiles and O(T) residuals."""
    t, h, d = 4096, 2, 16
    spec = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    kspec = jax.ShapeDtypeStruct((1, t, 1, d), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)

    def temp_bytes(fn):
        loss = lambda q, k, v, m: jnp.sum(fn(q, k, v, m))
        c = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, kspec, kspec, valid).compile()
        return c.memory_analysis().temp_size_in_bytes

    scores = t * t * h * 4
    assert temp_bytes(A.xla_attention) >= scores  # the reference really is quadratic
    assert temp_bytes(functools.partial(A.blockwise_attention, block_size=256)) < scores / 16


def test_resolve_and_errors():
    assert A.resolve("auto", 128, jnp.float32, "cpu") == "xla"
    assert A.resolve("auto", A.AUTO_XLA_MAX_LEN + 1, jnp.float32, "cpu") == "blockwise"
    assert A.resolve("auto", 8192, jnp.bfloat16, "gpu") == "cudnn"
    assert A.resolve("auto", 8192, jnp.float32, "gpu") == "blockwise"  # cuDNN: 16-bit only
    assert A.resolve("auto", 8192, jnp.bfloat16, "tpu") == "splash"
    assert A.resolve("blockwise", 8, jnp.float32, "cpu") == "blockwise"
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; valid: \('auto'"):
        A.resolve("flash", 8, jnp.float32)
    qkv, valid, _ = _batch(8, 4, 2)
    with pytest.raises(ValueError, match="H % K == 0"):
        A.attend(qkv[0], qkv[1][:, :, :1].repeat(3, 2), qkv[2], valid)
    with pytest.raises(ValueError, match=r"valid must be \[B, T\]"):
        A.attend(*qkv, valid[:, :4])
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        A.blockwise_attention(*qkv, valid, 0)


@pytest.mark.parametrize("s,block", [(37, 8), (40, 8), (37, 36), (16, 5)])
def test_decode_attention_over_the_written_window_equals_one_pass(s, block):
    # rows with holes (a left-padded prompt, a ring slot reused), one row written only at the
    # start, one row empty; S not a multiple of the block (the last block is shifted back)
    keys = jax.random.split(jax.random.key(s), 3)
    q = jax.random.normal(keys[0], (4, 2, 3, 16))
    k = jax.random.normal(keys[1], (4, 2, s, 16))
    v = jax.random.normal(keys[2], (4, 2, s, 16))
    valid = np.zeros((4, s), bool)
    valid[0, 3: s - 9] = True
    valid[0, 10] = False
    valid[1, :4] = True
    valid[2, [0, s - 1]] = True
    want = A.decode_attention(q, k, v, jnp.asarray(valid), block_size=0)
    got = jax.jit(functools.partial(A.decode_attention, block_size=block))(q, k, v,
                                                                           jnp.asarray(valid))
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(got)))
    # hand reference for row 1 (4 slots): softmax over those slots only
    sc = np.einsum("kgd,ksd->kgs", q[1], k[1, :, :4]) / 4.0
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(got[1], np.einsum("kgs,ksd->kgd", p, v[1, :, :4]), rtol=1e-5,
                               atol=1e-5)


def test_decode_attention_reads_only_the_written_blocks():
    # slots past the last written one are never read: NaN there does not reach the output
    q = jnp.ones((1, 1, 1, 4))
    k = jnp.ones((1, 1, 32, 4)).at[:, :, 8:].set(jnp.nan)
    v = jnp.ones((1, 1, 32, 4)).at[:, :, 8:].set(jnp.nan)
    valid = jnp.zeros((1, 32), bool).at[:, :6].set(True)
    assert bool(jnp.all(A.decode_attention(q, k, v, valid, block_size=8) == 1.0))
    assert bool(jnp.all(jnp.isnan(A.decode_attention(q, k, v, valid, block_size=0))))
