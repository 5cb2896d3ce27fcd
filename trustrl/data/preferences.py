"""RLHF data: preference pairs for reward-model training, the synthetic "wordpref" task's hidden
ground truth, and (through trustrl.data.datasets) the prompt sets RL samples from.

    pairs = load_pairs(cfg.pairs, "train", data_dir)   # [{"id", "prompt", "chosen", "rejected",
                                                        #   "task"}], python str, random access
    examples = datasets.load_examples(cfg.task, "train", data_dir)  # the RL prompts
    g = ground_truth("wordpref", prompts, responses, **ground_truth_rule(cfg.task))  # [N] float32
    g = ground_truth_fn(cfg.task)(prompts, responses)  # the same (None: no ground truth)

Prompt sets for RL (datasets.load_examples, task.name in PREFERENCE_DATASETS; no verifier, the
reward comes from a reward model, rewards.get_reward_fn raises for them):
- "ultrafeedback", "hh_rlhf" (PROMPT_FORMATS): files in task.manual_dir, laid out as
  datasets.PROMPT_LAYOUTS says (jsonl, jsonl.gz or parquet; split by file name: train / test,
  HF's train_prefs / test_prefs first, then train / test, train_gen / test_gen, train_sft /
  test_sft; HH-RLHF's <subset>/train.jsonl.gz found one folder down). "answer" is "". Identical
  prompts are kept once per split, and train drops the prompts of the test split; files without a
  test split get task.num_test prompts held out of train (datasets.held_out_indices(seed)).
  Built by datasets' TrustrlPrompts tfds builder under data_dir/trustrl_prompts/<fmt>-<fingerprint
  of the files' names and sizes>/.
- "wordpref" (trustrl.data.tasks): prompts "Write about {a} and {b}." over a pseudo-word lexicon,
  "answer" a reference response of 3-8 uniformly drawn lexicon words (the warm start's target, so
  the base policy writes random word lists); built like arithmetic (TrustrlSynthetic,
  .../wordpref-d<size>-r<rule_seed>-n<train>-t<test>-s<seed>/).

Multi-turn prompts (the design): an example keeps datasets.FIELDS. "prompt" is the plain text of
the user's message when the conversation is that one message (every UltraFeedback prompt, the
single-turn HH-RLHF ones, wordpref), and otherwise the JSON list of the conversation's
{"role", "content"} messages up to and including the last user turn (datasets.encode_prompt;
HH-RLHF's earlier Human / Assistant turns, a message-list prompt with a system message).
datasets.prompt_messages(example) decodes either form into the message list (what a reward
model's chat template renders, with the response appended as the assistant turn) and
datasets.format_prompt renders it for the policy ("chat": the tokenizer's chat template over the
messages; "plain": earlier turns as "User: ..." / "Assistant: ..." lines before the template).
A text prompt that would itself decode as a message list is stored JSON-encoded, so the two
forms never collide. Preference pairs use the same "prompt" encoding.

Preference pairs (load_pairs; pair_cfg.name in PAIR_FORMATS), one tfds builder (TrustrlPairs,
data_dir/trustrl_pairs/<name>-...):
- "ultrafeedback" (UltraFeedback-binarized style): "chosen" / "rejected" are strings (the
  responses) or message lists whose last message is the assistant's response; the prompt is the
  row's "prompt" (or "instruction"; a string or messages as above), else the chosen list's
  messages before the response.
- "hh_rlhf": "chosen" / "rejected" transcripts split into the shared prompt (the turns before the
  last "\\n\\nAssistant:") and the two final assistant responses; a row whose two transcripts
  differ before that point is dropped (counted).
- both: rows whose chosen == rejected are dropped, exact duplicate pairs kept once (counted,
  logged); splits as the prompt files (pair_cfg.num_test held out of train by index when the
  files have no test split).
- "wordpref": synthetic pairs with a known label: per prompt (tasks.generate_splits, so the test
  prompts are held out of train) two responses drawn like the reference answers; chosen is the one
  with the higher ground truth (an exact tie is redrawn), then with probability
  pair_cfg.label_noise (default 0) the two are swapped (independently per pair, label_noise=1
  swaps every pair). Deterministic in (difficulty, rule_seed, num_train, num_test, seed,
  label_noise).

wordpref's ground truth (hidden from the policy and the reward model; GROUND_TRUTH):
    lexicon, w = tasks.wordpref_rule(size, rule_seed)   # make_lexicon(size, rule_seed) and
                                                        # default_rng([rule_seed, 7]).normal(size)
    words = response.split(), each lowercased with trailing punctuation stripped
    g = mean_j w(word_j)  (a word outside the lexicon counts -1.0)  + 0.5 if a word is one of the
        prompt's two topic words;  g = -2.0 for a response without words
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import string
from typing import Mapping, Sequence

import numpy as np

from trustrl.data import datasets, tasks

log = logging.getLogger(__name__)

PROMPT_FORMATS = datasets.PROMPT_FORMATS  # ("ultrafeedback", "hh_rlhf"): RL prompt files
PREFERENCE_DATASETS = datasets.PREFERENCE_DATASETS  # every task.name without a verifier
PAIR_FORMATS = PROMPT_FORMATS + ("wordpref",)
PAIR_FIELDS = ("id", "prompt", "chosen", "rejected", "task")

# --- ground truth ----------------------------------------------------------------------------------

WORDPREF_OUTSIDE = -1.0  # a word outside the lexicon
WORDPREF_EMPTY = -2.0  # a response without words
WORDPREF_TOPIC_BONUS = 0.5  # the response mentions one of the prompt's topic words


@functools.lru_cache(maxsize=16)
def wordpref_weights(size: int = tasks.WORDPREF_SIZE, rule_seed: int = 0) -> Mapping:
    """{word: hidden weight} of the lexicon (tasks.wordpref_rule)."""
    lexicon, weights = tasks.wordpref_rule(size, rule_seed)
    return dict(zip(lexicon, (float(x) for x in weights)))


def _words(response: str) -> list:
    return [w.lower().rstrip(string.punctuation) for w in response.split()]


def wordpref_topics(prompt) -> tuple:
    """The two topic words of a wordpref prompt (a str, e.g. a formatted prompt, or a dict)."""
    text = datasets.prompt_text(prompt)
    m = tasks.WORDPREF_TOPICS.search(text)
    if m is None:
        raise ValueError(f"not a wordpref prompt (no {tasks.WORDPREF_PROMPT!r}): {text[:80]!r}")
    return m.group(1).lower(), m.group(2).lower()


def wordpref_score(prompt, response: str, weights: Mapping) -> float:
    """The ground truth of one response under explicit {word: weight} (module docstring)."""
    words = _words(response)
    if not words:
        return WORDPREF_EMPTY
    g = float(np.mean([weights.get(w, WORDPREF_OUTSIDE) for w in words]))
    if set(wordpref_topics(prompt)) & set(words):
        g += WORDPREF_TOPIC_BONUS
    return g


def wordpref_ground_truth(prompts, responses, *, size: int = tasks.WORDPREF_SIZE,
                          rule_seed: int = 0) -> np.ndarray:
    weights = wordpref_weights(int(size), int(rule_seed))
    return np.array([wordpref_score(p, r, weights) for p, r in zip(prompts, responses)],
                    np.float32)


GROUND_TRUTH = {"wordpref": wordpref_ground_truth}


def ground_truth(task: str, prompts: Sequence, responses: Sequence[str], **rule) -> np.ndarray:
    """[N] float32 hidden ground-truth scores of responses to prompts (str or example dicts) for
    a task with one (GROUND_TRUTH); rule: the task's parameters (ground_truth_rule(task_cfg))."""
    if task not in GROUND_TRUTH:
        raise ValueError(f"task {task!r} has no ground-truth score; choose one of "
                         f"{sorted(GROUND_TRUTH)}")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return GROUND_TRUTH[task](prompts, responses, **rule)


