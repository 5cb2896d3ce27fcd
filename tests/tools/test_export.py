"""python -m trustrl.tools.export: a tiny LoRA run on a Hugging Face base exported as a PEFT
adapter (PeftModel on the transformers base) and as a merged directory (transformers), which
agree with each other and with the trained adapters; bad flags exit 2 with one line."""
import dataclasses
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.data.tokenizer import train_bpe
from trustrl.model import hf, peft
from trustrl.model import transformer as M
from trustrl.tools import export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 264


def _config(**overrides):
    spec = importlib.util.spec_from_file_location("trustrl_test_default_cfg",
                                                  os.path.join(REPO, "configs", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("tiny_lora")
    cfg.update_from_flattened_dict(overrides)
    return cfg


def _hf_base(path):
    """A tiny random Qwen3 (tiny_lora's shape) with a byte-level BPE tokenizer of VOCAB tokens."""
    texts = [f"{a} + {b} = {a + b}" for a in range(60) for b in range(60)]
    train_bpe(texts, VOCAB, save_dir=path)
    cfg = M.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=4, num_kv_heads=4, head_dim=8, family="qwen3",
                        tie_word_embeddings=True)
    hf.save_hf_dir(M.init_params(cfg, jax.random.key(3)), cfg, str(path))
    return str(path)


def _torch_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _model_cfg(targets):
    return M.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=4, head_dim=8, family="qwen3",
                         tie_word_embeddings=True, lora_rank=4, lora_alpha=8.0,
                         lora_targets=tuple(targets))


