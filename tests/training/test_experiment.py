"""The run's tokenizer (training.experiment): a damaged one is refused, or trained again."""
import os
import re

import pytest

from trustrl.infra import integrity
from trustrl.training import experiment
from trustrl.data import tokenizer as tk

from test_train import tiny  # the tiny config with dotted overrides
import test_tokenizer

examples = test_tokenizer.examples  # the fixture: arithmetic training examples


@pytest.mark.parametrize("damage", ["empty_config", "missing_config", "missing_vocab"])
def test_run_tokenizer_damaged_is_refused_or_rebuilt_without_record(tmp_path, capsys, examples,
                                                                   damage):
    """With its integrity record, a damaged saved tokenizer is refused naming the file; without
    one (an older trustrl's non-atomic save) an incomplete one is kept aside and trained again."""
    cfg = tiny()
    wd = str(tmp_path)
    first = experiment._tokenizer(cfg, wd, examples)
    saved = tmp_path / "tokenizer"
    damaged = {"empty_config": "tokenizer_config.json", "missing_config": "tokenizer_config.json",
               "missing_vocab": "tokenizer.json"}[damage]
    {"empty_config": lambda: (saved / "tokenizer_config.json").write_text(""),
     "missing_config": lambda: (saved / "tokenizer_config.json").unlink(),
     "missing_vocab": lambda: (saved / "tokenizer.json").unlink()}[damage]()
    with pytest.raises(integrity.IntegrityError,
                       match=rf"refusing to resume: {saved}/{damaged} .*(has 0 bytes|missing)"):
        experiment._tokenizer(cfg, wd, examples)
    (saved / integrity.TREE_RECORD).unlink()  # as saved by an older trustrl
    capsys.readouterr()
    again = experiment._tokenizer(cfg, wd, examples)
    out = capsys.readouterr().out
    assert f"tokenizer: {saved} is incomplete" in out and "training it again" in out
    aside = re.search(r"kept it as (\S+)", out).group(1)
    assert os.path.isdir(aside)  # nothing deleted
    assert again.eos_id is not None and again.eos_id == first.eos_id
    assert again.backend.to_str() == first.backend.to_str()  # identical vocabulary
    assert tk.Tokenizer.from_dir(saved).eos_id == first.eos_id  # and saved complete again
    integrity.verify_tree(str(saved), "tokenizer", strict=True)  # with its record
    with pytest.raises(ValueError, match=r"has 264 tokens but tokenizer.vocab_size=270"):
        experiment._tokenizer(tiny(**{"tokenizer.vocab_size": 270}), wd, examples)
