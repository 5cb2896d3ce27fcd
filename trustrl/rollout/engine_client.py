"""Fill the Rollout record from an external OpenAI-compatible engine (vLLM, SGLang, llama.cpp).

    client = EngineClient("http://127.0.0.1:8000", SamplerConfig(max_new_tokens=256,
                          temperature=1.0, eos_ids=(2,), record_topk=20), vocab_size=V,
                          recompute=policy_recompute(params, model_cfg), precision="bf16")
    rollout = client.generate(prompts, group_size=8, seed=step)   # trustrl.rollout.record.Rollout

Engines (``engine=``; "auto" asks GET /v1/models, whose ``owned_by`` names llama.cpp
("llamacpp"), vLLM and SGLang; any other owner is spoken to in vLLM's request format):

  vllm / sglang: one POST ``/v1/completions`` with token-id prompts (``"prompt": [[ids], ...]``),
    ``n`` = group_size, ``max_tokens``, ``temperature`` (0 for greedy), ``top_p``, ``top_k``
    (-1 = off), neutral ``min_p`` / penalties (so that no generation_config.json default
    applies), ``logprobs`` = K, ``stop_token_ids`` = eos_ids with ``ignore_eos`` (the engine then
    stops on exactly the trainer's EOS set) and ``return_tokens_as_token_ids``, so every token
    comes back as ``"token_id:123"`` (text tokens cannot be mapped back to ids), and
    ``return_token_ids`` (vLLM >= 0.10.2, SGLang's CompletionRequest): each choice then carries
    ``prompt_token_ids`` (the ids the engine conditioned on) and ``token_ids`` (the generated
    ids); older servers ignore the field (vLLM logs it as ignored, SGLang's pydantic model drops
    unknown fields). ``echo`` stays false: vLLM's echo puts the prompt into the text and the
    log-prob lists, which the record does not want. ``seed`` is sent as given (vLLM draws the n
    samples of a prompt from one generator seeded with it).
  llama.cpp (``llama-server``): ONE REQUEST PER ROW (n=1, at most the server's ``total_slots``
    of GET /props at a time): its ``n`` is capped at ``--parallel`` (HTTP 400 above), a
    multi-choice answer carries the usage of its first choice only, and its extra samples get
    seed+1, seed+2, ... Each row gets its own seed ``row_seed(seed, prompt, sample)``, so no two
    rows of a call or of consecutive calls (seed=step) share one. Sent: ``samplers`` =
    [temperature, top_k, top_p] (trustrl's order; llama.cpp's default chain truncates BEFORE
    the temperature and adds min_p / typical / penalties), top_k 0 = off, ``logprobs`` =
    max(K, 1) (``logprobs: 0`` returns nothing), no ``stop_token_ids`` (ignored by llama.cpp:
    it stops on its own end-of-generation set) and no ``ignore_eos`` (llama.cpp BANS its
    end-of-generation tokens with it, while its log-probs do not show the ban). llama.cpp's
    log-probs are log softmax(logits) at temperature 1 before its sampling chain; at T != 1 the
    client asks ``post_sampling_probs`` (probabilities after the chain = softmax(logits / T)
    when nothing truncates), so T != 1 with top_p < 1 or top_k > 0 is refused (those are
    renormalised over the kept set and omit the zeroed tokens). Refused request fields (in
    ``extra_body``): ignore_eos, stop_token_ids, post_sampling_probs, n_probs, samplers.

Response: the completion choices, in either log-prob shape (parsed per choice):
  completions shape (vLLM / serve_sampler): ``logprobs = {tokens, token_logprobs,
    top_logprobs: [{"token_id:i": logp, ...}], ...}``;
  chat shape (llama.cpp, SGLang, vLLM's chat endpoint): ``logprobs = {content: [{id, token,
    bytes, logprob, top_logprobs: [{id, token, bytes, logprob}, ...]}, ...]}`` (``prob`` /
    ``top_probs`` under llama.cpp's post_sampling_probs; ids from ``id``, else from a
    ``"token_id:N"`` token).
Choice ``index`` = prompt * n + sample in one answer (the group_size samples of a prompt
adjacent, as trustrl's sampler lays them out); per-row answers come in that order. The record is
built exactly as ``trustrl.rollout.sampler.Sampler`` builds it: prompts LEFT-padded with id 0 to
``sampler.prompt_bucket`` (``sampler.left_pad``); responses padded to max_new_tokens with id 0;
response_mask 1 up to and including EOS; finish_reason FINISH_EOS when the last token is an EOS
id (vLLM can report "length" when EOS is the max_tokens-th token; the trainer's sampler calls
that EOS), FINISH_LENGTH when it ran to max_tokens without one; rollout_logp the sampled token's
log-prob; top-K ids / log-probs sorted by decreasing log-prob (ties: lower id first), the
sampled token forced into the LAST slot when absent (``divergences.build_topk_set``'s rule), pad
0 / 0.0. ``rollout.validate`` accepts it.

Prompt ids (token-in-token-out; ``check_prompt_ids``). A choice that carries
``prompt_token_ids`` (vLLM / SGLang with return_token_ids) must hold exactly the ids sent for its
prompt: an engine that decoded the token-id prompt to text and encoded it again (a text-only
server, a proxy, a chat template in between) conditions on other ids ("1" "2" sent, "12"
re-encoded) while the trainer scores the sent ones, so the answer is refused with an
EngineError naming the choice, its prompt, the first differing position and both ids ("the
engine re-tokenised the prompt: ..."). A choice's ``token_ids``, when present, must equal the
ids of its log-probs. Engines that return no prompt ids (llama.cpp's /v1/completions answer
has none; vLLM < 0.10.2) keep the length check on ``usage.prompt_tokens``: per row for per-row
answers (llama.cpp, routed experts, ``complete``), and for one vLLM answer the sum of the
prompts' lengths (vLLM counts each prompt once, not once per sample); a re-tokenisation that
keeps the length passes that check unseen.

Multi-turn (``EngineClient.complete``, used by ``trustrl.rollout.engine_multiturn``): one
completion per token-id prompt, ONE REQUEST PER ROW (n=1, its own ``max_tokens`` and seed,
``concurrency`` in flight, default ROW_CONCURRENCY for vLLM / SGLang, GET /props' total_slots
for llama.cpp): the prompts of a turn hold each episode's whole history, and a batched request
has one seed for all its prompts, so the identical first prompts of a group would draw
identical samples. Rows are parsed and checked (this docstring's rules, ``check_logprobs`` with
the history as context) in groups of equal max_tokens.

Structure, checked on EVERY row (``EngineError``, one line naming the row, the cause and the
engine option): counts (``usage.completion_tokens`` per row for per-row answers, summed for one
answer; ``usage.prompt_tokens`` = the prompt's length per row), token gaps (llama.cpp leaves out
of ``logprobs.content`` every token that ends inside a multi-byte UTF-8 character; seen as a
count below ``usage.completion_tokens`` or as an entry whose ``bytes`` are not its token's own
``bytes`` in its top_logprobs: such a row's token sequence is not the generated one and cannot
be recorded), ids inside the vocabulary, no token after an EOS id, a "stop" only on an EOS id, a
"length" stop only at max_tokens, and stopping that differs from the request: rows that run on
although the engine's own log-probs give the EOS ids mass (``check_stopping``: the chance of
never drawing one, prod(1 - p_eos) over the row's tokens, below 1e-6 / rows, or over all rows
when none ended; a bound under any honest sampler, Ville's inequality).

Log-prob semantics (the traps). trustrl's rollout_logp is log softmax(logits / T) over the FULL
vocabulary. Engines commonly return something else, and training then silently uses a wrong
anchor mu. On every call ``check_logprobs`` recomputes sampled tokens' log-probs with the
trainer's policy (``recompute``): ``check_rows`` rows (default 8) picked at random in full, and
the first ``check_tokens`` (default 8) response tokens of EVERY other row (one short forward),
and compares, per token, d = returned - recomputed(T):

  trap (a) "log-probs taken before temperature": T != 1 and the returned values match the
      recompute at temperature 1 much better than at T: mean|returned - recomputed(1)| <
      TEMPERATURE_RATIO (0.5) x mean|d|, with mean|d| > MIN_SIGNAL. A correct engine has
      mean|returned - recomputed(1)| ~ mean|recomputed(T) - recomputed(1)| + noise > mean|d|,
      so the ratio cannot fall below 1/2 by noise. (vLLM's default --logprobs-mode
      raw_logprobs and llama.cpp's log-probs without post_sampling_probs are this trap.)
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
  too large: mean|d| > max_mean_abs, set from the engine's declared ``precision``
      (``Tolerances.for_precision``): fp32 0.01, bf16 / fp16 0.05 (the default), q8 0.05
      (not measured), q4 0.12 nats. Measured: SmolLM2-135M with a bf16 rollout against the fp32
      trainer ~0.01 mean |log pi/mu| (docs/mismatch_profile.md), the tiny test model 0.004;
      llama.cpp (CPU) on SmolLM2's Q4_1 GGUF against exactly its dequantised weights 0.061 at
      T=1, 0.059 at T=0.7 (kernel noise: ggml quantises the activations too), on an F32 GGUF of
      the same weights 0.0013, against weights with 0.02 x std noise 0.185 (docs/
      rollout_engines.md):
      "the engine's weights differ from the trainer's" (or another model, tokenizer, or
      precision). An engine on other weights that is much sharper than the trainer, with
      almost no token below the recompute, would be reported as trap (b).
  rows off: up to half the rows with a mean |d| over their checked tokens above
      max_row_mean_abs (1.0 nats; 0.5 at fp32) while the other rows pass: "fabricated
      log-probs, or the row answers another prompt" (checked first; when more rows are off,
      the traps above name the engine-wide cause, and rows still off after them are refused).
The check raises ``EngineLogprobError`` (``.trap`` in "before_temperature",
"renormalised_truncation", "mismatch", "row_mismatch"; ``.stats`` the measured numbers); it
never corrects the record, and prints the measured gap either way (``log=``).
``check_rows=0`` turns it off (then nothing protects the log-probs; not recommended).
Thresholds are the ``Tolerances`` fields; docs/rollout_engines.md explains the setup.
The timeout is a deadline per request (connect, headers and body together).

Routed experts (R3, ``SamplerConfig.record_routes=True``; engine "sglang" only, with a
``route_layout=record.RouteLayout.of(model_cfg)``): the request adds SGLang's
``return_routed_experts: true`` (the server must run with ``--enable-return-routed-experts``).
SGLang's OpenAI endpoints answer it at the RESPONSE level, ``sglext.routed_experts``, taken from
the request's FIRST choice only (sglang python/sglang/srt/entrypoints/openai/
serving_completions.py, ``_build_completion_response``: "Build sglext at response level (from
first ret_item ...)"; protocol.py ``class SglExt``), so the client then sends ONE REQUEST PER
ROW (one prompt, n=1, seed ``row_seed``, ``concurrency`` in flight, default
ROUTES_CONCURRENCY). The value is a base64 string of the flat row-major ids of dtype int32
(``sglext.routed_experts_dtype`` "uint8" / "uint16" / "int32" when the server names one), of
logical shape [seqlen - 1, num_hidden_layers, top_k] (SGLang's docs/basic_usage/
openai_api_completions, "Returning Routed Experts (MoE Models)"; layers/moe/
routed_experts_capturer.py: a [tokens, num_hidden_layers, num_experts_per_tok] int32 buffer,
``get_routed_experts`` returns the positions [0, seqlen - 1); ``extract_routed_experts_from_
meta_info`` decodes it with np.frombuffer(b64decode(...), int32)): every position of prompt +
completion but the last token, one row per decoder layer (dense layers included). The client
keeps ``route_layout.sparse_layers``, checks every id against num_experts and the count against
the row's prompt and completion lengths, and writes them at the row's columns of
Rollout.routed_experts (left padding, the last token and the rest 0; record.py). An answer
without them is an EngineError naming the server flag; ``routed_experts_start_len`` (a partial
slice) is refused in extra_body.
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import dataclasses
import functools
import hashlib
import http.client
import json
import math
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trustrl.rollout.record import (
    FINISH_EOS, FINISH_LENGTH, Rollout, RouteLayout, routes_dtype, validate)
from trustrl.rollout.sampler import (
    SamplerConfig, check_int, as_prompt_list, left_pad, prompt_bucket)

TOKEN_ID = re.compile(r"token_id:(\d+)")
ENGINES = ("auto", "vllm", "sglang", "llama.cpp")
_OWNERS = {"llamacpp": "llama.cpp", "vllm": "vllm", "sglang": "sglang"}
# request fields the client sets itself for llama.cpp (why each cannot come from extra_body)
_LLAMA_CPP_REFUSED = {
    "ignore_eos": "llama.cpp's ignore_eos BANS its end-of-generation tokens (logit bias -inf) "
                  "while its log-probs do not show the ban",
    "stop_token_ids": "llama.cpp ignores stop_token_ids and stops on its own end-of-generation "
                      "set: set SamplerConfig.eos_ids to that set",
    "post_sampling_probs": "the client asks it at temperature != 1 only (llama.cpp then returns "
                           "probabilities after its whole sampling chain)",
    "n_probs": "the client sets logprobs = max(record_topk, 1)",
    "samplers": "the client sends trustrl's order [temperature, top_k, top_p]",
}
NO_EOS_ALPHA = 1e-6  # check_stopping's false-alarm bound
ROUTES_CONCURRENCY = 32  # per-row requests in flight when recording routed experts (default)
ROW_CONCURRENCY = 32  # per-row requests in flight for ``complete`` on vLLM / SGLang (default)
_ROUTES_WIRE = {"int32": np.int32, "uint16": np.uint16, "uint8": np.uint8}  # SGLang's dtypes


class EngineError(RuntimeError):
    """The engine could not be reached or answered something the record cannot be built from."""


class EngineLogprobError(EngineError):
    """The engine's log-probs are not trustrl's rollout_logp (see the module docstring).

    trap: "before_temperature", "renormalised_truncation", "mismatch" or "row_mismatch";
    stats: the numbers."""

    def __init__(self, message: str, trap: str, stats: dict):
        super().__init__(message)
        self.trap, self.stats = trap, stats


@dataclasses.dataclass(frozen=True)
class Completion:
    """One row's completion from ``EngineClient.complete``: the generated ids (an EOS id
    included, last, when it stopped on one), their log-probs (rollout_logp's rule), the top-K
    ids / log-probs ([m, K], the sampled token forced in; None when record_topk=0) and whether
    it ended on an EOS id (False: it ran to its max_tokens)."""
    ids: np.ndarray
    logp: np.ndarray
    topk_ids: np.ndarray | None
    topk_logp: np.ndarray | None
    eos: bool


# max_mean_abs per declared engine precision (nats per token; module docstring for the numbers)
PRECISIONS = {"fp32": 0.01, "bf16": 0.05, "fp16": 0.05, "q8": 0.05, "q4": 0.12}


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Thresholds of ``check_logprobs`` (nats per token; see the module docstring for why)."""
    max_mean_abs: float = 0.05       # mean |returned - recomputed(T)| allowed
    min_signal: float = 0.01         # below this no trap is diagnosed (rounding level)
    temperature_ratio: float = 0.5   # trap (a): err at T=1 < ratio x err at T
    max_downward: float = 0.01       # trap (b): mean(max(-d, 0)) at most this
    max_row_mean_abs: float = 1.0    # one row's mean |d| over its checked tokens at most this
    precision: str = "bf16"          # the declared engine precision these were set for

    @classmethod
    def for_precision(cls, precision: str) -> Tolerances:
        """The tolerances for an engine computing in ``precision`` (a PRECISIONS key)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)} (the engine's "
                             f"weights / kernels), got {precision!r}")
        return cls(max_mean_abs=PRECISIONS[precision],
                   max_row_mean_abs=0.5 if precision == "fp32" else 1.0, precision=precision)


def policy_recompute(params, model_cfg):
    """``recompute`` from trustrl's policy: ``policy.response_logp`` on ``params`` at
    ``model_cfg``'s precision (pass the rollout config and cast params to check the engine
    against the trainer's own rollout precision)."""
    from trustrl.model import policy
    return functools.partial(policy.response_logp, params, model_cfg)


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of row (prompt, sample) of the call seeded ``seed``: a hash, in [0, 2**31 - 1),
    distinct (up to hash collisions, ~1 in 2e9 per pair) across prompts, samples and seeds, so
    seed=step, step+1, ... never repeat a row's draws (llama.cpp's own n > 1 uses seed + i)."""
    h = hashlib.blake2b(f"trustrl-row-seed/{int(seed)}/{int(prompt)}/{int(sample)}".encode(),
                        digest_size=8)
    return int.from_bytes(h.digest(), "little") % (2 ** 31 - 1)


# ------------------------------------------------------------------------------------ HTTP


def _timed_out(url: str, timeout: float) -> EngineError:
    return EngineError(f"no answer from the rollout engine at {url} within {timeout} s (a "
                       "deadline for the whole request); raise EngineClient(timeout=...) for "
                       "long generations")


def http_json(url: str, body: dict | None = None, *, timeout: float = 120.0,
              api_key: str | None = None) -> Any:
    """GET (body None) or POST JSON; returns the parsed answer. ``timeout`` is a DEADLINE for the
    whole request (connect, send, headers and body: a server trickling bytes cannot hold it
    longer). EngineError names the URL on a connection failure, the deadline, a non-200 answer
    or malformed JSON."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EngineError(f"the rollout engine URL {url!r} is not http(s)://host[:port]/...")
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout)
    expired, sock = threading.Event(), []

    def expire():  # the deadline: shut the socket, which ends any blocked read or write
        expired.set()
        for s in sock:  # the connected socket (the response keeps using it after getresponse)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        timer.start()
        conn.connect()
        sock.append(conn.sock)
        if expired.is_set():  # the deadline fell during connect
            raise TimeoutError
        conn.request("GET" if data is None else "POST", path, body=data, headers=headers)
        resp = conn.getresponse()
        status, reason, raw = resp.status, resp.reason, resp.read()
    except TimeoutError:
        raise _timed_out(url, timeout) from None
    except (ConnectionRefusedError, socket.gaierror) as e:
        raise EngineError(f"cannot reach the rollout engine at {url}: {e} (is the server "
                          "running and is the URL its base, e.g. http://127.0.0.1:8000?)"
                          ) from None
    except (http.client.HTTPException, OSError) as e:  # e.g. reset mid-answer
        if expired.is_set():
            raise _timed_out(url, timeout) from None
        raise EngineError(f"connection to the rollout engine at {url} failed: {e!r}") from None
    finally:
        timer.cancel()
        conn.close()
    if expired.is_set():
        raise _timed_out(url, timeout)
    if status != 200:
        detail = raw[:1000].decode("utf-8", "replace")
        try:  # vLLM / OpenAI / llama.cpp error bodies: {"message": ...} or {"error": {...}}
            obj = json.loads(detail)
            inner = obj.get("error", obj) if isinstance(obj, dict) else None
            if isinstance(inner, dict) and isinstance(inner.get("message"), str):
                detail = inner["message"]
        except ValueError:
            pass
        raise EngineError(f"the rollout engine at {url} answered HTTP {status} {reason}: "
                          f"{detail}")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise EngineError(f"malformed JSON from the rollout engine at {url}: {e}; the answer "
                          f"starts {raw[:200]!r}") from None


