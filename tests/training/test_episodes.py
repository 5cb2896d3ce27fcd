"""Environment episodes in the run (trustrl.training.episodes): a tiny multi-turn run with
per-turn advantages and a resume, and a tiny model that learns the native multi-turn task."""
import numpy as np
import pytest

from configs import environments
from trustrl.infra.metrics import read_jsonl
from trustrl.training import loop as train

from test_train import LEARN, set_fields as _set


@pytest.mark.slow
def test_a_tiny_multi_turn_run_with_turn_advantages_logs_episodes_and_resumes(tmp_path):
    cfg = _set(environments.get_config("tiny"), {"env.advantage": "turn"})
    wd = str(tmp_path / "run")
    train.train(cfg, wd)
    rows = read_jsonl(wd + "/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {"eval/pass@1", "eval/return_mean", "eval/turns_mean"} <= set(rows[0])
    for row in rows[1:]:
        assert row["reward/mean"] == pytest.approx(row["episode/return_mean"])
        assert 1 <= row["episode/turns_mean"] <= cfg.env.max_turns
        assert row["episode/obs_policy_ratio"] > 0  # observations between the turns
        assert np.isfinite(row["episode/mismatch_turn0"]) and np.isfinite(row["loss/value"])
        assert row["train/optimizer_steps"] > 0
    cfg.train.iterations = 3  # resumed: one more iteration from the checkpoint of iteration 2
    train.train(cfg, wd)
    rows = read_jsonl(wd + "/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["train/optimizer_steps"] == 3 * cfg.train.minibatches


@pytest.mark.optimized  # execution-bound: compiled at XLA's default level
@pytest.mark.slow
def test_a_tiny_model_learns_the_multi_turn_task(tmp_path):
    """One-digit additions answered over up to 3 turns with higher / lower feedback, after a
    short single-turn warm start: the episode return rises and episodes get shorter."""
    cfg = _set(environments.get_config("default"), {
        **LEARN, "env.kwargs.difficulty": 1, "env.max_turn_tokens": 4,
        "env.max_total_tokens": 32, "train.iterations": 24})
    train.train(cfg, str(tmp_path / "run"))
    rows = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    reward = [r["reward/mean"] for r in rows]
    turns = [r["episode/turns_mean"] for r in rows]
    assert np.mean(reward[-6:]) > np.mean(reward[:6]) + 0.03, reward
    assert np.mean(turns[-6:]) < np.mean(turns[:6]), turns


@pytest.mark.parametrize("variant,env_id", [("arc1d", "rg:arc_1d"), ("acre", "rg:acre"),
                                            ("sudoku", "game:Sudoku-v0-easy")])
def test_the_app_f5_presets(variant, env_id):
    """Qwen3-1.7B-Base on GEM tasks at TV delta 0.2 (App. F.5): valid configs (with the `envs`
    extra; without it the validation names the extra)."""
    import importlib.util

    from trustrl.training import config_validation as cv
    cfg = environments.get_config(variant)
    assert cfg.env.id == env_id and cfg.env.template == "chatml"
    assert cfg.loss.method == "dppo_binary_tv" and cfg.loss.delta_low == cfg.loss.delta_high == 0.2
    assert (cfg.env.max_turns > 1) == (variant == "sudoku")
    if importlib.util.find_spec("gem") is None:
        with pytest.raises(ValueError, match="needs the optional 'envs' extra"):
            cv.validate(cfg)
    else:
        cv.validate(cfg)
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        environments.get_config("nope")
