"""trustrl.data.datasets: tfds builders (synthetic + math files), load_examples, prompts,
PromptIterator."""
import json
import sys

import ml_collections
import numpy as np
import pytest
import tokenizers

from trustrl.data import datasets as data, rewards, tasks
from trustrl.data import tokenizer as tk

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def task_cfg(name="arithmetic", **kw):
    c = dict(name=name, difficulty=2, operations="+", num_train=40, num_test=8, manual_dir="",
             template="plain")
    c.update(kw)
    return ml_collections.ConfigDict(c)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def as_list(examples):
    return [examples[i] for i in range(len(examples))]


# --- synthetic builder ------------------------------------------------------------------------------

def test_synthetic_builds_reads_back_and_is_deterministic(tmp_path):
    cfg = task_cfg(operations="+-", num_train=40, num_test=8)
    a_train = data.load_examples(cfg, "train", str(tmp_path / "a"))
    a_test = data.load_examples(cfg, "test", str(tmp_path / "a"))
    b_train = as_list(data.load_examples(cfg, "train", str(tmp_path / "b")))
    assert len(a_train) == 40 and len(a_test) == 8
    assert as_list(a_train) == b_train  # two independent builds agree
    # Same content (and order) as the generator, values are python str.
    expected = tasks.generate_splits("arithmetic", difficulty=2, operations="+-", num_train=40,
                                     num_test=8, seed=0)
    assert as_list(a_train) == expected["train"] and as_list(a_test) == expected["test"]
    for ex in as_list(a_test) + b_train:
        assert set(ex) == set(data.FIELDS) and all(type(v) is str for v in ex.values())
        assert ex["task"] == "arithmetic"
    assert not {e["prompt"] for e in as_list(a_test)} & {e["prompt"] for e in b_train}
    assert a_train[-1] == a_train[39] and a_train[1:3] == [a_train[1], a_train[2]]
    with pytest.raises(IndexError):
        a_train[40]
    # Config name encodes the parameters: one directory per configuration.
    built = sorted(p.name for p in (tmp_path / "a" / "trustrl_synthetic").iterdir())
    assert built == ["arithmetic-d2-ops_plus_minus-n40-t8-s0"]


def test_synthetic_configs_get_their_own_directory_and_are_reused(tmp_path, monkeypatch):
    cfg = task_cfg("countdown", difficulty=3, num_train=12, num_test=4)
    s0 = as_list(data.load_examples(cfg, "train", str(tmp_path)))
    s1 = as_list(data.load_examples(cfg, "train", str(tmp_path), seed=1))
    assert s0 != s1 and all(ex["task"] == "countdown" for ex in s0)
    assert all(rewards.countdown_correct(f"Answer: {ex['answer']}", ex["answer"]) for ex in s0)
    names = sorted(p.name for p in (tmp_path / "trustrl_synthetic").iterdir())
    assert names == ["countdown-d3-n12-t4-s0", "countdown-d3-n12-t4-s1"]
    # Already built: read back without generating again.
    monkeypatch.setattr(tasks, "generate_splits", lambda *a, **k: pytest.fail("rebuilt"))
    assert as_list(data.load_examples(cfg, "train", str(tmp_path))) == s0


def test_synthetic_config_name_and_errors(tmp_path):
    assert (data.synthetic_config_name("arithmetic", 2, "+", 20000, 256, 0)
            == "arithmetic-d2-ops_plus-n20000-t256-s0")
    assert data.synthetic_config_name("arithmetic", 3, "*-", 5, 1, 7) == \
        "arithmetic-d3-ops_times_minus-n5-t1-s7"
    with pytest.raises(ValueError, match="invalid"):
        data.synthetic_config_name("arithmetic", 2, "+/", 5, 1, 0)
    with pytest.raises(ValueError, match="no 'test' split"):
        data.load_examples(task_cfg(num_test=0, num_train=5), "test", str(tmp_path))
    with pytest.raises(ValueError, match=r"countdown difficulty"):
        data.load_examples(task_cfg("countdown", difficulty=9), "train", str(tmp_path))


