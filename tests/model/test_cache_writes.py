"""bf16 KV-cache writes on XLA:CPU as bit copies (transformer.bitwise_on_cpu): the same values
bit for bit as the float writes, without XLA:CPU's float32 round trip of the whole cache, and
the float writes unchanged in what TPU and GPU programs get."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.model import transformer as M

V = 96


def _plain(write):
    """The writes as they were: on the floats, the updates cast to the buffer's dtype."""
    return lambda buf, *updates: write(buf, *(u.astype(buf.dtype) for u in updates))


def _odd_bf16(shape, seed):
    """bf16 values with every kind of bit pattern: normals, subnormals, +-0, +-inf and NaNs
    with payloads (raw 16-bit patterns)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    raw.flat[:6] = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001]
    return jax.lax.bitcast_convert_type(jnp.asarray(raw), jnp.bfloat16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_bit_copies_equal_the_float_writes(dtype):
    bits = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16 if x.dtype.itemsize
                                                             == 2 else jnp.uint32))
    buf = _odd_bf16((3, 2, 9, 4), 0).astype(dtype)
    # in buf's dtype (the caches' keys are): XLA:CPU's own float32 -> bf16 casts flush
    # subnormals differently in different fusions, which is not the writes' doing
    upd = _odd_bf16((3, 2, 1, 4), 1).astype(dtype)
    cols = jnp.asarray([[2], [8], [11]])  # 11: out of range, dropped
    writes = {
        "scatter": lambda b, x: b.at[jnp.arange(3)[:, None, None], jnp.arange(2)[None, None, :],
                                     cols[:, :, None]].set(x.transpose(0, 2, 1, 3),
                                                           mode="drop"),
        "dynamic_update_slice": lambda b, x: jax.lax.dynamic_update_slice(b, x, (0, 0, 5, 0)),
        "select": lambda b, x: jnp.where(jnp.arange(9)[None, None, :, None] == 3, x, b)}
    for name, write in writes.items():
        got = jax.jit(M.bitwise_on_cpu(write))(buf, upd)
        want = jax.jit(_plain(write))(buf, upd)
        assert got.dtype == buf.dtype, name
        # NaN for NaN; every other value bit for bit (the float path may quiet a NaN's
        # payload, 0x7FC1 -> 0x7FC0; the bit copy keeps it)
        nan = np.isnan(np.asarray(got, np.float32))
        np.testing.assert_array_equal(nan, np.isnan(np.asarray(want, np.float32)), name)
        np.testing.assert_array_equal(bits(got)[~nan], bits(want)[~nan], err_msg=name)
        assert not np.array_equal(bits(got), bits(buf)), name  # something was written


def _decode_program(cfg, row_indexed: bool, steps=6, batch=4, prompt=5, length=16):
    """prefill + ``steps`` greedy decode steps in one jitted program (a sampler's loop)."""
    def run(params, tokens, valid):
        cache = M.init_cache(cfg, batch, length)
        if row_indexed:
            cache = M.row_indexed(cache)
        pos = M.positions_from_mask(valid).astype(jnp.int32)
        logits, cache = M.prefill(params, cfg, tokens, pos, valid, cache)

        def body(i, carry):
            logits, cache, out = carry
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            live = (jnp.arange(batch) + i) % 3 > 0  # row-indexed: some rows skip a step
            logits, cache = M.decode_step(params, cfg, tok, pos[:, -1] + 1 + i, cache,
                                          live if row_indexed else None)
            return logits, cache, out.at[i].set(logits)
        out = jnp.zeros((steps, batch, cfg.vocab_size), jnp.float32)
        return jax.lax.fori_loop(0, steps, body, (logits, cache, out))
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(1, V, (batch, prompt)), jnp.int32)
    valid = jnp.asarray(np.arange(prompt)[None] >= np.array([0, 1, 3, 0])[:, None], jnp.int32)
    return jax.jit(run), (tokens, valid)


@pytest.mark.parametrize("row_indexed", [False, True], ids=["shared_column", "row_indexed"])
def test_bf16_decode_is_bit_identical_and_has_no_float32_cache(monkeypatch, row_indexed):
    cfg = M.ModelConfig.tiny(V, param_dtype="float32", dtype="bfloat16")
    params = M.init_params(cfg, jax.random.key(0))
    fn, args = _decode_program(cfg, row_indexed)
    new = jax.block_until_ready(fn(params, *args))
    compiled = fn.lower(params, *args).compile().as_text()
    cache_shape = "{},{},16,{}".format(4, cfg.num_kv_heads, cfg.head_dim)
    # XLA:CPU's float writes convert each layer's whole cache to f32[...] and back
    assert not re.search(rf"f32\[{cache_shape}\]", compiled)
    assert re.search(rf"u16\[{cache_shape}\]", compiled)  # the writes ran on bit patterns

    monkeypatch.setattr(M, "bitwise_on_cpu", _plain)
    fn, args = _decode_program(cfg, row_indexed)
    old = jax.block_until_ready(fn(params, *args))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert np.isfinite(np.asarray(new[2])).all() and np.ptp(np.asarray(new[2])) > 0


def test_insert_rows_bit_identical_on_bf16(monkeypatch):
    cfg = M.ModelConfig.tiny(V, param_dtype="float32", dtype="bfloat16")
    cache = M.init_cache(cfg, 4, 12)
    fill = lambda x, s: _odd_bf16(x.shape, s)
    cache = cache._replace(k=tuple(fill(x, i) for i, x in enumerate(cache.k)),
                           v=tuple(fill(x, 10 + i) for i, x in enumerate(cache.v)),
                           index=jnp.int32(3))  # the rows wrap past column 12
    new = M.init_cache(cfg, 2, 5)
    new = new._replace(k=tuple(fill(x, 20 + i) for i, x in enumerate(new.k)),
                       v=tuple(fill(x, 30 + i) for i, x in enumerate(new.v)),
                       valid=jnp.ones((2, 5), bool))
    slots = jnp.asarray([2, 7])  # 7: a padding row, dropped
    got = jax.jit(M.insert_rows)(cache, new, slots)
    monkeypatch.setattr(M, "bitwise_on_cpu", _plain)
    want = jax.jit(M.insert_rows)(cache, new, slots)
    u16 = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint16))
    for a, b in zip(got.k + got.v, want.k + want.v):
        nan = np.isnan(np.asarray(a, np.float32))
        np.testing.assert_array_equal(nan, np.isnan(np.asarray(b, np.float32)))
        np.testing.assert_array_equal(u16(a)[~nan], u16(b)[~nan])
    assert not np.array_equal(u16(got.k[0]), u16(cache.k[0]))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_other_platforms_write_the_floats(platform):
    """Lowered for TPU or GPU (from this CPU host), the program writes bf16 as it is: no
    bit-pattern view, so their layouts and memory (aot_check's figures) are unchanged."""
    write = M.bitwise_on_cpu(lambda b, x: jax.lax.dynamic_update_slice(b, x, (0, 1)))
    args = (jnp.zeros((2, 4), jnp.bfloat16), jnp.ones((2, 1), jnp.bfloat16))
    traced = jax.jit(write).trace(*args)
    assert "ui16" in traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "ui16" not in traced.lower(lowering_platforms=(platform,)).as_text()