def ground_truth_rule(cfg) -> dict:
    """The ground-truth keyword arguments of a wordpref task or pair config: {"size":
    cfg.difficulty (default tasks.WORDPREF_SIZE), "rule_seed": cfg.rule_seed (default 0)}."""
    size = datasets.config_value(cfg, "difficulty")
    return {"size": int(tasks.WORDPREF_SIZE if size is None else size),
            "rule_seed": int(datasets.config_value(cfg, "rule_seed", 0) or 0)}


def ground_truth_fn(task_cfg):
    """(prompts, responses) -> [N] float32 ground truth of task_cfg's task with its rule
    (ground_truth_rule), or None for a task without a ground truth (every task but wordpref)."""
    task = datasets.config_value(task_cfg, "name")
    if task not in GROUND_TRUTH:
        return None
    return functools.partial(ground_truth, task, **ground_truth_rule(task_cfg))


# --- synthetic pairs -------------------------------------------------------------------------------

_MAX_REDRAWS = 1000


def wordpref_pairs(*, difficulty: int = tasks.WORDPREF_SIZE, rule_seed: int = 0, num_train: int,
                   num_test: int, seed: int = 0, label_noise: float = 0.0) -> dict:
    """{"train": [pair, ...], "test": [...]} of wordpref (module docstring). Prompts come from
    tasks.generate_splits(seed); split s's responses from default_rng([seed, 2, s]) and its label
    flips from default_rng([seed, 3, s]) (s = 0 train, 1 test), so label_noise changes only the
    labels."""
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be a probability in [0, 1], got {label_noise}")
    splits = tasks.generate_splits("wordpref", difficulty=difficulty, num_train=num_train,
                                   num_test=num_test, seed=seed, rule_seed=rule_seed)
    lexicon = tasks.make_lexicon(difficulty, rule_seed)
    weights = wordpref_weights(difficulty, rule_seed)
    out = {}
    for s, split in enumerate(datasets.SPLITS):
        rng = np.random.default_rng([seed, 2, s])
        flips = np.random.default_rng([seed, 3, s]).random(len(splits[split])) < label_noise
        pairs = []
        for ex, flip in zip(splits[split], flips):
            a = tasks.wordpref_response(rng, lexicon)
            g_a = np.float32(wordpref_score(ex["prompt"], a, weights))
            for _ in range(_MAX_REDRAWS):
                b = tasks.wordpref_response(rng, lexicon)
                g_b = np.float32(wordpref_score(ex["prompt"], b, weights))
                if g_a != g_b:
                    break
            else:
                raise ValueError(f"wordpref difficulty={difficulty}: {_MAX_REDRAWS} responses "
                                 f"tie with {a!r}; use a larger lexicon")
            chosen, rejected = (a, b) if g_a > g_b else (b, a)
            if flip:
                chosen, rejected = rejected, chosen
            pairs.append({"id": ex["id"], "prompt": ex["prompt"], "chosen": chosen,
                          "rejected": rejected, "task": "wordpref"})
        out[split] = pairs
    return out


