"""Partial rollouts: a row interrupted by a weight update continues with the new weights.

    sampler = PartialSampler(base_sampler, chunk=16)
    rollout = sampler.generate(params, prompts, group_size, key)   # params.current()
    sampler.last_versions       # [B, N] int32: the parameter version that sampled each token
    sampler.first_version       # the version of the first segment (the oldest)

The response is decoded in segments of ``chunk`` tokens. Before each segment the sampler asks
``params.current()`` for the (version, parameters) to use (trustrl.training.async_rollouts.
Versioned: the version chosen for the rollout for the first segment, then the newest the
trainer has published); the rows still generating continue from their prompt plus the tokens
sampled so far, re-prefilled under the segment's parameters (the KV cache of older weights is not reused,
as in AReaL's interruptible generation), so every token's recorded mu is exactly
pi_version(token | its whole prefix) of the version that sampled it, the anchor DPPO's mask
needs per token. The segments are one sampler's calls (``Sampler.generate`` with
max_new_tokens = chunk, and the remainder for the last), so a row's tokens, log-probs and
top-K come from the same programs as an unsegmented rollout; only the random draws differ.

Cost: each segment after the first re-prefills the rows still generating (prefill is
compute-bound and parallel; the decode it saves from is not). Rows that have stopped are not
decoded again. The continuing rows are padded (repeats of the last) to a multiple of the
sampler mesh's batch shards. Not supported: recording routed experts (a mixture of experts'
R3), and the full-vocabulary divergences, which recompute mu from one version's parameters.
"""
from __future__ import annotations

import dataclasses
import jax
import numpy as np

from trustrl.infra import multihost, sharding
from trustrl.rollout.record import FINISH_LENGTH, Rollout
from trustrl.rollout.sampler import Sampler

RESPONSE_FIELDS = ("response_tokens", "response_mask", "rollout_logp", "rollout_topk_ids",
                   "rollout_topk_logp")


class PartialSampler:
    """``base``'s rollouts decoded in segments of ``chunk`` tokens (module docstring)."""

    def __init__(self, base: Sampler, chunk: int):
        if base.cfg.record_routes:
            raise ValueError("partial rollouts do not record routed experts (R3): a row's "
                             "prefix is re-prefilled under new weights")
        if not 0 < chunk < base.cfg.max_new_tokens:
            raise ValueError(f"partial rollout chunk={chunk} must be in [1, max_new_tokens="
                             f"{base.cfg.max_new_tokens})")
        self.base, self.chunk, self.cfg = base, chunk, base.cfg
        self._segment = {}  # max_new_tokens -> a Sampler of the base's model and settings
        self.last_versions = self.first_version = None

    def _sampler(self, n: int) -> Sampler:
        if n not in self._segment:
            self._segment[n] = Sampler(self.base.model,
                                       dataclasses.replace(self.base.cfg, max_new_tokens=n),
                                       batch_sharding=self.base.batch_sharding)
        return self._segment[n]

    def release(self):
        for s in self._segment.values():
            s.release()

    def _shards(self) -> int:
        sh = self.base.batch_sharding
        return 1 if sh is None else sharding.axis_size(sh.mesh, sh.spec[0])

    def generate(self, params, prompts, group_size: int, key) -> Rollout:
        """A host (numpy) Rollout of max_new_tokens columns; ``last_versions`` its tokens'
        versions (-1 outside the response)."""
        n_total = self.cfg.max_new_tokens
        version, p = params.current()
        self.first_version = version
        first = multihost.to_host(self._sampler(self.chunk).generate(p, prompts, group_size,
                                                                     jax.random.fold_in(key, 0)))
        b = first.response_tokens.shape[0]
        out = {f: None if getattr(first, f) is None else np.zeros(
            (b, n_total, *getattr(first, f).shape[2:]), getattr(first, f).dtype)
            for f in RESPONSE_FIELDS}
        versions = np.full((b, n_total), -1, np.int32)
        finish = first.finish_reason.copy()
        # the rows' prompts without padding: what every continuation starts from
        prompt_rows = [row[m > 0].tolist() for row, m in zip(first.prompt_tokens,
                                                              first.prompt_mask)]
        done, seg, r, rows = 0, 1, first, np.arange(b)
        while True:
            n = r.response_tokens.shape[1]
            for f in RESPONSE_FIELDS:
                if out[f] is not None:
                    out[f][rows, done:done + n] = getattr(r, f)[:len(rows)]
            versions[rows, done:done + n] = np.where(r.response_mask[:len(rows)] > 0, version, -1)
            finish[rows] = r.finish_reason[:len(rows)]
            done += n
            rows = rows[r.finish_reason[:len(rows)] == FINISH_LENGTH]
            if done >= n_total or not len(rows):
                break
            version, p = params.current()  # the newest weights, for the rows still going
            cont = [prompt_rows[i] + out["response_tokens"][i, :done].tolist() for i in rows]
            pad = -len(cont) % self._shards()
            r = multihost.to_host(self._sampler(min(self.chunk, n_total - done)).generate(
                p, cont + [cont[-1]] * pad, 1, jax.random.fold_in(key, seg)))
            seg += 1
        self.last_versions = versions
        return first.replace(finish_reason=finish, **out)
