"""Model set-up shared by the benchmark scripts (model_forward.py, rollout_throughput.py)."""
from __future__ import annotations

import os
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from trustrl.model import hf  # noqa: E402
from trustrl.model import transformer as M  # noqa: E402


def default_shape(quick: bool = False) -> M.ModelConfig:
    """The CPU default experiment's model shape (configs/default.py), tied embeddings; with
    ``quick`` a tiny config for smoke tests."""
    if quick:
        return M.ModelConfig.tiny(vocab_size=64)
    return M.ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True)


def label(cfg: M.ModelConfig) -> str:
    return f"tiny ({cfg.num_layers}L, d={cfg.hidden_size}, V={cfg.vocab_size})"


def export_random(cfg: M.ModelConfig, hf_dir: str):
    """Random params (key 0) for cfg, also written as a Hugging Face dir for the reference."""
    params = M.init_params(cfg, jax.random.key(0))
    hf.save_hf_dir(params, cfg, hf_dir)
    return params


def best_of(runs: dict, repeats: int):
    """(best seconds per call, first outputs) of no-argument callables: one untimed warm-up
    call each (compiles), then ``repeats`` interleaved timed calls (blocking on the results),
    so load changes on a shared machine hit every variant alike."""
    outs = {k: jax.block_until_ready(f()) for k, f in runs.items()}
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            best[k] = min(best[k], time.perf_counter() - t)
    return best, outs