# ------------------------------------------------------------------------ request / response


def build_request(prompts: Sequence[np.ndarray], group_size: int, cfg: SamplerConfig, *,
                  model: str, seed: int | None = None, extra: dict | None = None,
                  engine: str = "vllm") -> dict:
    """The /v1/completions body for ``prompts`` (token-id arrays), ``group_size`` samples each,
    in ``engine``'s dialect (module docstring); ``cfg.record_routes``: SGLang's
    return_routed_experts (sglang only, one row per request)."""
    if cfg.record_routes and engine != "sglang":
        raise ValueError(f"record_routes=True asks the engine for routed experts in SGLang's "
                         f"return_routed_experts style; engine={engine!r} is not 'sglang'")
    if cfg.record_routes and (len(prompts) != 1 or group_size != 1):
        raise ValueError("routed-experts requests carry one row (one prompt, n=1): SGLang "
                         "returns the routed experts of a request's first choice only")
    k = cfg.record_topk
    temperature = 0.0 if cfg.greedy else float(cfg.temperature)
    if engine == "llama.cpp":
        if len(prompts) != 1 or group_size != 1:
            raise ValueError("llama.cpp requests carry one row (one prompt, n=1): its n is "
                             "capped at --parallel and its usage counts only the first choice")
        body = {
            "model": model, "prompt": np.asarray(prompts[0]).tolist(), "n": 1,
            "max_tokens": cfg.max_new_tokens, "temperature": temperature,
            "top_p": float(cfg.top_p), "top_k": max(cfg.top_k, 0), "min_p": 0.0,
            "logprobs": max(k, 1), "samplers": ["temperature", "top_k", "top_p"],
            "stream": False}
        if temperature not in (0.0, 1.0):
            body["post_sampling_probs"] = True
    elif engine in ("vllm", "sglang"):
        body = {
            "model": model, "prompt": [np.asarray(p).tolist() for p in prompts],
            "n": group_size, "max_tokens": cfg.max_new_tokens, "temperature": temperature,
            "top_p": float(cfg.top_p), "logprobs": k, "stop_token_ids": list(cfg.eos_ids),
            "ignore_eos": True, "return_tokens_as_token_ids": True, "skip_special_tokens": False,
            "return_token_ids": True, "echo": False, "stream": False,
            # explicit neutral values: vLLM otherwise fills unset fields from the model's
            # generation_config.json (e.g. top_k=20, repetition_penalty=1.05), which changes mu
            "top_k": cfg.top_k if cfg.top_k > 0 else -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    else:
        raise ValueError(f"engine must be one of {ENGINES[1:]}, got {engine!r}")
    if cfg.record_routes:
        body["return_routed_experts"] = True
    if seed is not None:
        body["seed"] = int(seed)
    body.update(extra or {})
    return body


def _routes_row(answer, layout: RouteLayout, tokens: int, where: str, url: str) -> np.ndarray:
    """The routed experts of one row's answer (module docstring): [tokens - 1, M, k] ids of
    the sparse layers for its ``tokens`` = prompt + completion tokens."""
    ext = answer.get("sglext") if isinstance(answer, dict) else None
    raw = ext.get("routed_experts") if isinstance(ext, dict) else None
    if raw is None:
        raise EngineError(
            f"{where} from {url} has no routed experts (sglext.routed_experts) although the "
            "request asked return_routed_experts=true (record_routes=True): start SGLang with "
            "--enable-return-routed-experts, on a mixture-of-experts model")
    wire = ext.get("routed_experts_dtype", "int32")
    if wire not in _ROUTES_WIRE or not isinstance(raw, str):
        raise EngineError(f"{where} from {url}: sglext.routed_experts must be a base64 string "
                          f"of {sorted(_ROUTES_WIRE)} ids, got a {type(raw).__name__} of dtype "
                          f"{wire!r}")
    try:
        flat = np.frombuffer(base64.b64decode(raw, validate=True), _ROUTES_WIRE[wire])
    except (binascii.Error, ValueError) as e:
        raise EngineError(f"{where} from {url}: sglext.routed_experts is not base64 {wire} "
                          f"ids ({e})") from None
    lay, k, positions = layout.num_layers, layout.experts_per_tok, tokens - 1
    if flat.size != positions * lay * k:
        raise EngineError(
            f"{where} from {url}: {flat.size} routed-expert ids, expected [seqlen - 1, layers, "
            f"top_k] = [{positions}, {lay}, {k}] = {positions * lay * k} ({tokens} prompt + "
            "completion tokens; route_layout from the trainer's model config): another model, "
            "a routed_experts_start_len, or a multi-choice answer")
    ids = flat.reshape(positions, lay, k)[:, list(layout.sparse_layers)]
    bad = ids[(ids < 0) | (ids >= layout.num_experts)]
    if bad.size:
        raise EngineError(f"{where} from {url}: routed expert ids {bad[:5].tolist()} outside "
                          f"[0, num_experts={layout.num_experts}) in the sparse layers "
                          f"{list(layout.sparse_layers)}")
    return ids


def _token_id(s, where: str, url: str) -> int:
    m = TOKEN_ID.fullmatch(s) if isinstance(s, str) else None
    if m is None:
        raise EngineError(
            f"{where}: token {s!r} from {url} is not of the form 'token_id:N' and has no integer "
            "'id'; request return_tokens_as_token_ids=true (vLLM: the request field or the "
            "server flag --return-tokens-as-token-ids): text tokens cannot be mapped back to ids")
    return int(m.group(1))


def _logprob(x, where: str, url: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise EngineError(f"{where}: log-prob {x!r} from {url} is not a finite number (vLLM "
                          "writes -inf as -9999.0)")
    return float(x)


def _prob_logprob(e: dict, where: str, url: str) -> float:
    """The log-prob of a chat-shape entry: ``logprob``, or log(``prob``) (post_sampling_probs)."""
    if "logprob" in e:
        return _logprob(e["logprob"], where, url)
    p = e.get("prob")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise EngineError(f"{where}: entry from {url} has no 'logprob' and its 'prob' {p!r} is "
                          "not in (0, 1] (llama.cpp's post_sampling_probs gives a sampled "
                          "token probability 0 only when its sampling chain zeroed it)")
    return math.log(p)


def _entry_id(e: dict, where: str, url: str) -> int:
    i = e.get("id")
    if isinstance(i, int) and not isinstance(i, bool):
        return i
    return _token_id(e.get("token"), where, url)


def _parse_logprobs(lp: dict, where: str, url: str):
    """(ids, log-probs, [{id: logp} per token]) from either log-prob shape (module docstring)."""
    if "content" in lp:  # chat shape
        content = lp["content"]
        if not isinstance(content, list):
            raise EngineError(f"{where} from {url}: logprobs.content is not a list")
        ids, lps, tops = [], [], []
        for t, e in enumerate(content):
            w = f"{where} token {t}"
            if not isinstance(e, dict):
                raise EngineError(f"{w} from {url}: logprobs.content entry is not an object")
            tok, x = _entry_id(e, w, url), _prob_logprob(e, w, url)
            top = e.get("top_logprobs", e.get("top_probs"))
            if top is None:
                top = []
            if not isinstance(top, list):
                raise EngineError(f"{w} from {url}: top_logprobs is {type(top).__name__}, "
                                  "expected a list of {id, logprob} objects (chat shape)")
            entries = {}
            for c in top:
                if not isinstance(c, dict):
                    raise EngineError(f"{w} from {url}: a top_logprobs entry is not an object")
                cid = _entry_id(c, w, url)
                entries[cid] = _prob_logprob(c, w, url)
                # llama.cpp: an entry's bytes are its text since the last complete UTF-8
                # character; a token's own bytes are in its top entry. They differ exactly when
                # the tokens before it were left out (they ended inside a character).
                if cid == tok and isinstance(e.get("bytes"), list) and isinstance(
                        c.get("bytes"), list) and e["bytes"] != c["bytes"]:
                    raise EngineError(
                        f"{w} from {url}: a gap before this token: its entry carries the bytes "
                        f"{bytes(e['bytes'][:16])!r} but token {tok} alone is "
                        f"{bytes(c['bytes'][:16])!r}; the engine left out the token(s) before "
                        "it, which ended inside a multi-byte UTF-8 character (llama.cpp omits "
                        "such tokens from logprobs.content): the row's token sequence is not "
                        "the generated one and cannot be recorded")
            ids.append(tok)
            lps.append(x)
            tops.append(entries)
        return ids, lps, tops
    toks, tok_lps = lp.get("tokens"), lp.get("token_logprobs")
    if not isinstance(toks, list) or not isinstance(tok_lps, list) or len(toks) != len(tok_lps):
        raise EngineError(f"{where} from {url}: logprobs has neither 'content' (chat shape) nor "
                          "'tokens' / 'token_logprobs' of equal lengths (completions shape)")
    ids = [_token_id(t, f"{where} token {i}", url) for i, t in enumerate(toks)]
    lps = [_logprob(x, f"{where} token {i}", url) for i, x in enumerate(tok_lps)]
    tops_raw = lp.get("top_logprobs")
    tops = []
    if isinstance(tops_raw, list) and len(tops_raw) == len(ids):
        for t, top in enumerate(tops_raw):
            w = f"{where} token {t}"
            if top is None:
                tops.append({})
                continue
            if not isinstance(top, dict):
                raise EngineError(f"{w}: top_logprobs entry from {url} is "
                                  f"{type(top).__name__}, expected an object "
                                  "{'token_id:N': logprob}")
            tops.append({_token_id(key, w, url): _logprob(v, w, url) for key, v in top.items()})
    elif tops_raw is not None:
        raise EngineError(f"{where} from {url}: logprobs.top_logprobs is not one entry per "
                          "token")
    else:
        tops = None
    return ids, lps, tops


def _k_hint(engine: str) -> str:
    if engine == "llama.cpp":
        return ("llama.cpp: logprobs = n_probs; with post_sampling_probs it omits the tokens its "
                "sampling chain zeroed (top-p / top-k / min-p)")
    return "vLLM caps it at --max-logprobs, default 20"


def _topk_row(entries: dict, tok: int, tok_lp: float, k: int, where: str, url: str,
              engine: str = "vllm"):
    """(ids [K], logp [K]): the engine's entries sorted by decreasing log-prob (lower id first
    on ties), the sampled token forced into the last slot when not among the first K."""
    if tok in entries and not math.isclose(entries[tok], tok_lp, rel_tol=1e-6, abs_tol=1e-6):
        raise EngineError(f"{where}: the sampled token {tok} has log-prob {tok_lp} in "
                          f"token_logprobs but {entries[tok]} in top_logprobs (from {url})")
    if len(entries) < k:
        raise EngineError(f"{where}: {len(entries)} top_logprobs from {url}, expected at least "
                          f"K={k} (logprobs=K; {_k_hint(engine)})")
    entries = dict(entries)
    order = sorted(entries, key=lambda i: (-entries[i], i))[:k]
    if tok not in order:
        order[-1] = tok
    entries[tok] = tok_lp
    return order, [entries[i] for i in order]


def _usage(answer: dict, key: str):
    u = answer.get("usage") if isinstance(answer, dict) else None
    v = u.get(key) if isinstance(u, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _id_list(x, what: str, where: str, url: str) -> list:
    if not isinstance(x, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise EngineError(f"{where} from {url}: {what} is not a list of token ids (got "
                          f"{str(x)[:80]})")
    return x


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where the id lists differ (the shorter one's length when it is a
    prefix of the other); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if int(x) != int(y):
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_prompt_ids(returned, sent: Sequence[int], where: str, url: str = "the engine"):
    """Refuses a choice whose ``prompt_token_ids`` are not the ids sent (module docstring):
    EngineError naming ``where``, the first differing position and both ids there."""
    got = _id_list(returned, "prompt_token_ids", where, url)
    sent = [int(t) for t in sent]
    i = first_difference(sent, got)
    if i is None:
        return
    at = lambda seq: f"id {seq[i]}" if i < len(seq) else "nothing (its end)"  # noqa: E731
    lo = max(0, i - 2)
    raise EngineError(
        f"{where} from {url}: the engine re-tokenised the prompt: at position {i} the client "
        f"sent {at(sent)}, the engine's prompt_token_ids have {at(got)} ({len(sent)} ids sent, "
        f"{len(got)} returned; from position {lo}: sent {sent[lo:i + 3]}, returned "
        f"{got[lo:i + 3]}). The engine conditioned on other ids than the trajectory holds (a "
        "token-id prompt decoded to text and encoded again: a server without token-id "
        "prompts, a proxy or a chat template in between); send the ids to /v1/completions "
        "unchanged")


def _check_token_ids(returned, ids: list, eos: set, where: str, url: str):
    """A choice's ``token_ids`` (return_token_ids) must be the ids of its log-probs; an engine
    that trims the stop token from them (and not from the log-probs) is accepted."""
    got = _id_list(returned, "token_ids", where, url)
    if got == ids or (ids and ids[-1] in eos and got == ids[:-1]):
        return
    i = first_difference(ids, got)
    at = lambda seq: f"id {seq[i]}" if i < len(seq) else "nothing"  # noqa: E731
    raise EngineError(f"{where} from {url}: its token_ids differ from the tokens of its "
                      f"log-probs at position {i} ({at(got)} vs {at(ids)}; {len(got)} vs "
                      f"{len(ids)} ids): the answer does not describe one generated sequence")


def _stop_hint(engine: str) -> str:
    if engine == "llama.cpp":
        return ("llama.cpp ignores stop_token_ids and stops on its own end-of-generation set "
                "(the GGUF's eos / eot / eog tokens): make SamplerConfig.eos_ids that set")
    return ("stop strings, another stop id, or an engine that drops the stop token (it must be "
            "returned)")


def _eos_mass(top: dict, eos: set, top_p: float, top_k: int, greedy: bool) -> float:
    """The probability the sampler could draw an EOS id at one position, from the returned
    entries (the top ones): greedy 1 when an EOS id is the argmax, else 0; otherwise the mass of
    the EOS ids inside the top-k / top-p set (a lower bound of its renormalised mass)."""
    order = sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))
    if greedy:
        return 1.0 if order and order[0][0] in eos else 0.0
    p, cum = 0.0, 0.0
    for rank, (i, lp) in enumerate(order):
        if (top_k > 0 and rank >= top_k) or cum >= top_p:
            break  # outside the truncated set: the sampler cannot draw it
        if i in eos:
            p += math.exp(lp)
        cum += math.exp(lp)
    return p


def check_stopping(rows: Sequence[tuple], eos: set, *, alpha: float = NO_EOS_ALPHA,
                   engine: str = "vllm", url: str = "the engine", top_p: float = 1.0,
                   top_k: int = 0, greedy: bool = False):
    """Refuses rows that run on although the engine's OWN log-probs give the EOS ids mass.

    rows: (row, ids, [{id: logp} per token], ended_on_eos) per row. For each position that did
    not draw an EOS id, p = the returned mass of the EOS ids among its entries that the sampler
    could draw (``_eos_mass``: inside top-k / top-p; greedy: 1 if an EOS id is the argmax), a
    lower bound of the drawing probability when the log-probs are the sampled distribution's
    (tempered: trap (a) engines are refused by check_logprobs, but may be named here first).
    Under a sampler that draws from those probabilities, L = prod 1 / (1 - p) over a row's
    non-EOS positions, times 0 once it draws EOS, is a martingale of mean 1, so P(L >= c) <= 1/c
    (Ville): a row with L >= rows / alpha, or all rows together (none ended) with prod L >=
    1 / alpha, is refused with false-alarm rate <= alpha. Returns {row: log L}."""
    logl = {}
    for row, ids, tops, _ in rows:
        s = 0.0
        for t, tok in enumerate(ids):
            if tok in eos or not tops or t >= len(tops):
                continue
            p = _eos_mass(tops[t], eos, top_p, top_k, greedy)
            s -= math.log1p(-min(p, 1 - 1e-12))
        logl[row] = s
    if not logl:
        return logl
    ended = [r for r, _, _, e in rows if e]
    worst = max(logl, key=logl.get)
    hint = ("llama.cpp: ignore_eos=true adds a -inf logit bias to its end-of-generation tokens "
            "and its log-probs do not show it; never send it" if engine == "llama.cpp" else
            "an ignore_eos / logit_bias / min_tokens setting, or a sampler that bans them")
    if logl[worst] >= math.log(len(rows) / alpha) and worst not in ended:
        raise EngineError(
            f"choice {worst} from {url} runs on without an EOS id {sorted(eos)} although the "
            f"engine's own log-probs give them mass at its positions (chance of never drawing "
            f"one: {math.exp(-logl[worst]):.2g}): its stopping differs from the request ({hint})")
    total = sum(logl.values())
    if not ended and total >= math.log(1 / alpha):
        raise EngineError(
            f"none of the {len(rows)} choices from {url} ended on an EOS id {sorted(eos)} "
            f"although the engine's own log-probs give them mass (chance of that: "
            f"{math.exp(-total):.2g}): its stopping differs from the request ({hint})")
    return logl


def rollout_from_response(body: Any, prompts: Sequence[np.ndarray], group_size: int,
                          cfg: SamplerConfig, vocab_size: int, url: str = "the engine", *,
                          engine: str = "vllm", route_layout: RouteLayout | None = None
                          ) -> Rollout:
    """Builds the Rollout record from a /v1/completions answer (a dict), or from a list of
    one-choice answers, one per row in row order (llama.cpp; routed experts); see the module
    docstring. ``cfg.record_routes``: Rollout.routed_experts from each row's answer
    (``route_layout`` required)."""
    b, n, k = len(prompts) * group_size, cfg.max_new_tokens, cfg.record_topk
    per_row = isinstance(body, list)
    answers = body if per_row else [body]
    for a in answers:
        if not isinstance(a, dict) or not isinstance(a.get("choices"), list):
            err = a.get("error") if isinstance(a, dict) else None
            raise EngineError(f"the answer from {url} has no 'choices' list"
                              + (f" (error: {err})" if err else "")
                              + f"; got {str(a)[:200]}")
    if per_row:
        if len(answers) != b:
            raise EngineError(f"{len(answers)} answers from {url} for {b} rows")
        by_index = {}
        for row, a in enumerate(answers):
            if len(a["choices"]) != 1 or not isinstance(a["choices"][0], dict):
                raise EngineError(f"the answer for row {row} from {url} has "
                                  f"{len(a['choices'])} choices, expected 1 (n=1)")
            by_index[row] = a["choices"][0]
    else:
        choices = body["choices"]
        if len(choices) != b:
            raise EngineError(f"{url} returned {len(choices)} choices for {len(prompts)} "
                              f"prompts x n={group_size}; expected {b}")
        by_index = {}
        for c in choices:
            idx = c.get("index") if isinstance(c, dict) else None
            if not isinstance(idx, int) or not 0 <= idx < b or idx in by_index:
                raise EngineError(f"{url} returned a choice with index {idx!r}: expected each "
                                  f"of 0..{b - 1} once (index = prompt * n + sample)")
            by_index[idx] = c
    if cfg.record_routes and route_layout is None:
        raise ValueError("record_routes=True needs route_layout (record.RouteLayout.of("
                         "model_cfg)) to read the engine's routed experts")
    if cfg.record_routes and not per_row and b != 1:
        raise EngineError(f"routed experts need one answer per row (SGLang returns those of a "
                          f"request's first choice only); got one answer for {b} rows")
    width = prompt_bucket(max(len(p) for p in prompts), cfg)
    routes = None
    if cfg.record_routes:
        routes = np.zeros((b, width + n, len(route_layout.sparse_layers),
                           route_layout.experts_per_tok), routes_dtype(route_layout.num_experts))
    eos = set(cfg.eos_ids)
    tokens = np.zeros((b, n), np.int32)
    mask = np.zeros((b, n), np.int32)
    logp = np.zeros((b, n), np.float32)
    topk_ids = np.zeros((b, n, max(k, 1)), np.int32)
    topk_logp = np.zeros((b, n, max(k, 1)), np.float32)
    finish = np.zeros((b,), np.int32)
    stopping, echoed = [], 0
    for row in range(b):
        c, where = by_index[row], f"choice {row}"
        lp = c.get("logprobs")
        if not isinstance(lp, dict):
            raise EngineError(f"{where} from {url} has no logprobs object (got {lp!r}); the "
                              f"request asked logprobs={max(k, 1) if engine == 'llama.cpp' else k}"
                              + (" (llama.cpp returns none for logprobs: 0)"
                                 if engine == "llama.cpp" else ""))
        ids, lps, tops = _parse_logprobs(lp, where, url)
        m = len(ids)
        if c.get("prompt_token_ids") is not None:  # vLLM / SGLang with return_token_ids
            check_prompt_ids(c["prompt_token_ids"], prompts[row // group_size],
                             f"{where} (prompt {row // group_size})", url)
            echoed += 1
        if c.get("token_ids") is not None:
            _check_token_ids(c["token_ids"], ids, eos, where, url)
        used = _usage(answers[row], "completion_tokens") if per_row else None
        if used is not None and used != m:
            raise EngineError(
                f"{where} from {url}: the engine generated {used} tokens (usage."
                f"completion_tokens) but returned log-probs for {m}: {used - m} left out "
                "(llama.cpp omits every token that ends inside a multi-byte UTF-8 character "
                "from logprobs.content); the row's token sequence is not the generated one and "
                "cannot be recorded")
        if per_row:
            want = len(prompts[row // group_size])
            got = _usage(answers[row], "prompt_tokens")
            if got is not None and got != want:
                raise EngineError(f"{where} from {url}: usage.prompt_tokens {got}, but its "
                                  f"prompt {row // group_size} has {want} tokens: the engine "
                                  "answered another prompt, re-tokenised it or added tokens "
                                  "(e.g. a BOS)")
        if not 1 <= m <= n:
            raise EngineError(f"{where} from {url} has {m} tokens, expected 1..max_tokens={n}")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise EngineError(f"{where} from {url}: token ids {bad[:5]} outside [0, "
                              f"{vocab_size}) (vocab_size={vocab_size}): another model?")
        early = [i for i, t in enumerate(ids[:-1]) if t in eos]
        if early:
            raise EngineError(f"{where} from {url} continues after EOS id {ids[early[0]]} at "
                              f"token {early[0]}: the engine must stop on stop_token_ids"
                              + (f" ({_stop_hint(engine)})" if engine == "llama.cpp" else ""))
        reason = c.get("finish_reason")
        if ids[-1] in eos:
            finish[row] = FINISH_EOS
        elif reason == "length" and m == n:
            finish[row] = FINISH_LENGTH
        elif reason == "length":
            raise EngineError(
                f"{where} from {url} stopped for length after {m} < max_tokens={n} tokens: the "
                "engine's context limit (max_model_len, llama.cpp's -c / --parallel), or tokens "
                "left out of its log-probs (llama.cpp: tokens ending inside a multi-byte UTF-8 "
                "character; its per-row usage.completion_tokens tells)")
        else:
            raise EngineError(
                f"{where} from {url} finished with {reason!r} after {m} tokens but its last "
                f"token {ids[-1]} is not an EOS id {sorted(eos)}: {_stop_hint(engine)}")
        tokens[row, :m], mask[row, :m], logp[row, :m] = ids, 1, lps
        if routes is not None:
            plen = len(prompts[row // group_size])
            routes[row, width - plen:width + m - 1] = _routes_row(
                answers[row] if per_row else body, route_layout, plen + m, where, url)
        stopping.append((row, ids, tops, bool(finish[row] == FINISH_EOS)))
        if k:
            if tops is None or len(tops) != m:
                raise EngineError(f"{where} from {url}: logprobs.top_logprobs missing or not "
                                  f"one per token (the request asked logprobs={k})")
            for t in range(m):
                topk_ids[row, t], topk_logp[row, t] = _topk_row(
                    tops[t], ids[t], lps[t], k, f"{where} token {t}", url, engine)
    if not per_row:
        used = _usage(body, "completion_tokens")
        total = int(mask.sum())
        if used is not None and engine != "llama.cpp" and used != total:
            raise EngineError(
                f"{url}: usage.completion_tokens is {used} but the log-probs hold {total} "
                f"tokens over {b} rows: the engine left tokens out of its log-probs (or counts "
                "differently); the record would hold token sequences that were never generated")
        want = sum(len(p) for p in prompts)
        used = _usage(body, "prompt_tokens")
        if engine == "vllm" and not echoed and used is not None and used not in (
                want, want * group_size):  # vLLM counts each prompt once; others per sample
            raise EngineError(
                f"{url}: usage.prompt_tokens is {used} but the {len(prompts)} prompts sent hold "
                f"{want} ids (and the answer carries no prompt_token_ids): the engine conditioned "
                "on other prompts (re-tokenised them, or added tokens such as a BOS)")
    check_stopping(stopping, eos, engine=engine, url=url, top_p=float(cfg.top_p),
                   top_k=cfg.top_k, greedy=cfg.greedy)
    ptoks, pmask = left_pad([p for p in prompts for _ in range(group_size)], width)
    r = Rollout(
        prompt_tokens=jnp.asarray(ptoks), prompt_mask=jnp.asarray(pmask),
        response_tokens=jnp.asarray(tokens), response_mask=jnp.asarray(mask),
        rollout_logp=jnp.asarray(logp),
        rollout_topk_ids=jnp.asarray(topk_ids) if k else None,
        rollout_topk_logp=jnp.asarray(topk_logp) if k else None,
        finish_reason=jnp.asarray(finish),
        group_index=jnp.repeat(jnp.arange(len(prompts), dtype=jnp.int32), group_size),
        routed_experts=None if routes is None else jnp.asarray(routes))
    try:
        validate(r, vocab_size, None if route_layout is None else route_layout.num_experts)
    except ValueError as e:
        raise EngineError(f"the record built from {url} fails rollout.validate: {e}") from None
    return r


# ---------------------------------------------------------------------------------- traps


def _check_rows(b: int, rows: int, seed) -> np.ndarray:
    """The rows recomputed in full: all when rows >= b, else ``rows`` picked at random."""
    if rows >= b:
        return np.arange(b)
    rng = np.random.default_rng(None if seed is None else [int(seed) & 0xFFFFFFFF, 0x7E57])
    return np.sort(rng.choice(b, rows, replace=False))


def check_logprobs(r: Rollout, recompute: Callable, cfg: SamplerConfig, *, rows: int = 8,
                   tol: Tolerances = Tolerances(), url: str = "the engine", tokens: int = 8,
                   seed: int | None = None, engine: str = "vllm",
                   log: Callable[[str], None] | None = None) -> dict:
    """Compares the returned rollout_logp with ``recompute`` (the trainer's log-probs): ``rows``
    rows (picked at random with ``seed``; all when the batch has no more) in full, and the first
    ``tokens`` response tokens of every other row; raises EngineLogprobError naming the trap
    (module docstring). ``log`` (e.g. print) gets the measured gap either way.

    recompute(tokens [b, P+N], positions, valid, *, num_response=N, temperature) -> [b, N]
    log softmax(logits / temperature) of the response tokens (``policy_recompute``).
    Returns the measured statistics."""
    b, n = r.response_tokens.shape
    full = _check_rows(b, rows, seed)
    mask_all = np.asarray(r.response_mask) > 0
    temp = float(cfg.temperature)
    parts = [(full, n)]  # (row indices, horizon)
    rest = np.setdiff1d(np.arange(b), full)
    if len(rest) and tokens > 0:
        parts.append((rest, min(tokens, n)))
    got, want, raw, row_of = [], [], [], []
    for idx, h in parts:
        sub = jax.tree.map(lambda x, idx=idx: x[idx], r)
        width = sub.prompt_tokens.shape[1] + h
        args = (sub.tokens[:, :width], sub.positions[:, :width], sub.valid_mask[:, :width])
        m = mask_all[idx, :h]
        got.append(np.asarray(sub.rollout_logp, np.float64)[:, :h][m])
        want.append(np.asarray(recompute(*args, num_response=h, temperature=temp),
                               np.float64)[m])
        if not cfg.greedy and temp != 1.0:
            raw.append(np.asarray(recompute(*args, num_response=h, temperature=1.0),
                                  np.float64)[m])
        row_of.append(np.broadcast_to(idx[:, None], m.shape)[m])
    got, want, row_of = (np.concatenate(x) for x in (got, want, row_of))
    stats = {"tokens": int(got.size), "rows": int(b), "full_rows": len(full),
             "row_tokens": int(min(tokens, n)) if len(rest) and tokens > 0 else n,
             "precision": tol.precision, "max_mean_abs": tol.max_mean_abs}
    if not got.size:
        return stats
    d = got - want
    stats.update(mean_abs=float(np.abs(d).mean()), max_abs=float(np.abs(d).max()),
                 mean=float(d.mean()), downward=float(np.maximum(-d, 0).mean()),
                 frac_higher=float((d > 0).mean()))
    per_row = np.bincount(row_of, np.abs(d), b) / np.maximum(np.bincount(row_of, None, b), 1)
    worst = int(np.argmax(per_row))
    stats.update(worst_row=worst, worst_row_mean_abs=float(per_row[worst]))
    where = (f"over {stats['tokens']} response tokens ("
             + (f"all {b} rows in full" if len(full) == b else
                f"{stats['full_rows']} rows in full, the first {stats['row_tokens']} tokens of "
                f"the other {b - stats['full_rows']}") + f") from {url}")
    if log is not None:
        log(f"engine_client: log-prob check {where}: mean |returned - recomputed| "
            f"{stats['mean_abs']:.3g} nats (signed {stats['mean']:+.3g}, max "
            f"{stats['max_abs']:.3g}, worst row {worst}: {stats['worst_row_mean_abs']:.3g}); "
            f"tolerance {tol.max_mean_abs:g} for precision {tol.precision}")
    bad = np.flatnonzero(per_row > tol.max_row_mean_abs)
    rest_d = np.abs(d[~np.isin(row_of, bad)])
    if len(bad) and 2 * len(bad) <= b and rest_d.size and rest_d.mean() <= tol.max_mean_abs:
        # a minority of rows far off while the others agree: those rows, not the engine
        raise EngineLogprobError(
            f"row(s) {bad[:5].tolist()} (prompt(s) "
            f"{np.asarray(r.group_index)[bad[:5]].tolist()}) from {url}: their log-probs differ "
            f"from the trainer's recompute by {per_row[bad[0]]:.3g} nats on average over "
            f"their checked tokens (row tolerance {tol.max_row_mean_abs:g}) while the other rows "
            f"agree to {rest_d.mean():.3g}: fabricated log-probs, or the "
            "row answers another prompt", "row_mismatch", stats)
    if raw:
        raw = np.concatenate(raw)
        stats["mean_abs_at_t1"] = float(np.abs(got - raw).mean())
        if (stats["mean_abs"] > tol.min_signal
                and stats["mean_abs_at_t1"] < tol.temperature_ratio * stats["mean_abs"]):
            fix = ("llama.cpp: the client asks post_sampling_probs at T != 1; was it removed, or "
                   "did the server ignore it?" if engine == "llama.cpp" else
                   "vLLM: start it with --logprobs-mode processed_logprobs (its default "
                   "raw_logprobs is this trap)")
            raise EngineLogprobError(
                f"trap (a), log-probs taken before temperature: the engine's log-probs match the "
                f"trainer's recompute at temperature 1 (mean |diff| {stats['mean_abs_at_t1']:.3g})"
                f" far better than at the requested temperature {temp:g} (mean |diff| "
                f"{stats['mean_abs']:.3g}) {where}: it returns log softmax(logits), not log "
                f"softmax(logits / T). {fix}; or sample at temperature 1.",
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
            "top_k / top_p unless started with --generation-config vllm; llama.cpp's "
            "post_sampling_probs are after its whole sampling chain).",
            "renormalised_truncation", stats)
    if stats["mean_abs"] > tol.max_mean_abs:
        raise EngineLogprobError(
            f"the engine's log-probs differ from the trainer's recompute: mean |diff| "
            f"{stats['mean_abs']:.3g} nats (max {stats['max_abs']:.3g}, signed mean "
            f"{stats['mean']:+.3g}) {where}; tolerance {tol.max_mean_abs:g} for the declared "
            f"engine precision {tol.precision!r} (EngineClient(precision=...): "
            f"{', '.join(f'{p} {v:g}' for p, v in PRECISIONS.items())}). The engine's weights "
            "differ from the trainer's (export them with trustrl.model.hf.save_hf_dir and "
            "reload the "
            "engine), or it serves another model, tokenizer or precision.",
            "mismatch", stats)
    if len(bad):
        raise EngineLogprobError(
            f"row(s) {bad[:5].tolist()} from {url}: their log-probs differ from the trainer's "
            f"recompute by up to {stats['worst_row_mean_abs']:.3g} nats on average over their "
            f"checked tokens (the batch: {stats['mean_abs']:.3g}; row tolerance "
            f"{tol.max_row_mean_abs:g}): fabricated log-probs, or the row answers another "
            "prompt", "row_mismatch", stats)
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
    engine: "auto" (GET /v1/models' owned_by), "vllm", "sglang" or "llama.cpp".
    precision: the engine's weights / kernels, one of PRECISIONS ("fp32", "bf16", "fp16", "q8",
      "q4"): sets ``Tolerances.for_precision``; ``tolerances`` overrides it.
    model: the served model name (default: the first of GET /v1/models).
    timeout: seconds, a deadline per request. check_rows: rows recomputed in full per call,
      picked at random (0: no check); check_tokens: the leading response tokens of every other
      row recomputed too. concurrency: requests in flight for per-row engines (llama.cpp:
      default GET /props' total_slots; routed experts: ROUTES_CONCURRENCY; ``complete`` on
      vLLM / SGLang: ROW_CONCURRENCY). extra_body: more
      request fields.
    route_layout: the policy's ``record.RouteLayout.of(model_cfg)``; required with
      ``cfg.record_routes`` (engine "sglang": Rollout.routed_experts, module docstring).
    log: gets the measured log-prob gap of every call (default print; None: silent).
    """

    def __init__(self, url: str, cfg: SamplerConfig, vocab_size: int, *,
                 recompute: Callable | None = None, model: str | None = None,
                 timeout: float = 120.0, check_rows: int = 8,
                 tolerances: Tolerances | None = None, api_key: str | None = None,
                 extra_body: dict | None = None, engine: str = "auto",
                 precision: str = "bf16", check_tokens: int = 8,
                 concurrency: int | None = None,
                 log: Callable[[str], None] | None = print,
                 route_layout: RouteLayout | None = None):
        check_int("vocab_size", vocab_size, 1)
        check_int("check_rows", check_rows, 0)
        check_int("check_tokens", check_tokens, 0)
        if concurrency is not None:
            check_int("concurrency", concurrency, 1)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
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
        if cfg.record_routes and not isinstance(route_layout, RouteLayout):
            raise ValueError("record_routes=True needs route_layout=record.RouteLayout.of("
                             "model_cfg) (the policy's layers, sparse layers, top-k and "
                             f"experts) to read the engine's routed experts; got {route_layout!r}")
        for key in ("return_routed_experts", "routed_experts_start_len"):
            if key in (extra_body or {}):
                raise ValueError(f"extra_body[{key!r}]: the client sets return_routed_experts "
                                 "from SamplerConfig.record_routes and reads every position "
                                 "(no routed_experts_start_len); remove it")
        self.base = url.rstrip("/").removesuffix("/v1")
        self.cfg, self.vocab_size, self.recompute = cfg, vocab_size, recompute
        self.tolerances = tolerances if tolerances is not None else Tolerances.for_precision(
            precision)
        self.timeout, self.check_rows, self.check_tokens = timeout, check_rows, check_tokens
        self.api_key, self.extra_body, self._model = api_key, dict(extra_body or {}), model
        self.concurrency, self.log, self.route_layout = concurrency, log, route_layout
        self._engine = None if engine == "auto" else engine
        if self._engine is not None:
            self._check_engine_options(self._engine)
        self.last_check: dict = {}

    def _check_engine_options(self, engine: str):
        if self.cfg.record_routes and engine != "sglang":
            raise ValueError(f"record_routes=True reads routed experts in SGLang's "
                             f"return_routed_experts style; the engine is {engine!r}: serve the "
                             "model with SGLang (--enable-return-routed-experts) and pass "
                             "engine='sglang'")
        if engine != "llama.cpp":
            return
        for key, why in _LLAMA_CPP_REFUSED.items():
            if key in self.extra_body:
                raise ValueError(f"extra_body[{key!r}] with engine='llama.cpp': {why}; remove it")
        c = self.cfg
        if not c.greedy and c.temperature != 1.0 and (c.top_p < 1.0 or c.top_k > 0):
            raise ValueError(
                f"temperature={c.temperature:g} with top_p={c.top_p:g} / top_k={c.top_k} on "
                "llama.cpp: its log-probs are at temperature 1 before the sampling chain, and "
                "the tempered ones (post_sampling_probs) come after the top-p / top-k "
                "truncation, renormalised and without the zeroed tokens (trap b); use "
                "top_p=1, top_k=0 at this temperature, or temperature 1")

    def _models(self) -> dict:
        url = f"{self.base}/v1/models"
        body = http_json(url, timeout=self.timeout, api_key=self.api_key)
        try:
            entry = body["data"][0]
            entry["id"]
        except (KeyError, IndexError, TypeError):
            raise EngineError(f"{url} lists no model ({str(body)[:200]}); pass "
                              "EngineClient(model=..., engine=...)") from None
        return entry

    @property
    def engine(self) -> str:
        """The engine dialect (engine="auto": from GET /v1/models' owned_by)."""
        if self._engine is None:
            entry = self._models()
            self._model = self._model or entry["id"]
            engine = _OWNERS.get(str(entry.get("owned_by", "")).lower(), "vllm")
            self._check_engine_options(engine)
            self._engine = engine
        return self._engine

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self._models()["id"]
        return self._model

    def _slots(self) -> int:
        if self.concurrency is None and self.cfg.record_routes:
            self.concurrency = ROUTES_CONCURRENCY
        if self.concurrency is None:
            url = f"{self.base}/props"
            body = http_json(url, timeout=self.timeout, api_key=self.api_key)
            slots = body.get("total_slots") if isinstance(body, dict) else None
            if not isinstance(slots, int) or slots < 1:
                raise EngineError(f"{url} has no total_slots ({str(body)[:200]}); pass "
                                  "EngineClient(concurrency=...)")
            self.concurrency = slots
        return self.concurrency

    def generate(self, prompts, group_size: int, *, seed: int | None = None) -> Rollout:
        """``prompts``: token-id lists or a 2-D int array (``sampler.as_prompt_list``)."""
        prompts = as_prompt_list(prompts, self.vocab_size, self.cfg.max_prompt_len)
        check_int("group_size", group_size, 1)
        url = f"{self.base}/v1/completions"
        engine, model = self.engine, self.model
        if engine == "llama.cpp" or self.cfg.record_routes:  # one request per row
            bodies = [build_request(
                [p], 1, self.cfg, model=model, engine=engine, extra=self.extra_body,
                seed=None if seed is None else row_seed(seed, i, s))
                for i, p in enumerate(prompts) for s in range(group_size)]
            answer = self._post_rows(url, bodies, self._slots())
        else:
            body = build_request(prompts, group_size, self.cfg, model=model, seed=seed,
                                 extra=self.extra_body, engine=engine)
            answer = http_json(url, body, timeout=self.timeout, api_key=self.api_key)
        r = rollout_from_response(answer, prompts, group_size, self.cfg, self.vocab_size, url,
                                  engine=engine, route_layout=self.route_layout)
        if self.check_rows:
            self.last_check = check_logprobs(
                r, self.recompute, self.cfg, rows=self.check_rows, tol=self.tolerances, url=url,
                tokens=self.check_tokens, seed=seed, engine=engine, log=self.log)
        return r

    def _post_rows(self, url: str, bodies: list, slots: int) -> list:
        """POSTs one request body per row, ``slots`` in flight; the answers in row order."""
        post = functools.partial(http_json, url, timeout=self.timeout, api_key=self.api_key)
        pool = concurrent.futures.ThreadPoolExecutor(slots)
        try:
            return list(pool.map(post, bodies))
        finally:  # on the first failure, the queued rows are not sent
            pool.shutdown(wait=False, cancel_futures=True)

    def complete(self, prompts, max_tokens, *, seeds: Sequence[int | None] | None = None
                 ) -> list[Completion]:
        """One completion per token-id prompt (multi-turn: each prompt an episode's history).

        ``max_tokens``: an int for every row, or one per row (each >= 1; the SamplerConfig's
        max_new_tokens does not apply); ``seeds``: one per row (None: the engine's own
        randomness). ONE REQUEST PER ROW (n=1), ``concurrency`` in flight (module docstring:
        Multi-turn); every row is parsed and checked as ``generate``'s rows are (the prompt-id
        echo, ``rollout_from_response``'s structure rules and ``check_logprobs`` with the
        prompt as context), in groups of equal max_tokens. Returns the rows' Completions."""
        if self.cfg.record_routes:
            raise ValueError("EngineClient.complete does not record routed experts (R3): a "
                             "multi-turn episode's routes would span several requests; set "
                             "SamplerConfig.record_routes=False")
        prompts = as_prompt_list(prompts, self.vocab_size, self.cfg.max_prompt_len)
        b = len(prompts)
        limits = [max_tokens] * b if np.ndim(max_tokens) == 0 else list(max_tokens)
        seeds = [None] * b if seeds is None else list(seeds)
        if len(limits) != b or len(seeds) != b:
            raise ValueError(f"{b} prompts but {len(limits)} max_tokens and {len(seeds)} seeds; "
                             "give one per prompt (max_tokens may be one int)")
        for i, m in enumerate(limits):
            check_int(f"max_tokens[{i}]", m, 1)
        limits = [int(m) for m in limits]
        url = f"{self.base}/v1/completions"
        engine, model = self.engine, self.model
        cfgs = {m: dataclasses.replace(self.cfg, max_new_tokens=m) for m in set(limits)}
        bodies = [build_request([p], 1, cfgs[m], model=model, engine=engine,
                                extra=self.extra_body, seed=sd)
                  for p, m, sd in zip(prompts, limits, seeds)]
        slots = self.concurrency or (self._slots() if engine == "llama.cpp" else ROW_CONCURRENCY)
        answers = self._post_rows(url, bodies, slots)
        out: list = [None] * b
        for m, cfg in sorted(cfgs.items()):
            rows = [i for i in range(b) if limits[i] == m]
            r = rollout_from_response([answers[i] for i in rows], [prompts[i] for i in rows], 1,
                                      cfg, self.vocab_size, url, engine=engine)
            if self.check_rows:
                first = next((sd for sd in (seeds[i] for i in rows) if sd is not None), None)
                self.last_check = check_logprobs(
                    r, self.recompute, cfg, rows=self.check_rows, tol=self.tolerances, url=url,
                    tokens=self.check_tokens, seed=first, engine=engine, log=self.log)
            host = jax.device_get((r.response_tokens, r.response_mask, r.rollout_logp,
                                   r.rollout_topk_ids, r.rollout_topk_logp, r.finish_reason))
            toks, mask, logp, tk_ids, tk_logp, finish = host
            for j, i in enumerate(rows):
                n = int(mask[j].sum())
                out[i] = Completion(
                    ids=np.asarray(toks[j, :n], np.int32), logp=np.asarray(logp[j, :n], np.float32),
                    topk_ids=None if tk_ids is None else np.asarray(tk_ids[j, :n], np.int32),
                    topk_logp=None if tk_logp is None else np.asarray(tk_logp[j, :n], np.float32),
                    eos=bool(finish[j] == FINISH_EOS))
        return out
