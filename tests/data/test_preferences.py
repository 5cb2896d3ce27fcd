"""trustrl.data.preferences (and the RLHF parts of trustrl.data.datasets): prompt files and
preference pairs in UltraFeedback / HH-RLHF layouts (jsonl, jsonl.gz, parquet), multi-turn
prompts, the wordpref task's hidden ground truth and its synthetic pairs."""
import gzip
import json

import ml_collections
import numpy as np
import pytest
import tokenizers

from trustrl.data import datasets as data, preferences as prefs, rewards, tasks
from trustrl.data import tokenizer as tk

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def cfg(name, **kw):
    return ml_collections.ConfigDict({"name": name, "manual_dir": "", "num_test": 0, **kw})


def write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def as_list(seq):
    return [seq[i] for i in range(len(seq))]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --- prompt encoding and rendering ----------------------------------------------------------------

def test_encode_prompt_round_trips_and_never_collides():
    assert data.encode_prompt([user("Hi there")]) == "Hi there"  # a lone user message: plain
    convo = [{"role": "system", "content": "Be brief."}, user("a"), assistant("b"), user("c?")]
    text = data.encode_prompt(convo)
    assert json.loads(text) == convo and data.prompt_messages(text) == convo
    assert data.prompt_messages({"prompt": "Hi there"}) == [user("Hi there")]
    # a user text that is itself a message list stays that text (stored JSON-encoded)
    tricky = json.dumps([user("x")])
    assert data.encode_prompt([user(tricky)]) != tricky
    assert data.prompt_messages(data.encode_prompt([user(tricky)])) == [user(tricky)]
    assert data.prompt_messages('[{"role": "user"}]') == [user('[{"role": "user"}]')]
    with pytest.raises(ValueError, match="at least one message"):
        data.encode_prompt([])


def chat_tokenizer():
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return tk.Tokenizer(backend, {"chat_template": tk.FALLBACK_TEMPLATES["chatml"]})


def test_format_prompt_renders_conversations():
    convo = data.encode_prompt([user("Name a fruit."), assistant("Apple."), user("Another?")])
    ex = {"id": "x", "prompt": convo, "answer": "", "task": "hh_rlhf"}
    assert data.format_prompt(ex, "plain") == ("User: Name a fruit.\nAssistant: Apple.\n"
                                               "Question: Another?\nAnswer:")
    chat = data.format_prompt(ex, "chat", chat_tokenizer())
    assert chat == ("<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\nApple."
                    "<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n")
    # no \boxed{} instruction for a task without a verifier; a verifier task keeps it
    single = {"id": "y", "prompt": "Tell a joke.", "answer": "", "task": "ultrafeedback"}
    assert "boxed" not in data.format_prompt(single, "chat", chat_tokenizer())
    assert "boxed" in data.format_prompt(dict(single, task="gsm8k"), "chat", chat_tokenizer())
    assert data.format_prompt(single, "plain") == "Question: Tell a joke.\nAnswer:"


def test_tasks_without_verifier_name_the_reward_model():
    assert set(data.PREFERENCE_DATASETS) == {"ultrafeedback", "hh_rlhf", "wordpref"}
    assert set(data.TASK_NAMES) == set(rewards.TASKS)
    for name in data.PREFERENCE_DATASETS:
        with pytest.raises(ValueError, match=f"{name} has no verifier: it needs a reward model, "
                                             f"set reward_model.hf_dir"):
            rewards.score(name, ["x"], [""])


# --- HH-RLHF transcripts --------------------------------------------------------------------------

HH_CHOSEN = ("\n\nHuman: What is a good pet?\n\nAssistant: A cat is easy to keep."
             "\n\nHuman: Why?\n\nAssistant: Cats are independent.")
HH_REJECTED = ("\n\nHuman: What is a good pet?\n\nAssistant: A cat is easy to keep."
               "\n\nHuman: Why?\n\nAssistant: No idea.")
HH_CONTEXT = [user("What is a good pet?"), assistant("A cat is easy to keep."), user("Why?")]


def test_hh_transcript_splitting():
    assert data.split_hh(HH_CHOSEN) == (HH_CONTEXT, "Cats are independent.")
    assert data.split_hh("Human: hi\n\nAssistant:") == ([user("hi")], "")  # no leading blank line
    with pytest.raises(ValueError, match="no final 'Assistant:' turn"):
        data.split_hh("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: and?")
    with pytest.raises(ValueError, match="must start with 'Human:'"):
        data.split_hh("preamble\n\nHuman: hi\n\nAssistant: yo")