def test_peft_and_merged_exports_load_in_peft_and_transformers_alike(tmp_path, capsys):
    """One iteration of tiny_lora on a HF base, its adapters started from a PEFT directory
    with non-zero B (model.lora.init_from; a random model earns no reward, so RL alone would
    leave B at zero), exported both ways."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft_lib = pytest.importorskip("peft")
    from trustrl.training import loop
    root = tmp_path
    base = _hf_base(root / "base")
    targets = _config().model.lora.targets
    init = jax.tree.map(lambda x: x + 0.1, M.init_adapters(_model_cfg(targets),
                                                           jax.random.key(5)))
    peft.save_adapters(init, _model_cfg(targets), str(root / "init"), base)
    cfg = _config(**{"model.hf_dir": base, "warmstart.steps": 0, "train.iterations": 1,
                     "eval.every": 0, "model.lora.init_from": str(root / "init")})
    workdir = str(root / "run")
    loop.train(cfg, workdir)
    shutil.rmtree(root / "init")  # the checkpoint holds the adapters: export does not need it
    capsys.readouterr()
    out_peft, out_merged = str(root / "peft"), str(root / "merged")
    assert export.main([f"--workdir={workdir}", f"--out={out_peft}", "--format=peft"]) == 0
    assert export.main([f"--workdir={workdir}", "--step=1", f"--out={out_merged}",
                        "--format=merged"]) == 0
    lines = capsys.readouterr().out
    assert "wrote checkpoint 1" in lines and "PEFT LoRA adapter (r=4, alpha=8.0" in lines
    config = json.loads(open(os.path.join(out_peft, peft.CONFIG_FILE)).read())
    assert config["base_model_name_or_path"] == base and config["r"] == 4
    assert os.path.exists(os.path.join(out_merged, "tokenizer.json"))

    # the exported adapters are the checkpoint's: init_from's, moved by the optimizer step
    adapters = peft.load_adapters(out_peft, _model_cfg(targets))
    diffs = [np.abs(np.asarray(x) - np.asarray(y)).max()
             for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(init))]
    assert max(diffs) < 0.05, diffs
    assert all(np.abs(np.asarray(x)).min() > 0 for x in jax.tree.leaves(adapters))

    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 10))
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(base).float().eval()
    plain = _torch_logits(torch_base, tokens)
    with_adapter = peft_lib.PeftModel.from_pretrained(torch_base, out_peft).eval()
    got_peft = _torch_logits(with_adapter, tokens)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out_merged).float().eval()
    got_merged = _torch_logits(merged, tokens)
    assert np.abs(got_peft - got_merged).max() <= 1e-4, np.abs(got_peft - got_merged).max()
    assert np.abs(got_peft - plain).max() > 1e-6

    # a changed base is refused (the checkpoint records the base's identity): exit 1, one line
    base_cfg, params = hf.load_hf_dir(base)
    params["final_norm"]["scale"] = params["final_norm"]["scale"] + 1e-3
    hf.save_hf_dir(params, base_cfg, base)
    capsys.readouterr()
    assert export.main([f"--workdir={workdir}", f"--out={root}/again", "--format=peft"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ValueError: the checkpoint in "), err
    assert "trained on another base: model.hf_dir" in err[0], err
    assert not os.path.exists(f"{root}/again")


def _fake_workdir(path, **overrides):
    """A workdir with a recorded config and an (empty) checkpoint 1: enough for the checks
    export makes before it builds anything."""
    from trustrl.infra import integrity
    (path / "checkpoints" / "1").mkdir(parents=True)
    (path / "checkpoints" / "1" / "_CHECKPOINT_METADATA").write_text("{}")
    integrity.write_file(str(path / "config.json"), json.dumps(_config(**overrides).to_dict()))
    return str(path)


def test_bad_flags_exit_2_with_one_line(tmp_path, capsys):
    workdir = _fake_workdir(tmp_path / "run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        ([f"--workdir={workdir}", f"--out={tmp_path}/o"], "usage: ", "--format"),
        ([f"--workdir={workdir}", f"--out={tmp_path}/o", "--format=gguf"], "usage: ",
         "invalid choice: 'gguf'"),
        ([f"--workdir={workdir}", f"--out={tmp_path}/o", "--format=peft", "--step=x"],
         "usage: ", "--step: invalid int value: 'x'"),
        ([f"--workdir={tmp_path}/none", f"--out={tmp_path}/o", "--format=merged"], "export: ",
         "the run directory does not exist"),
        ([f"--workdir={workdir}", "--step=7", f"--out={tmp_path}/o", "--format=peft"],
         "export: ", "--step=7: no such checkpoint in"),
        ([f"--workdir={workdir}", f"--out={tmp_path}/full", "--format=peft"], "export: ",
         "exists and is not an empty directory"),
        ([f"--workdir={tmp_path}/full", f"--out={tmp_path}/o", "--format=peft"], "export: ",
         "has no checkpoints"),
        ([f"--workdir={_fake_workdir(tmp_path / 'fft', **{'model.lora.rank': 0})}",
          f"--out={tmp_path}/o", "--format=peft"], "export: ",
         "trained every parameter (model.lora.rank=0), not LoRA adapters; use --format=merged"),
    ]
    for argv, prefix, needle in cases:
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(prefix) and needle in err[0], (argv, err)
    assert not os.path.exists(f"{tmp_path}/o")


def test_the_written_base_is_the_runs_frozen_base_dequantised(tmp_path):
    """--format=peft of a run whose base is not model.hf_dir as stored writes that base: the
    frozen kernels (an int8 QLoRA base dequantised), as save_hf_dir writes a model."""
    import types

    from trustrl.model import lora, quant
    cfg = _model_cfg(("q_proj", "o_proj", "down_proj"))
    params = M.init_params(lora.base_config(cfg), jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.3, M.init_adapters(cfg, jax.random.key(1)))
    export._write_base(types.SimpleNamespace(frozen=params, model_cfg=cfg), adapters,
                       str(tmp_path / "plain"))
    _, back = hf.load_hf_dir(str(tmp_path / "plain"))
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    qcfg = dataclasses.replace(cfg, weight_quant="int8")
    frozen = quant.quantize_params(params, "int8", qcfg.scan_layers)
    export._write_base(types.SimpleNamespace(frozen=frozen, model_cfg=qcfg), adapters,
                       str(tmp_path / "int8"))
    _, back = hf.load_hf_dir(str(tmp_path / "int8"))
    q = frozen["layers"]["attn"]
    want = quant.dequantize(q["q_proj"], q["q_proj" + quant.SCALE_SUFFIX], 1, jnp.float32,
                            lead=1)
    np.testing.assert_array_equal(np.asarray(back["layers"]["attn"]["q_proj"]), np.asarray(want))
    assert np.abs(np.asarray(want) - np.asarray(params["layers"]["attn"]["q_proj"])).max() > 0
