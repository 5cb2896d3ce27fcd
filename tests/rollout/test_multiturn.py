"""Multi-turn rollouts (trustrl.rollout.multiturn): token-in-token-out trajectories on one KV
cache, masks / denominators, limits, and the DPPO mask against a turn-by-turn reference."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.core import advantages as adv_lib, losses
from trustrl.data import environments as envs_lib, tokenizer as tok_lib
from trustrl.model import policy, transformer as tm
from trustrl.model.policy import DecodeModel
from trustrl.rollout import multiturn, record, trajectory
from trustrl.rollout.sampler import SamplerConfig


@pytest.fixture(scope="module")
def tok():
    # no split_digits: "12" is ONE token, while the byte tokens "1" and "2" exist too
    texts = [f"Question: What is {a} + {b}?\nAnswer: {a + b}\nhigher\nlower\ninvalid\n12 12"
             for a in range(10, 40) for b in range(10, 20)]
    return tok_lib.train_bpe(texts, 290)


def scripted_model(table, vocab):
    """A DecodeModel whose next token is a function of the last token consumed
    (``table[last]``, default table[-1]): logits one-hot x 30. Its cache only counts columns."""
    nxt = np.full(vocab, table.get(-1, 0), np.int32)
    for a, b in table.items():
        if a >= 0:
            nxt[a] = b
    nxt = jnp.asarray(nxt)
    logits = lambda last: 30.0 * jax.nn.one_hot(nxt[last], vocab)

    def extend(p, t, pos, v, c):
        last = t.shape[1] - 1 - jnp.argmax(v[:, ::-1], axis=1)
        return logits(jnp.take_along_axis(t, last[:, None], 1)[:, 0]), c + v.sum(1)
    return DecodeModel(
        init_cache=lambda b, n: jnp.zeros((b,), jnp.int32),
        prefill=lambda p, t, pos, v, c: (logits(t[:, -1]), c + v.sum(1)),
        decode=lambda p, t, pos, c, valid=None: (logits(t), c + (1 if valid is None else valid)),
        vocab_size=vocab, extend=extend)


def envs(tok, n, template="plain", **kw):
    return [envs_lib.TokenEnv(envs_lib.GuessTheSum(**kw), tok, envs_lib.TurnTemplate(template))
            for _ in range(n)]


def test_token_in_token_out_keeps_ids_a_round_trip_would_change(tok):
    one, two, eos = tok.encode("1")[0], tok.encode("2")[0], tok.eos_id
    assert tok.encode("12") != [one, two]  # decode + re-encode would merge them
    colon = tok.encode("Answer:")[-1]
    model = scripted_model({colon: one, one: two, two: eos}, tok.vocab_size)
    mt = multiturn.MultiTurnConfig(max_turns=3, max_turn_tokens=4, max_total_tokens=40)
    sampler = multiturn.MultiTurnSampler(model, SamplerConfig(greedy=True, record_topk=0), mt)
    e = envs(tok, 2)
    r, traj = sampler.run(None, e, [0, 1], 1, jax.random.key(0))
    for i, env in enumerate(e):
        row = np.asarray(r.response_tokens[i])
        mask = np.asarray(r.response_mask[i]) > 0
        obs = tok.encode(envs_lib.TurnTemplate("plain").later(
            "higher" if env.env.answer > 12 else "lower"))
        turn = [one, two, eos]
        want = turn + obs + turn + obs + turn
        assert row[:len(want)].tolist() == want and not row[len(want):].any()
        assert mask[:len(want)].tolist() == [t < 3 or 3 + len(obs) <= t < 6 + len(obs)
                                            or t >= 6 + 2 * len(obs) for t in range(len(want))]
        assert traj.num_turns[i] == 3 and traj.finish[i] == trajectory.MAX_TURNS
        np.testing.assert_array_equal(traj.turn_index[i, :len(want)],
                                      [0] * (3 + len(obs)) + [1] * (3 + len(obs)) + [2] * 3)
    # the trainer's input is the sampler's sequence, bit for bit: prompt then trajectory
    prompts = [env.reset(s) for env, s in zip(envs(tok, 2), [0, 1])]
    for i, p in enumerate(prompts):
        toks = np.asarray(r.tokens[i])[np.asarray(r.valid_mask[i]) > 0]
        assert toks[:len(p)].tolist() == p
    # every token processed once: prompt + trajectory (no re-prefill); observations are
    # appended in one chunk per turn, the turns decode in step
    assert (traj.processed == np.asarray([len(p) for p in prompts]) + 9 + 2 * len(obs)).all()
    assert sampler.counts.steps == 9 and sampler.counts.appends == 2


def test_limits_and_finish_reasons(tok):
    one, eos = tok.encode("1")[0], tok.eos_id
    colon = tok.encode("Answer:")[-1]
    model = scripted_model({-1: one}, tok.vocab_size)  # never ends a turn by itself
    run = lambda mt: multiturn.MultiTurnSampler(
        model, SamplerConfig(greedy=True, record_topk=0), mt).run(
            None, envs(tok, 1), [3], 1, jax.random.key(0))
    r, traj = run(multiturn.MultiTurnConfig(max_turns=2, max_turn_tokens=3,
                                            max_total_tokens=64))
    row, mask = np.asarray(r.response_tokens[0]), np.asarray(r.response_mask[0])
    # the capped turn is closed by the template's end-of-turn token, a template token
    assert row[:4].tolist() == [one, one, one, eos] and mask[:4].tolist() == [1, 1, 1, 0]
    assert traj.finish[0] == trajectory.MAX_TURNS and traj.turn_ends[1] == 2
    assert int(r.finish_reason[0]) == record.FINISH_LENGTH
    r, traj = run(multiturn.MultiTurnConfig(max_turns=9, max_turn_tokens=3, max_total_tokens=10))
    assert traj.finish[0] == trajectory.MAX_TOTAL_TOKENS and traj.processed[0] <= 10 + len(
        envs(tok, 1)[0].reset(3))
    assert int(np.asarray(r.response_mask).sum()) <= 10
    # a right answer ends the episode (terminated) with its reward
    ans = envs_lib.GuessTheSum()
    ans.reset(5)
    digits = [tok.encode(d)[0] for d in str(ans.answer)]
    assert len(set(digits)) == len(digits)  # 152: the table's keys are distinct
    table = {colon: digits[0], **{a: b for a, b in zip(digits, digits[1:])}, digits[-1]: eos}
    r, traj = multiturn.MultiTurnSampler(
        scripted_model(table, tok.vocab_size), SamplerConfig(greedy=True, record_topk=0),
        multiturn.MultiTurnConfig()).run(None, envs(tok, 1), [5], 1, jax.random.key(0))
    assert traj.finish[0] == trajectory.TERMINATED and traj.returns[0] == 1.0
    assert int(r.finish_reason[0]) == record.FINISH_EOS and traj.num_turns[0] == 1
    with pytest.raises(TypeError, match="max_turns must be an int >= 1"):
        multiturn.MultiTurnConfig(max_turns=0.5)
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        multiturn.MultiTurnConfig(max_turns=0)


@pytest.fixture(scope="module")
def tiny(tok):
    cfg = tm.ModelConfig.tiny(vocab_size=tok.vocab_size)
    return cfg, tm.init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def episodes(tok, tiny):
    cfg, params = tiny
    mt = multiturn.MultiTurnConfig(max_turns=3, max_turn_tokens=4, max_total_tokens=40)
    sampler = multiturn.MultiTurnSampler(policy.decode_model(cfg),
                                         SamplerConfig(record_topk=4, temperature=1.0), mt)
    r, traj = sampler.run(params, envs(tok, 6), [1, 2, 3], 2, jax.random.key(1))
    return r, traj


def test_kv_continuation_equals_a_full_prefill_of_the_trajectory(tiny, episodes):
    cfg, params = tiny
    r, traj = episodes
    assert (traj.num_turns > 1).all()  # several turns, observations in between
    lp = jax.nn.log_softmax(tm.forward_logits(params, cfg, r.tokens, r.positions,
                                              r.valid_mask)[:, r.prompt_len - 1:-1], -1)
    m = np.asarray(r.response_mask) > 0
    full = np.asarray(jnp.take_along_axis(lp, r.response_tokens[..., None], -1)[..., 0])
    np.testing.assert_allclose(full[m], np.asarray(r.rollout_logp)[m], atol=2e-5)
    # mu's recorded top-K equals the full forward's at the policy tokens
    top = np.asarray(jnp.take_along_axis(lp, r.rollout_topk_ids, -1))
    np.testing.assert_allclose(top[m], np.asarray(r.rollout_topk_logp)[m], atol=2e-5)
    assert not np.asarray(r.rollout_logp)[~m].any() and not np.asarray(r.rollout_topk_ids)[~m].any()
    record.validate(jax.device_get(r), cfg.vocab_size)


def test_trajectories_replay_turn_by_turn_through_fresh_environments(tok, episodes):
    """Rows end their turns at different steps (one row feeds its observation while another
    waits for its environment): each row's trajectory is still exactly its own turns and the
    observations a fresh environment gives for them."""
    r, traj = episodes
    toks, m = np.asarray(r.response_tokens), np.asarray(r.response_mask) > 0
    assert len({tuple(np.flatnonzero(row)) for row in m}) > 1  # the rows are out of step
    for i in range(toks.shape[0]):
        env = envs(tok, 1)[0]
        env.reset(int(traj.seeds[i]))
        want, mask = [], []
        for k in range(int(traj.num_turns[i])):
            turn = toks[i][(traj.turn_index[i] == k) & m[i]].tolist()
            step = env.step(turn, ended=turn[-1] == env.eot)
            want += turn + (step.obs_ids if k + 1 < traj.num_turns[i] else [])
            mask += [1] * len(turn) + [0] * (len(want) - len(mask) - len(turn))
            assert step.reward == traj.turn_rewards[i, k]
        assert toks[i, :len(want)].tolist() == want and not toks[i, len(want):].any()
        assert m[i, :len(want)].tolist() == [bool(x) for x in mask] and not m[i, len(want):].any()


def test_masks_and_denominators_count_policy_tokens_only(episodes):
    r, traj = episodes
    m = np.asarray(r.response_mask)
    obs = (traj.turn_index >= 0) & (m == 0)
    assert obs.sum() > 0 and m.sum() > 0
    rng = np.random.default_rng(0)
    logp = np.asarray(r.rollout_logp) + rng.normal(0, 0.3, m.shape).astype(np.float32) * m
    adv = rng.normal(size=m.shape[0]).astype(np.float32)
    loss, _ = losses.policy_loss(jnp.asarray(logp), r.rollout_logp, jnp.asarray(adv),
                                 r.response_mask, method="pg_is", delta_low=0.2, delta_high=0.2,
                                 agg="token-mean")
    ratio = np.exp(logp - np.asarray(r.rollout_logp))
    want = -(ratio * adv[:, None] * m).sum() / m.sum()  # value of the IS surrogate, policy only
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # changing observation columns' logp changes nothing
    loss2, _ = losses.policy_loss(jnp.asarray(logp + 5.0 * obs), r.rollout_logp,
                                  jnp.asarray(adv), r.response_mask, method="pg_is",
                                  delta_low=0.2, delta_high=0.2, agg="token-mean")
    assert float(loss2) == float(loss)
    metrics = traj.metrics(r.response_mask)
    assert metrics["episode/obs_policy_ratio"] == pytest.approx(obs.sum() / m.sum())
    assert metrics["episode/turns_mean"] == pytest.approx(traj.num_turns.mean())


@pytest.mark.slow
def test_dppo_mask_uses_mu_per_policy_token_against_a_turn_by_turn_reference(tiny, episodes):
    """The trainer's one forward over the episode vs a slow reference that runs each turn
    separately (its prefix from scratch): same pi log-probs, hence the same DPPO mask."""
    cfg, params = tiny
    r, traj = episodes
    moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape),
                         params)  # pi after some updates
    p = r.prompt_len
    got = np.asarray(policy.response_logp(moved, cfg, r.tokens, r.positions, r.valid_mask,
                                          num_response=r.response_tokens.shape[1]))
    ref = np.zeros_like(got)
    toks, valid = np.asarray(r.tokens), np.asarray(r.valid_mask)
    for i in range(toks.shape[0]):
        start = int((valid[i, :p] == 0).sum())
        for k in range(int(traj.num_turns[i])):
            cols = np.flatnonzero((traj.turn_index[i] == k) & (np.asarray(r.response_mask[i])
                                                                > 0))
            end = p + cols[-1] + 1  # the turn's prefix and its tokens, nothing after
            seq = jnp.asarray(toks[i, start:end])[None]
            lp = jax.nn.log_softmax(tm.forward_logits(
                moved, cfg, seq, jnp.arange(seq.shape[1])[None], jnp.ones_like(seq)), -1)[0]
            for c in cols:
                ref[i, c] = lp[p + c - 1 - start, toks[i, p + c]]
    m = np.asarray(r.response_mask) > 0
    np.testing.assert_allclose(got[m], ref[m], atol=2e-5)
    tv = np.abs(np.exp(got[m]) - np.exp(np.asarray(r.rollout_logp)[m]))
    delta = float(np.median(tv))  # about half the policy tokens leave the trust region
    mask = functools.partial(losses.policy_loss, rollout_logp=r.rollout_logp,
                             advantages=jnp.ones(m.shape[0]), mask=r.response_mask,
                             method="dppo_binary_tv", delta_low=delta, delta_high=delta)
    _, m_got = mask(jnp.asarray(got))
    _, m_ref = mask(jnp.asarray(ref))
    assert 0 < float(m_got["loss/masked_frac"]) < 1
    assert float(m_got["loss/masked_frac"]) == pytest.approx(float(m_ref["loss/masked_frac"]))


def test_turn_and_episode_advantages_by_hand():
    r = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    n = np.array([3, 2, 1, 4])
    a = adv_lib.turn_advantages(r, n, 2)
    # group 0: G = [1,1,1] and [1,1]: every turn at its baseline; group 1: turn 0 +-0.5, then
    # turns only episode 3 played (a baseline of itself): 0
    np.testing.assert_allclose(a, [[0, 0, 0, 0], [0, 0, 0, 0], [.5, 0, 0, 0], [-.5, 0, 0, 0]])
    r2 = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 2]], np.float32)
    n2 = np.array([2, 1, 3, 3])
    # group 0: turn 0 G = 1, 1 -> 0; turn 1: only ep 0 -> 0. group 1: G0 = 0, 2 -> -1, +1;
    # G1 = 0, 2 -> -1, +1; G2 = 0, 2 -> -1, +1
    np.testing.assert_allclose(adv_lib.turn_advantages(r2, n2, 2),
                               [[0, 0, 0], [0, 0, 0], [-1, -1, -1], [1, 1, 1]])
    np.testing.assert_allclose(adv_lib.turn_advantages(r2, n2, 2, "rloo"),
                               [[0, 0, 0], [0, 0, 0], [-2, -2, -2], [2, 2, 2]])
    g = adv_lib.turn_advantages(r2, n2, 2, "grpo")
    np.testing.assert_allclose(g[2:], [[-1, -1, -1], [1, 1, 1]], atol=1e-5)
    # one turn per episode: exactly the single-turn advantages
    one = adv_lib.turn_advantages(r[:, :1], np.ones(4, int), 2, "grpo")[:, 0]
    np.testing.assert_allclose(one, adv_lib.grpo(r[:, 0], 2), atol=1e-6)
    # broadcast to tokens by turn index (-1: padding -> 0)
    idx = np.array([[0, 0, 1, 1, -1], [0, 1, 2, -1, -1]])
    np.testing.assert_allclose(trajectory.token_advantages([[1, 2, 0], [3, 4, 5]], idx),
                               [[1, 1, 2, 2, 0], [3, 4, 5, 0, 0]])
    with pytest.raises(ValueError, match="unknown advantage method 'x'"):
        adv_lib.turn_advantages(r, n, 2, "x")


def test_environment_errors_name_the_valid_choices(tok):
    with pytest.raises(ValueError, match=r"unknown trustrl environment 'nope'.*guess_sum"):
        envs_lib.make("trustrl:nope")
    with pytest.raises(ValueError, match="must be '<source>:<name>'"):
        envs_lib.make("guess_sum")
    with pytest.raises(ValueError, match="unknown turn template 'x'"):
        envs_lib.TurnTemplate("x")
    env = envs_lib.GuessTheSum()
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("3")
    obs, info = env.reset(5)
    assert env.reset(5) == (obs, info)  # deterministic per seed
    ans = int(info["answer"])
    assert env.step(str(ans - 1))[:3] == ("higher", 0.0, False)
    assert env.step(f"it is {ans}")[1:3] == (1.0, True)
    g = envs_lib.GuessTheNumber(high=8)
    g.reset(2)
    assert g.step("nothing")[0] == "invalid"


@pytest.mark.slow
def test_fewer_rows_than_episodes_and_early_exits_play_the_same_greedy_episodes(tok, tiny):
    """max_rows=2 for 6 episodes (a finished episode's row takes the next one: cache row
    emptied, prompt appended) and exits as soon as one row waits give each episode exactly the
    trajectory of one row per episode with turn-synchronous exits."""
    cfg, params = tiny
    model = policy.decode_model(cfg)
    mt = multiturn.MultiTurnConfig(max_turns=3, max_turn_tokens=4, max_total_tokens=40)

    def play(max_rows, exit_fraction):
        sampler = multiturn.MultiTurnSampler(
            model, SamplerConfig(greedy=True, record_topk=3, max_rows=max_rows),
            dataclasses.replace(mt, exit_fraction=exit_fraction))
        r, traj = sampler.run(params, envs(tok, 6), [1, 2, 3], 2, jax.random.key(1))
        return jax.device_get(r), traj, sampler.counts

    base, traj0, c0 = play(0, 1.0)
    assert c0.appends >= 1 and (traj0.num_turns > 1).any()
    merges = 0  # exits that only moved the round region (rows still generating)
    for max_rows, frac in ((2, 1.0), (0, 1e-6), (4, 1e-6)):
        r, traj, counts = play(max_rows, frac)
        merges += counts.merges
        np.testing.assert_array_equal(r.response_tokens, base.response_tokens)
        np.testing.assert_array_equal(r.response_mask, base.response_mask)
        np.testing.assert_array_equal(r.rollout_topk_ids, base.rollout_topk_ids)
        np.testing.assert_allclose(r.rollout_logp, base.rollout_logp, atol=2e-5)
        np.testing.assert_array_equal(traj.turn_index, traj0.turn_index)
        np.testing.assert_array_equal(traj.processed, traj0.processed)
        if max_rows:  # the refilled rows' prompts were prefilled through appends
            assert counts.prefill_tokens == int(np.asarray(base.prompt_mask).sum())
    assert merges >= 1
    with pytest.raises(ValueError, match="exit_fraction must be a number in"):
        multiturn.MultiTurnConfig(exit_fraction=0)


def test_turns_to_solve_counts_only_solved_episodes():
    """A game that terminates on failure (return 0) is not a solve: the training metric uses
    Trajectories.solved, as the evaluation does."""
    tr = trajectory
    traj = tr.Trajectories.assemble(
        turn_index=np.zeros((3, 4), np.int32), rewards=[[0.0, 1.0], [0.0, 0.0, 0.0], [0.0]],
        max_turns=3, finish=[tr.TERMINATED, tr.TERMINATED, tr.MAX_TURNS], seeds=[0, 1, 2],
        turn_ends=np.zeros(len(tr.TURN_ENDS), np.int64), processed=[4, 4, 4])
    assert traj.solved.tolist() == [True, False, False]
    assert traj.metrics(np.ones((3, 4)))["episode/turns_to_solve"] == 2.0  # not (2 + 3) / 2
    failed = tr.Trajectories.assemble(
        turn_index=np.zeros((1, 4), np.int32), rewards=[[0.0]], max_turns=3,
        finish=[tr.TERMINATED], seeds=[0], turn_ends=np.zeros(len(tr.TURN_ENDS), np.int64),
        processed=[4])
    assert "episode/turns_to_solve" not in failed.metrics(np.ones((1, 4)))


def test_round_region_moves_into_each_rows_next_columns():
    """The loop writes at a shared column of the round region; _from_loop moves each row's
    valid round tokens, in order, to its own next columns (a numpy reference), clears the
    region, and advances the rows' columns; keys and values bit for bit (bf16)."""
    from trustrl.model import transformer as M
    b, kh, s, d, width = 3, 2, 14, 4, 5
    rng = np.random.default_rng(0)
    cols = np.array([4, 9, 6], np.int32)  # row 1 is the longest: the region is 9 .. 13
    valid = np.zeros((b, s), bool)
    for i, c in enumerate(cols):
        valid[i, :c] = rng.random(c) < 0.8  # rows may have holes (reset / padding)
    ok = rng.random((b, width)) < 0.6
    ok[1, 0] = True  # the longest row's first round token stays where it is
    valid[:, 9:9 + width] = ok
    bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
    k = [jnp.asarray(rng.normal(size=(b, kh, s, d)), jnp.bfloat16) for _ in range(2)]
    v = [jnp.asarray(rng.normal(size=(b, kh, s, d)), jnp.bfloat16) for _ in range(2)]
    cache = M.KVCache(tuple(k), tuple(v), jnp.asarray(valid), jnp.int32(9 + width))
    got, new_cols = jax.jit(multiturn._from_loop, static_argnums=2)(cache, jnp.asarray(cols),
                                                                     width)
    want_valid = valid.copy()
    want_valid[:, 9:] = False
    want_k = [np.asarray(bits(x)).copy() for x in k]
    for i in range(b):
        src = [9 + j for j in range(width) if ok[i, j]]
        for r, col in enumerate(src):
            want_valid[i, cols[i] + r] = True
            for w, x in zip(want_k, k):
                w[i, :, cols[i] + r] = np.asarray(bits(x))[i, :, col]
    np.testing.assert_array_equal(np.asarray(new_cols), cols + ok.sum(1))
    np.testing.assert_array_equal(np.asarray(got.index), cols + ok.sum(1))
    np.testing.assert_array_equal(np.asarray(got.valid), want_valid)
    for w, x in zip(want_k, got.k):
        rows_cols = want_valid  # the garbage of empty slots is not compared
        np.testing.assert_array_equal(np.asarray(bits(x))[np.broadcast_to(
            rows_cols[:, None, :, None], w.shape)], w[np.broadcast_to(
                rows_cols[:, None, :, None], w.shape)])
    assert ok.sum() > 3 and (ok.sum(1) > 0).all()


