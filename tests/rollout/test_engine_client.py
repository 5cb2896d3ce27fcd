"""trustrl.rollout.engine_client against a local vLLM-style server (trustrl.tools.serve_sampler).

The server samples with trustrl's own Sampler, so a seeded request must give back exactly the
record the sampler produces; its trap modes return the log-probs that real engines get wrong,
and the client must refuse them by comparing with a real trainer-side recompute.
"""
import base64
import contextlib
import dataclasses
import gzip
import http.server
import json
import pathlib
import socket
import threading
import time

import jax
import numpy as np
import pytest

from trustrl.rollout import engine_client as ec
from trustrl.model import transformer as M
from trustrl.model import policy
from trustrl.rollout import record as rollout_lib
from trustrl.rollout.sampler import Sampler, SamplerConfig, left_pad
from trustrl.tools import serve_sampler

V, K, N, SEED = 128, 4, 6, 3
EOS = tuple(range(1, 20))  # ~15% of the mass: some rows stop early, some run to max_tokens
FIELDS = ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask", "rollout_logp",
          "rollout_topk_ids", "rollout_topk_logp", "finish_reason", "group_index")


def _perturbed(params, seed):
    """Random init has unit norms / zero biases: perturb every parameter."""
    paths, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(paths))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for (_, x), k in zip(paths, keys)])


@pytest.fixture(scope="module")
def policy_():
    cfg = M.ModelConfig.tiny(V)
    return cfg, _perturbed(M.init_params(cfg, jax.random.key(0)), 1)


@pytest.fixture(scope="module")
def server(policy_):
    cfg, params = policy_
    with serve_sampler.SamplerServer(params, cfg) as s:
        yield s


@pytest.fixture
def mode(server):
    """Sets the server's logprobs_mode for one test (restored afterwards)."""
    def set_mode(m):
        server.logprobs_mode = m
    yield set_mode
    server.logprobs_mode = "processed"


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V, n).tolist() for n in lengths]


def _client(server, policy_, **kw):
    cfg, params = policy_
    scfg = SamplerConfig(**{**dict(max_new_tokens=N, record_topk=K, eos_ids=EOS,
                                   temperature=0.7), **kw})
    return ec.EngineClient(server.url, scfg, V, recompute=ec.policy_recompute(params, cfg))


def test_round_trip_equals_the_trustrl_sampler(server, policy_):
    cfg, params = policy_
    client = _client(server, policy_)
    prompts = _prompts((3, 9, 5))
    r = client.generate(prompts, 2, seed=SEED)
    rollout_lib.validate(r, vocab_size=V)
    want = Sampler(policy.decode_model(cfg), client.cfg).generate(
        params, prompts, 2, jax.random.key(SEED))
    for f in FIELDS:  # tokens, log-probs and top-K bit for bit (float32 survives JSON)
        np.testing.assert_array_equal(getattr(r, f), getattr(want, f), err_msg=f)
    finish = np.asarray(r.finish_reason).tolist()
    assert rollout_lib.FINISH_EOS in finish and rollout_lib.FINISH_LENGTH in finish, finish
    assert client.last_check["tokens"] > 10 and client.last_check["mean_abs"] < 1e-5


def test_left_padding_and_group_layout(server, policy_):
    client = _client(server, policy_, temperature=1.0)
    prompts = _prompts((1, 17, 4), seed=1)  # 17 > 16: the prompt bucket is 32
    r = client.generate(prompts, 3, seed=0)
    rollout_lib.validate(r, vocab_size=V)
    assert r.prompt_tokens.shape == (9, 32) and r.response_tokens.shape == (9, N)
    np.testing.assert_array_equal(r.group_index, np.repeat([0, 1, 2], 3))
    toks, mask = left_pad([p for p in prompts for _ in range(3)], 32)
    np.testing.assert_array_equal(r.prompt_tokens, toks)
    np.testing.assert_array_equal(r.prompt_mask, mask)
    assert np.asarray(r.prompt_tokens)[0, :31].sum() == 0  # pad id 0 on the left
    # the first response token's RoPE position is the prompt's real length
    np.testing.assert_array_equal(np.asarray(r.positions)[:, 32],
                                  [len(p) for p in prompts for _ in range(3)])
    lengths = np.asarray(r.response_mask).sum(1)
    for row in range(9):  # mask 1 up to and including EOS, then id 0 / log-prob 0 / top-K pad
        m = int(lengths[row])
        assert np.all(np.asarray(r.response_mask)[row, :m] == 1)
        assert not np.asarray(r.response_tokens)[row, m:].any()
        assert not np.asarray(r.rollout_logp)[row, m:].any()
        assert not np.asarray(r.rollout_topk_ids)[row, m:].any()
        last = int(r.response_tokens[row, m - 1])
        assert (last in EOS) == (int(r.finish_reason[row]) == rollout_lib.FINISH_EOS)
    # top-K sorted by decreasing log-prob; the sampled token is in the set
    ids, lp = np.asarray(r.rollout_topk_ids), np.asarray(r.rollout_topk_logp)
    live = np.asarray(r.response_mask) > 0
    assert np.all(np.diff(lp[live], axis=-1) <= 0)  # a forced sampled token is below the rest
    assert np.all((ids[live] == np.asarray(r.response_tokens)[live][:, None]).any(-1))


def test_raw_before_temperature_is_refused(server, policy_, mode):
    mode("raw_before_temperature")
    with pytest.raises(ec.EngineLogprobError, match="trap \\(a\\), log-probs taken before "
                       "temperature") as e:
        _client(server, policy_).generate(_prompts((3, 9, 5)), 2, seed=SEED)
    assert e.value.trap == "before_temperature"
    assert e.value.stats["mean_abs_at_t1"] < 1e-4 < 0.05 < e.value.stats["mean_abs"]
    assert server.url in str(e.value)


