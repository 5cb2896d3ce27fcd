"""Multi-turn episodes through an external engine (trustrl.rollout.engine_multiturn), token-in-
token-out, and the engine client's prompt-id echo check, against a scripted local engine.

The fake engine answers vLLM's /v1/completions format (as trustrl.tools.serve_sampler does) with
``prompt_token_ids`` / ``token_ids`` per choice (return_token_ids); its completions come from a
script, its log-probs from a fixed function of (position, id), so every recorded value is known.
"""
import http.server
import json
import threading

import numpy as np
import pytest

from test_engine_client import _choice, _http_server  # the local HTTP server of the client tests

from trustrl.data import environments as envs_lib
from trustrl.data import tokenizer as tk
from trustrl.rollout import engine_client as ec
from trustrl.rollout import engine_multiturn as emt
from trustrl.rollout import record as rollout_lib
from trustrl.rollout import trajectory
from trustrl.rollout.sampler import SamplerConfig

K = 2


def _lp(pos, tok):
    """The fake engine's log-prob of id ``tok`` at absolute position ``pos``."""
    return -0.05 * (1 + (np.asarray(tok) + np.asarray(pos)) % 7)


def _recompute(tokens, positions, valid, *, num_response, temperature):
    """The trainer-side recompute matching the fake engine (check_logprobs' signature)."""
    return _lp(np.asarray(positions)[:, -num_response:], np.asarray(tokens)[:, -num_response:])


class _Engine(http.server.BaseHTTPRequestHandler):
    """vLLM-style engine: one prompt per request (n=1); the completion is
    ``server.reply(prompt)`` cut at max_tokens; ``server.echo(prompt)`` is the prompt the engine
    conditions on (identity, or a re-tokenisation); ``server.prompt_ids``: return_token_ids."""

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "fake", "owned_by": "vllm"}]})

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append(body)
        (prompt,) = body["prompt"]
        seen = srv.echo(prompt)
        ids = list(srv.reply(prompt))[:body["max_tokens"]]
        stop = set(body["stop_token_ids"])
        pos = [len(seen) + j for j in range(len(ids))]
        lps = [float(_lp(p, t)) for p, t in zip(pos, ids)]
        other = lambda t: 150 if t != 150 else 151  # noqa: E731 (never an EOS id)
        tops = [{f"token_id:{t}": lp, f"token_id:{other(t)}": lp - 1.0}
                for t, lp in zip(ids, lps)]
        choice = _choice([f"token_id:{t}" for t in ids], lps, tops,
                         "stop" if ids[-1] in stop else "length")
        if srv.prompt_ids and body.get("return_token_ids"):
            choice.update(prompt_token_ids=seen, token_ids=ids)
        self._send({"choices": [choice], "usage": {
            "prompt_tokens": len(seen), "completion_tokens": len(ids),
            "total_tokens": len(seen) + len(ids)}})

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def tok():
    texts = [f"Guess my number between 1 and {h}. {g} higher lower correct invalid 12"
             for h in range(8, 20) for g in range(1, 20)]
    return tk.train_bpe(texts, 300)  # specials 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>


@pytest.fixture
def engine():
    with _http_server(_Engine) as httpd:
        httpd.lock, httpd.requests = threading.Lock(), []
        httpd.echo, httpd.prompt_ids = list, True
        httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        yield httpd


TEMPLATE = envs_lib.TurnTemplate("chatml")


def _envs(tok, n):
    return [envs_lib.TokenEnv(envs_lib.GuessTheNumber(16), tok, TEMPLATE) for _ in range(n)]


def _client(engine, tok, *, eos=(0, 2), check=False, **kw):
    cfg = SamplerConfig(**{**dict(max_new_tokens=8, record_topk=K, eos_ids=eos,
                                  max_prompt_len=256), **kw})
    return ec.EngineClient(engine.url, cfg, tok.vocab_size, engine="vllm", log=None,
                           recompute=_recompute if check else None, check_rows=8 if check else 0)


def _turn(prompt, eot=2):
    """The policy turns in a prompt so far: the first prompt holds one end-of-turn id (the user
    message's), every finished turn adds two (its own or the template's, and the next user
    message's)."""
    return (list(prompt).count(eot) - 1) // 2