def test_the_loop_writes_the_cache_at_a_shared_column(tiny):
    """The compiled CPU decode loop updates the KV cache with dynamic_update_slice at one
    column, not a per-row scatter (which cost XLA:CPU a copy of every layer's cache a step)."""
    import re
    cfg, params = tiny
    mts = multiturn.MultiTurnSampler(policy.decode_model(cfg), SamplerConfig(record_topk=2),
                                     multiturn.MultiTurnConfig(max_turns=2, max_turn_tokens=3,
                                                               max_total_tokens=12))
    toks, valid = jnp.ones((4, 8), jnp.int32), jnp.ones((4, 8), jnp.int32)
    logits, cache = mts._prefill(params, toks, valid, length=8 + 12 + 3)
    s = multiturn._initial_state(logits, cache, jax.random.key(0), valid, 12, 2)
    assert s.cache.index.shape == () and int(s.cache.index) == 8 and s.cols.tolist() == [8] * 4
    hlo = mts._loop_fn(0).lower(params, s).compile().as_text()
    shape = re.compile(rf"\[4,{cfg.num_kv_heads},23,{cfg.head_dim}\]")  # the cache
    scatters = [ln for ln in hlo.splitlines() if "scatter(" in ln and shape.search(ln)]
    updates = [ln for ln in hlo.splitlines() if "dynamic-update-slice(" in ln
               and shape.search(ln)]
    assert not scatters, scatters[:2]
    assert len(updates) >= 2 * cfg.num_layers  # keys and values of every layer