@pytest.mark.filterwarnings("ignore:top_p=.* truncate the sampling distribution")
@pytest.mark.parametrize("truncation", [dict(top_p=0.8), dict(top_k=8)])
def test_renormalised_truncation_is_refused(server, policy_, mode, truncation):
    client = _client(server, policy_, **truncation)
    prompts = _prompts((3, 9, 5))
    r = client.generate(prompts, 2, seed=SEED)  # processed: untruncated log-probs pass
    rollout_lib.validate(r, vocab_size=V)
    assert client.last_check["mean_abs"] < 1e-5
    mode("renormalised_truncated")
    with pytest.raises(ec.EngineLogprobError, match="trap \\(b\\), log-probs renormalised "
                       "after top-p / top-k truncation") as e:
        client.generate(prompts, 2, seed=SEED)
    assert e.value.trap == "renormalised_truncation"
    # every token's log-prob rose by -log(kept mass) > 0
    assert e.value.stats["frac_higher"] == 1.0 and e.value.stats["downward"] == 0
    assert e.value.stats["mean"] > 0.1


def test_other_weights_are_refused(server, policy_):
    cfg, params = policy_
    server.update_params(_perturbed(M.init_params(cfg, jax.random.key(5)), 2))
    try:
        with pytest.raises(ec.EngineLogprobError, match="weights differ from the trainer's"
                           ) as e:
            _client(server, policy_).generate(_prompts((3, 9, 5)), 2, seed=SEED)
    finally:
        server.update_params(params)
    # sharper than the trainer on its own samples (signed mean > 0), but two-sided
    assert e.value.trap == "mismatch" and e.value.stats["mean_abs"] > 0.05
    assert e.value.stats["downward"] > 0.02


def test_bf16_engine_against_fp32_trainer_passes(policy_):
    """Real precision noise (bf16 engine, fp32 recompute) stays inside the tolerances."""
    cfg, params = policy_
    with serve_sampler.SamplerServer(params, cfg, rollout_dtype="bfloat16") as s:
        client = _client(s, policy_, max_new_tokens=12)
        rollout_lib.validate(client.generate(_prompts((3, 9, 5)), 2, seed=SEED), V)
    st = client.last_check
    # measured mean |diff| 0.004, signed mean 1e-4: two-sided noise
    assert 1e-4 < st["mean_abs"] < ec.Tolerances().max_mean_abs / 4, st
    assert abs(st["mean"]) < ec.Tolerances().min_signal / 4, st


# ---------------------------------------------------------------- errors without a model


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_names_the_url():
    url = f"http://127.0.0.1:{_free_port()}"
    client = ec.EngineClient(url, SamplerConfig(max_new_tokens=4, record_topk=2), V,
                             check_rows=0, model="m", timeout=5, engine="vllm")
    with pytest.raises(ec.EngineError, match=f"cannot reach the rollout engine at {url}"):
        client.generate([[1, 2]], 1)


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's (status, body bytes, delay)."""

    def _answer(self):
        status, body, delay = self.server.canned
        time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client timed out and closed the connection
            pass

    do_GET = do_POST = _answer

    def log_message(self, *a):
        pass


