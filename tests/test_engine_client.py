"""trustrl.engine_client against a local vLLM-style server (trustrl.tools.serve_sampler).

The server samples with trustrl's own Sampler, so a seeded request must give back exactly the
record the sampler produces; its trap modes return the log-probs that real engines get wrong,
and the client must refuse them by comparing with a real trainer-side recompute.
"""
import http.server
import json
import socket
import threading
import time

import jax
import numpy as np
import pytest

from trustrl import engine_client as ec
from trustrl import model as M
from trustrl import policy
from trustrl import rollout as rollout_lib
from trustrl.sampler import Sampler, SamplerConfig, left_pad
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


@pytest.fixture
def canned():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


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
