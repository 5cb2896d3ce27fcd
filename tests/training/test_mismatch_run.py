"""The mismatch dial in a run: staleness and rollout.mu="rescored" through the loop, the
calibration tool, and the dial's config errors (trustrl.rollout.mismatch)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import default
from trustrl.infra.metrics import read_jsonl
from trustrl.training import calibration, config_validation as cv, loop as train

from test_config_validation import tiny as _tiny  # the tiny config with dotted overrides
from test_main import TINY, _main
from test_multihost import REPO




def test_stale_rescored_run(tmp_path):
    """3 iterations of 2 optimizer steps, staleness 2, mu rescored by the trainer, bf16
    rollout: iteration 0 rolls out with the current parameters (nothing older yet) and its
    rescored mu equals the score pass's pi_old exactly (two separate forwards of the same
    parameters: mismatch 0.0, while the bf16 sampler's own log-probs differ); iterations 1 and
    2 roll out with the parameters of 2 steps earlier, so pi_old != mu (weight decay moves the
    parameters every step even where the tiny base's rewards, hence advantages, are all 0)."""
    cfg = _tiny(**{"optim.weight_decay": 0.5, "optim.learning_rate": 1e-2, "train.iterations": 3, "train.minibatches": 2, "train.score_pass": True,
                   "rollout.mismatch.staleness": 2, "rollout.mu": "rescored",
                   "eval.every": 0, "checkpoint.every": 0, "rollout.dtype": "bfloat16"})
    train.train(cfg, str(tmp_path / "run"))
    rows = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["rollout/staleness"] for r in rows] == [0.0, 2.0, 2.0]
    assert rows[0]["rollout/mismatch_mean"] == 0.0
    assert rows[0]["rollout/logp_absdiff_max"] == 0.0
    assert rows[0]["rollout/sampler_mismatch_mean"] > 0  # what the rescoring replaced
    assert all(r["rollout/mismatch_mean"] > 0 for r in rows[1:]), rows


def test_calibration_measures_the_noise(tmp_path):
    """fp32 rollout (no precision mismatch), logit noise 0.2 and staleness 1 on the tiny base:
    the report has the settings, a mismatch far above fp32's ~1e-7 and mu buckets that cover
    every token."""
    cfg = _tiny(**{"rollout.dtype": "float32", "rollout.mismatch.noise": 0.2,
                   "rollout.mismatch.staleness": 1})
    out = calibration.calibrate(cfg, str(tmp_path / "cal"), batches=1)
    s = out["summary"]
    assert out["settings"]["rollout.mismatch.noise"] == 0.2
    assert s["tokens"] > 0 and s["rollout/mismatch_mean"] > 1e-4, s
    assert s["rollout/max_ratio"] > 1.05
    assert sum(b["tokens"] for b in out["by_mu"]) == s["tokens"]
    np.testing.assert_allclose(sum(b["share"] for b in out["by_mu"]), 1.0, rtol=1e-9)
    text = calibration.format_report(out)
    assert "rollout.mismatch.noise=0.2" in text and "| [0, 0.01) |" in text


@pytest.mark.parametrize("field,value,extra,needle", [
    ("rollout.mismatch.noise", -0.1, {}, "rollout.mismatch.noise must be in [0, inf), got -0.1"),
    ("rollout.mismatch.noise", float("nan"), {}, "rollout.mismatch.noise must be finite"),
    ("rollout.mismatch.staleness", -1, {}, "rollout.mismatch.staleness must be an int >= 0"),
    ("rollout.mismatch.staleness", 1.5, {}, "rollout.mismatch.staleness must be an int, got 1.5"),
    ("rollout.mismatch.pre_temperature", True, {"rollout.temperature": 1.0},
     "rollout.mismatch.pre_temperature=True with rollout.temperature=1"),
    ("rollout.mismatch.top_p_renorm", True, {}, "rollout.mismatch.top_p_renorm=True without "
                                                "truncation"),
    ("rollout.mismatch.top_p_renorm", True, {"rollout.top_p": 0.9, "loss.method": "dppo_topk_tv"},
     "its top-K cannot be recorded"),
    ("rollout.mismatch.noise", 0.1, {"loss.method": "dppo_full_tv"},
     "the full-vocabulary methods recompute mu"),
    ("rollout.mu", "rescored", {"rollout.mismatch.noise": 0.1},
     "rollout.mu='rescored' replaces mu by the trainer's forward"),
    ("rollout.mu", "rescored", {"loss.method": "dppo_topk_kl"},
     "rescores the sampled tokens only; loss.method='dppo_topk_kl' reads mu's topk"),
    ("rollout.mu", "recorded", {}, "rollout.mu='recorded' is not valid; choose one of "
                                   "['sampler', 'rescored']"),
])
def test_bad_dial_values_name_the_field(field, value, extra, needle):
    with pytest.raises(ValueError) as e:
        cv.validate(_tiny(**{field: value, **extra}))
    assert needle in str(e.value)


def test_missing_method_field_is_named():
    d = default.get_config("tiny").to_dict()
    d["loss"]["method"] = "icepop"
    del d["loss"]["icepop_low"]
    with pytest.raises(ValueError, match="the config has no field 'loss.icepop_low'"):
        cv.validate(ConfigDict(d))


def test_cli_exits_2_naming_the_dial_field(tmp_path, subprocess_env):
    wd = tmp_path / "run"
    p = _main([TINY, f"--workdir={wd}", "--config.rollout.mismatch.staleness=-2"],
              subprocess_env)
    assert p.returncode == 2, p.stderr
    assert "rollout.mismatch.staleness must be an int >= 0, got -2" in p.stderr.strip()
    assert not wd.exists()
    p = subprocess.run([sys.executable, "-m", "trustrl.tools.calibrate_mismatch", TINY,
                        f"--workdir={wd}", "--config.rollout.mismatch.noise=-1.0"],
                       cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("invalid config: rollout.mismatch.noise")
    assert not os.path.exists(wd)