@contextlib.contextmanager
def _http_server(handler):
    """A threaded local HTTP server with ``handler``, shut down when the block ends."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def canned():
    with _http_server(_Canned) as httpd:
        yield httpd


def _choice(tokens, logps, tops=None, finish="length", index=0):
    return {"index": index, "text": "", "finish_reason": finish,
            "logprobs": {"tokens": tokens, "token_logprobs": logps, "text_offset": [0] * len(
                tokens), "top_logprobs": tops}}


def test_malformed_and_failed_answers_are_clear(canned):
    url = f"http://127.0.0.1:{canned.server_address[1]}"
    client = ec.EngineClient(url, SamplerConfig(max_new_tokens=2, record_topk=0), V,
                             check_rows=0, model="m", timeout=0.5, engine="vllm")
    cases = [
        ((200, b"<html>not json", 0), f"malformed JSON from the rollout engine at {url}"),
        ((500, json.dumps({"object": "error", "message": "CUDA out of memory"}).encode(), 0),
         f"{url}/v1/completions answered HTTP 500.*CUDA out of memory"),
        ((200, json.dumps({"choices": [_choice(["a", "b"], [-1.0, -2.0])]}).encode(), 0),
         "'a' .* not of the form 'token_id:N'.*return_tokens_as_token_ids"),
        ((200, json.dumps({"choices": [{"index": 0, "finish_reason": "length"}]}).encode(), 0),
         "choice 0 .* has no logprobs object"),
        ((200, json.dumps({"choices": []}).encode(), 0), "returned 0 choices .* expected 1"),
        ((200, b"{}", 1.5), f"no answer from the rollout engine at {url}.* within 0.5 s"),
    ]
    for answer, message in cases:
        canned.canned = answer
        with pytest.raises(ec.EngineError, match=message):
            client.generate([[5, 6]], 1)


def test_the_local_server_answers_bad_requests_with_400(server, policy_):
    client = _client(server, policy_, record_topk=21)  # vLLM's default max_logprobs is 20
    with pytest.raises(ec.EngineError, match="HTTP 400.*logprobs must be an int in \\[0, 20\\]"):
        client.generate([[1, 2]], 1)
    with pytest.raises(ec.EngineError, match="HTTP 404.*does not exist"):
        ec.EngineClient(server.url, client.cfg, V, check_rows=0, model="other").generate(
            [[1, 2]], 1)


# ----------------------------------------------------------- the record-building rules


def _build(choices, k=3, eos=(7,), n=3, group=1, prompts=([4, 5],)):
    cfg = SamplerConfig(max_new_tokens=n, record_topk=k, eos_ids=eos)
    return ec.rollout_from_response({"choices": choices}, [np.asarray(p) for p in prompts],
                                    group, cfg, V)


def test_topk_order_and_the_forced_sampled_token():
    t = lambda i: f"token_id:{i}"  # noqa: E731
    # position 0: sampled 9 absent from the top 3 (vLLM sends top K + the sampled token)
    # position 1: ties sort by lower id; sampled 3 inside the top 3
    tops = [{t(1): -0.5, t(2): -1.0, t(3): -2.0, t(9): -4.0},
            {t(5): -1.0, t(3): -1.0, t(8): -1.5, t(6): -3.0}]
    r = _build([_choice([t(9), t(3)], [-4.0, -1.0], tops, finish="stop")], eos=(3,))
    np.testing.assert_array_equal(r.rollout_topk_ids[0, :2], [[1, 2, 9], [3, 5, 8]])
    np.testing.assert_array_equal(r.rollout_topk_logp[0, :2], [[-0.5, -1.0, -4.0],
                                                               [-1.0, -1.0, -1.5]])
    np.testing.assert_array_equal(r.rollout_topk_ids[0, 2], 0)  # padding after EOS
    np.testing.assert_array_equal(r.response_mask, [[1, 1, 0]])
    assert int(r.finish_reason[0]) == rollout_lib.FINISH_EOS
    rollout_lib.validate(r, V)


def test_finish_reasons_and_refused_answers():
    t = lambda i: f"token_id:{i}"  # noqa: E731
    top = lambda i, lp: {t(i): lp, t(i + 1): lp - 1, t(i + 2): lp - 2}  # noqa: E731
    ok = lambda ids, finish: _choice([t(i) for i in ids], [-0.1] * len(ids),  # noqa: E731
                                     [top(i, -0.1) for i in ids], finish)
    # an engine may report "length" when EOS is the max_tokens-th token: the sampler says EOS
    assert int(_build([ok([4, 5, 7], "length")]).finish_reason[0]) == rollout_lib.FINISH_EOS
    assert int(_build([ok([4, 5, 6], "length")]).finish_reason[0]) == rollout_lib.FINISH_LENGTH
    refused = [
        ([ok([7, 5, 6], "length")], "continues after EOS id 7"),
        ([ok([4, 5], "stop")], "finished with 'stop' .* not an EOS id"),
        ([ok([4, 5], "length")], "stopped for length after 2 < max_tokens=3"),
        ([_choice([t(7)], [-0.1], [{t(7): -0.1}], "stop")], "1 top_logprobs .* expected at "
         "least K=3"),
        ([_choice([t(7)], [-0.1], [{t(7): -0.2, t(1): -3, t(2): -4}], "stop")],
         "log-prob -0.1 in token_logprobs but -0.2 in top_logprobs"),
        ([ok([4, 5, 500], "length")], "token ids \\[500\\] outside \\[0, 128\\)"),
        ([_choice([t(4), t(5), t(6)], [0.5, -0.1, -0.1], [top(4, 0.5), top(5, -0.1),
                                                          top(6, -0.1)])],
         "fails rollout.validate: .*positive log-probs"),
        ([_choice([t(7)], [float("-inf")], [top(7, -1.0)], "stop")], "not a finite number"),
        ([ok([4, 5, 6], "length"), ok([4, 5, 6], "length")], "returned 2 choices"),
    ]
    for choices, message in refused:
        with pytest.raises(ec.EngineError, match=message):
            _build(choices)
    with pytest.raises(ec.EngineError, match="index 0: expected each of 0..1 once"):
        _build([ok([4, 5, 6], "length"), ok([4, 5, 6], "length")], group=2)


def test_request_fields():
    cfg = SamplerConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, eos_ids=(2, 3),
                        record_topk=20)
    body = ec.build_request([np.asarray([1, 2]), np.asarray([3])], 4, cfg, model="m", seed=7)
    assert body["prompt"] == [[1, 2], [3]] and body["n"] == 4 and body["logprobs"] == 20
    assert body["return_tokens_as_token_ids"] is True and body["stop_token_ids"] == [2, 3]
    assert body["ignore_eos"] is True and body["top_k"] == -1 and body["seed"] == 7
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 5
    with pytest.raises(ValueError, match="recompute is required"):
        ec.EngineClient("http://127.0.0.1:1", cfg, V)


def test_serve_sampler_help(capsys):
    with pytest.raises(SystemExit) as e:
        serve_sampler.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--logprobs_mode" in out and "raw_before_temperature" in out


# ------------------------------------------------------- chat-shape log-probs (llama.cpp)


def _entry(i, lp, top=(), raw=None):
    """A llama.cpp logprobs.content entry; raw: its bytes when not its own (a gap before it)."""
    own = list(f"<{i}>".encode())
    return {"id": i, "token": f"<{i}>", "bytes": own if raw is None else raw, "logprob": lp,
            "top_logprobs": [{"id": j, "token": f"<{j}>", "bytes": list(f"<{j}>".encode()),
                              "logprob": v} for j, v in top]}


def _answer(entries, finish="length", used=None, prompt_tokens=2):
    return {"choices": [{"text": "", "index": 0, "finish_reason": finish,
                         "logprobs": {"content": entries}}],
            "usage": {"completion_tokens": len(entries) if used is None else used,
                      "prompt_tokens": prompt_tokens}}


def _rows(answers, k=2, eos=(7,), n=3, group=1, prompts=([4, 5],)):
    cfg = SamplerConfig(max_new_tokens=n, record_topk=k, eos_ids=eos)
    return ec.rollout_from_response(answers, [np.asarray(p) for p in prompts], group, cfg, V,
                                    engine="llama.cpp")


def test_chat_shape_is_read_natively():
    tops = lambda i: [(i, -0.5), (i + 1, -1.5)]  # noqa: E731
    r = _rows([_answer([_entry(4, -0.5, tops(4)), _entry(9, -3.0, tops(5)),
                        _entry(7, -0.5, tops(7))], "stop")])
    np.testing.assert_array_equal(r.response_tokens, [[4, 9, 7]])
    np.testing.assert_allclose(r.rollout_logp, [[-0.5, -3.0, -0.5]])
    # the sampled 9 is not in its top 2: forced into the last slot
    np.testing.assert_array_equal(r.rollout_topk_ids[0], [[4, 5], [5, 9], [7, 8]])
    assert int(r.finish_reason[0]) == rollout_lib.FINISH_EOS
    # vLLM's chat endpoint: no 'id', the token as 'token_id:N'
    e = {"token": "token_id:4", "logprob": -0.1, "top_logprobs": [
        {"token": "token_id:4", "logprob": -0.1}, {"token": "token_id:3", "logprob": -2.5}]}
    r = _rows([_answer([e, e, e])])
    np.testing.assert_array_equal(r.response_tokens, [[4, 4, 4]])
    assert int(r.finish_reason[0]) == rollout_lib.FINISH_LENGTH


def test_gaps_are_refused_on_every_row():
    tops = lambda i: [(i, -0.5), (i + 1, -1.5)]  # noqa: E731
    ok = [_entry(4, -0.5, tops(4)), _entry(5, -0.5, tops(5)), _entry(7, -0.5, tops(7))]
    # usage counts one token more than the entries: an EOS-ended row with a gap is refused too
    with pytest.raises(ec.EngineError, match="choice 1 .* generated 4 tokens .* returned "
                       "log-probs for 3: 1 left out .*multi-byte UTF-8"):
        _rows([_answer(ok, "stop"), _answer(ok, "stop", used=4)], group=2)
    # a row cut at max_tokens with a gap is a gap, not "the engine's context limit"
    with pytest.raises(ec.EngineError, match="generated 3 tokens .* log-probs for 2"):
        _rows([_answer(ok[:2], "length", used=3)])
    # the bytes of a left-out token merged into the next entry (batched answers, no usage)
    gapped = _entry(5, -0.5, tops(5), raw=[0xE6, 0x96] + list(b"<5>"))
    body = _answer([ok[0], gapped, ok[2]], "stop")
    del body["usage"]
    with pytest.raises(ec.EngineError, match="choice 0 token 1 .* a gap before this token.*"
                       "b'\\\\xe6\\\\x96<5>'.* token 5 alone is b'<5>'"):
        _rows([body])
    # the prompt's length in usage: a row that answers another prompt
    with pytest.raises(ec.EngineError, match="usage.prompt_tokens 3, but its prompt 0 has 2"):
        _rows([_answer(ok, "stop", prompt_tokens=3)])


def test_post_sampling_probabilities_and_their_omissions():
    e = lambda i, p, top: {"id": i, "token": "x", "bytes": [120], "prob": p,  # noqa: E731
                           "top_probs": [{"id": j, "token": "x", "bytes": [120], "prob": q}
                                         for j, q in top]}
    r = _rows([_answer([e(4, 0.5, [(4, 0.5), (3, 0.25)])] * 3)])
    np.testing.assert_allclose(r.rollout_logp, np.log(0.5), rtol=1e-6)
    np.testing.assert_allclose(r.rollout_topk_logp[0, 0], np.log([0.5, 0.25]), rtol=1e-6)
    with pytest.raises(ec.EngineError, match="1 top_logprobs .* expected at least K=2 .*"
                       "post_sampling_probs it omits the tokens its sampling chain zeroed"):
        _rows([_answer([e(4, 1.0, [(4, 1.0)])] * 3)])
    with pytest.raises(ec.EngineError, match="'prob' 0 is not in \\(0, 1\\]"):
        _rows([_answer([e(4, 0, [(4, 0.5), (3, 0.5)])] * 3)])


def test_stopping_that_differs_from_the_request_is_refused():
    # EOS 7 holds half the mass at every position, yet no row ever ends: banned EOS
    runs_on = _entry(4, -0.7, [(4, -0.7), (7, -0.7)])
    many = [_answer([runs_on] * 24)] * 3
    with pytest.raises(ec.EngineError, match="runs on without an EOS id \\[7\\] although the "
                       "engine's own log-probs give them mass.*ignore_eos=true"):
        _rows(many, n=24, group=3)
    # the same mass over fewer tokens per row: only all rows together are conclusive
    few = [_answer([runs_on] * 8)] * 4
    with pytest.raises(ec.EngineError, match="none of the 4 choices .* ended on an EOS id"):
        _rows(few, n=8, group=4)
    # a row that ended on EOS breaks the all-rows test; low EOS mass never triggers it
    _rows(few[:3] + [_answer([runs_on] * 7 + [_entry(7, -0.7, [(4, -0.7), (7, -0.7)])],
                             "stop")], n=8, group=4)
    quiet = _entry(4, -0.01, [(4, -0.01), (7, -9.0)])
    _rows([_answer([quiet] * 24)] * 3, n=24, group=3)
    # an honest truncating / greedy sampler cannot draw an EOS outside its set: no alarm
    tail = _entry(4, -0.05, [(4, -0.05), (7, -3.0)])  # EOS p = 0.05 outside top_p 0.9 / top_k 1
    for kw in (dict(top_p=0.9), dict(top_k=1)):
        cfg = SamplerConfig(max_new_tokens=24, record_topk=2, eos_ids=(7,), **kw)
        ec.rollout_from_response([_answer([tail] * 24)] * 32, [np.asarray([4, 5])], 32, cfg, V,
                                 engine="llama.cpp")
    with pytest.raises(ec.EngineError, match="none of the 32 choices"):  # untruncated: 36 nats
        _rows([_answer([tail] * 24)] * 32, n=24, group=32)
    greedy = SamplerConfig(max_new_tokens=24, record_topk=2, eos_ids=(7,), greedy=True)
    ec.rollout_from_response([_answer([runs_on] * 24)] * 3, [np.asarray([4, 5])], 3, greedy, V,
                             engine="llama.cpp")  # EOS ties the argmax at a lower rank: id 4
    argmax_eos = _entry(4, -0.9, [(7, -0.6), (4, -0.9)])
    with pytest.raises(ec.EngineError, match="choice 0 .* runs on without an EOS id"):
        ec.rollout_from_response([_answer([argmax_eos] * 24)], [np.asarray([4, 5])], 1,
                                 greedy, V, engine="llama.cpp")
    # a row ending on an id outside eos_ids: llama.cpp stops on its own end-of-generation set
    with pytest.raises(ec.EngineError, match="last token 0 is not an EOS id \\[7\\]: llama.cpp "
                       "ignores stop_token_ids .* make SamplerConfig.eos_ids that set"):
        _rows([_answer([_entry(4, -0.5, [(4, -0.5), (5, -1)]), _entry(0, -0.5, [(0, -0.5),
                                                                               (5, -1)])],
                       "stop")])


def test_llama_cpp_request_and_refused_options():
    cfg = SamplerConfig(max_new_tokens=5, temperature=1.0, eos_ids=(2,), record_topk=0)
    body = ec.build_request([np.asarray([1, 2])], 1, cfg, model="m", seed=7, engine="llama.cpp")
    assert body["prompt"] == [1, 2] and body["n"] == 1 and body["logprobs"] == 1
    assert "ignore_eos" not in body and "stop_token_ids" not in body
    assert body["samplers"] == ["temperature", "top_k", "top_p"] and body["top_k"] == 0
    assert "post_sampling_probs" not in body and body["seed"] == 7
    hot = SamplerConfig(max_new_tokens=5, temperature=0.7, eos_ids=(2,), record_topk=4)
    assert ec.build_request([np.asarray([1])], 1, hot, model="m", engine="llama.cpp")[
        "post_sampling_probs"] is True
    with pytest.raises(ValueError, match="one row"):
        ec.build_request([np.asarray([1])], 2, cfg, model="m", engine="llama.cpp")
    with pytest.raises(ValueError, match="engine must be one of"):
        ec.build_request([np.asarray([1])], 1, cfg, model="m", engine="tgi")
    mk = lambda c, **kw: ec.EngineClient("http://127.0.0.1:1", c, V, check_rows=0,  # noqa: E731
                                         engine="llama.cpp", **kw)
    for key, why in [("ignore_eos", "BANS its end-of-generation tokens"),
                     ("stop_token_ids", "ignores stop_token_ids"),
                     ("post_sampling_probs", "at temperature != 1 only")]:
        with pytest.raises(ValueError, match=f"extra_body\\['{key}'\\] with "
                           f"engine='llama.cpp': .*{why}"):
            mk(cfg, extra_body={key: True})
    with pytest.raises(ValueError, match="temperature=0.7 with top_p=0.9 .* llama.cpp.*trap b"):
        mk(SamplerConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, eos_ids=(2,)))
    with pytest.raises(ValueError, match="engine must be one of"):
        ec.EngineClient("http://x", cfg, V, check_rows=0, engine="tgi")
    with pytest.raises(ValueError, match="precision must be one of .*'q4'.* got 'int3'"):
        mk(cfg, precision="int3")
    assert mk(cfg, precision="q4").tolerances.max_mean_abs == ec.PRECISIONS["q4"]


def test_row_seeds_are_distinct_across_prompts_samples_and_steps():
    seeds = {ec.row_seed(step, p, s) for step in range(20) for p in range(8) for s in range(8)}
    assert len(seeds) == 20 * 8 * 8  # llama.cpp's own n uses seed + s: step 1 = step 0 shifted
    assert all(0 <= x < 2 ** 31 - 1 for x in seeds)
    assert ec.row_seed(3, 1, 2) == ec.row_seed(3, 1, 2)


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Sends headers, then one byte every 0.1 s for a long time (a stuck or hostile server)."""

    def do_POST(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *a):
        pass


