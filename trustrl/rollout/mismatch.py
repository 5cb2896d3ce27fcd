"""The mismatch dial: training-inference mismatch and staleness as experimental variables.

Every source is set in ``rollout.mismatch.*`` (configs/default.py), independent of the others
and combinable; each is deliberate and labelled (the run's config says what was done to mu):

  precision   ``rollout.dtype``: float32 / bfloat16 / int8 / fp8 weights / int4 weights
              (trustrl.model.quant), against the trainer's own dtype
  noise       ``rollout.mismatch.noise`` s >= 0: N(0, s^2) on every logit before the
              temperature; the token is drawn from the noised distribution and mu is that
              distribution (so pi / mu is a correct importance weight, only a noisier one)
  staleness   ``rollout.mismatch.staleness`` k >= 0: the rollout uses the parameters of k
              optimizer steps earlier, exactly (the old parameters are kept: ParamHistory);
              mu is that old policy's distribution
  traps       engine bugs reproduced on purpose, which corrupt only the recorded mu:
              ``pre_temperature`` (mu = softmax(logits), the temperature ignored: an engine's
              raw log-probs) and ``top_p_renorm`` (mu = the top-p / top-k truncated,
              renormalised distribution the token was drawn from, not the full softmax)

``rollout.mu`` chooses where mu comes from: "sampler" (the recorded log-probs, default) or
"rescored": the sampled tokens rescored by the trainer's forward of the rollout's parameters,
which replaces mu (the bitwise on-policy mode: at staleness 0, pi_old == mu exactly, whatever
the rollout's precision; mu is then no longer the distribution the tokens were drawn from).

``trustrl.tools.calibrate_mismatch`` prints, for a config, the mismatch the dial produces on
the base policy (mean |pi - mu|, by mu bucket, the largest ratio), so a study picks its
settings by measured mismatch, not by knob value.
"""
from __future__ import annotations

import collections

MU_SOURCES = ("sampler", "rescored")
DEFAULTS = {"noise": 0.0, "staleness": 0, "pre_temperature": False, "top_p_renorm": False}


def settings(cfg) -> dict:
    """The run's dial as a plain dict (the defaults where a field is absent: older configs)."""
    m = cfg.rollout.get("mismatch", None)
    return {k: (m.get(k, v) if m is not None else v) for k, v in DEFAULTS.items()}


def mu_source(cfg) -> str:
    return cfg.rollout.get("mu", "sampler")


def sampler_fields(cfg) -> dict:
    """The SamplerConfig fields of the dial's sampler-side sources (noise and the traps)."""
    d = settings(cfg)
    return {"logit_noise": float(d["noise"]), "record_pre_temperature": bool(d["pre_temperature"]),
            "record_renormalized": bool(d["top_p_renorm"])}


def corrupts_mu(cfg) -> bool:
    """Whether a sampler-side source (noise or a trap) changes the recorded mu."""
    d = settings(cfg)
    return bool(d["noise"] or d["pre_temperature"] or d["top_p_renorm"])


class ParamHistory:
    """The parameters of the last ``capacity`` optimizer steps, oldest first: what a stale
    rollout uses. ``push(step, params)`` after every optimizer step (and once at the start);
    ``at(k)`` = the parameters of k steps before the newest, exactly (the stored arrays, not a
    recomputation). Until k + 1 steps are stored, ``oldest()`` is the oldest stored (the run's
    first parameters): a run's first k steps roll out with staleness = the steps taken so far.

    The stored arrays must not be donated later: push copies (trustrl.training.step donates
    the train state's buffers)."""

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ParamHistory capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._items: collections.deque = collections.deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._items)

    def push(self, step: int, params):
        if self._items and step <= self._items[-1][0]:
            raise ValueError(f"ParamHistory: step {step} after step {self._items[-1][0]}; the "
                             f"steps must increase")
        self._items.append((int(step), params))

    def at(self, k: int):
        """(params, step) of k optimizer steps before the newest stored."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"staleness must be an int >= 0, got {k!r}")
        if k >= self.capacity:
            raise ValueError(f"staleness {k} is larger than the stored history: it holds the "
                             f"last {self.capacity} optimizer steps' parameters; valid: 0 .. "
                             f"{self.capacity - 1}")
        if k >= len(self._items):
            raise ValueError(f"staleness {k}: only {len(self._items)} steps are stored so far; "
                             f"valid now: 0 .. {len(self._items) - 1}")
        step, params = self._items[-1 - k]
        return params, step

    def oldest(self):
        """(params, step) of the oldest stored step: k steps back once the history is full."""
        return self.at(len(self._items) - 1)

    def newest(self):
        return self.at(0)