# --- pair files ------------------------------------------------------------------------------------

def _response(value, where: str, field: str):
    """(context messages or None, response text) of a chosen / rejected value."""
    if isinstance(value, (str, bytes)):
        return None, datasets.cell_text(value)
    messages = datasets.message_list(value, f"{where} '{field}'")
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the '{field}' message list does not end with an assistant "
                         f"message (the response)")
    return messages[:-1], messages[-1]["content"]


def _pair_row(kind: str, row: Mapping, where: str):
    """(prompt messages, chosen, rejected) of one file row, or None when an HH-RLHF row's two
    transcripts differ before their last assistant turn."""
    if kind == "hh_rlhf":
        transcripts = [datasets.cell_text(datasets.row_field(row, f, where=where))
                       for f in ("chosen", "rejected")]
        try:
            (prompt, chosen), (prompt_r, rejected) = (datasets.split_hh(t) for t in transcripts)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return None if prompt != prompt_r else (prompt, chosen, rejected)
    context, chosen = _response(datasets.row_field(row, "chosen", where=where), where, "chosen")
    _, rejected = _response(datasets.row_field(row, "rejected", where=where), where, "rejected")
    lower = {str(k).lower(): v for k, v in row.items()}
    value = next((lower[k] for k in ("prompt", "instruction") if lower.get(k) is not None), None)
    if value is not None:
        return datasets.prompt_from_value(value, where), chosen, rejected
    if not context or context[-1]["role"] != "user":
        raise ValueError(f"{where}: none of the fields ['prompt', 'instruction'] (has "
                         f"{sorted(row)}), and 'chosen' is no message list ending with a user "
                         f"and an assistant message to take the prompt from")
    return context, chosen, rejected