def test_two_turn_episode_is_token_in_token_out(engine, tok):
    seed_env, eot = 3, 2
    game = envs_lib.GuessTheNumber(16)
    game.reset(seed_env)
    assert game.secret == 13
    # turn 1 guesses " 12" as the ids " 1", "2": re-encoding its text gives ONE id (" 12")
    c1 = tok.encode(" 1") + tok.encode("2") + [eot]
    assert len(c1) == 3 and tok.encode(tok.decode(c1[:2])) == tok.encode(" 12")
    assert len(tok.encode(" 12")) == 1
    c2 = tok.encode(" 13") + [eot]
    engine.reply = lambda p: (c1, c2)[_turn(p)]
    client = _client(engine, tok, check=True)
    r, traj = emt.run_episodes(client, _envs(tok, 1), [seed_env], 1, max_turns=3,
                               max_turn_tokens=8, max_total_tokens=64, seed=5)
    ref = _envs(tok, 1)[0]
    p1 = ref.reset(seed_env)
    obs1 = ref.step(c1, ended=True).obs_ids
    p2 = p1 + c1 + obs1
    # the requests: the whole history as ids, n=1, max_tokens, per-(episode, turn) seeds
    q1, q2 = engine.requests
    assert q1["prompt"] == [p1] and q2["prompt"] == [p2]
    assert q1["n"] == q2["n"] == 1 and q1["return_token_ids"] is True
    assert q1["max_tokens"] == 8 and q2["max_tokens"] == 8
    assert [q1["seed"], q2["seed"]] == [ec.row_seed(5, 0, 0), ec.row_seed(5, 0, 1)]
    # the trajectory: exactly the completion and observation ids, padded to max_total_tokens
    want = c1 + obs1 + c2
    L = len(want)
    toks = np.asarray(r.response_tokens)
    assert toks.shape == (1, 64)
    assert toks[0, :L].tolist() == want and not toks[0, L:].any()
    assert tok.encode(" 12")[0] not in want  # never re-encoded
    policy = np.zeros(64, bool)
    policy[:len(c1)] = True
    policy[len(c1) + len(obs1):L] = True
    np.testing.assert_array_equal(np.asarray(r.response_mask)[0], policy)
    pos = len(p1) + np.arange(64)  # absolute position of each response column
    logp = np.asarray(r.rollout_logp)[0]
    np.testing.assert_allclose(logp[policy], _lp(pos, toks[0])[policy], rtol=1e-6)
    assert not logp[~policy].any()
    ids = np.asarray(r.rollout_topk_ids)[0]
    np.testing.assert_array_equal(ids[policy], np.stack([toks[0][policy], np.full(
        policy.sum(), 150)], 1))
    assert not ids[~policy].any()
    np.testing.assert_array_equal(np.asarray(r.prompt_tokens)[0, -len(p1):], p1)
    assert not np.asarray(r.prompt_tokens)[0, :-len(p1)].any()
    rollout_lib.validate(r, tok.vocab_size)
    # the per-turn facts
    assert traj.num_turns.tolist() == [2] and traj.finish.tolist() == [trajectory.TERMINATED]
    assert int(r.finish_reason[0]) == rollout_lib.FINISH_EOS
    np.testing.assert_array_equal(traj.turn_rewards, [[0.0, 1.0, 0.0]])
    assert traj.turn_index[0].tolist() == ([0] * (len(c1) + len(obs1)) + [1] * len(c2)
                                           + [-1] * (64 - L))
    assert traj.turn_ends.tolist() == [2, 0, 0] and traj.seeds.tolist() == [3]
    assert traj.processed.tolist() == [len(p1) + len(c1) + len(p2) + len(c2)]
    # the log-prob check recomputed the last turn with its whole history as context
    assert client.last_check["tokens"] == len(c2) and client.last_check["mean_abs"] < 1e-6


def test_a_retokenising_engine_is_refused(engine, tok):
    """The engine decodes the id prompt and encodes its text again: turn 1's ids " 1" "2" come
    back as one " 12" in the second request's prompt_token_ids."""
    c1 = tok.encode(" 1") + tok.encode("2") + [2]
    engine.reply = lambda p: c1
    engine.echo = lambda p: tok.encode(tok.decode(p))
    ref = _envs(tok, 1)[0]
    p1 = ref.reset(3)
    p2 = p1 + c1 + ref.step(c1).obs_ids
    merged = tok.encode(" 12")[0]
    with pytest.raises(ec.EngineError, match=(
            f"choice 0 \\(prompt 0\\) from .*: the engine re-tokenised the prompt: at position "
            f"{len(p1)} the client sent id {c1[0]}, the engine's prompt_token_ids have id "
            f"{merged}")):
        emt.run_episodes(_client(engine, tok), _envs(tok, 1), [3], 1, max_turns=3,
                         max_turn_tokens=8, max_total_tokens=64)
    assert len(engine.requests) == 2  # the first prompt round-trips; the second does not
    # without prompt ids the length in usage.prompt_tokens catches this one
    engine.prompt_ids, engine.requests = False, []
    assert len(engine.echo(p2)) == len(p2) - 1
    with pytest.raises(ec.EngineError, match=(
            f"choice 0 from .*: usage.prompt_tokens {len(p2) - 1}, but its prompt 0 has "
            f"{len(p2)} tokens: the engine answered another prompt, re-tokenised it")):
        emt.run_episodes(_client(engine, tok), _envs(tok, 1), [3], 1, max_turns=3,
                         max_turn_tokens=8, max_total_tokens=64)


