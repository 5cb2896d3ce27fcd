"""Fill the Rollout record from an external OpenAI-compatible engine (vLLM / SGLang style).

    client = EngineClient("http://127.0.0.1:8000", SamplerConfig(max_new_tokens=256,
                          temperature=1.0, eos_ids=(2,), record_topk=20), vocab_size=V,
                          recompute=policy_recompute(params, model_cfg))
    rollout = client.generate(prompts, group_size=8, seed=step)   # trustrl.rollout.Rollout

Request: one POST ``/v1/completions`` with token-id prompts (``"prompt": [[ids], ...]``),
``n`` = group_size, ``max_tokens``, ``temperature`` (0 for greedy), ``top_p``, ``top_k`` (a vLLM
extension; -1 = off), neutral ``min_p`` / penalties (so that no generation_config.json default
applies), ``logprobs`` = K, ``stop_token_ids`` = eos_ids with ``ignore_eos`` (the engine then
stops on exactly the trainer's EOS set) and ``return_tokens_as_token_ids`` (vLLM), so every
token comes back as the string ``"token_id:123"``: the only unambiguous form (text tokens
cannot be mapped back to ids).
Anything else is refused with an ``EngineError`` naming the URL and the problem.

Response: vLLM's completion choices. Choice ``index`` = prompt * n + sample (the group_size
samples of a prompt adjacent, as trustrl's sampler lays them out); per choice
``logprobs = {tokens, token_logprobs, top_logprobs: [{"token_id:i": logp, ...}], ...}`` and
``finish_reason``. The record is built exactly as ``trustrl.sampler.Sampler`` builds it:
prompts LEFT-padded with id 0 to ``sampler.prompt_bucket`` (``sampler.left_pad``); responses
padded to max_new_tokens with id 0; response_mask 1 up to and including EOS; finish_reason
FINISH_EOS when the last token is an EOS id (vLLM can report "length" when EOS is the
max_tokens-th token; the trainer's sampler calls that EOS), FINISH_LENGTH when it ran to
max_tokens without one; rollout_logp the sampled token's log-prob; top-K ids / log-probs sorted
by decreasing log-prob (ties: lower id first), the sampled token forced into the LAST slot when
absent (``divergences.build_topk_set``'s rule), pad 0 / 0.0. ``rollout.validate`` accepts it.

Log-prob semantics (the traps). trustrl's rollout_logp is log softmax(logits / T) over the FULL
vocabulary. Engines commonly return something else, and training then silently uses a wrong
anchor mu. On every call ``check_logprobs`` recomputes the sampled tokens' log-probs of the first
``check_rows`` rows with the trainer's policy (``recompute``) and compares, per token,
d = returned - recomputed(T) over their response tokens:

  trap (a) "log-probs taken before temperature": T != 1 and the returned values match the
      recompute at temperature 1 much better than at T: mean|returned - recomputed(1)| <
      TEMPERATURE_RATIO (0.5) x mean|d|, with mean|d| > MIN_SIGNAL. A correct engine has
      mean|returned - recomputed(1)| ~ mean|recomputed(T) - recomputed(1)| + noise > mean|d|,
      so the ratio cannot fall below 1/2 by noise. (vLLM's default --logprobs-mode
      raw_logprobs is this trap.)
  trap (b) "log-probs renormalised after top-p / top-k truncation": every kept token's
      log-prob rises by the same -log Z_t >= 0 (Z_t the kept mass at step t), so d is one-sided
      upwards: mean(d) > MIN_SIGNAL while its downward part mean(max(-d, 0)) <= MAX_DOWNWARD
      (0.01, noise level): no token is materially below the recompute. Precision noise (bf16
      engine vs fp32 trainer) is two-sided, its signed mean ~ KL(mu || pi) ~ 1e-4, and fails
      the first condition; other weights put a share of tokens well below the recompute
      (tiny test model: downward part 0.05-0.07 with a signed mean of +0.35..+0.73, as the
      sampled tokens favour the engine) and fail the second. (vLLM's processed_logprobs with
      top_p < 1 or top_k > 0 is this trap, also when the truncation comes from the model's
      generation_config.json defaults rather than the request.) Truncation that removes under
      ~1% of the mass per token (-log Z < MIN_SIGNAL) is not detected; its effect on mu is then
      below bf16 noise as well.
  too large: mean|d| > MAX_MEAN_ABS (0.05 nats): "the engine's weights differ from the
      trainer's" (or another model, tokenizer, or precision). SmolLM2-135M with a bf16 rollout
      against the fp32 trainer measures ~0.01 mean |log pi/mu| (docs/mismatch_profile.md), the
      tiny test model 0.004; 0.05 leaves ~5x headroom for other kernels. An engine on other
      weights that is much sharper than the trainer, with almost no token below the recompute,
      would be reported as trap (b).
The check raises ``EngineLogprobError`` (``.trap`` in "before_temperature",
"renormalised_truncation", "mismatch"; ``.stats`` the measured numbers); it never corrects the
record. ``check_rows=0`` turns it off (then nothing protects the record; not recommended).
Thresholds are the ``Tolerances`` fields; docs/rollout_engines.md explains the setup.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import socket
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trustrl.rollout import FINISH_EOS, FINISH_LENGTH, Rollout, validate
from trustrl.sampler import SamplerConfig, _check_int, as_prompt_list, left_pad, prompt_bucket

TOKEN_ID = re.compile(r"token_id:(\d+)")


class EngineError(RuntimeError):
    """The engine could not be reached or answered something the record cannot be built from."""


class EngineLogprobError(EngineError):
    """The engine's log-probs are not trustrl's rollout_logp (see the module docstring).

    trap: "before_temperature", "renormalised_truncation" or "mismatch"; stats: the numbers."""

    def __init__(self, message: str, trap: str, stats: dict):
        super().__init__(message)
        self.trap, self.stats = trap, stats


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Thresholds of ``check_logprobs`` (nats per token; see the module docstring for why)."""
    max_mean_abs: float = 0.05       # mean |returned - recomputed(T)| allowed
    min_signal: float = 0.01         # below this no trap is diagnosed (rounding level)
    temperature_ratio: float = 0.5   # trap (a): err at T=1 < ratio x err at T
    max_downward: float = 0.01       # trap (b): mean(max(-d, 0)) at most this


