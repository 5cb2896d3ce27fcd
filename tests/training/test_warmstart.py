"""The warm-start cache (training.warmstart): eos in its key, corrupt entries kept aside."""
import os
import re

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.infra import integrity
from trustrl.training import experiment, warmstart
from trustrl.data import tokenizer as tk

from test_train import tiny  # the tiny config with dotted overrides
import test_tokenizer

examples = test_tokenizer.examples  # the fixture: arithmetic training examples


def test_warm_start_without_eos_fails_even_with_a_cache(tmp_path, examples):
    texts = [f"{e['prompt']} {e['answer']}" for e in examples]
    with_eos = tk.train_bpe(texts, 264)
    no_eos = tk.Tokenizer(with_eos.backend, dict(with_eos.config, eos_token=None, pad_token=None))
    cfg = tiny(**{"warmstart.cache_dir": str(tmp_path)})
    env = experiment.TaskEnv(no_eos, "arithmetic", "plain", examples, [])
    mcfg = experiment.model_config(cfg, no_eos.vocab_size)
    # the old key ignored the eos: the key now tells the two tokenizers apart
    assert warmstart.cache_key(cfg, env, mcfg) != warmstart.cache_key(
        cfg, experiment.TaskEnv(with_eos, "arithmetic", "plain", examples, []), mcfg)
    path = tmp_path / f"warmstart-{warmstart.cache_key(cfg, env, mcfg)}.msgpack"
    path.write_bytes(b"a cached base")
    with pytest.raises(ValueError, match="the warm start needs a tokenizer with an eos token"):
        warmstart.warm_start(cfg, env, mcfg, params=None, mesh=None)


def test_corrupt_warm_start_cache_is_reported_and_ignored(tmp_path, capsys):
    """Entries that match their integrity record but not the model (or hold non-finite values)
    are rejected too, and kept aside (see test_integrity.py for entries failing the record)."""
    params = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4)}}
    path = str(tmp_path / "warmstart-x.msgpack")
    integrity.write_file(path, flax.serialization.msgpack_serialize(
        jax.tree.map(np.asarray, params)))
    loaded = warmstart._load_cached(path, params)
    np.testing.assert_array_equal(np.asarray(loaded["a"]), np.asarray(params["a"]))
    blob = open(path, "rb").read()
    for bad, why in [(blob[:len(blob) // 2], ""), (b"", ""),
                     (flax.serialization.msgpack_serialize({"a": np.zeros((3, 2)),
                                                            "b": {"c": np.ones(4)}}),
                      "shapes differ from the model's at \\['a'\\]"),
                     (flax.serialization.msgpack_serialize({"a": np.full((2, 3), np.nan),
                                                            "b": {"c": np.ones(4)}}),
                      "non-finite")]:
        integrity.write_file(path, bad)
        assert warmstart._load_cached(path, params) is None
        out = capsys.readouterr().out
        assert f"warm start: ignoring cache {path}, training again" in out
        assert re.search(why, out), out
        assert not os.path.exists(path)  # kept aside, not deleted
        aside = re.search(r"kept it as (\S+)", out).group(1)
        assert open(aside, "rb").read() == bad  # the earlier ones are not overwritten