HH_ROWS = [
    {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    {"chosen": "\n\nHuman: Say hi.\n\nAssistant: Hi!", "rejected": "\n\nHuman: Say hi.\n\n"
     "Assistant: No."},
    {"chosen": "\n\nHuman: Same?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Same?\n\n"
     "Assistant: Yes."},  # chosen == rejected: dropped
    {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
]


@pytest.mark.parametrize("fmt", ["jsonl.gz", "parquet"])
def test_hh_rlhf_prompts_and_pairs(tmp_path, fmt):
    manual = tmp_path / "hh"
    write = ((lambda p, r: write_jsonl(p, r, gz=True)) if fmt == "jsonl.gz" else write_parquet)
    write(manual / "helpful-base" / f"train.{fmt}", HH_ROWS)
    write(manual / "harmless-base" / f"train.{fmt}", HH_ROWS[1:2])  # a duplicate across subsets
    write(manual / "helpful-base" / f"test.{fmt}", HH_ROWS[:1])
    write_jsonl(manual / "red-team-attempts" / "red_team_attempts.jsonl", [{"x": 1}])  # not read
    d = str(tmp_path / "d")
    train = as_list(data.load_examples(cfg("hh_rlhf", manual_dir=str(manual)), "train", d))
    test = as_list(data.load_examples(cfg("hh_rlhf", manual_dir=str(manual)), "test", d))
    # test holds the multi-turn prompt, so train drops it; duplicates kept once
    assert [data.prompt_messages(e) for e in test] == [HH_CONTEXT]
    assert [e["prompt"] for e in train] == ["Say hi.", "Same?", "A"]
    assert all(e["answer"] == "" and e["task"] == "hh_rlhf" for e in train + test)
    assert set(train[0]) == set(data.FIELDS)

    pairs, stats = prefs.read_pair_files("hh_rlhf", manual)
    assert stats["train"] == {"pairs": 2, "same": 1, "duplicate": 1, "mismatch": 1}
    got = as_list(prefs.load_pairs(cfg("hh_rlhf", manual_dir=str(manual)), "train", d))
    assert got == pairs["train"]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in got] == [  # files in path order
        ("Say hi.", "Hi!", "No."),
        (data.encode_prompt(HH_CONTEXT), "Cats are independent.", "No idea.")]
    assert set(got[0]) == set(prefs.PAIR_FIELDS) and all(p["task"] == "hh_rlhf" for p in got)
    test_pairs = as_list(prefs.load_pairs(cfg("hh_rlhf", manual_dir=str(manual)), "test", d))
    assert [p["chosen"] for p in test_pairs] == ["Cats are independent."]


def test_hh_rlhf_missing_fields_name_file_row_and_field(tmp_path):
    manual = tmp_path / "hh"
    write_jsonl(manual / "train.jsonl", [HH_ROWS[0], {"chosen": HH_CHOSEN}])
    with pytest.raises(ValueError, match=r"hh_rlhf .*train\.jsonl row 1: none of the fields "
                                         r"\['rejected'\]"):
        prefs.read_pair_files("hh_rlhf", manual)
    write_jsonl(manual / "train.jsonl", [{"text": "hi"}])
    with pytest.raises(ValueError, match=r"train\.jsonl row 0: none of the fields "
                                         r"\['chosen', 'rejected'\]"):
        data.load_examples(cfg("hh_rlhf", manual_dir=str(manual)), "train", str(tmp_path / "d"))
    write_jsonl(manual / "train.jsonl", [{"chosen": "no markers", "rejected": "at all"}])
    with pytest.raises(ValueError, match=r"train\.jsonl row 0: .*must start with 'Human:'"):
        prefs.read_pair_files("hh_rlhf", manual)


# --- UltraFeedback --------------------------------------------------------------------------------

def uf_row(prompt, chosen="good", rejected="bad"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": 8.0}


def test_ultrafeedback_jsonl_dedupe_and_message_prompts(tmp_path):
    manual = tmp_path / "uf"
    system_convo = [{"role": "system", "content": "Be kind."}, user("Hello?"),
                    assistant("Hi."), user("Bye?"), assistant("trailing, cut")]
    write_jsonl(manual / "train.jsonl", [
        uf_row("Write a poem."), uf_row("Write a poem."),  # duplicate
        uf_row([user("Plan a trip.")]),  # message list, one user message: plain text
        uf_row(system_convo), uf_row("Held out question."), uf_row("  ")])  # empty: skipped
    write_jsonl(manual / "test.jsonl", [uf_row("Held out question.")])
    c = cfg("ultrafeedback", manual_dir=str(manual))
    d = str(tmp_path / "d")
    train = as_list(data.load_examples(c, "train", d))
    assert [e["prompt"] for e in train[:2]] == ["Write a poem.", "Plan a trip."]
    assert data.prompt_messages(train[2]) == system_convo[:4]  # up to the last user message
    assert len(train) == 3 and all(e["answer"] == "" for e in train)
    assert [e["id"] for e in train] == ["ultrafeedback-train-0", "ultrafeedback-train-1",
                                        "ultrafeedback-train-2"]
    assert as_list(data.load_examples(c, "test", d))[0]["prompt"] == "Held out question."


def test_ultrafeedback_binarized_parquet_layout_prompts_and_pairs(tmp_path):
    manual = tmp_path / "uf"
    rows = [{"prompt": f"Question {i}?", "prompt_id": str(i),
             "chosen": [user(f"Question {i}?"), assistant(f"good {i}")],
             "rejected": [user(f"Question {i}?"), assistant(f"bad {i}")],
             "score_chosen": 9.0, "score_rejected": 2.0} for i in range(5)]
    rows.append(dict(rows[0], rejected=rows[0]["chosen"]))  # a tie: chosen == rejected
    write_parquet(manual / "data" / "train_prefs-00000-of-00001.parquet", rows[:3] + rows[5:])
    write_parquet(manual / "data" / "test_prefs-00000-of-00001.parquet", rows[3:5])
    write_parquet(manual / "data" / "train_gen-00000-of-00001.parquet",
                  [dict(rows[0], prompt="only in gen")])  # train_prefs wins over train_gen
    c = cfg("ultrafeedback", manual_dir=str(manual))
    d = str(tmp_path / "d")
    assert [e["prompt"] for e in as_list(data.load_examples(c, "train", d))] == [
        "Question 0?", "Question 1?", "Question 2?"]
    assert len(data.load_examples(c, "test", d)) == 2
    pairs = as_list(prefs.load_pairs(c, "train", d))
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        (f"Question {i}?", f"good {i}", f"bad {i}") for i in range(3)]
    assert prefs.read_pair_files("ultrafeedback", manual)[1]["train"]["same"] == 1
    # the prompt may come from the chosen message list when the row has no prompt field
    write_jsonl(tmp_path / "m" / "train.jsonl", [{"chosen": rows[1]["chosen"],
                                                  "rejected": "plain bad"}])
    got, _ = prefs.read_pair_files("ultrafeedback", tmp_path / "m")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in got["train"]] == [
        ("Question 1?", "good 1", "plain bad")]


