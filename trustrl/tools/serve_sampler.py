"""A local vLLM-style /v1/completions server backed by trustrl's Sampler (tests and demos).

    with SamplerServer(params, model_cfg) as server:          # 127.0.0.1, ephemeral port
        client = EngineClient(server.url, SamplerConfig(...), model_cfg.vocab_size, ...)

    python -m trustrl.tools.serve_sampler --hf_dir assets/smollm2-135m --port 8000
    python -m trustrl.tools.serve_sampler --tiny_vocab 128        # random tiny model

Serves GET /v1/models and POST /v1/completions (stdlib ThreadingHTTPServer; requests run one
at a time). It binds 127.0.0.1 only. A request is what ``trustrl.rollout.engine_client`` sends:
token-id
``prompt`` (a list of ints or a list of such lists), ``n``, ``max_tokens``, ``temperature`` (0:
greedy), ``top_p``, ``top_k`` (<= 0: off), ``logprobs`` (K <= ``max_logprobs``, default 20, as
vLLM), ``stop_token_ids``, ``seed`` (the sampler's key is jax.random.key(seed); without one a
server-side counter), ``return_tokens_as_token_ids``. The whole request is one
``Sampler.generate`` call, so a seeded answer equals the trustrl sampler's own record for the
same prompts, group size and key. The answer is vLLM's: choice index = prompt * n + sample,
``logprobs = {tokens, token_logprobs, top_logprobs, text_offset}`` where top_logprobs holds the
K most likely tokens plus the sampled one (tokens as "token_id:N" when requested, else
``detokenize``'s text), -inf written as -9999.0, finish_reason "stop" (EOS) or "length".
Other fields (ignore_eos, echo=false, skip_special_tokens, stream=false, neutral min_p and
penalties) are accepted; no EOS other than stop_token_ids is used (as vLLM with ignore_eos).
``return_routed_experts: true`` (a mixture-of-experts model) answers as SGLang does: a
response-level ``sglext.routed_experts``, base64 of the FIRST choice's int32 ids [prompt +
completion - 1, num_layers, top_k] (the sampler's Rollout.routed_experts; dense layers 0).

``logprobs_mode`` (settable between requests) emulates engines on purpose:
  "processed"               log softmax(logits / T) over the full vocabulary: trustrl's contract
                            (the sampler's own record).
  "raw_before_temperature"  log softmax(logits): trap (a) when T != 1 (vLLM's raw_logprobs).
  "renormalised_truncated"  log softmax of the top-p / top-k truncated tempered logits: trap (b)
                            when truncation is on (vLLM's processed_logprobs).
The two trap modes recompute log-probs of the sampled tokens with a teacher-forced forward of
the same parameters (``policy.response_logits``). ``update_params`` swaps the weights (what a
real engine's weight reload does).
"""
from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import sys
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from trustrl.model import policy
from trustrl.model.transformer import DTYPES
from trustrl.rollout.record import FINISH_EOS
from trustrl.rollout.sampler import Sampler, SamplerConfig, filter_logits

LOGPROBS_MODES = ("processed", "raw_before_temperature", "renormalised_truncated")
NEG_INF = -9999.0  # vLLM's OpenAI layer clamps log-probs to this (JSON has no -inf)


class RequestError(ValueError):
    """A bad request: answered with HTTP ``code`` and the message."""

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


def _field(body: dict, name: str, kind, default):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise RequestError(f"{name} must be {kind.__name__}, got {value!r}")
    return value


@functools.partial(jax.jit, static_argnames=("model_cfg", "num_response", "mode", "temperature",
                                             "top_p", "top_k", "k"))