def test_timeout_is_a_deadline_per_request():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/completions"
        t0 = time.monotonic()
        with pytest.raises(ec.EngineError, match="no answer .* within 1 s \\(a deadline"):
            ec.http_json(url, {"x": 1}, timeout=1)
        assert time.monotonic() - t0 < 3  # a per-read timeout would wait 100 s
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------ the check covers every row


def test_every_row_is_checked(server, policy_, capsys):
    cfg, params = policy_
    client = _client(server, policy_, max_new_tokens=12)
    prompts = _prompts((3, 9, 5, 4, 7, 6, 2, 8))
    r = client.generate(prompts, 2, seed=SEED)  # 16 rows, 8 in full, 8 on 8 tokens
    st = client.last_check
    assert st["rows"] == 16 and st["full_rows"] == 8 and st["mean_abs"] < 1e-5
    assert "log-prob check over" in capsys.readouterr().out  # the gap is printed either way
    rec = ec.policy_recompute(params, cfg)
    full = set(ec._check_rows(16, 8, SEED).tolist())
    late = [row for row in range(8, 16) if row not in full]
    assert late  # rows the old check (the first 8) never saw
    logp = np.asarray(r.rollout_logp).copy()
    logp[late[0]] = np.where(np.asarray(r.response_mask)[late[0]] > 0, -0.3, 0.0)
    with pytest.raises(ec.EngineLogprobError,
                       match=f"row\\(s\\) \\[{late[0]}\\] .*fabricated log-probs") as e:
        ec.check_logprobs(r.replace(rollout_logp=logp), rec, client.cfg, seed=SEED)
    assert e.value.trap == "row_mismatch" and e.value.stats["worst_row"] == late[0]
    # rows answering another prompt: swap the responses of rows 10 and 15 (prompts 5 and 7),
    # both beyond the first 8 rows the check used to cover. The tiny model barely depends on the
    # prompt, so the 2 rows stay under the row tolerance; the batch's mean |d| still refuses them
    order = np.arange(16)
    order[[10, 15]] = [15, 10]
    swapped = r.replace(**{f: getattr(r, f)[order] for f in (
        "response_tokens", "response_mask", "rollout_logp", "rollout_topk_ids",
        "rollout_topk_logp", "finish_reason")})
    with pytest.raises(ec.EngineLogprobError) as e:
        ec.check_logprobs(swapped, rec, client.cfg, seed=SEED)
    assert e.value.trap in ("row_mismatch", "mismatch") and e.value.stats["worst_row"] in (10, 15)