def test_ultrafeedback_instruction_field_held_out_test_and_missing_field(tmp_path):
    manual = tmp_path / "uf"  # the original UltraFeedback: per-source files, no split names
    write_jsonl(manual / "evol_instruct.jsonl", [{"instruction": f"Task {i}"} for i in range(6)])
    write_jsonl(manual / "sharegpt.jsonl", [{"instruction": f"Task {i}"} for i in range(4, 10)])
    c = cfg("ultrafeedback", manual_dir=str(manual), num_test=3)
    d = str(tmp_path / "d")
    train = [e["prompt"] for e in as_list(data.load_examples(c, "train", d))]
    test = [e["prompt"] for e in as_list(data.load_examples(c, "test", d))]
    assert len(train) == 7 and len(test) == 3  # 10 distinct prompts (4, 5 deduplicated)
    assert sorted(train + test, key=lambda t: int(t.split()[1])) == [f"Task {i}" for i in
                                                                     range(10)]
    held = data.held_out_indices(10, 3, seed=0)
    assert test == [f"Task {i}" for i in held]
    assert test != [e["prompt"] for e in as_list(data.load_examples(c, "test", d, seed=1))]
    with pytest.raises(ValueError, match="num_test > 0"):
        data.load_examples(cfg("ultrafeedback", manual_dir=str(manual)), "test", d)

    bad = tmp_path / "bad"
    write_jsonl(bad / "train.jsonl", [{"prompt": "ok"}, {"question": "where is my prompt?"}])
    with pytest.raises(ValueError, match=r"ultrafeedback .*bad.train\.jsonl row 1: none of the "
                                         r"fields \['prompt', 'instruction'\]"):
        data.load_examples(cfg("ultrafeedback", manual_dir=str(bad)), "train", d)
    write_jsonl(bad / "train.jsonl", [{"prompt": "ok", "chosen": "a"}])
    with pytest.raises(ValueError, match=r"train\.jsonl row 0: none of the fields \['rejected'\]"):
        prefs.load_pairs(cfg("ultrafeedback", manual_dir=str(bad)), "train", d)
    write_jsonl(bad / "train.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"row 0: none of the fields \['prompt', 'instruction'\]"):
        prefs.read_pair_files("ultrafeedback", bad)
    with pytest.raises(FileNotFoundError, match=r"ultrafeedback: no source files.*train_prefs"):
        data.load_examples(cfg("ultrafeedback", manual_dir=str(tmp_path / "d")), "train", d)


def test_rebuild_reuses_and_new_files_build_afresh(tmp_path, monkeypatch):
    manual = tmp_path / "uf"
    write_jsonl(manual / "train.jsonl", [uf_row(f"P{i}") for i in range(4)])
    c = cfg("ultrafeedback", manual_dir=str(manual), num_test=1)
    d = str(tmp_path / "d")
    first = as_list(data.load_examples(c, "train", d))
    pairs = as_list(prefs.load_pairs(c, "train", d))
    monkeypatch.setattr(data, "read_prompt_files", lambda *a: pytest.fail("rebuilt prompts"))
    monkeypatch.setattr(prefs, "read_pair_files", lambda *a: pytest.fail("rebuilt pairs"))
    assert as_list(data.load_examples(c, "train", d)) == first
    assert as_list(prefs.load_pairs(c, "train", d)) == pairs
    monkeypatch.undo()
    write_jsonl(manual / "train.jsonl", [uf_row(f"P{i}") for i in range(6)])
    assert len(data.load_examples(c, "train", d)) == 5
    assert len(list((tmp_path / "d" / "trustrl_prompts").iterdir())) == 2


# --- wordpref -------------------------------------------------------------------------------------

def test_wordpref_score_hand_values():
    w = {"zu": 1.0, "ka": -0.5, "mi": 2.0}
    p = "Write about zu and mi."
    assert prefs.wordpref_score(p, "ka ka", w) == -0.5
    assert prefs.wordpref_score(p, "Zu, ka!", w) == pytest.approx(0.25 + 0.5)  # topic "zu"
    assert prefs.wordpref_score(p, "zu foo", w) == pytest.approx((1.0 - 1.0) / 2 + 0.5)
    assert prefs.wordpref_score(p, "MI...", w) == pytest.approx(2.5)
    assert prefs.wordpref_score(p, "foo bar ka", w) == pytest.approx((-1 - 1 - 0.5) / 3)
    assert prefs.wordpref_score(p, "", w) == -2.0 and prefs.wordpref_score(p, " \n ", w) == -2.0
    # the topic words also count from a formatted prompt
    assert prefs.wordpref_score(f"Question: {p}\nAnswer:", "mi", w) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="not a wordpref prompt"):
        prefs.wordpref_score("What is 1 + 1?", "mi", w)


