"""Weight-only int8 / fp8 rollouts (trustrl.model.quant): per-channel error bounds, the quantised
model against its dequantised-weights reference, and a mismatch larger than bf16's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.model import transformer as M
from trustrl.model import policy, quant
from trustrl.rollout import record as rollout_lib
from trustrl.rollout.sampler import Sampler, SamplerConfig

from test_rollout_model import V, _perturbed, _prompts, _trainer_logp


@pytest.mark.parametrize("kind", quant.QUANT)
@pytest.mark.parametrize("in_ndim,shape", [(1, (48, 3, 8)), (2, (4, 8, 40))])
def test_per_channel_error_bounds(kind, in_ndim, shape):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape) * rng.uniform(0.01, 3, size=shape[in_ndim:])  # channel scales
    w[..., 0] = 0.0  # an all-zero channel: scale 1, exact zeros
    q, scale = quant.quantize(w, in_ndim, kind)
    assert q.dtype == quant.STORAGE[kind] and scale.shape == shape[in_ndim:]
    amax = np.abs(w).max(axis=tuple(range(in_ndim)))
    np.testing.assert_allclose(scale, np.where(amax > 0, amax / quant.QMAX[kind], 1.0),
                               rtol=1e-6)
    back = np.asarray(quant.dequantize(q, scale, in_ndim, jnp.float32), np.float64)
    err, s = np.abs(back - w), np.asarray(scale, np.float64)
    if kind in ("int8", "int4"):
        assert np.all(err <= s / 2 * (1 + 1e-5))
        # the channel maximum hits QMAX (127 / 7)
        assert np.abs(np.asarray(q, np.int32)).max() == quant.QMAX[kind]
    else:  # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal step 2^-9 of the scale
        assert np.all(err <= np.maximum(2.0 ** -4 * np.abs(w), 2.0 ** -10 * s) * (1 + 1e-5))
    assert np.all(back[..., 0] == 0)
    # the error is not trivially zero: quantisation happened
    assert err.max() > 1e-4 * np.abs(w).max()


def test_quantize_params_layout_and_errors():
    cfg = M.ModelConfig.tiny(V, "qwen3")
    params = M.init_params(cfg, jax.random.key(0))
    roll_cfg = policy.rollout_config(cfg, "int8")
    assert roll_cfg.weight_quant == "int8" and roll_cfg.param_dtype == "bfloat16"
    roll = policy.cast_params(params, roll_cfg)
    layers = roll["layers"]
    assert layers["attn"]["o_proj"].dtype == jnp.int8
    assert layers["attn"]["o_proj_scale"].shape == (cfg.num_layers, cfg.hidden_size)  # per layer
    assert layers["mlp"]["down_proj_scale"].dtype == jnp.float32
    assert roll["embedding"].dtype == jnp.bfloat16  # the embedding / head stay at bf16
    # the layout equals the quantised model's own parameter shapes (what init / aot see)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), M.param_shapes(roll_cfg))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), roll) == want
    assert policy.cast_params(roll, roll_cfg) is not None  # idempotent on quantised params
    with pytest.raises(ValueError, match=r"rollout dtype must be one of \('float32', "
                                         r"'bfloat16', 'int8', 'fp8', 'int4'\), got 'int2'"):
        policy.rollout_config(cfg, "int2")
    with pytest.raises(ValueError, match="unknown weight quantisation 'int2'"):
        M.ModelConfig.tiny(V, weight_quant="int2")


@pytest.mark.parametrize("kind", quant.QUANT)
def test_quantised_rollout_equals_the_dequantised_weights_reference(kind):
    # the int8 / fp8 model computes exactly what a bf16 model with the dequantised weights does
    cfg = M.ModelConfig.tiny(V, "llama")
    params = _perturbed(M.init_params(cfg, jax.random.key(0)))
    q_cfg = policy.rollout_config(cfg, kind)
    q_params = policy.cast_params(params, q_cfg)
    ref_cfg = policy.rollout_config(cfg, "bfloat16")
    ref_params = quant.dequantize_params(q_params, jnp.bfloat16, stacked=cfg.scan_layers)
    scfg = SamplerConfig(max_new_tokens=12, temperature=0.8, record_topk=4, eos_ids=(5,))
    prompts, key = _prompts((4, 9, 2)), jax.random.key(3)
    got = Sampler(policy.decode_model(q_cfg), scfg).generate(q_params, prompts, 2, key)
    want = Sampler(policy.decode_model(ref_cfg), scfg).generate(ref_params, prompts, 2, key)
    np.testing.assert_array_equal(got.response_tokens, want.response_tokens)
    np.testing.assert_allclose(got.rollout_logp, want.rollout_logp, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.rollout_topk_logp, want.rollout_topk_logp, atol=1e-6, rtol=0)
    # and the trainer-side forward of the quantised config (the exact methods' mu recompute)
    logp_q = policy.response_logp(q_params, q_cfg, got.tokens, got.positions, got.valid_mask,
                                  num_response=12, temperature=0.8)
    logp_r = policy.response_logp(ref_params, ref_cfg, got.tokens, got.positions,
                                  got.valid_mask, num_response=12, temperature=0.8)
    np.testing.assert_allclose(logp_q, logp_r, atol=1e-6, rtol=0)


def test_quantised_mismatch_is_larger_than_bf16s():
    # against the fp32 trainer on the same sampled tokens: fp32 < bf16 < int8 < fp8 rollouts
    cfg = M.ModelConfig.tiny(V, "llama")
    params = _perturbed(M.init_params(cfg, jax.random.key(0)))
    prompts, stats = _prompts((5, 12, 7)), {}
    for dtype in ("float32", "bfloat16", "int8", "fp8", "int4"):
        roll_cfg = policy.rollout_config(cfg, dtype)
        s = Sampler(policy.decode_model(roll_cfg), SamplerConfig(max_new_tokens=16,
                                                                 record_topk=0))
        r = s.generate(policy.cast_params(params, roll_cfg), prompts, 4, jax.random.key(2))
        trainer = _trainer_logp(params, cfg, r, 1.0)
        stats[dtype] = {k: float(v) for k, v in rollout_lib.mismatch_stats(
            trainer, r.rollout_logp, r.response_mask).items()}
    mean = {d: s["rollout/mismatch_mean"] for d, s in stats.items()}
    assert mean["float32"] < 1e-6 < mean["bfloat16"] < mean["int8"] < mean["fp8"], mean
    # measured mean |pi - mu|: bf16 2.6e-5, int8 5.0e-5 (bf16 activations + 8-bit weights),
    # fp8 2.0e-4 (3 mantissa bits)
    assert mean["int8"] > 1.5 * mean["bfloat16"] and mean["fp8"] > 4 * mean["bfloat16"], mean
    # 4-bit weights (per channel, 15 levels): the dial's largest precision source
    assert mean["int4"] > 2 * mean["fp8"], mean