def policy_recompute(params, model_cfg):
    """``recompute`` from trustrl's policy: ``policy.response_logp`` on ``params`` at
    ``model_cfg``'s precision (pass the rollout config and cast params to check the engine
    against the trainer's own rollout precision)."""
    from trustrl import policy
    return functools.partial(policy.response_logp, params, model_cfg)


# ------------------------------------------------------------------------------------ HTTP


def http_json(url: str, body: dict | None = None, *, timeout: float = 120.0,
              api_key: str | None = None) -> Any:
    """GET (body None) or POST JSON; returns the parsed answer. EngineError names the URL on a
    connection failure, a timeout, a non-200 answer or malformed JSON."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers,
                                 method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:1000].decode("utf-8", "replace")
        try:  # vLLM / OpenAI error bodies: {"message": ...} or {"error": {"message": ...}}
            obj = json.loads(detail)
            inner = obj.get("error", obj) if isinstance(obj, dict) else None
            if isinstance(inner, dict) and isinstance(inner.get("message"), str):
                detail = inner["message"]
        except ValueError:
            pass
        raise EngineError(f"the rollout engine at {url} answered HTTP {e.code} {e.reason}: "
                          f"{detail}") from None
    except (socket.timeout, TimeoutError) as e:
        raise EngineError(f"no answer from the rollout engine at {url} within {timeout} s "
                          f"({e}); raise EngineClient(timeout=...) for long generations") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise EngineError(f"no answer from the rollout engine at {url} within {timeout} s"
                              ) from None
        raise EngineError(f"cannot reach the rollout engine at {url}: {reason} (is the server "
                          "running and is the URL its base, e.g. http://127.0.0.1:8000?)"
                          ) from None
    except (ConnectionError, OSError) as e:  # e.g. reset mid-answer
        raise EngineError(f"connection to the rollout engine at {url} failed: {e}") from None
    if status != 200:
        raise EngineError(f"the rollout engine at {url} answered HTTP {status}, expected 200")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise EngineError(f"malformed JSON from the rollout engine at {url}: {e}; the answer "
                          f"starts {raw[:200]!r}") from None


# ------------------------------------------------------------------------ request / response


def build_request(prompts: Sequence[np.ndarray], group_size: int, cfg: SamplerConfig, *,
                  model: str, seed: int | None = None, extra: dict | None = None) -> dict:
    """The /v1/completions body for ``prompts`` (token-id arrays), ``group_size`` samples each."""
    k = cfg.record_topk
    body = {
        "model": model, "prompt": [np.asarray(p).tolist() for p in prompts], "n": group_size,
        "max_tokens": cfg.max_new_tokens,
        "temperature": 0.0 if cfg.greedy else float(cfg.temperature), "top_p": float(cfg.top_p),
        "logprobs": k, "stop_token_ids": list(cfg.eos_ids), "ignore_eos": True,
        "return_tokens_as_token_ids": True, "skip_special_tokens": False, "echo": False,
        "stream": False,
        # explicit neutral values: vLLM otherwise fills unset fields from the model's
        # generation_config.json (e.g. top_k=20, repetition_penalty=1.05), which changes mu
        "top_k": cfg.top_k if cfg.top_k > 0 else -1, "min_p": 0.0, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0}
    if seed is not None:
        body["seed"] = int(seed)
    body.update(extra or {})
    return body


def _token_id(s, where: str, url: str) -> int:
    m = TOKEN_ID.fullmatch(s) if isinstance(s, str) else None
    if m is None:
        raise EngineError(
            f"{where}: token {s!r} from {url} is not of the form 'token_id:N'; request "
            "return_tokens_as_token_ids=true (vLLM: the request field or the server flag "
            "--return-tokens-as-token-ids): text tokens cannot be mapped back to ids")
    return int(m.group(1))


def _logprob(x, where: str, url: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise EngineError(f"{where}: log-prob {x!r} from {url} is not a finite number (vLLM "
                          "writes -inf as -9999.0)")
    return float(x)


def _topk_row(top: Any, tok: int, tok_lp: float, k: int, where: str, url: str):
    """(ids [K], logp [K]): the engine's entries sorted by decreasing log-prob (lower id first
    on ties), the sampled token forced into the last slot when not among the first K."""
    if not isinstance(top, dict):
        raise EngineError(f"{where}: top_logprobs entry from {url} is {type(top).__name__}, "
                          "expected an object {'token_id:N': logprob}")
    entries = {}
    for key, val in top.items():
        entries[_token_id(key, where, url)] = _logprob(val, where, url)
    if tok in entries and not math.isclose(entries[tok], tok_lp, rel_tol=1e-6, abs_tol=1e-6):
        raise EngineError(f"{where}: the sampled token {tok} has log-prob {tok_lp} in "
                          f"token_logprobs but {entries[tok]} in top_logprobs (from {url})")
    if len(entries) < k:
        raise EngineError(f"{where}: {len(entries)} top_logprobs from {url}, expected at least "
                          f"K={k} (logprobs=K; vLLM caps it at --max-logprobs, default 20)")
    order = sorted(entries, key=lambda i: (-entries[i], i))[:k]
    if tok not in order:
        order[-1] = tok
    entries[tok] = tok_lp
    return order, [entries[i] for i in order]


def rollout_from_response(body: Any, prompts: Sequence[np.ndarray], group_size: int,
                          cfg: SamplerConfig, vocab_size: int, url: str = "the engine") -> Rollout:
    """Builds the Rollout record from a /v1/completions answer (see the module docstring)."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        err = body.get("error") if isinstance(body, dict) else None
        raise EngineError(f"the answer from {url} has no 'choices' list"
                          + (f" (error: {err})" if err else "")
                          + f"; got {str(body)[:200]}")
    b, n, k = len(prompts) * group_size, cfg.max_new_tokens, cfg.record_topk
    choices = body["choices"]
    if len(choices) != b:
        raise EngineError(f"{url} returned {len(choices)} choices for {len(prompts)} prompts x "
                          f"n={group_size}; expected {b}")
    by_index = {}
    for c in choices:
        idx = c.get("index") if isinstance(c, dict) else None
        if not isinstance(idx, int) or not 0 <= idx < b or idx in by_index:
            raise EngineError(f"{url} returned a choice with index {idx!r}: expected each of "
                              f"0..{b - 1} once (index = prompt * n + sample)")
        by_index[idx] = c
    eos = set(cfg.eos_ids)
    tokens = np.zeros((b, n), np.int32)
    mask = np.zeros((b, n), np.int32)
    logp = np.zeros((b, n), np.float32)
    topk_ids = np.zeros((b, n, max(k, 1)), np.int32)
    topk_logp = np.zeros((b, n, max(k, 1)), np.float32)
    finish = np.zeros((b,), np.int32)
    for row in range(b):
        c, where = by_index[row], f"choice {row}"
        lp = c.get("logprobs")
        if not isinstance(lp, dict):
            raise EngineError(f"{where} from {url} has no logprobs object (got {lp!r}); the "
                              f"request asked logprobs={k}")
        toks, tok_lps = lp.get("tokens"), lp.get("token_logprobs")
        if not isinstance(toks, list) or not isinstance(tok_lps, list) or len(toks) != len(
                tok_lps):
            raise EngineError(f"{where} from {url}: logprobs.tokens / token_logprobs missing or "
                              "of different lengths")
        m = len(toks)
        if not 1 <= m <= n:
            raise EngineError(f"{where} from {url} has {m} tokens, expected 1..max_tokens={n}")
        ids = [_token_id(t, f"{where} token {i}", url) for i, t in enumerate(toks)]
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise EngineError(f"{where} from {url}: token ids {bad[:5]} outside [0, "
                              f"{vocab_size}) (vocab_size={vocab_size}): another model?")
        early = [i for i, t in enumerate(ids[:-1]) if t in eos]
        if early:
            raise EngineError(f"{where} from {url} continues after EOS id {ids[early[0]]} at "
                              f"token {early[0]}: the engine must stop on stop_token_ids")
        reason = c.get("finish_reason")
        if ids[-1] in eos:
            finish[row] = FINISH_EOS
        elif reason == "length" and m == n:
            finish[row] = FINISH_LENGTH
        elif reason == "length":
            raise EngineError(f"{where} from {url} stopped for length after {m} < max_tokens={n}"
                              " tokens (the engine's context limit, max_model_len?)")
        else:
            raise EngineError(
                f"{where} from {url} finished with {reason!r} after {m} tokens but its last "
                f"token {ids[-1]} is not an EOS id {sorted(eos)}: stop strings, another stop "
                "id, or an engine that drops the stop token (it must be returned)")
        lps = [_logprob(x, f"{where} token {i}", url) for i, x in enumerate(tok_lps)]
        tokens[row, :m], mask[row, :m], logp[row, :m] = ids, 1, lps
        if k:
            tops = lp.get("top_logprobs")
            if not isinstance(tops, list) or len(tops) != m:
                raise EngineError(f"{where} from {url}: logprobs.top_logprobs missing or not "
                                  f"one per token (the request asked logprobs={k})")
            for t in range(m):
                topk_ids[row, t], topk_logp[row, t] = _topk_row(
                    tops[t], ids[t], lps[t], k, f"{where} token {t}", url)
    width = prompt_bucket(max(len(p) for p in prompts), cfg)
    ptoks, pmask = left_pad([p for p in prompts for _ in range(group_size)], width)
    r = Rollout(
        prompt_tokens=jnp.asarray(ptoks), prompt_mask=jnp.asarray(pmask),
        response_tokens=jnp.asarray(tokens), response_mask=jnp.asarray(mask),
        rollout_logp=jnp.asarray(logp),
        rollout_topk_ids=jnp.asarray(topk_ids) if k else None,
        rollout_topk_logp=jnp.asarray(topk_logp) if k else None,
        finish_reason=jnp.asarray(finish),
        group_index=jnp.repeat(jnp.arange(len(prompts), dtype=jnp.int32), group_size))
    try:
        validate(r, vocab_size)
    except ValueError as e:
        raise EngineError(f"the record built from {url} fails rollout.validate: {e}") from None
    return r