def test_prompt_ids_of_a_batched_answer_are_checked():
    """generate()'s one-answer path: every choice's prompt_token_ids against its own prompt,
    token_ids against its log-probs, and usage.prompt_tokens when no ids come back."""
    t = lambda i: f"token_id:{i}"  # noqa: E731
    ok = lambda index, **kw: {**_choice([t(4), t(7)], [-0.1, -0.2], None, "stop",  # noqa: E731
                                        index), **kw}
    prompts = [np.asarray([5, 6, 9]), np.asarray([8])]
    cfg = SamplerConfig(max_new_tokens=3, record_topk=0, eos_ids=(7,))
    build = lambda choices, **u: ec.rollout_from_response(  # noqa: E731
        {"choices": choices, "usage": {"completion_tokens": 8, **u}}, prompts, 2, cfg, 128)
    echo = [ok(0, prompt_token_ids=[5, 6, 9]), ok(1, prompt_token_ids=[5, 6, 9]),
            ok(2, prompt_token_ids=[8], token_ids=[4, 7]), ok(3, prompt_token_ids=[8])]
    rollout_lib.validate(build(echo), 128)
    merged = [*echo[:1], ok(1, prompt_token_ids=[5, 15]), *echo[2:]]
    with pytest.raises(ec.EngineError, match="choice 1 \\(prompt 0\\) .* re-tokenised the prompt: "
                       "at position 1 the client sent id 6, .* have id 15 \\(3 ids sent, 2 "):
        build(merged)
    longer = [*echo[:3], ok(3, prompt_token_ids=[0, 8])]  # an added BOS
    with pytest.raises(ec.EngineError, match="choice 3 \\(prompt 1\\) .* at position 0 the "
                       "client sent id 8, .* have id 0"):
        build(longer)
    with pytest.raises(ec.EngineError, match="choice 2 .* token_ids differ from the tokens of "
                       "its log-probs at position 0"):
        build([*echo[:2], ok(2, token_ids=[5, 7]), echo[3]])
    # a stop token trimmed from token_ids (not from the log-probs) is accepted
    rollout_lib.validate(build([*echo[:2], ok(2, token_ids=[4]), echo[3]]), 128)
    bare = [ok(i) for i in range(4)]  # no prompt ids: the usage count (vLLM: once per prompt)
    rollout_lib.validate(build(bare, prompt_tokens=4), 128)
    with pytest.raises(ec.EngineError, match="usage.prompt_tokens is 3 but the 2 prompts sent "
                       "hold 4 ids"):
        build(bare, prompt_tokens=3)


def test_eos_ids_must_hold_the_end_of_turn_id(tok):
    client = ec.EngineClient("http://127.0.0.1:1", SamplerConfig(eos_ids=(0,)), tok.vocab_size,
                             engine="vllm", model="m", check_rows=0)
    with pytest.raises(ValueError, match="end a turn with id 2 \\(TokenEnv.eot\\) but the "
                       "client's SamplerConfig.eos_ids are \\[0\\].*add 2 to eos_ids"):
        emt.run_episodes(client, _envs(tok, 1), [3], 1, max_turns=2, max_turn_tokens=4,
                         max_total_tokens=16)
    client = ec.EngineClient("http://127.0.0.1:1", SamplerConfig(eos_ids=(0, 2)),
                             tok.vocab_size, engine="vllm", model="m", check_rows=0)
    with pytest.raises(ValueError, match="3 token environments for 4 episodes"):
        emt.run_episodes(client, _envs(tok, 3), [3, 4], 2, max_turns=2, max_turn_tokens=4,
                         max_total_tokens=16)
    with pytest.raises(ValueError, match="more than SamplerConfig.max_prompt_len=2048"):
        emt.run_episodes(client, _envs(tok, 1), [3], 1, max_turns=2, max_turn_tokens=4,
                         max_total_tokens=4096)


