"""RLHF end to end: a reward model trained with Bradley-Terry on synthetic pairs
(trustrl.training.reward_training, the train_reward_model tool), exported as a Hugging Face
sequence-classification directory that transformers scores the same, then RL against it
(configs/rlhf.py) with every shaping option, a KL-to-reference penalty and a resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import reward_model as rm_configs, rlhf as rlhf_configs
from trustrl.infra.metrics import read_jsonl
from trustrl.training import loop as train, reward_training

from test_train import REPO, set_fields


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """(HF directory, train() metrics) of the tiny reward model."""
    root = tmp_path_factory.mktemp("rm")
    cfg = rm_configs.get_config("tiny")
    params, rm_cfg, tok, metrics = reward_training.train(cfg, str(root / "work"))
    out = reward_training.export(params, rm_cfg, tok, str(root / "hf"))
    return out, metrics, str(root / "work")


def test_reward_model_training_logs_held_out_accuracy_and_exports(tiny_rm):
    out, metrics, work = tiny_rm
    rows = read_jsonl(os.path.join(work, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for r in (rows[0], rows[2], rows[4]):  # before training, every eval_every=2, the end
        assert 0.0 <= r["eval/accuracy"] <= 1.0 and r["eval/num_pairs"] == 16
    assert all(np.isfinite(r["bt/loss"]) for r in rows[1:])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_the_export_reloads_in_transformers_with_equal_scores(tiny_rm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from trustrl import reward_model
    from trustrl.data.tokenizer import Tokenizer
    from trustrl.training import rlhf
    out = tiny_rm[0]
    tok = Tokenizer.from_dir(out)
    ids, _ = rlhf.encode(tok, ["Write about a.", "Write about b and c."],
                         ["one two", "three four five six"], max_length=64)
    cfg, params = reward_model.load_hf_dir(out, param_dtype="float32", dtype="float32")
    (_, tokens, valid), = rlhf.pack(ids, pad_id=cfg.pad_token_id or 0, bucket=1)
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    ours = np.asarray(reward_model.score(params, cfg, tokens, positions, valid))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(valid, dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours).max() > 0  # a real score, not a zero head


def test_the_tool_refuses_a_non_empty_out_with_exit_2(tmp_path, subprocess_env):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    p = subprocess.run([sys.executable, "-m", "trustrl.tools.train_reward_model",
                        "--config=configs/reward_model.py:tiny", f"--workdir={tmp_path / 'w'}",
                        f"--out={tmp_path / 'out'}"], cwd=REPO, env=subprocess_env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "is not an empty directory" in p.stderr
    assert (tmp_path / "out" / "x").read_text() == "keep me"


@pytest.mark.slow
def test_a_tiny_rlhf_run_with_every_shaping_option_logs_and_resumes(tiny_rm, tmp_path):
    cfg = set_fields(rlhf_configs.get_config("tiny"), {
        "reward_model.hf_dir": tiny_rm[0], "reward_model.normalize": "running",
        "reward_model.clip": 3.0, "reward_model.length_penalty": 0.1,
        "reward_model.kl_coef": 0.05, "reward_model.dtype": "float32"})
    wd = str(tmp_path / "run")
    train.train(cfg, wd)
    rows = read_jsonl(wd + "/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {"eval/rm_score", "eval/ground_truth_mean", "eval/sampled_rm_score"} <= set(rows[0])
    assert "eval/pass@1" not in rows[0]  # no verifier: the reward model's evaluation
    for row in rows[1:]:
        for key in ("reward/rm_mean", "reward/rm_std", "reward/rm_truncated_frac",
                    "reward/ground_truth_mean", "reward/kl_ref_mean", "loss/value"):
            assert np.isfinite(row[key]), key
        assert "reward/rm_length_corr" in row
        # clipped at 3 after normalising; minus the length and KL penalties
        assert -3.0 - 0.1 - 0.05 * abs(row["reward/kl_ref_max"]) * 2 <= row["reward/mean"] <= 3
    host = json.load(open(os.path.join(wd, "checkpoints", "2", "host", "metadata")))
    rows_per_iter = cfg.rollout.prompts_per_iter * cfg.rollout.group_size
    assert host["reward_norm"]["count"] == 2 * rows_per_iter  # running moments checkpointed
    cfg.train.iterations = 3
    train.train(cfg, wd)
    host = json.load(open(os.path.join(wd, "checkpoints", "3", "host", "metadata")))
    assert host["reward_norm"]["count"] == 3 * rows_per_iter  # restored, then updated
    assert [r["step"] for r in read_jsonl(wd + "/metrics.jsonl")] == [0, 1, 2, 3]


def test_a_causal_lm_given_as_reward_model_is_refused_before_the_run(tmp_path):
    """check_environment (before anything is written) names a missing directory; the run's
    build loads the reward model first and names a causal LM's config.json."""
    import jax
    from trustrl.infra import sharding
    from trustrl.model import hf
    from trustrl.model.transformer import ModelConfig, init_params
    from trustrl.training import config_validation as cv, experiment
    cfg = set_fields(rlhf_configs.get_config("tiny"),
                     {"reward_model.hf_dir": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="reward_model.hf_dir=.*nowhere.*no such directory"):
        cv.check_environment(cfg, str(tmp_path / "wd"))
    m = ModelConfig.tiny()
    hf.save_hf_dir(init_params(m, jax.random.key(0)), m, str(tmp_path / "lm"))
    cfg.reward_model.hf_dir = str(tmp_path / "lm")
    with pytest.raises(ValueError, match="reward_model.hf_dir=.*lm.*config.json.*causal"):
        experiment.reward_scorer(cfg, sharding.make_mesh(cfg.mesh))


def test_reward_model_training_starts_from_a_hugging_face_base(tmp_path):
    """base.hf_dir: a causal LM directory (here a tiny Llama written by trustrl, with its
    tokenizer) is the trunk; its embedding and layers start as the base's."""
    import jax
    from trustrl.data.tokenizer import train_bpe
    from trustrl.model import hf
    from trustrl.model.transformer import ModelConfig, init_params
    tok = train_bpe(["Write about zaku and tebi. zaku tebi mola"] * 50 + ["user: assistant: \n"],
                    280, save_dir=None)
    m = ModelConfig.tiny(vocab_size=tok.vocab_size)
    base = init_params(m, jax.random.key(3))
    hf.save_hf_dir(base, m, str(tmp_path / "base"))
    tok.save(str(tmp_path / "base"))
    cfg = set_fields(rm_configs.get_config("tiny"), {"base.hf_dir": str(tmp_path / "base"),
                                                    "train.steps": 1})
    params, rm_cfg, tok2, _ = reward_training.train(cfg, str(tmp_path / "work"))
    assert tok2.vocab_size == tok.vocab_size and rm_cfg.model.num_layers == m.num_layers
    # one small step moved the trunk only a little from the base's weights
    diff = np.abs(np.asarray(params["model"]["embedding"]) - np.asarray(base["embedding"]))
    assert 0 < diff.max() < 0.05


@pytest.mark.optimized  # execution-bound: compiled at XLA's default level
@pytest.mark.slow
def test_rlhf_against_a_learned_reward_model_improves_the_hidden_ground_truth(tmp_path):
    """The demo shrunk: a reward model learns the hidden "wordpref" rule from labelled pairs
    (held-out accuracy well above chance), then DPPO against it raises both the reward model's
    score and the ground truth the reward model never saw."""
    rm_cfg = set_fields(rm_configs.get_config("wordpref"), {
        "base.num_layers": 1, "base.hidden_size": 64, "base.intermediate_size": 128,
        "base.head_dim": 16, "pairs.num_train": 2048, "pairs.num_test": 128,
        "train.steps": 120, "train.eval_every": 0})
    params, cfg_rm, tok, metrics = reward_training.train(rm_cfg, str(tmp_path / "rm"))
    assert metrics["eval/accuracy"] > 0.7
    rm_dir = reward_training.export(params, cfg_rm, tok, str(tmp_path / "rm_hf"))
    cfg = set_fields(rlhf_configs.get_config("demo"), {
        "reward_model.hf_dir": rm_dir, "warmstart.steps": 150, "warmstart.cache_dir": "",
        "model.num_layers": 2, "rollout.prompts_per_iter": 16, "rollout.group_size": 4,
        "rollout.max_new_tokens": 16, "train.iterations": 12, "train.minibatches": 2,
        "eval.every": 12, "eval.num_prompts": 32, "eval.k": 2, "checkpoint.every": 0,
        "log.progress": False, "log.tensorboard": False, "optim.learning_rate": 3e-4})
    wd = str(tmp_path / "run")
    train.train(cfg, wd)
    rows = read_jsonl(wd + "/metrics.jsonl")
    first, last = rows[1:4], rows[-3:]
    mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
    assert mean(last, "reward/rm_mean") > mean(first, "reward/rm_mean") + 0.5
    assert mean(last, "reward/ground_truth_mean") > mean(first, "reward/ground_truth_mean") + 0.1
    assert rows[-1]["eval/ground_truth_mean"] > rows[0]["eval/ground_truth_mean"]