def _emulated_logprobs(params, tokens, positions, valid, *, model_cfg, num_response, mode,
                       temperature, top_p, top_k, k):
    """The trap modes' log-probs: (sampled [B, N], top values [B, N, k], top ids [B, N, k])."""
    logits = policy.response_logits(params, model_cfg, tokens, positions, valid,
                                    num_response=num_response).astype(jnp.float32)
    if mode == "raw_before_temperature":
        lp = jax.nn.log_softmax(logits, axis=-1)
    else:  # renormalised_truncated
        b, n, v = logits.shape
        tempered = jax.nn.log_softmax(logits / temperature, axis=-1).reshape(b * n, v)
        lp = jax.nn.log_softmax(filter_logits(tempered, top_p, top_k), axis=-1).reshape(b, n, v)
    sampled = jnp.take_along_axis(lp, tokens[:, -num_response:, None], axis=-1)[..., 0]
    top_v, top_i = jax.lax.top_k(lp, k)  # decreasing, ties: lower id first
    return sampled, top_v, top_i


class SamplerServer:
    """/v1/completions from ``trustrl.rollout.sampler.Sampler`` on ``params`` (module docstring).

    params, model_cfg: the policy (the trainer's fp32 parameters); rollout_dtype: the precision
    the server samples at (policy.rollout_config / cast_params). A context manager: the server
    runs in a daemon thread from ``start`` (or ``with``) to ``close``; ``url`` is its base.
    """

    def __init__(self, params, model_cfg, *, rollout_dtype: str = "float32",
                 logprobs_mode: str = "processed", model_name: str = "trustrl",
                 port: int = 0, seed: int = 0, max_logprobs: int = 20,
                 min_prompt_bucket: int = 16, max_prompt_len: int = 2048,
                 detokenize=None, verbose: bool = False):
        self.roll_cfg = policy.rollout_config(model_cfg, rollout_dtype)
        self.logprobs_mode = logprobs_mode
        self.update_params(params)
        self.model_name, self.max_logprobs, self.verbose = model_name, max_logprobs, verbose
        self.min_prompt_bucket, self.max_prompt_len = min_prompt_bucket, max_prompt_len
        self.detokenize = detokenize or (lambda i: f"<{i}>")
        self._decode_model = policy.decode_model(self.roll_cfg)
        self._samplers: dict = {}
        self._lock = threading.Lock()
        self._key, self._calls = jax.random.key(seed), 0
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self
        self._thread = None

    # -- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "SamplerServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                            name="serve_sampler")
            self._thread.start()
        return self

    def close(self):
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def update_params(self, params):
        """New weights for the next requests (cast to the rollout precision)."""
        self.params = policy.cast_params(params, self.roll_cfg)

    @property
    def logprobs_mode(self) -> str:
        return self._mode

    @logprobs_mode.setter
    def logprobs_mode(self, mode: str):
        if mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {mode!r}")
        self._mode = mode

    # -- the API
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "owned_by": "trustrl", "created": 0}]}

    def completions(self, body) -> dict:
        """The answer to one /v1/completions request body (RequestError when invalid)."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") not in (None, self.model_name):
            raise RequestError(f"The model `{body['model']}` does not exist (served: "
                               f"{self.model_name!r})", 404)
        if body.get("stream"):
            raise RequestError("stream=true is not supported by this test server")
        if body.get("echo"):
            raise RequestError("echo=true is not supported by this test server")
        for name, neutral in (("min_p", 0.0), ("repetition_penalty", 1.0),
                              ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
            if body.get(name, neutral) not in (None, neutral):
                raise RequestError(f"{name}={body[name]!r} is not supported by this test "
                                   f"server (only {neutral})")
        prompts = body.get("prompt")
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]
        if not (isinstance(prompts, list) and prompts and all(
                isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in p) for p in prompts)):
            raise RequestError("prompt must be token ids: a list of ints or a list of such "
                               "lists (this server has no tokenizer)")
        n = _field(body, "n", int, 1)
        temperature = _field(body, "temperature", float, 1.0)
        top_k = _field(body, "top_k", int, 0)
        k = body.get("logprobs")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)
                              or not 0 <= k <= self.max_logprobs):
            raise RequestError(f"logprobs must be an int in [0, {self.max_logprobs}] "
                               f"(max_logprobs), got {k!r}")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError(f"seed must be an int, got {seed!r}")
        greedy = temperature == 0.0
        routes = body.get("return_routed_experts", False)
        if not isinstance(routes, bool):
            raise RequestError(f"return_routed_experts must be a bool, got {routes!r}")
        try:
            cfg = SamplerConfig(
                max_new_tokens=_field(body, "max_tokens", int, 16),
                temperature=1.0 if greedy else temperature, greedy=greedy,
                top_p=_field(body, "top_p", float, 1.0), top_k=max(top_k, 0),
                eos_ids=tuple(_field(body, "stop_token_ids", list, [])),
                record_topk=0 if k is None else min(k + 1, self.roll_cfg.vocab_size),
                min_prompt_bucket=self.min_prompt_bucket, max_prompt_len=self.max_prompt_len,
                record_routes=routes)
            cfg.validate(self.roll_cfg.vocab_size)
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None
        as_ids = bool(body.get("return_tokens_as_token_ids", False))
        with self._lock:
            if seed is None:
                key = jax.random.fold_in(self._key, self._calls)
                self._calls += 1
            else:
                key = jax.random.key(seed)
            try:
                sampler = self._samplers.get(cfg)
                if sampler is None:
                    sampler = self._samplers[cfg] = Sampler(self._decode_model, cfg)
                r = sampler.generate(self.params, prompts, n, key)
            except (TypeError, ValueError) as e:
                raise RequestError(str(e)) from None
            choices = self._choices(r, cfg, k, as_ids)
        used = int(np.asarray(r.response_mask).sum())
        prompt_used = int(np.asarray(r.prompt_mask).sum()) // n
        answer = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                  "created": int(time.time()), "model": self.model_name, "choices": choices,
                  "usage": {"prompt_tokens": prompt_used, "completion_tokens": used,
                            "total_tokens": prompt_used + used}}
        if routes:
            answer["sglext"] = {"routed_experts": self._first_choice_routes(r)}
        return answer

    def _first_choice_routes(self, r) -> str:
        """SGLang's sglext.routed_experts of the first choice: base64 of int32 [prompt +
        completion - 1, num_layers, top_k] (the sampler's record at the row's processed
        positions, every layer; layers without experts 0)."""
        c = self.roll_cfg
        width = r.prompt_tokens.shape[1]
        plen, m = int(np.asarray(r.prompt_mask)[0].sum()), int(np.asarray(r.response_mask)[0].sum())
        ids = np.asarray(r.routed_experts)[0, width - plen:width + m - 1].astype(np.int32)
        full = np.zeros((ids.shape[0], c.num_layers, c.num_experts_per_tok), np.int32)
        full[:, list(c.sparse_layers)] = ids
        return base64.b64encode(full.tobytes()).decode("ascii")

    def _choices(self, r, cfg: SamplerConfig, k, as_ids: bool) -> list:
        tokens, mask = np.asarray(r.response_tokens), np.asarray(r.response_mask)
        finish = np.asarray(r.finish_reason)
        if k is None:
            logp = top_v = top_i = None
        elif self.logprobs_mode == "processed":  # the sampler's record: top K+1 with the
            logp = np.asarray(r.rollout_logp)     # sampled token forced last; the first K are
            top_v = np.asarray(r.rollout_topk_logp)[..., :k]  # the true top K
            top_i = np.asarray(r.rollout_topk_ids)[..., :k]
        else:
            out = _emulated_logprobs(
                self.params, r.tokens, r.positions, r.valid_mask, model_cfg=self.roll_cfg,
                num_response=tokens.shape[1], mode=self.logprobs_mode,
                temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=cfg.top_k,
                k=max(k, 1))
            logp, top_v, top_i = (np.asarray(x) for x in out)
            top_v, top_i = top_v[..., :k], top_i[..., :k]
        name = (lambda i: f"token_id:{i}") if as_ids else self.detokenize
        choices = []
        for row in range(tokens.shape[0]):
            m = int(mask[row].sum())
            ids = tokens[row, :m].tolist()
            texts = [self.detokenize(i) for i in ids]
            choice = {"index": row, "text": "".join(texts), "logprobs": None,
                      "finish_reason": "stop" if finish[row] == FINISH_EOS else "length",
                      "stop_reason": ids[-1] if finish[row] == FINISH_EOS else None}
            if logp is not None:
                clamp = lambda x: max(float(x), NEG_INF)
                tops = []
                for t in range(m):
                    top = {name(int(i)): clamp(v) for i, v in zip(top_i[row, t], top_v[row, t])}
                    top[name(ids[t])] = clamp(logp[row, t])
                    tops.append(top)
                offsets = np.cumsum([0] + [len(s) for s in texts[:-1]]).tolist()
                choice["logprobs"] = {"tokens": [name(i) for i in ids],
                                      "token_logprobs": [clamp(x) for x in logp[row, :m]],
                                      "top_logprobs": tops, "text_offset": offsets}
            choices.append(choice)
        return choices


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "trustrl-serve-sampler/0.1"

    def _send(self, code: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str):
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(code, "InternalServerError")
        self._send(code, {"object": "error", "message": message, "type": kind, "param": None,
                          "code": code})

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._send(200, self.server.app.models())
        elif path in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        else:
            self._error(404, f"no route {path!r}; GET /v1/models, POST /v1/completions")

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        if path != "/v1/completions":
            self._error(404, f"no route {path!r}; POST /v1/completions")
            return
        try:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
        except ValueError as e:
            self._error(400, f"the request body is not JSON: {e}")
            return
        try:
            answer = self.server.app.completions(body)
        except RequestError as e:
            self._error(e.code, str(e))
            return
        except Exception as e:  # noqa: BLE001 (the client gets the reason, the server lives on)
            self._error(500, f"{type(e).__name__}: {e}")
            return
        self._send(200, answer)

    def log_message(self, fmt, *args):
        if self.server.app.verbose:
            super().log_message(fmt, *args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m trustrl.tools.serve_sampler",
        description="Serve /v1/completions (vLLM format, token-id prompts) from trustrl's "
                    "Sampler on 127.0.0.1, for trustrl.rollout.engine_client tests and demos.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf_dir",
                     help="a Hugging Face model directory (trustrl.model.hf.load_hf_dir)")
    src.add_argument("--tiny_vocab", type=int, help="a random tiny model with this vocabulary")
    ap.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="rollout precision (default float32)")
    ap.add_argument("--logprobs_mode", default="processed", choices=LOGPROBS_MODES,
                    help="processed: trustrl's contract; the others emulate the traps")
    ap.add_argument("--model_name", default="trustrl", help="the served model id")
    ap.add_argument("--seed", type=int, default=0, help="key of unseeded requests")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    detokenize = None
    if args.hf_dir:
        import os

        from trustrl.model import hf
        model_cfg, params = hf.load_hf_dir(args.hf_dir)
        if os.path.exists(os.path.join(args.hf_dir, "tokenizer.json")):
            from trustrl.data.tokenizer import Tokenizer
            tok = Tokenizer.from_dir(args.hf_dir)
            detokenize = lambda i: tok.decode([i])  # noqa: E731
    else:
        from trustrl.model import transformer as model_lib
        model_cfg = model_lib.ModelConfig.tiny(args.tiny_vocab)
        params = model_lib.init_params(model_cfg, jax.random.key(args.seed))
    server = SamplerServer(params, model_cfg, rollout_dtype=args.dtype,
                           logprobs_mode=args.logprobs_mode, model_name=args.model_name,
                           port=args.port, seed=args.seed, detokenize=detokenize,
                           verbose=args.verbose)
    print(f"serving {args.model_name!r} at {server.url}/v1/completions "
          f"(logprobs_mode={args.logprobs_mode}, {args.dtype}); Ctrl-C stops", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