# ---------------------------------------------------------------------------------- traps


def check_logprobs(r: Rollout, recompute: Callable, cfg: SamplerConfig, *, rows: int = 8,
                   tol: Tolerances = Tolerances(), url: str = "the engine") -> dict:
    """Compares the returned rollout_logp of the first ``rows`` rows with ``recompute`` (the
    trainer's log-probs); raises EngineLogprobError naming the trap (module docstring).

    recompute(tokens [b, P+N], positions, valid, *, num_response=N, temperature) -> [b, N]
    log softmax(logits / temperature) of the response tokens (``policy_recompute``).
    Returns the measured statistics."""
    sub = jax.tree.map(lambda x: x[:rows], r)
    n = sub.response_tokens.shape[1]
    mask = np.asarray(sub.response_mask) > 0
    stats = {"tokens": int(mask.sum()), "rows": int(mask.shape[0])}
    if not mask.any():
        return stats
    args = (sub.tokens, sub.positions, sub.valid_mask)
    temp = float(cfg.temperature)
    got = np.asarray(sub.rollout_logp, np.float64)[mask]
    want = np.asarray(recompute(*args, num_response=n, temperature=temp), np.float64)[mask]
    d = got - want
    stats.update(mean_abs=float(np.abs(d).mean()), max_abs=float(np.abs(d).max()),
                 mean=float(d.mean()), downward=float(np.maximum(-d, 0).mean()),
                 frac_higher=float((d > 0).mean()))
    where = (f"over {stats['tokens']} response tokens of the first {stats['rows']} rows from "
             f"{url}")
    if not cfg.greedy and temp != 1.0:
        raw = np.asarray(recompute(*args, num_response=n, temperature=1.0), np.float64)[mask]
        stats["mean_abs_at_t1"] = float(np.abs(got - raw).mean())
        if (stats["mean_abs"] > tol.min_signal
                and stats["mean_abs_at_t1"] < tol.temperature_ratio * stats["mean_abs"]):
            raise EngineLogprobError(
                f"trap (a), log-probs taken before temperature: the engine's log-probs match the "
                f"trainer's recompute at temperature 1 (mean |diff| {stats['mean_abs_at_t1']:.3g})"
                f" far better than at the requested temperature {temp:g} (mean |diff| "
                f"{stats['mean_abs']:.3g}) {where}: it returns log softmax(logits), not log "
                "softmax(logits / T). vLLM: start it with --logprobs-mode processed_logprobs "
                "(its default raw_logprobs is this trap), or sample at temperature 1.",
                "before_temperature", stats)
    if stats["mean"] > tol.min_signal and stats["downward"] <= tol.max_downward:
        raise EngineLogprobError(
            f"trap (b), log-probs renormalised after top-p / top-k truncation: the engine's "
            f"log-probs are systematically HIGHER than the trainer's recompute (mean "
            f"{stats['mean']:+.3g} nats, higher on {100 * stats['frac_higher']:.0f}% of tokens, "
            f"mean downward part {stats['downward']:.3g}) {where}, as after renormalising over a "
            f"truncated set (implied kept mass exp(-mean) = {math.exp(-stats['mean']):.3g}; "
            f"requested top_p={cfg.top_p:g}, top_k={cfg.top_k}). trustrl's rollout_logp is the "
            "UNtruncated tempered softmax: sample with top_p=1, top_k=0, or use log-probs taken "
            "before truncation (vLLM's processed_logprobs include top-p / top-k; at temperature "
            "1 its raw_logprobs do not; vLLM also applies the model's generation_config.json "
            "top_k / top_p unless started with --generation-config vllm).",
            "renormalised_truncation", stats)
    if stats["mean_abs"] > tol.max_mean_abs:
        raise EngineLogprobError(
            f"the engine's log-probs differ from the trainer's recompute: mean |diff| "
            f"{stats['mean_abs']:.3g} nats (max {stats['max_abs']:.3g}, signed mean "
            f"{stats['mean']:+.3g}) {where}; tolerance {tol.max_mean_abs:g}. The engine's "
            "weights differ from the trainer's (export them with trustrl.hf.save_hf_dir and "
            "reload the engine), or it serves another model, tokenizer or precision.",
            "mismatch", stats)
    return stats