def test_ground_truth_matches_the_documented_rule():
    lexicon = tasks.make_lexicon(10, seed=3)
    w = np.random.default_rng([3, 7]).normal(size=10)
    prompt = f"Write about {lexicon[5]} and {lexicon[1]}."
    responses = [f"{lexicon[0]} {lexicon[5]} bogus", f"{lexicon[2]}.", ""]
    got = prefs.ground_truth("wordpref", [prompt, {"prompt": prompt}, prompt], responses,
                             size=10, rule_seed=3)
    want = [(w[0] + w[5] - 1.0) / 3 + 0.5, w[2], -2.0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert prefs.ground_truth_rule(cfg("wordpref", difficulty=10, rule_seed=3)) == {
        "size": 10, "rule_seed": 3}
    assert prefs.ground_truth_rule({"name": "wordpref"}) == {"size": 24, "rule_seed": 0}
    fn = prefs.ground_truth_fn(cfg("wordpref", difficulty=10, rule_seed=3))
    np.testing.assert_array_equal(fn([prompt] * 3, responses), got)
    assert prefs.ground_truth_fn(cfg("gsm8k")) is None
    with pytest.raises(ValueError, match=r"'gsm8k' has no ground-truth score; choose one of "
                                         r"\['wordpref'\]"):
        prefs.ground_truth("gsm8k", ["x"], ["y"])
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        prefs.ground_truth("wordpref", [prompt], ["a", "b"])


def wordpref_cfg(**kw):
    c = dict(difficulty=24, rule_seed=0, num_train=30, num_test=6, template="plain")
    c.update(kw)
    return cfg("wordpref", **c)


def test_wordpref_prompts_through_load_examples(tmp_path, monkeypatch):
    c = wordpref_cfg(num_test=6)
    train = as_list(data.load_examples(c, "train", str(tmp_path / "a")))
    test = as_list(data.load_examples(c, "test", str(tmp_path / "a")))
    assert len(train) == 30 and len(test) == 6
    lexicon = set(tasks.make_lexicon(24, seed=0))
    for ex in train + test:
        a, b = prefs.wordpref_topics(ex)
        assert a != b and {a, b} <= lexicon and ex["task"] == "wordpref"
        words = ex["answer"].split()
        assert 3 <= len(words) <= 8 and set(words) <= lexicon
    assert not {e["prompt"] for e in test} & {e["prompt"] for e in train}
    # deterministic per seed; rule_seed changes the lexicon and gets its own directory
    assert as_list(data.load_examples(c, "train", str(tmp_path / "b"))) == train
    assert as_list(data.load_examples(c, "train", str(tmp_path / "a"), seed=1)) != train
    other = as_list(data.load_examples(wordpref_cfg(rule_seed=1), "train", str(tmp_path / "a")))
    lexicon_1 = set(tasks.make_lexicon(24, seed=1))
    assert lexicon_1 != lexicon
    assert all(set(e["answer"].split()) <= lexicon_1 for e in other)
    assert sorted(p.name for p in (tmp_path / "a" / "trustrl_synthetic").iterdir()) == [
        "wordpref-d24-r0-n30-t6-s0", "wordpref-d24-r0-n30-t6-s1", "wordpref-d24-r1-n30-t6-s0"]
    monkeypatch.setattr(tasks, "generate_splits", lambda *a, **k: pytest.fail("rebuilt"))
    assert as_list(data.load_examples(c, "train", str(tmp_path / "a"))) == train
    with pytest.raises(ValueError, match=r"wordpref difficulty \(the lexicon size\)"):
        tasks.check_task("wordpref", 1, "+")


def test_wordpref_pairs_follow_the_ground_truth_and_label_noise(tmp_path):
    d = str(tmp_path)
    c = wordpref_cfg(num_train=40, num_test=8)
    pairs = as_list(prefs.load_pairs(c, "train", d))
    assert len(pairs) == 40 and len(prefs.load_pairs(c, "test", d)) == 8
    rule = prefs.ground_truth_rule(c)
    prompts = [p["prompt"] for p in pairs]
    g_c = prefs.ground_truth("wordpref", prompts, [p["chosen"] for p in pairs], **rule)
    g_r = prefs.ground_truth("wordpref", prompts, [p["rejected"] for p in pairs], **rule)
    assert (g_c > g_r).all()
    lexicon = set(tasks.make_lexicon(24, seed=0))
    assert all(3 <= len(p["chosen"].split()) <= 8 and set(p["chosen"].split()) <= lexicon
               for p in pairs)
    # label_noise = 1 swaps every pair (the same responses); 0.5 swaps some; seed decides
    flipped = as_list(prefs.load_pairs(wordpref_cfg(num_train=40, num_test=8, label_noise=1.0),
                                       "train", d))
    assert [(p["rejected"], p["chosen"]) for p in flipped] == [
        (p["chosen"], p["rejected"]) for p in pairs]
    half = as_list(prefs.load_pairs(wordpref_cfg(num_train=40, num_test=8, label_noise=0.5),
                                    "train", d))
    swapped = sum(h["chosen"] != p["chosen"] for h, p in zip(half, pairs))
    assert 5 < swapped < 35
    assert as_list(prefs.load_pairs(c, "train", str(tmp_path / "again"))) == pairs
    assert as_list(prefs.load_pairs(c, "train", d, seed=1)) != pairs
    with pytest.raises(ValueError, match=r"label_noise must be a probability"):
        prefs.load_pairs(wordpref_cfg(label_noise=1.5), "train", d)
    with pytest.raises(ValueError, match=r"unknown preference pairs 'chess'.*'wordpref'"):
        prefs.load_pairs(cfg("chess"), "train", d)
