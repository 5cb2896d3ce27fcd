"""The sanity-study pieces: long-tailed filler, solve-band filtering, the --small study."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import sanity
from trustrl.training import config_validation, filtering, warmstart
from trustrl.data import rewards, tasks
from trustrl.data.tokenizer import train_bpe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lexicon_is_deterministic_distinct_and_short_words_first():
    lex = tasks.make_lexicon(500, seed=3)
    assert lex == tasks.make_lexicon(500, seed=3) and lex != tasks.make_lexicon(500, seed=4)
    assert len(set(lex)) == 500 and all(w.isalpha() and w.islower() for w in lex)
    assert [len(w) for w in lex] == sorted(len(w) for w in lex)
    with pytest.raises(ValueError, match="size"):
        tasks.make_lexicon(0)


def test_filler_follows_the_zipf_law_and_length_bounds():
    lex = tasks.make_lexicon(200)
    rng = np.random.default_rng(0)
    texts = [tasks.filler_text(rng, lex, zipf=1.1, min_words=2, max_words=5) for _ in range(3000)]
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) == 2 and max(lengths) == 5
    counts = np.bincount([lex.index(w) for t in texts for w in t.split()], minlength=200)
    # P(i) ~ (i+1)^-1.1: word 0 vs word 9 is 10^1.1 = 12.6x
    assert 9 < counts[0] / counts[9] < 17
    assert (counts == 0).sum() < 60  # the tail is visited, not cut off
    with pytest.raises(ValueError, match="min_words"):
        tasks.filler_text(rng, lex, zipf=1.1, min_words=3, max_words=2)


class _Env:
    """Just enough of experiment.TaskEnv for the warm-start encoder."""
    def __init__(self, tok):
        self.tokenizer = tok

    def encode_prompts(self, examples):
        return [self.tokenizer.encode(f"Question: {ex['prompt']}\nAnswer:") for ex in examples]


def test_worked_answers_with_filler_parse_to_the_answer_and_mark_the_answer_part():
    lex = tasks.make_lexicon(100)
    rng = np.random.default_rng(1)
    corpus = [tasks.filler_text(rng, lex, zipf=1.1, min_words=2, max_words=6) +
              f"\nAnswer: {i}" for i in range(500)]
    tok = train_bpe(corpus, 400, split_digits=True)
    env = _Env(tok)
    examples = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]
    filler = dict(lexicon=lex, zipf=1.1, min_words=2, max_words=6)
    prompts, answers, starts = warmstart.encode_pairs(env, examples, filler, seed=0)
    again = warmstart.encode_pairs(env, examples, filler, seed=0)
    assert answers == again[1] and answers != warmstart.encode_pairs(env, examples, filler, 1)[1]
    eos = tok.eos_id
    for ex, ans, st in zip(examples, answers, starts):
        assert ans[-1] == eos and 0 < st < len(ans)
        head = tok.decode(ans[:st])
        tail = tok.decode(ans[st:], skip_special_tokens=True)
        assert 2 <= len(head.split()) <= 6 and all(w in lex for w in head.split())
        assert tail == f"\nAnswer: {ex['answer']}"
        text = tok.decode(ans, skip_special_tokens=True)
        # scored as the trainer scores it: the prompt's "Answer:" prefix + the response
        assert rewards.extract_answer("Answer:" + text) == ex["answer"]
    batch = warmstart.make_batch(prompts[:3], answers[:3], starts[:3])
    for i in range(3):
        am, rm = batch["answer_mask"][i], batch["response_mask"][i]
        assert am.sum() == len(answers[i]) - starts[i] and rm.sum() == len(answers[i])
        assert np.all(am <= rm) and am[starts[i]] == 1 and am[starts[i] - 1] == 0
    plain = warmstart.encode_pairs(env, examples[:2])
    assert plain[2] == [0, 0] and tok.decode(plain[1][0], skip_special_tokens=True) == " 1"


class _FakeRollout:
    def __init__(self, texts):
        self.texts = texts


class _FakeSampler:
    """Response j of example "n" is correct iff j < n: example n's solve rate is n / samples."""
    calls = 0

    def generate(self, params, prompts, samples, key):
        _FakeSampler.calls += 1
        texts = []
        for p in prompts:
            n = int(p[0])
            texts += [" ok" if j < n else " no" for j in range(samples)]
        return _FakeRollout(texts)


class _FakeEnv:
    correct_threshold = 0.5

    def encode_prompts(self, examples):
        return [[int(ex["answer"])] for ex in examples]

    def decode_responses(self, rollout):
        return rollout.texts

    def score(self, texts, answers):
        return np.array([t == " ok" for t in texts], float)


