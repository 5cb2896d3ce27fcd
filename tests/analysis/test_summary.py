"""The closing summary (windowed means, standard errors) and the step-0 eval it compares to."""
import io
import math

import numpy as np
import pytest

from configs import default
from trustrl.analysis import summary
from trustrl.training import loop as train
from trustrl.infra.metrics import read_jsonl


def _rows(rewards, evals):
    """metrics rows: iterations 1.. with reward/mean; evals {step: (pass@1, sampled, se)}."""
    rows = {s: {"step": s} for s in range(0, len(rewards) + 1)}
    for i, r in enumerate(rewards, start=1):
        rows[i]["reward/mean"] = r
    for s, (p, m, se) in evals.items():
        rows[s].update({"eval/pass@1": p, "eval/num_prompts": 100,
                        "eval/sampled_reward_mean": m, "eval/sampled_reward_se": se})
    return [rows[s] for s in sorted(rows) if len(rows[s]) > 1]


def test_binomial_se_hand_values():
    assert summary.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert summary.binomial_se(0.9, 400) == pytest.approx(0.015)
    assert summary.binomial_se(1.0, 10) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        summary.binomial_se(0.5, 0)


def test_windowed_means_and_errors_on_hand_rows():
    # 12 iterations, window 4: first 4 = [0.1, 0.3, 0.2, 0.4], last 4 = [0.7, 0.9, 0.8, 0.6]
    rewards = [0.1, 0.3, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5, 0.7, 0.9, 0.8, 0.6]
    rows = _rows(rewards, {0: (0.8, 0.6, 0.03), 6: (0.5, 0.1, 0.2), 12: (0.9, 0.7, 0.04)})
    s = summary.summarize(rows, window=4)
    first, last = s["train"]["first"], s["train"]["last"]
    # mean 0.25, sample std sqrt(((.15)^2+(.05)^2+(.05)^2+(.15)^2)/3) = 0.129099, / sqrt(4)
    assert first["value"] == pytest.approx(0.25) and first["se"] == pytest.approx(0.0645497)
    assert last["value"] == pytest.approx(0.75) and last["se"] == pytest.approx(0.0645497)
    assert first["steps"] == (1, 4) and last["steps"] == (9, 12)
    assert s["train"]["change"]["value"] == pytest.approx(0.5)
    assert s["train"]["change"]["se"] == pytest.approx(0.0645497 * math.sqrt(2))
    g = s["eval"]["eval/pass@1"]  # before = step 0, after = the last eval (not step 6)
    assert (g["before"]["step"], g["after"]["step"]) == (0, 12)
    assert g["before"]["se"] == pytest.approx(0.04)  # sqrt(.8 * .2 / 100)
    assert g["after"]["se"] == pytest.approx(0.03)   # sqrt(.9 * .1 / 100)
    assert g["change"]["value"] == pytest.approx(0.1) and g["change"]["se"] == pytest.approx(0.05)
    m = s["eval"]["eval/sampled_reward_mean"]
    assert m["change"]["value"] == pytest.approx(0.1) and m["change"]["se"] == pytest.approx(0.05)

    text = summary.format_summary(s)
    lines = text.splitlines()
    assert len(lines) == 3, text
    assert lines[0] == ("training reward, mean ± s.e. over 4 iterations: 0.250 ± 0.065 "
                        "(iterations 1-4) -> 0.750 ± 0.065 (iterations 9-12); change "
                        "+0.500 ± 0.091 (+5.5 s.e.)")
    assert lines[1] == ("held-out greedy pass@1 (100 prompts, ± binomial s.e.): 0.800 ± 0.040 "
                        "(before RL) -> 0.900 ± 0.030 (iteration 12); change +0.100 ± 0.050 "
                        "(+2.0 s.e.)")
    assert lines[2].startswith("held-out T=1 reward (100 prompts, ± s.e. over prompts): "
                               "0.600 ± 0.030 (before RL) -> 0.700 ± 0.040")