def test_precision_sets_the_tolerance(policy_):
    """The same bf16 engine: passes as bf16, refused when declared fp32 (tolerance 0.01)."""
    cfg, params = policy_
    with serve_sampler.SamplerServer(params, cfg, rollout_dtype="bfloat16") as s:
        scfg = SamplerConfig(max_new_tokens=12, record_topk=K, eos_ids=EOS, temperature=0.7)
        rec = ec.policy_recompute(params, cfg)
        r = ec.EngineClient(s.url, scfg, V, recompute=rec, check_rows=0).generate(
            _prompts((3, 9, 5)), 2, seed=SEED)
    # measured mean |d| 0.004: inside bf16's 0.05, outside a tolerance of 0.001
    st = ec.check_logprobs(r, rec, scfg, tol=ec.Tolerances.for_precision("bf16"))
    assert st["precision"] == "bf16" and st["max_mean_abs"] == 0.05
    with pytest.raises(ec.EngineLogprobError, match="tolerance 0.001 for the declared engine "
                       "precision 'fp32'"):
        ec.check_logprobs(r, rec, scfg, tol=dataclasses.replace(
            ec.Tolerances.for_precision("fp32"), max_mean_abs=0.001))


# ------------------------------------ recorded llama.cpp answers (tests/fixtures/llama_cpp)

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "llama_cpp"
SMOL_V = 49152  # SmolLM2's vocabulary