def test_unknown_task_split_and_empty_data_dir(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'chess'.*gsm8k.*aime"):
        data.load_examples(task_cfg("chess"), "train", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*'train', 'test'"):
        data.load_examples(task_cfg(), "validation", str(tmp_path))
    with pytest.raises(ValueError, match="data_dir"):
        data.load_examples(task_cfg(), "train", "")
    assert set(data.TASK_NAMES) == set(rewards.TASKS)  # every dataset has a verifier


# --- math builders ------------------------------------------------------------------------------

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A car costs $1,000 and a boat $234 more.", "answer": "#### 1,234"},
    {"question": "Temperature drops 5 below 2.", "answer": "2-5=-3\n####  -3 "},
]


def test_gsm8k_jsonl(tmp_path):
    manual = tmp_path / "gsm8k"
    write_jsonl(manual / "train.jsonl", GSM8K_ROWS)
    write_jsonl(manual / "test.jsonl", GSM8K_ROWS[:1])
    write_jsonl(manual / "train_socratic.jsonl", [{"question": "no", "answer": "#### 0"}])
    cfg = task_cfg("gsm8k", manual_dir=str(manual))
    train = as_list(data.load_examples(cfg, "train", str(tmp_path / "d")))
    test = as_list(data.load_examples(cfg, "test", str(tmp_path / "d")))
    assert [e["answer"] for e in train] == ["7", "1234", "-3"]
    assert [e["prompt"] for e in train] == [r["question"] for r in GSM8K_ROWS]
    assert [e["id"] for e in train] == ["gsm8k-train-0", "gsm8k-train-1", "gsm8k-train-2"]
    assert test == [{"id": "gsm8k-test-0", "prompt": GSM8K_ROWS[0]["question"], "answer": "7",
                     "task": "gsm8k"}]
    assert rewards.score("gsm8k", ["Answer: 1234", "\\boxed{1,234}"], ["1234"] * 2).all()


def test_gsm8k_hf_parquet_layout_and_rebuild_on_new_files(tmp_path):
    manual = tmp_path / "gsm8k"
    write_parquet(manual / "main" / "train-00000-of-00001.parquet", GSM8K_ROWS[:2])
    write_parquet(manual / "socratic" / "train-00000-of-00001.parquet", GSM8K_ROWS)
    cfg = task_cfg("gsm8k", manual_dir=str(manual), num_test=1)
    train = as_list(data.load_examples(cfg, "train", str(tmp_path / "d")))
    test = as_list(data.load_examples(cfg, "test", str(tmp_path / "d")))
    # Only "main" is read; no test file: one problem held out of train.
    assert len(train) == 1 and len(test) == 1
    assert {train[0]["answer"], test[0]["answer"]} == {"7", "1234"}
    # Different files -> a different build directory.
    write_parquet(manual / "main" / "train-00000-of-00001.parquet", GSM8K_ROWS)
    assert len(data.load_examples(cfg, "train", str(tmp_path / "d"))) == 2
    assert len(list((tmp_path / "d" / "trustrl_math").iterdir())) == 2


def test_gsm8k_without_final_answer_marker_raises(tmp_path):
    write_jsonl(tmp_path / "m" / "train.jsonl", [{"question": "q", "answer": "it is 5"}])
    with pytest.raises(ValueError, match="####"):
        data.load_examples(task_cfg("gsm8k", manual_dir=str(tmp_path / "m")), "train",
                           str(tmp_path / "d"))


def test_math_json_directory_layout(tmp_path):
    root = tmp_path / "dl" / "MATH"
    problems = {
        ("train", "algebra", 1): ("Solve x/2 = 1/4.", r"So $x = \boxed{\frac{1}{2}}$."),
        ("train", "algebra", 10): ("What is 1+1?", r"First \boxed{1}, then $\boxed{2}$."),
        ("train", "geometry", 3): ("Area?", r"The area is $\boxed{\sqrt{2}+\{1\}}$ units."),
        ("train", "geometry", 4): ("No box here.", "The answer is 5."),
        ("test", "number_theory", 7): ("2^3?", r"$2^3 = \boxed 8$."),
    }
    for (split, subject, n), (problem, solution) in problems.items():
        path = root / split / subject / f"{n}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"problem": problem, "level": "Level 1", "type": subject,
                                    "solution": solution}))
    cfg = task_cfg("math", manual_dir=str(tmp_path / "dl"))
    train = as_list(data.load_examples(cfg, "train", str(tmp_path / "d")))
    test = as_list(data.load_examples(cfg, "test", str(tmp_path / "d")))
    assert sorted((e["prompt"], e["answer"]) for e in train) == sorted([
        ("Solve x/2 = 1/4.", r"\frac{1}{2}"), ("What is 1+1?", "2"),
        ("Area?", r"\sqrt{2}+\{1\}")])  # the row without \boxed is skipped
    assert [(e["prompt"], e["answer"], e["task"]) for e in test] == [("2^3?", "8", "math")]
    half = next(e for e in train if e["prompt"].startswith("Solve"))
    assert rewards.math_correct("Answer: 0.5", half["answer"])