def test_short_runs_missing_fields_and_non_finite_are_reported():
    rows = _rows([0.5, float("nan"), 0.7], {})
    s = summary.summarize(rows, window=10)
    assert s["window"] == 3 and s["train"]["first"]["steps"] == (1, 3)
    text = summary.format_summary(s)
    assert "fewer than two evals in this run" in text
    one = _rows([0.5, 0.6], {0: (0.8, 0.6, 0.03)})  # a single eval: no change to report
    assert summary.summarize(one)["eval"] == {}
    assert "WARNING non-finite values: [(2, 'reward/mean')]" in text
    # an old run: first eval at iteration 25, no eval/num_prompts -> no standard error
    old = [{"step": 25, "reward/mean": 0.5, "eval/pass@1": 0.9},
           {"step": 50, "reward/mean": 0.6, "eval/pass@1": 0.8}]
    line = summary.format_summary(summary.summarize(old)).splitlines()[1]
    assert "s.e. unknown" in line and "iteration 25: no step-0 eval" in line
    assert "0.900 (iteration 25: no step-0 eval) -> 0.800 (iteration 50); change -0.100" in line
    with pytest.raises(ValueError, match="no training rows"):
        summary.summarize([{"step": 0, "eval/pass@1": 0.5}])
    with pytest.raises(ValueError, match="window must be >= 1"):
        summary.summarize(old, window=0)


def test_step0_eval_row_after_a_tiny_run_and_its_resume(tmp_path):
    wd = str(tmp_path / "run")
    cfg = default.get_config("tiny")  # 2 iterations, eval every iteration, checkpoint every 1
    train.train(cfg, wd)
    rows = read_jsonl(f"{wd}/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    base = rows[0]
    assert "reward/mean" not in base and "train/grad_norm" not in base  # no update yet
    assert base["eval/num_prompts"] == 8 and 0.0 <= base["eval/pass@1"] <= 1.0
    assert np.isfinite(base["eval/sampled_reward_se"])
    # a resumed run neither repeats nor drops the step-0 row
    cfg.train.iterations = 3
    train.train(cfg, wd)
    rows = read_jsonl(f"{wd}/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0] == base
    with open(f"{wd}/metrics.jsonl") as f:
        assert sum('"step": 0,' in line for line in f) == 1
    out = io.StringIO()
    s = summary.print_summary(rows, file=out)
    assert s["eval"]["eval/pass@1"]["before"]["step"] == 0
    assert s["train"]["first"]["steps"] == (1, 3)
    assert "(before RL)" in out.getvalue()


def test_robustness_study_commands_and_table():
    from launch import demo_robustness as dr
    specs = dr.run_specs([0, 1], [0], ["fastmath"], "wd")
    assert [s[0] for s in specs] == ["ws0_seed0", "ws0_seed1", "xla_fastmath_ws0_seed0"]
    cmds = dr.commands(specs, "wd")
    assert "--config.seed=1" in cmds[1] and "--config.warmstart.seed=0" in cmds[1]
    assert cmds[2][:2] == ["env", "XLA_FLAGS=--xla_cpu_enable_fast_math=true"]
    assert "--config.warmstart.cache_dir=wd/cache_fastmath" in cmds[2]
    with pytest.raises(SystemExit, match="unknown --xla variant 'avx9'; valid"):
        dr.run_specs([0], [0], ["avx9"], "wd")
    a = _rows([0.2] * 10 + [0.6] * 10, {0: (0.8, 0.5, 0.05), 20: (0.9, 0.7, 0.05)})
    b = _rows([0.4] * 10 + [0.8] * 10, {0: (0.6, 0.3, 0.05), 20: (0.7, 0.5, 0.05)})
    rows = [dr.run_row(summary.summarize(r)) for r in (a, b)]
    np.testing.assert_allclose(rows[0], [0.2, 0.6, 0.8, 0.9, 0.5, 0.7])
    lines = dr.table(["a", "b"], rows).splitlines()
    assert lines[-3] == "| **mean** | 0.300 | 0.700 | 0.700 | 0.800 | 0.400 | 0.600 |"
    assert lines[-2] == "| **min** | 0.200 | 0.600 | 0.600 | 0.700 | 0.300 | 0.500 |"
    assert lines[-1] == "| **max** | 0.400 | 0.800 | 0.800 | 0.900 | 0.500 | 0.700 |"