def _fixture(name):
    path = FIXTURES / name
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    d = json.loads(raw)
    cfg = SamplerConfig(**{**d["cfg"], "eos_ids": tuple(d["cfg"]["eos_ids"])})
    return d, cfg, [np.asarray(p) for p in d["prompts"]]


class _Replay(serve_sampler._Handler):
    """llama-server as recorded: each POST must be one of the recorded request bodies (the
    stand-in server's JSON replies, ``_send``, with llama-server's routes)."""

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "smollm2", "object": "model",
                                                         "owned_by": "llamacpp"}]})
        elif self.path == "/props":
            self._send(200, {"total_slots": 4})
        else:
            self._send(404, {"error": {"code": 404, "message": "File Not Found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = self.server.recorded.get(json.dumps(body, sort_keys=True))
        if answer is None:
            self._send(400, {"error": {"code": 400, "message": f"not recorded: {body}"}})
        else:
            self._send(200, answer)

    def log_message(self, *a):
        pass


@pytest.fixture
def replay():
    with _http_server(_Replay) as httpd:
        def serve(d):
            httpd.recorded = {json.dumps(q, sort_keys=True): a
                              for q, a in zip(d["requests"], d["answers"], strict=True)}
            return f"http://127.0.0.1:{httpd.server_address[1]}"
        yield serve


def test_llama_cpp_replay_builds_the_record(replay):
    d, cfg, prompts = _fixture("t1_ascii.json")
    client = ec.EngineClient(replay(d), cfg, SMOL_V, check_rows=0)  # engine="auto"
    # the client's own requests (one per row, row seeds, llama.cpp's fields) are the recorded
    # ones: the replay server answers nothing else
    r = client.generate(prompts, d["group_size"], seed=d["seed"])
    assert client.engine == "llama.cpp" and client.concurrency == 4
    rollout_lib.validate(r, SMOL_V)
    assert all(q["n"] == 1 and "ignore_eos" not in q for q in d["requests"])
    for row, a in enumerate(d["answers"]):
        content = a["choices"][0]["logprobs"]["content"]
        m = len(content)
        assert m == a["usage"]["completion_tokens"]
        np.testing.assert_array_equal(r.response_tokens[row, :m], [e["id"] for e in content])
        np.testing.assert_allclose(r.rollout_logp[row, :m], [e["logprob"] for e in content],
                                   rtol=1e-6)
        assert int(r.response_mask[row].sum()) == m
        ended = a["choices"][0]["finish_reason"] == "stop"
        assert ended == (int(r.finish_reason[row]) == rollout_lib.FINISH_EOS)
        assert ended == (content[-1]["id"] in cfg.eos_ids)
    np.testing.assert_array_equal(r.group_index, [0, 0, 1, 1])


def test_llama_cpp_replay_utf8_gap_is_refused(replay):
    d, cfg, prompts = _fixture("utf8_gap.json")
    a = d["answers"][0]
    assert a["usage"]["completion_tokens"] == len(a["choices"][0]["logprobs"]["content"]) + 1
    client = ec.EngineClient(replay(d), cfg, SMOL_V, check_rows=0)
    with pytest.raises(ec.EngineError, match="choice 0 token 2 .* a gap before this token: .*"
                       "b'\\\\xd1\\\\x91' but token 235 alone is b'\\\\x91'.* multi-byte UTF-8"):
        client.generate(prompts, 1, seed=d["seed"])
    # without the bytes (an engine that sends none): the usage count still tells
    stripped = json.loads(json.dumps(a))
    for e in stripped["choices"][0]["logprobs"]["content"]:
        del e["bytes"]
    with pytest.raises(ec.EngineError, match="generated 12 tokens \\(usage.completion_tokens\\) "
                       "but returned log-probs for 11: 1 left out"):
        ec.rollout_from_response([stripped], prompts, 1, cfg, SMOL_V, engine="llama.cpp")


def test_llama_cpp_replay_ignore_eos_is_refused():
    d, cfg, prompts = _fixture("ignore_eos.json.gz")
    assert all(q["ignore_eos"] is True for q in d["requests"])
    finish = [a["choices"][0]["finish_reason"] for a in d["answers"]]
    assert finish == ["length"] * 32  # 0 of 32 rows ended
    # row 30 (a Hebrew ramble) also left 12 tokens out: refused first
    with pytest.raises(ec.EngineError, match="choice 30 .* gap"):
        ec.rollout_from_response(d["answers"], prompts, 4, cfg, SMOL_V, engine="llama.cpp")
    with pytest.raises(ec.EngineError, match="none of the 28 choices .* ended on an EOS id "
                       "\\[0, 2\\] .*\\(chance of that: 1.4e-08\\).*ignore_eos=true"):
        ec.rollout_from_response(d["answers"][:28], prompts[:7], 4, cfg, SMOL_V,
                                 engine="llama.cpp")
    # the same prompts and seeds as the client sends them: rows end, nothing is refused
    e, cfg, prompts = _fixture("eos_ends.json.gz")
    assert [q["seed"] for q in e["requests"]] == [q["seed"] for q in d["requests"][:8]]
    r = ec.rollout_from_response(e["answers"], prompts, 4, cfg, SMOL_V, engine="llama.cpp")
    assert (np.asarray(r.finish_reason) == rollout_lib.FINISH_EOS).sum() >= 2


def test_llama_cpp_replay_post_sampling_probs(replay):
    d, cfg, prompts = _fixture("t07_post_sampling.json")
    assert d["requests"][0]["post_sampling_probs"] is True and cfg.temperature == 0.7
    r = ec.EngineClient(replay(d), cfg, SMOL_V, check_rows=0).generate(prompts, 1,
                                                                       seed=d["seed"])
    content = d["answers"][0]["choices"][0]["logprobs"]["content"]
    np.testing.assert_allclose(r.rollout_logp[0, :len(content)],
                               np.log([e["prob"] for e in content]), rtol=1e-5)
    # with top_p=0.9 the chain zeroes tokens and they are left out: fewer than K=20 entries
    d, cfg, prompts = _fixture("t07_top_p_post_sampling.json")
    assert len(d["answers"][0]["choices"][0]["logprobs"]["content"][0]["top_probs"]) == 7
    with pytest.raises(ec.EngineError, match="7 top_logprobs .* expected at least K=20 .*"
                       "post_sampling_probs it omits the tokens its sampling chain zeroed"):
        ec.rollout_from_response(d["answers"], prompts, 1, cfg, SMOL_V, engine="llama.cpp")
    with pytest.raises(ValueError, match="top_p=0.9 .* on llama.cpp"):  # refused up front
        ec.EngineClient(replay(d), cfg, SMOL_V, check_rows=0, engine="llama.cpp")


def test_llama_cpp_replay_logprobs_0_and_n_above_parallel():
    d, cfg, prompts = _fixture("logprobs0_and_n64.json")
    assert d["requests"][0]["logprobs"] == 0
    assert d["answers"][0]["choices"][0]["logprobs"] is None
    with pytest.raises(ec.EngineError, match="no logprobs object .*\\(llama.cpp returns none "
                       "for logprobs: 0\\)"):
        ec.rollout_from_response(d["answers"][:1], prompts, 1, cfg, SMOL_V, engine="llama.cpp")
    # the client asks logprobs = max(K, 1) and never sends n > 1 to llama.cpp
    assert ec.build_request(prompts, 1, SamplerConfig(max_new_tokens=4, record_topk=0),
                            model="m", engine="llama.cpp")["logprobs"] == 1
    assert "Field 'n': Value must be between 1 <= value <= 4, but got 64" in d["answers"][1][
        "http_error"]


# ---------------------------------------------- routed experts (R3), SGLang's return_routed_experts

MOE_X, MOE_K = 6, 2
LAYOUT = rollout_lib.RouteLayout(num_layers=3, sparse_layers=(0, 2), experts_per_tok=MOE_K,
                                 num_experts=MOE_X)


def _routed_answer(ids, lp=-0.1, finish="stop", routes=None, wire="int32"):
    """A one-row SGLang answer (completions shape) carrying ``routes`` [T, L, k] (None: none)
    as sglext.routed_experts."""
    t = lambda i: f"token_id:{i}"  # noqa: E731
    answer = {"choices": [_choice([t(i) for i in ids], [lp] * len(ids), None, finish)],
              "usage": {"completion_tokens": len(ids)}}
    if routes is not None:
        raw = base64.b64encode(np.asarray(routes, wire).tobytes()).decode()
        answer["sglext"] = {"routed_experts": raw} if wire == "int32" else {
            "routed_experts": raw, "routed_experts_dtype": wire}
    return answer


def _routed_rows(answers, prompts=([4, 5], [6, 7, 8]), n=3, layout=LAYOUT):
    cfg = SamplerConfig(max_new_tokens=n, record_topk=0, eos_ids=(7,), record_routes=True,
                        min_prompt_bucket=4)
    return ec.rollout_from_response(answers, [np.asarray(p) for p in prompts], 1, cfg, V,
                                    engine="sglang", route_layout=layout)


def test_routed_experts_are_read_into_the_record_layout():
    rng = np.random.default_rng(0)
    # row 0: prompt 2 + 3 tokens (no EOS: length) -> 4 positions; row 1: prompt 3 + 1 (EOS)
    r0 = rng.integers(0, MOE_X, (4, 3, MOE_K))
    r1 = rng.integers(0, MOE_X, (3, 3, MOE_K))
    r1[:, 1] = 99  # the dense layer's row: not kept (SGLang leaves dense layers' rows as is)
    r = _routed_rows([_routed_answer([4, 5, 6], finish="length", routes=r0),
                      _routed_answer([7], routes=r1, wire="uint8")])
    got = np.asarray(r.routed_experts)
    assert got.shape == (2, 4 + 3, 2, MOE_K) and got.dtype == np.uint8
    want = np.zeros_like(got)
    want[0, 2:6] = r0[:, [0, 2]]  # prompt columns 2, 3 and response columns 0, 1 (4, 5)
    want[1, 1:4] = r1[:, [0, 2]]  # prompt columns 1..3; its one token (EOS) never processed
    np.testing.assert_array_equal(got, want)
    rollout_lib.validate(r, V, num_experts=MOE_X)


def test_routed_experts_missing_or_malformed_are_refused():
    rng = np.random.default_rng(1)
    ok = lambda: rng.integers(0, MOE_X, (4, 3, MOE_K))  # noqa: E731
    one = lambda answer: _routed_rows([answer], prompts=([4, 5],))  # noqa: E731
    with pytest.raises(ec.EngineError, match="no routed experts .*--enable-return-routed-exp"):
        one(_routed_answer([4, 5, 6], finish="length"))
    with pytest.raises(ec.EngineError, match=r"10 routed-expert ids, expected .* \[4, 3, 2\]"):
        one(dict(_routed_answer([4, 5, 6], finish="length"), sglext={
            "routed_experts": base64.b64encode(np.zeros(10, np.int32).tobytes()).decode()}))
    bad = ok()
    bad[1, 2, 0] = MOE_X
    with pytest.raises(ec.EngineError, match=r"ids \[6\] outside \[0, num_experts=6\)"):
        one(_routed_answer([4, 5, 6], finish="length", routes=bad))
    bad[1, 2, 0] = 0
    bad[0, 1, 0] = MOE_X  # the dense layer: ignored
    assert int(np.asarray(one(_routed_answer([4, 5, 6], finish="length", routes=bad))
                          .routed_experts).max()) < MOE_X
    with pytest.raises(ec.EngineError, match="not base64 int32"):
        one(dict(_routed_answer([4, 5, 6], finish="length"),
                 sglext={"routed_experts": "%%%"}))
    with pytest.raises(ec.EngineError, match="dtype 'int64'"):
        one(dict(_routed_answer([4, 5, 6], finish="length"),
                 sglext={"routed_experts": "AAAA", "routed_experts_dtype": "int64"}))
    with pytest.raises(ec.EngineError, match="one answer per row .* first choice only"):
        _routed_rows({"choices": [_routed_answer([4])["choices"][0],
                                  dict(_routed_answer([4])["choices"][0], index=1)]})


def test_routed_experts_request_and_options():
    cfg = SamplerConfig(max_new_tokens=3, record_topk=0, record_routes=True)
    body = ec.build_request([np.asarray([1, 2])], 1, cfg, model="m", engine="sglang")
    assert body["return_routed_experts"] is True and body["n"] == 1
    with pytest.raises(ValueError, match="engine='vllm' is not 'sglang'"):
        ec.build_request([np.asarray([1, 2])], 1, cfg, model="m", engine="vllm")
    with pytest.raises(ValueError, match="one row .* first choice only"):
        ec.build_request([np.asarray([1, 2])], 2, cfg, model="m", engine="sglang")
    assert "return_routed_experts" not in ec.build_request(
        [np.asarray([1, 2])], 2, dataclasses.replace(cfg, record_routes=False), model="m",
        engine="sglang")
    url = "http://127.0.0.1:1"
    with pytest.raises(ValueError, match="record_routes=True needs route_layout"):
        ec.EngineClient(url, cfg, V, check_rows=0, engine="sglang")
    with pytest.raises(ValueError, match="the engine is 'vllm': serve the model with SGLang"):
        ec.EngineClient(url, cfg, V, check_rows=0, engine="vllm", route_layout=LAYOUT)
    with pytest.raises(ValueError, match=r"extra_body\['routed_experts_start_len'\]"):
        ec.EngineClient(url, cfg, V, check_rows=0, engine="sglang", route_layout=LAYOUT,
                        extra_body={"routed_experts_start_len": 3})
    with pytest.raises(ValueError, match="no layer with experts"):
        rollout_lib.RouteLayout.of(M.ModelConfig.tiny(V))


@pytest.mark.slow
def test_routed_experts_round_trip_through_the_local_server():
    # the local server answers return_routed_experts as SGLang does; the client's record holds
    # the trainer forward's own routing at every processed position (layer 1 has no experts)
    cfg = M.ModelConfig.tiny(V, family="qwen3_moe", num_experts=MOE_X,
                             num_experts_per_tok=MOE_K, moe_intermediate_size=16,
                             num_layers=3, mlp_only_layers=(1,), scan_layers=False)
    params = _perturbed(M.init_params(cfg, jax.random.key(0)), 1)
    params = jax.tree_util.tree_map_with_path(  # clear routing decisions
        lambda p, x: x * 20 if getattr(p[-1], "key", "") == "router" else x, params)
    scfg = SamplerConfig(max_new_tokens=N, record_topk=K, eos_ids=EOS, temperature=0.7,
                         record_routes=True)
    with serve_sampler.SamplerServer(params, cfg) as s:
        client = ec.EngineClient(s.url, scfg, V, recompute=ec.policy_recompute(params, cfg),
                                 engine="sglang", route_layout=rollout_lib.RouteLayout.of(cfg),
                                 log=None)
        r = client.generate(_prompts((3, 9, 5)), 2, seed=SEED)
    routes = np.asarray(r.routed_experts)
    assert routes.shape == (6, 16 + N, 2, MOE_K)
    _, moe = jax.jit(M.forward_moe, static_argnums=1)(params, cfg, r.tokens, r.positions,
                                                      r.valid_mask)
    resp = np.asarray(r.response_mask).copy()
    last = resp.sum(1) - 1
    resp[np.arange(6), last] = 0  # the last generated token is never processed
    done = np.concatenate([np.asarray(r.prompt_mask), resp], 1) > 0
    np.testing.assert_array_equal(routes[done], np.asarray(moe["ids"])[done])
    assert not routes[~done].any()
    assert len(np.unique(routes[done])) == MOE_X and (last > 0).any()