def test_math_jsonl_with_answer_field_is_test_only(tmp_path):
    write_jsonl(tmp_path / "m" / "test.jsonl", [
        {"problem": "p1", "solution": r"\boxed{3}", "answer": "4"},   # MATH-500: answer field wins
        {"problem": "p2", "solution": r"x \fbox{7} y"}])
    cfg = task_cfg("math", manual_dir=str(tmp_path / "m"))
    test = as_list(data.load_examples(cfg, "test", str(tmp_path / "d")))
    assert [e["answer"] for e in test] == ["4", "7"]
    with pytest.raises(ValueError, match="only a test split"):
        data.load_examples(cfg, "train", str(tmp_path / "d"))


DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response "
             "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
             "to the problem.\n\n")
DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'


def dapo_row(problem, answer):
    return {"data_source": "math_dapo",
            "prompt": [{"content": DAPO_HEAD + problem + DAPO_TAIL, "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lm"},
            "extra_info": {"index": f"id-{problem}"}}


def test_dapo_parquet_dedup_and_held_out_test(tmp_path):
    problems = [(f"Find {i} + {i}.", str(2 * i)) for i in range(10)]
    rows = [dapo_row(p, a) for p, a in problems] * 3  # the published file repeats problems
    write_parquet(tmp_path / "m" / "data" / "dapo-math-17k.parquet", rows)
    cfg = task_cfg("dapo_math", manual_dir=str(tmp_path / "m"), num_test=3)
    train = as_list(data.load_examples(cfg, "train", str(tmp_path / "d")))
    test = as_list(data.load_examples(cfg, "test", str(tmp_path / "d")))
    assert len(train) == 7 and len(test) == 3
    got = sorted((e["prompt"], e["answer"]) for e in train + test)
    assert got == sorted(problems)  # instruction wrapper stripped, duplicates dropped, disjoint
    held = data.held_out_indices(10, 3, seed=0)
    assert [e["prompt"] for e in test] == [problems[i][0] for i in held]
    assert as_list(data.load_examples(cfg, "test", str(tmp_path / "d"))) == test  # stable
    other = as_list(data.load_examples(cfg, "test", str(tmp_path / "d"), seed=5))
    assert len(other) == 3 and other != test
    with pytest.raises(ValueError, match="num_test > 0"):
        data.load_examples(task_cfg("dapo_math", manual_dir=str(tmp_path / "m"), num_test=0),
                           "test", str(tmp_path / "d"))
    assert len(data.load_examples(task_cfg("dapo_math", manual_dir=str(tmp_path / "m"),
                                           num_test=0), "train", str(tmp_path / "d"))) == 10
    with pytest.raises(ValueError, match="leaves no training"):
        data.load_examples(task_cfg("dapo_math", manual_dir=str(tmp_path / "m"), num_test=10),
                           "test", str(tmp_path / "d"))


def test_dapo_plain_string_prompt_and_solution_column(tmp_path):
    # open-r1/DAPO-Math-17k-Processed: a bare string prompt and a "solution" column.
    write_parquet(tmp_path / "m" / "train-00000-of-00001.parquet",
                  [{"prompt": "What is 6*7?", "solution": "42"}])
    ex = data.load_examples(task_cfg("dapo_math", manual_dir=str(tmp_path / "m"), num_test=0),
                            "train", str(tmp_path / "d"))[0]
    assert (ex["prompt"], ex["answer"], ex["task"]) == ("What is 6*7?", "42", "dapo_math")


def test_aime_jsonl_and_parquet_are_test_only(tmp_path):
    write_jsonl(tmp_path / "m" / "aime_2025.jsonl", [{"question": "Q25", "answer": "70"}])
    write_parquet(tmp_path / "m" / "aime_2024.parquet",
                  [{"ID": "2024-I-1", "Problem": "Q24a", "Answer": 204},
                   {"ID": "2024-I-2", "Problem": "Q24b", "Answer": 25}])
    cfg = task_cfg("aime", manual_dir=str(tmp_path / "m"))
    test = as_list(data.load_examples(cfg, "test", str(tmp_path / "d")))
    assert [(e["prompt"], e["answer"]) for e in test] == [("Q24a", "204"), ("Q24b", "25"),
                                                          ("Q25", "70")]
    assert [e["id"] for e in test] == ["aime-test-0", "aime-test-1", "aime-test-2"]
    with pytest.raises(ValueError, match="only a test split"):
        data.load_examples(cfg, "train", str(tmp_path / "d"))


@pytest.mark.parametrize("name,expected", [("gsm8k", "train.jsonl"), ("math", "train/<subject>"),
                                           ("dapo_math", "dapo-math-17k.parquet"),
                                           ("aime", "problem")])
def test_missing_math_files_name_what_is_expected(tmp_path, name, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hi")
    for manual_dir, why in (("", "manual_dir is empty"),
                            (str(tmp_path / "nope"), "not a directory"),
                            (str(tmp_path / "empty"), "no source files.*README.md")):
        with pytest.raises(FileNotFoundError, match=why) as e:
            data.load_examples(task_cfg(name, manual_dir=manual_dir), "test", str(tmp_path / "d"))
        assert expected in str(e.value)


def test_parquet_without_pyarrow_or_pandas_is_a_clear_error(tmp_path, monkeypatch):
    write_parquet(tmp_path / "x.parquet", [{"a": 1}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pyarrow"):
        data._read_parquet(tmp_path / "x.parquet")


def test_answer_extraction_helpers():
    assert data.gsm8k_answer("a #### 5\n#### 1,234,567") == "1234567"
    assert data.gsm8k_answer("#### 3.5") == "3.5" and data.gsm8k_answer("no marker") is None
    assert data.last_boxed(r"\boxed{a} and \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert data.last_boxed(r"\boxed{1} then \boxed{2") == "1"  # unbalanced last box ignored
    assert data.last_boxed("nothing") is None


# --- prompts ---------------------------------------------------------------------------------------

def chat_tokenizer(template="chatml"):
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    config = {} if template is None else {"chat_template": tk.FALLBACK_TEMPLATES[template]}
    return tk.Tokenizer(backend, config)


def test_format_prompt_and_response_prefix():
    ex = {"id": "x", "prompt": r"What is \frac{1}{2} + {x}?", "answer": "1", "task": "math"}
    plain = data.format_prompt(ex, "plain")
    assert plain == "Question: What is \\frac{1}{2} + {x}?\nAnswer:"
    assert plain == data.PLAIN_TEMPLATE.format(prompt=ex["prompt"]) and plain.endswith("Answer:")
    assert data.format_prompt(ex["prompt"], "plain") == plain
    chat = data.format_prompt(ex, "chat", chat_tokenizer())
    assert chat.startswith("<|im_start|>user\nWhat is \\frac{1}{2} + {x}?")
    assert "\\boxed{}" in chat and chat.endswith("<|im_start|>assistant\n")
    assert data.response_prefix("plain") == "Answer:" and data.response_prefix("chat") == ""
    with pytest.raises(ValueError, match=r"unknown prompt template 'fancy'.*'plain', 'chat'"):
        data.format_prompt(ex, "fancy")
    with pytest.raises(ValueError, match=r"'plain', 'chat'"):
        data.response_prefix("fancy")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        data.format_prompt(ex, "chat")
    with pytest.raises(ValueError, match="no chat template"):
        data.format_prompt(ex, "chat", chat_tokenizer(None))


def test_response_prefix_matches_reward_scoring():
    # Plain: the model continues after "Answer:"; chat: it writes \boxed{} itself.
    scores = rewards.score("arithmetic", [" 132", " 131", "132"], ["132"] * 3,
                           prefix=data.response_prefix("plain"))
    assert scores.tolist() == [1.0, 0.0, 1.0]
    scores = rewards.score("arithmetic", ["so \\boxed{132}", " 132"], ["132"] * 2,
                           prefix=data.response_prefix("chat"))
    assert scores.tolist() == [1.0, 0.0]


# --- PromptIterator --------------------------------------------------------------------------------

SOURCE = [{"id": str(i), "prompt": f"p{i}", "answer": str(i), "task": "arithmetic"}
          for i in range(10)]


def ids(batches):
    return [[int(e["id"]) for e in b] for b in batches]


def test_iterator_epochs_are_seeded_permutations_across_batch_boundaries():
    it = data.PromptIterator(SOURCE, batch_size=4, seed=3)
    flat = [i for b in ids([next(it) for _ in range(5)]) for i in b]  # 20 = two epochs
    assert flat[:10] == np.random.default_rng([3, 0]).permutation(10).tolist()
    assert flat[10:] == np.random.default_rng([3, 1]).permutation(10).tolist()
    assert it.state() == {"seed": 3, "epoch": 2, "position": 0, "batch_size": 4,
                          "num_examples": 10}
    again = data.PromptIterator(SOURCE, batch_size=4, seed=3)
    assert ids([next(again) for _ in range(5)]) == [flat[i:i + 4] for i in range(0, 20, 4)]
    other = data.PromptIterator(SOURCE, batch_size=4, seed=4)
    assert ids([next(other) for _ in range(5)]) != [flat[i:i + 4] for i in range(0, 20, 4)]


@pytest.mark.parametrize("k,m,batch_size", [(0, 4, 3), (3, 5, 3), (7, 4, 4), (2, 3, 25)])
def test_iterator_restore_continues_identically(k, m, batch_size):
    it = data.PromptIterator(SOURCE, batch_size=batch_size, seed=11)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.state()))  # survives a JSON round trip
    expected = ids([next(it) for _ in range(m)])
    restored = data.PromptIterator(SOURCE, batch_size=batch_size, seed=11)
    next(restored)  # its own position is overwritten
    restored.restore(state)
    assert ids([next(restored) for _ in range(m)]) == expected
    assert all(len(b) == batch_size for b in expected)


def test_iterator_over_built_dataset(tmp_path):
    examples = data.load_examples(task_cfg(num_train=13, num_test=2), "train", str(tmp_path))
    it = data.PromptIterator(examples, batch_size=5, seed=0)
    batches = [next(it) for _ in range(3)]  # 15 > 13: crosses into epoch 1
    order = np.random.default_rng([0, 0]).permutation(13)
    assert [e["id"] for e in batches[0]] == [examples[int(i)]["id"] for i in order[:5]]
    assert all(type(e["prompt"]) is str for b in batches for e in b)
    assert it.epoch == 1


def test_iterator_errors():
    it = data.PromptIterator(SOURCE, batch_size=4, seed=0)
    state = it.state()
    with pytest.raises(ValueError, match="seed=0 but this iterator has seed=1"):
        data.PromptIterator(SOURCE, batch_size=4, seed=1).restore(state)
    with pytest.raises(ValueError, match="batch_size=4 but this iterator has batch_size=5"):
        data.PromptIterator(SOURCE, batch_size=5, seed=0).restore(state)
    with pytest.raises(ValueError, match="num_examples=10 .* num_examples=9"):
        data.PromptIterator(SOURCE[:9], batch_size=4, seed=0).restore(state)
    with pytest.raises(ValueError, match="lacks"):
        it.restore({"seed": 0})
    with pytest.raises(ValueError, match="out of range"):
        it.restore({"seed": 0, "epoch": 0, "position": 10})
    with pytest.raises(ValueError, match="batch_size"):
        data.PromptIterator(SOURCE, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        data.PromptIterator(SOURCE, batch_size=1, seed=-1)
    with pytest.raises(ValueError, match="non-empty"):
        data.PromptIterator([], batch_size=1, seed=0)