def read_pair_files(kind: str, manual_dir) -> tuple:
    """({split: [pair dict, ...]}, {split: {"pairs", "same", "duplicate", "mismatch"}}) of a
    preference-pair file set (datasets.PROMPT_LAYOUTS): the pairs kept and the rows dropped
    (chosen == rejected; an exact duplicate pair; HH-RLHF transcripts with different prompts)."""
    out, stats = {}, {}
    for split, paths in datasets.find_preference_files(kind, manual_dir).items():
        seen, pairs = set(), []
        counts = {"same": 0, "duplicate": 0, "mismatch": 0}
        for path in paths:
            for n, row in enumerate(datasets.read_rows(path)):
                got = _pair_row(kind, row, f"{kind} {path} row {n}")
                if got is None:
                    counts["mismatch"] += 1
                    continue
                messages, chosen, rejected = got
                if chosen == rejected:
                    counts["same"] += 1
                    continue
                pair = (datasets.encode_prompt(messages), chosen, rejected)
                if pair in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(pair)
                pairs.append(pair)
        if any(counts.values()):
            log.warning("%s %s pairs: dropped %d with chosen == rejected, %d duplicates, %d with "
                        "different prompts", kind, split, counts["same"], counts["duplicate"],
                        counts["mismatch"])
        if not pairs:
            raise ValueError(f"{kind} {split}: no preference pairs in {[str(p) for p in paths]}")
        width = len(str(len(pairs) - 1))
        out[split] = [{"id": f"{kind}-{split}-{i:0{width}d}", "prompt": p, "chosen": c,
                       "rejected": r, "task": kind} for i, (p, c, r) in enumerate(pairs)]
        stats[split] = {"pairs": len(pairs), **counts}
    return out, stats


# --- tfds builder and loading ----------------------------------------------------------------------

_builders: dict = {}


def _pair_classes():
    """(config class, builder class) of the pair builder, defined (registered with tfds) once."""
    if _builders:
        return _builders["config"], _builders["builder"]
    import tensorflow_datasets as tfds  # no TensorFlow needed (array_record)

    @dataclasses.dataclass(eq=False)
    class PairConfig(tfds.core.BuilderConfig):
        kind: str = "wordpref"
        difficulty: int = tasks.WORDPREF_SIZE
        rule_seed: int = 0
        num_train: int = 1
        num_test: int = 0
        seed: int = 0
        label_noise: float = 0.0

    class TrustrlPairs(datasets.text_builder()):
        """Preference pairs (prompt, chosen, rejected) from files or the wordpref rule."""
        VERSION = tfds.core.Version("1.0.0")
        FIELDS = PAIR_FIELDS
        RELEASE_NOTES = {"1.0.0": "ultrafeedback / hh_rlhf files, synthetic wordpref"}
        MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(
            f"{k}: {v}" for k, v in datasets.PROMPT_LAYOUTS.items())

        def _split_generators(self, dl_manager):
            c = self.builder_config
            if c.kind == "wordpref":
                splits = wordpref_pairs(difficulty=c.difficulty, rule_seed=c.rule_seed,
                                        num_train=c.num_train, num_test=c.num_test, seed=c.seed,
                                        label_noise=c.label_noise)
            else:
                splits, _ = read_pair_files(c.kind, pathlib.Path(str(dl_manager.manual_dir)))
            return {s: self._generate_examples(ex) for s, ex in splits.items() if ex}

    for cls in (PairConfig, TrustrlPairs):
        cls.__qualname__ = cls.__name__
    _builders.update(config=PairConfig, builder=TrustrlPairs)
    return PairConfig, TrustrlPairs


