"""The Flax decoder: KV-cache decode == full forward, padding, sharding, remat, log-prob helper."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from trustrl.model import transformer as M
from trustrl.model.vocab_head import token_logp_and_entropy
from trustrl.infra.sharding import make_mesh

V = 128
_logits = jax.jit(M.forward_logits, static_argnums=1)  # eager flax is slow op-by-op on CPU


def _left_padded(seed=0, lengths=(9, 5, 12), width=12):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), width), np.int32)
    valid = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(1, V, n)
        valid[i, width - n:] = 1
    return jnp.asarray(tokens), jnp.asarray(valid)


def _perturbed(params, seed=1, scale=0.1):
    """Random init has unit norms / zero biases; perturb everything so bugs cannot hide."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_prefill_and_decode_equal_full_forward(family):
    cfg = M.ModelConfig.tiny(V, family, tie_word_embeddings=family == "qwen3")
    params = _perturbed(M.init_params(cfg, jax.random.key(0)))
    tokens, valid = _left_padded()
    positions = M.positions_from_mask(valid)
    full = _logits(params, cfg, tokens, positions, valid)  # [B, T, V]

    n_prompt = 7  # prefill the first 7 columns, then decode the remaining 5 teacher-forced
    prefill = jax.jit(functools.partial(M.prefill, config=cfg))
    decode = jax.jit(functools.partial(M.decode_step, config=cfg), donate_argnames="cache")
    cache = M.init_cache(cfg, tokens.shape[0], 16)
    logits, cache = prefill(params, tokens=tokens[:, :n_prompt], positions=positions[:, :n_prompt],
                            valid=valid[:, :n_prompt], cache=cache)
    assert logits.shape == (3, V) and logits.dtype == jnp.float32
    got = [logits]
    for t in range(n_prompt, tokens.shape[1]):
        old = cache
        logits, cache = decode(params, tokens=tokens[:, t], positions=positions[:, t], cache=cache)
        assert old.k[0].is_deleted()  # the cache buffer really was donated and reused
        got.append(logits)
    got = jnp.stack(got, axis=1)  # [B, 6, V] = full logits at columns 6..11
    # every row's last 5 columns are real tokens; row 1's column 6 is padding (ignored)
    np.testing.assert_allclose(got[:, 1:], full[:, n_prompt:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[[0, 2], 0], full[[0, 2], n_prompt - 1], atol=1e-5, rtol=0)
    assert int(cache.index) == 12
    # a used (dirty) cache is reusable: prefill starts over and ignores stale slots (row 1 is
    # all padding in these columns, so its logits are meaningless either way)
    again, _ = prefill(params, tokens=tokens[:, :n_prompt], positions=positions[:, :n_prompt],
                       valid=valid[:, :n_prompt], cache=cache)
    np.testing.assert_allclose(again[np.array([0, 2])], got[np.array([0, 2]), 0], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_left_padding_gives_the_unpadded_logits():
    cfg = M.ModelConfig.tiny(V, "llama", rope_scaling=M.Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))
    params = _perturbed(M.init_params(cfg, jax.random.key(0)))
    tokens, valid = _left_padded(lengths=(5, 12))
    padded = _logits(params, cfg, tokens, M.positions_from_mask(valid), valid)
    alone = tokens[:1, -5:]
    ref = _logits(params, cfg, alone, jnp.arange(5)[None], jnp.ones_like(alone))
    np.testing.assert_allclose(padded[0, -5:], ref[0], atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(padded)).all()  # fully masked pad queries stay finite


def test_cache_dtype_follows_compute_dtype():
    cfg = M.ModelConfig.tiny(V, param_dtype="float32", dtype="bfloat16")
    assert M.init_cache(cfg, 2, 8).k[0].dtype == jnp.bfloat16
    assert M.init_cache(cfg, 2, 8, dtype="float32").v[1].dtype == jnp.float32
    params = M.init_params(cfg, jax.random.key(0))
    assert params["layers"]["mlp"]["up_proj"].dtype == jnp.float32  # scanned: [L, E, F]
    tokens = jnp.ones((2, 4), jnp.int32)
    hidden = jax.jit(M.forward, static_argnums=1)(params, cfg, tokens,
                                                 M.positions_from_mask(tokens), tokens)
    assert hidden.dtype == jnp.bfloat16 and M.lm_head(params, cfg, hidden).dtype == jnp.float32


@pytest.mark.slow
@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 1, "tensor": 4},
                                  {"data": 1, "fsdp": 2, "tensor": 4}])