# --------------------------------------------------------------------------------- client


class EngineClient:
    """Rollouts from an OpenAI-compatible /v1/completions server, checked against ``recompute``.

    url: the server's base (``http://host:port``; a trailing ``/v1`` is accepted).
    cfg: the SamplerConfig the trainer's own sampler would use (max_new_tokens, temperature,
      top_p, top_k, greedy (needs temperature 1), eos_ids, record_topk, min_prompt_bucket,
      max_prompt_len; max_rows / topk_method / continuous do not apply: the engine batches).
    vocab_size: the trainer's vocabulary (ids are checked against it).
    recompute: the trainer-side log-prob function (``policy_recompute``); required unless
      check_rows=0.
    model: the served model name (default: the first of GET /v1/models).
    check_rows: rows checked per call (0: no check). extra_body: more request fields.
    """

    def __init__(self, url: str, cfg: SamplerConfig, vocab_size: int, *,
                 recompute: Callable | None = None, model: str | None = None,
                 timeout: float = 120.0, check_rows: int = 8, tolerances: Tolerances = Tolerances(),
                 api_key: str | None = None, extra_body: dict | None = None):
        _check_int("vocab_size", vocab_size, 1)
        _check_int("check_rows", check_rows, 0)
        cfg.validate(vocab_size)
        if cfg.greedy and cfg.temperature != 1.0:
            raise ValueError(f"greedy=True with temperature={cfg.temperature}: an engine's "
                             "greedy decoding (temperature 0) reports log-probs at "
                             "temperature 1; set temperature=1.0")
        if check_rows and recompute is None:
            raise ValueError("recompute is required to check the engine's log-probs (e.g. "
                             "engine_client.policy_recompute(params, model_cfg)); pass "
                             "check_rows=0 to skip the check (not recommended)")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.base = url.rstrip("/").removesuffix("/v1")
        self.cfg, self.vocab_size, self.recompute = cfg, vocab_size, recompute
        self.timeout, self.check_rows, self.tolerances = timeout, check_rows, tolerances
        self.api_key, self.extra_body, self._model = api_key, dict(extra_body or {}), model
        self.last_check: dict = {}

    @property
    def model(self) -> str:
        if self._model is None:
            url = f"{self.base}/v1/models"
            body = http_json(url, timeout=self.timeout, api_key=self.api_key)
            try:
                self._model = body["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise EngineError(f"{url} lists no model ({str(body)[:200]}); pass "
                                  "EngineClient(model=...)") from None
        return self._model

    def generate(self, prompts, group_size: int, *, seed: int | None = None) -> Rollout:
        """``prompts``: token-id lists or a 2-D int array (``sampler.as_prompt_list``)."""
        prompts = as_prompt_list(prompts, self.vocab_size, self.cfg.max_prompt_len)
        _check_int("group_size", group_size, 1)
        url = f"{self.base}/v1/completions"
        body = build_request(prompts, group_size, self.cfg, model=self.model, seed=seed,
                             extra=self.extra_body)
        answer = http_json(url, body, timeout=self.timeout, api_key=self.api_key)
        r = rollout_from_response(answer, prompts, group_size, self.cfg, self.vocab_size, url)
        if self.check_rows:
            self.last_check = check_logprobs(r, self.recompute, self.cfg, rows=self.check_rows,
                                             tol=self.tolerances, url=url)
        return r