def pair_builder(pair_cfg, *, data_dir: str, seed: int = 0):
    """The tfds builder of pair_cfg's pairs (not yet prepared; see datasets.build()). Config
    names: "<kind>-<fingerprint of the files>" or "wordpref-d<difficulty>-r<rule_seed>-n<train>-
    t<test>-s<seed>-p<label_noise>"."""
    kind = datasets.config_value(pair_cfg, "name")
    config_cls, builder_cls = _pair_classes()
    if kind == "wordpref":
        rule = ground_truth_rule(pair_cfg)
        noise = float(datasets.config_value(pair_cfg, "label_noise", 0.0) or 0.0)
        num_train = int(datasets.config_value(pair_cfg, "num_train"))
        num_test = int(datasets.config_value(pair_cfg, "num_test", 0) or 0)
        tasks.check_task("wordpref", rule["size"], "+")
        name = (f"wordpref-d{rule['size']}-r{rule['rule_seed']}-n{num_train}-t{num_test}"
                f"-s{int(seed)}-p{noise:.6g}")
        config = config_cls(name=name, description="wordpref_pairs(...)", kind=kind,
                            difficulty=rule["size"], rule_seed=rule["rule_seed"],
                            num_train=num_train, num_test=num_test, seed=int(seed),
                            label_noise=noise)
    else:
        manual_dir = datasets.config_value(pair_cfg, "manual_dir", "")
        files = datasets.find_preference_files(kind, manual_dir)
        config = config_cls(name=f"{kind}-{datasets.files_fingerprint(files, manual_dir)}",
                            description=f"{kind} pairs from {manual_dir}", kind=kind)
    return builder_cls(config=config, data_dir=data_dir, file_format="array_record")


def load_pairs(pair_cfg, split: str, data_dir: str, *, seed: int | None = None
               ) -> Sequence[dict]:
    """The preference pairs of one split, built under data_dir on first use and reused after.

    pair_cfg (a ConfigDict, dict or object): name (PAIR_FORMATS); for files manual_dir and
    num_test (held out of train when the files have no test split); for wordpref difficulty (the
    lexicon size, default tasks.WORDPREF_SIZE), rule_seed (0), num_train, num_test, label_noise
    (0). seed (default pair_cfg.seed, else 0) draws the synthetic pairs and the held-out ones.
    Returns a random-access sequence of {"id", "prompt", "chosen", "rejected", "task"} dicts of
    python str ("prompt" as datasets.encode_prompt writes it).
    """
    kind = datasets.config_value(pair_cfg, "name")
    if kind not in PAIR_FORMATS:
        raise ValueError(f"unknown preference pairs {kind!r}; choose one of {list(PAIR_FORMATS)}")
    if split not in datasets.SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(datasets.SPLITS)}")
    if not data_dir:
        raise ValueError("data_dir is empty: give the directory the tfds dataset is built in")
    data_dir = os.fspath(pathlib.Path(data_dir).expanduser())
    seed = int(datasets.config_value(pair_cfg, "seed", 0) or 0) if seed is None else int(seed)
    manual_dir = datasets.config_value(pair_cfg, "manual_dir", "") or ""
    from trustrl.infra import multihost
    with multihost.primary_first(f"tfds:pairs:{kind}:{split}"):
        builder = pair_builder(pair_cfg, data_dir=data_dir, seed=seed if kind == "wordpref" else 0)
        sources = datasets.build(builder, manual_dir=os.fspath(
            pathlib.Path(manual_dir).expanduser()) if manual_dir else None)
    if kind == "wordpref":
        if split not in sources:
            raise ValueError(f"wordpref pairs have no {split!r} split: num_{split}=0")
        return datasets.split_examples(builder, sources, split, PAIR_FIELDS)
    num_test = int(datasets.config_value(pair_cfg, "num_test", 0) or 0)
    return datasets.file_split(kind, builder, sources, split, num_test=num_test, seed=seed,
                               manual_dir=manual_dir, what="pairs", key="num_test (pairs)",
                               fields=PAIR_FIELDS)