def test_solve_rates_count_correct_samples_per_problem_across_padded_chunks():
    import jax
    examples = [{"answer": str(n)} for n in (0, 1, 4, 3, 2)]
    _FakeSampler.calls = 0
    rates = filtering.solve_rates(_FakeEnv(), _FakeSampler(), None, examples, 4,
                                  jax.random.key(0), chunk=3)
    np.testing.assert_allclose(rates, [0, 0.25, 1.0, 0.75, 0.5])
    assert _FakeSampler.calls == 2


@pytest.mark.parametrize("field,value,needle", [
    ("task.filler_words", -1, "filler_words"),
    ("task.filler_min", 9, "filler_min"),
    ("task.filter_samples", -2, "filter_samples"),
    ("task.solve_band_low", 0.9, "solve_band_low"),
])
def test_sanity_config_errors(field, value, needle):
    cfg = sanity.get_config("pg_is")
    config_validation.validate(cfg)
    node = cfg
    *path, last = field.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    with pytest.raises(ValueError, match=needle):
        config_validation.validate(cfg)
    with pytest.raises(ValueError, match="dppo_binary_tv"):
        sanity.get_config("dppo")


def _run_launcher(env, *args):
    out = subprocess.run([sys.executable, "launch/sanity.py", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_small_sanity_study_end_to_end(tmp_path, subprocess_env):
    """`launch/sanity.py --small` (what CI runs): filler, filtering, bf16 rollout, table, plots."""
    _run_launcher(subprocess_env, "--small", "--parallel=2", f"--workdir={tmp_path / 'runs'}",
                  f"--out={tmp_path / 'out'}")
    table = (tmp_path / "out" / "results_table.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| dppo_binary_tv |")
            or ln.startswith("| pg_is |")]
    assert len(rows) == 2
    plots = os.listdir(tmp_path / "out" / "sanity_plots")
    assert "reward_mean.png" in plots and "rollout_mismatch_mean.png" in plots
    info = json.loads((tmp_path / "runs" / "pg_is_seed0" / "filter.json").read_text())
    assert 0 < len(info["kept"]) <= 16
    rows = [json.loads(ln) for ln in
            (tmp_path / "runs" / "pg_is_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 0: the base's eval before RL
    rows = rows[1:]
    assert all(np.isfinite(r["rollout/mismatch_mean"]) for r in rows)
    assert rows[-1]["rollout/mismatch_mean"] > 0  # a bf16 rollout vs the fp32 trainer


def test_mismatch_by_mu_buckets_hand_values():
    from trustrl.rollout.record import mismatch_by_mu
    mu = np.array([[0.005, 0.05, 0.3, 0.9], [0.02, 1.0, 0.5, 0.7]])
    pi = np.array([[0.010, 0.05, 0.3, 0.8], [0.01, 1.0, 0.6, 0.7]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])  # 0.7 is padding
    out = mismatch_by_mu(np.log(pi), np.log(mu), mask)
    assert [b["tokens"] for b in out] == [1, 2, 1, 3]  # mu = 0.5 and 1.0 land in the top bucket
    assert sum(b["share"] for b in out) == pytest.approx(1.0)
    assert out[0]["max_ratio"] == pytest.approx(2.0) and out[0]["mean_abs_diff"] == pytest.approx(0.005)
    assert out[1]["max_ratio"] == pytest.approx(2.0)  # mu 0.02 -> pi 0.01
    assert out[1]["mean_abs_log_ratio"] == pytest.approx(np.log(2) / 2)
    assert out[2]["max_ratio"] == pytest.approx(1.0)
    assert out[3]["mean_abs_diff"] == pytest.approx((0.1 + 0 + 0.1) / 3)
    assert out[3]["max_ratio"] == pytest.approx(1.2)


@pytest.mark.slow
def test_mismatch_profile_small(tmp_path, subprocess_env):
    """`launch/sanity.py --mismatch_profile --small`: a bf16 rollout mismatches, fp32 ~does not."""
    _run_launcher(subprocess_env, "--mismatch_profile", "--small", f"--workdir={tmp_path / 'w'}",
                  f"--out={tmp_path / 'out'}")
    rows = [ln.split("|")[1:-1] for ln in
            (tmp_path / "out" / "mismatch_profile.md").read_text().splitlines()[2:]]
    by_dtype = {}
    for r in rows:
        if int(r[2]) > 0:
            by_dtype.setdefault(r[0].strip(), []).append(float(r[5]))  # mean abs log ratio
    assert set(by_dtype) == {"bfloat16", "float32"}
    assert max(by_dtype["bfloat16"]) > 1e-5  # bf16 rounding is visible (~4e-4 here)
    assert max(by_dtype["float32"]) < min(by_dtype["bfloat16"]) / 100


def test_quant_study_runs_in_priority_order_with_the_right_precisions():
    """Issue 15's study: fp8's core six first, then the four controls, the bf16 trainer, int8 for
    pg_is / pg_tis / dppo_binary_tv, fp8 seed 1, ...; every quantised name once per seed."""
    entries = sanity.get_quant_sweep()
    names = [e["config_arg"] for e in entries]
    assert names[:6] == [f"{m}_fp8" for m in sanity.CORE]
    assert names[6:10] == ["pg_is_fp32", "dppo_binary_tv_fp32", "pg_is", "dppo_binary_tv"]
    assert names[10:12] == ["pg_is_bf16trainer", "dppo_binary_tv_bf16trainer"]
    assert names[12:15] == ["pg_is_int8", "pg_tis_int8", "dppo_binary_tv_int8"]
    assert [(e["config_arg"], e["seed"]) for e in entries[15:21]] == [
        (f"{m}_fp8", 1) for m in sanity.CORE]
    assert len({(e["config_arg"], e["seed"]) for e in entries}) == len(entries)
    quant = {n for n, (_, d, _) in sanity.SANITY_METHODS.items() if d in sanity.QUANT_DTYPES}
    assert quant == {n for n in names if n.endswith(("_int8", "_fp8"))} and len(quant) == 22
    seeds = {n: sorted(e["seed"] for e in entries if e["config_arg"] == n) for n in quant}
    assert all(s == ([0, 1, 2] if n.rsplit("_", 1)[0] in sanity.CORE else [0])
               for n, s in seeds.items())
    for e in entries:
        c = sanity.get_config(e["config_arg"] + ",long")
        config_validation.validate(c)
        assert c.train.iterations == sanity.LONG_ITERATIONS == 200
        assert c.optim.learning_rate == sanity.LEARNING_RATE  # no per-method tuning
        suffix = e["config_arg"].rsplit("_", 1)[1]
        if suffix in sanity.QUANT_DTYPES:
            assert c.rollout.dtype == suffix and c.model.dtype == "float32"
    t = sanity.get_config("pg_is_bf16trainer")
    assert (t.model.dtype, t.model.param_dtype, t.rollout.dtype) == (
        "bfloat16", "float32", "bfloat16")
    # the main study is unchanged: 25 runs, bf16 / fp32 rollouts and an fp32 trainer only
    main = sanity.get_sweep()
    assert len(main) == 25 and all(not e["config_arg"].endswith(("_int8", "_fp8", "trainer"))
                                   for e in main)


def test_bf16_trainer_starts_from_the_fp32_runs_base(tmp_path, monkeypatch):
    """warmstart.dtype: the base (warm start + filter) of a bf16-compute trainer is built in fp32,
    under the same cache key as the fp32 trainer's, so both RL runs start from one base."""
    from trustrl.training import experiment
    seen = []

    def fake_warm_start(cfg, env, model_cfg, params, mesh):
        seen.append(("warm", model_cfg.dtype, warmstart.cache_key(cfg, env, model_cfg)))
        return params

    def fake_filter(cfg, env, model_cfg, sampler_cfg, params, mesh, warm_key):
        seen.append(("filter", model_cfg.dtype, warm_key))
        return {"kept": [0, 1]}

    monkeypatch.setattr(warmstart, "warm_start", fake_warm_start)
    monkeypatch.setattr(filtering, "filter_train", fake_filter)
    runs = {}
    for name in ("pg_is", "pg_is_bf16trainer"):
        cfg = sanity.get_config(name + ",small")
        cfg.warmstart.cache_dir = str(tmp_path / "cache")
        cfg.task.data_dir = str(tmp_path / "data")
        runs[name] = experiment.build(cfg, str(tmp_path / name))
    assert runs["pg_is"].model_cfg.dtype == "float32"
    assert runs["pg_is_bf16trainer"].model_cfg.dtype == "bfloat16"
    assert [s[1] for s in seen] == ["float32"] * 4  # warm + filter, for both runs
    assert seen[0][2] == seen[2][2] and seen[1][2] == seen[3][2] == seen[0][2]
    with pytest.raises(ValueError, match="warmstart.dtype"):
        bad = sanity.get_config("pg_is,small")
        bad.warmstart.dtype = "fp8"
        config_validation.validate(bad)