def test_max_turns_ends_episodes(engine, tok):
    engine.reply = lambda p: tok.encode(" 1") + [2]  # always wrong (secrets 13 and 9)
    r, traj = emt.run_episodes(_client(engine, tok), _envs(tok, 4), [3, 4], 2, max_turns=3,
                               max_turn_tokens=8, max_total_tokens=128, seed=1)
    assert traj.finish.tolist() == [trajectory.MAX_TURNS] * 4
    assert traj.num_turns.tolist() == [3] * 4 and traj.turn_ends.tolist() == [12, 0, 0]
    assert np.asarray(r.finish_reason).tolist() == [rollout_lib.FINISH_LENGTH] * 4
    assert np.asarray(r.group_index).tolist() == [0, 0, 1, 1]
    assert traj.seeds.tolist() == [3, 3, 4, 4] and not traj.returns.any()
    assert np.asarray(r.response_mask).sum() == 4 * 3 * 2  # three 2-id turns per episode
    # every (episode, turn) request has its own seed: a group's identical first prompts differ
    assert len(engine.requests) == 12 and len({q["seed"] for q in engine.requests}) == 12


def test_turn_and_total_token_limits(engine, tok):
    eot, one = 2, tok.encode(" 1")[0]
    engine.reply = lambda p: [one] * 20  # never ends a turn by itself
    c1 = [one] * 5
    obs1 = _envs(tok, 1)[0]
    obs1.reset(3)
    obs1 = obs1.step(c1, ended=False).obs_ids
    assert obs1[0] == eot  # the template closes the capped turn
    n = len(c1) + len(obs1) + 3  # room for 3 tokens of turn 2
    r, traj = emt.run_episodes(_client(engine, tok), _envs(tok, 1), [3], 1, max_turns=4,
                               max_turn_tokens=5, max_total_tokens=n)
    assert [q["max_tokens"] for q in engine.requests] == [5, 3]  # min(turn limit, remaining)
    toks, mask = np.asarray(r.response_tokens)[0], np.asarray(r.response_mask)[0]
    assert toks.shape == (n,) and toks.tolist() == c1 + obs1 + [one] * 3
    assert mask.tolist() == [1] * 5 + [0] * len(obs1) + [1] * 3  # the closing id is mask 0
    assert traj.finish.tolist() == [trajectory.MAX_TOTAL_TOKENS]
    assert traj.turn_ends.tolist() == [0, 1, 1]  # max_turn_tokens, then max_total_tokens
    assert traj.num_turns.tolist() == [2] and int(r.finish_reason[0]) == rollout_lib.FINISH_LENGTH
    # an episode whose next observation no longer fits ends before its next turn
    engine.requests = []
    r, traj = emt.run_episodes(_client(engine, tok), _envs(tok, 1), [3], 1, max_turns=4,
                               max_turn_tokens=5, max_total_tokens=len(c1) + len(obs1))
    assert len(engine.requests) == 1 and traj.finish.tolist() == [trajectory.MAX_TOTAL_TOKENS]
    assert np.asarray(r.response_mask).sum() == 5 and not np.asarray(r.response_tokens)[0, 5:].any()


def test_complete_keeps_rows_in_order_across_max_tokens(engine, tok):
    """EngineClient.complete: one request per row with its own max_tokens and seed; rows of
    different limits are parsed in separate groups and come back in prompt order."""
    engine.reply = lambda p: [p[-1]] * 9 if p[-1] != 5 else [5, 2]
    client = _client(engine, tok, check=True)
    prompts = [[3, 4, 7], [8, 9], [4, 5], [6]]
    out = client.complete(prompts, [5, 3, 5, 3], seeds=[11, 12, None, 14])
    sent = {tuple(q["prompt"][0]): q for q in engine.requests}  # requests arrive in any order
    assert [sent[tuple(p)]["max_tokens"] for p in prompts] == [5, 3, 5, 3]
    assert [sent[tuple(p)].get("seed") for p in prompts] == [11, 12, None, 14]
    assert [c.ids.tolist() for c in out] == [[7] * 5, [9] * 3, [5, 2], [6] * 3]
    assert [c.eos for c in out] == [False, False, True, False]
    for p, c in zip(prompts, out):
        np.testing.assert_allclose(c.logp, _lp(len(p) + np.arange(len(c.ids)), c.ids), rtol=1e-6)
        assert c.topk_ids.shape == (len(c.ids), K) and (c.topk_ids[:, 0] == c.ids).all()
    with pytest.raises(ValueError, match="4 prompts but 2 max_tokens and 4 seeds"):
        client.complete(prompts, [5, 3])
    with pytest.raises(ValueError, match="max_tokens\\[1\\] must be >= 1"):
        client.complete(prompts[:2], [5, 0])