def test_sharded_forward_equals_unsharded(axes):
    mesh = make_mesh(axes)
    cfg = M.ModelConfig.tiny_shardable(V, "qwen3")
    params = M.init_params(cfg, jax.random.key(0), mesh=mesh)
    # created sharded: heads / mlp / vocab over tensor, embed over fsdp, the stacked layer axis
    # replicated
    assert params["layers"]["attn"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["layers"]["mlp"]["down_proj"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["embedding"].sharding.spec == P("tensor", "fsdp")
    shard_shape = params["layers"]["mlp"]["gate_proj"].addressable_shards[0].data.shape
    assert shard_shape == (2, 64 // axes["fsdp"], 128 // 4)
    assert params["layers"]["mlp"]["gate_proj"].sharding == (
        M.param_shardings(cfg, mesh)["layers"]["mlp"]["gate_proj"])

    params = _perturbed(params)
    local = jax.device_get(params)
    tokens, valid = _left_padded(lengths=(9, 5, 12, 3))
    positions = M.positions_from_mask(valid)
    want = _logits(local, cfg, tokens, positions, valid)
    fn = jax.jit(functools.partial(M.forward_logits, config=cfg))
    with jax.set_mesh(mesh):  # activates the batch-sharding constraints inside the model
        got = fn(params, tokens=tokens, positions=positions, valid=valid)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert got.sharding.spec[-1] == "tensor"  # logits come out vocab-sharded


def test_indivisible_dimension_is_replicated():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    cfg = M.ModelConfig.tiny(V, num_heads=6, num_kv_heads=3)  # 6 and 3 heads: not 4-divisible
    shardings = M.param_shardings(cfg, mesh)
    assert shardings["layers"]["attn"]["k_proj"].spec == P(None, "fsdp", None, None)
    assert shardings["layers"]["mlp"]["up_proj"].spec == P(None, "fsdp", "tensor")


def test_remat_matches_plain_value_and_grad():
    cfg = M.ModelConfig.tiny(V, "qwen2", remat=False)
    params = _perturbed(M.init_params(cfg, jax.random.key(0)))
    tokens, valid = _left_padded(lengths=(6, 12))
    positions = M.positions_from_mask(valid)

    def loss(p, c):
        logits = M.forward_logits(p, c, tokens[:, :-1], positions[:, :-1], valid[:, :-1])
        logp, _ = token_logp_and_entropy(logits, tokens[:, 1:])
        return -jnp.sum(logp * valid[:, 1:])

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v0, g0 = grad_fn(params, cfg)
    v1, g1 = grad_fn(params, M.ModelConfig.tiny(V, "qwen2", remat=True))
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g1, g0)


def test_token_logp_and_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (2, 3))
    logp, ent = token_logp_and_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    z = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ref_logp = np.take_along_axis(z, targets[..., None], -1)[..., 0] - lse
    p = np.exp(z - lse[..., None])
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_allclose(ent, -(p * np.log(p)).sum(-1), atol=1e-5)
    assert logp.dtype == ent.dtype == jnp.float32
    # a one-hot distribution: log-prob 0, entropy 0
    lp, e = token_logp_and_entropy(jnp.array([[0.0, 1e4, 0.0]]), jnp.array([1]))
    np.testing.assert_allclose([lp[0], e[0]], [0.0, 0.0], atol=1e-6)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="valid: \\('llama', 'qwen2', 'qwen3', 'qwen3_moe'\\)"):
        M.ModelConfig.tiny(V, "gpt2")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        M.ModelConfig.tiny(V, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="dtype must be"):
        M.ModelConfig.tiny(V, dtype="float16")
