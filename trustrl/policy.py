"""Glue between the model, the sampler and the trainer: one policy, two precisions.

The trainer runs ``model_cfg`` (default fp32). The rollout engine runs the SAME parameters cast to
the rollout precision (default bf16 weights, activations and KV cache) through the KV-cache
decode path, so the training-inference mismatch is real, as with vLLM vs FSDP:

    roll_cfg = policy.rollout_config(model_cfg, "bfloat16")
    sampler = Sampler(policy.decode_model(roll_cfg), SamplerConfig(...))
    rollout = sampler.generate(policy.cast_params(params, roll_cfg), prompts, group_size, key)
    logits = policy.response_logits(params, model_cfg, rollout.tokens, rollout.positions,
                                    rollout.valid_mask, num_response=N)   # trainer side
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from trustrl import model as model_lib
from trustrl.rollout import response_logits_slice
from trustrl.sampler import DecodeModel


def rollout_config(model_cfg: model_lib.ModelConfig, dtype: str) -> model_lib.ModelConfig:
    """The rollout engine's view of the model: parameters and activations in ``dtype``."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"rollout dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    return dataclasses.replace(model_cfg, param_dtype=dtype, dtype=dtype, remat=False)


def cast_params(params, model_cfg: model_lib.ModelConfig):
    """Parameters cast to ``model_cfg.param_dtype`` (a no-op when they already are)."""
    dtype = jnp.dtype(model_cfg.param_dtype)
    return jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), params)


def decode_model(model_cfg: model_lib.ModelConfig) -> DecodeModel:
    """The sampler's view of the model: prefill / decode closed over the (static) config."""
    return DecodeModel(
        init_cache=lambda batch, max_len: model_lib.init_cache(model_cfg, batch, max_len),
        prefill=lambda p, *a: model_lib.prefill(p, model_cfg, *a),
        decode=lambda p, *a: model_lib.decode_step(p, model_cfg, *a),
        vocab_size=model_cfg.vocab_size)


def response_logits(params, model_cfg: model_lib.ModelConfig, tokens, positions, valid, *,
                    num_response: int, temperature: float = 1.0):
    """Tempered logits [B, N, V] float32 predicting the N response tokens of [B, P + N] sequences.

    The vocabulary head runs only on the N hidden states that predict response tokens (positions
    P-1 .. P+N-2), not on the prompt. Logits are divided by the sampling ``temperature``, so
    log_softmax of them is the distribution rollout_logp was recorded under.
    """
    prompt_len = tokens.shape[1] - num_response
    if prompt_len < 1:
        raise ValueError(f"sequences of length {tokens.shape[1]} have no prompt before "
                         f"num_response={num_response} response tokens")
    hidden = model_lib.forward(params, model_cfg, tokens, positions, valid)
    logits = model_lib.lm_head(params, model_cfg,
                               response_logits_slice(hidden, prompt_len, num_response))
    return logits if temperature == 1.0 else logits / temperature


@functools.partial(jax.jit, static_argnames=("model_cfg", "num_response", "temperature"))
def response_logp(params, model_cfg, tokens, positions, valid, *, num_response: int,
                  temperature: float = 1.0):
    """Trainer-side log-probs [B, N] of the response tokens (the last N columns of ``tokens``)."""
    logits = response_logits(params, model_cfg, tokens, positions, valid,
                             num_response=num_response, temperature=temperature)
    return model_lib.token_logp_and_entropy(logits, tokens[:, -num_response:])[0]
