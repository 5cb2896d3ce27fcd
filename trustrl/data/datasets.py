"""Prompt data: tfds builders (array_record, no TensorFlow), prompt templates, prompt iterator.

    examples = load_examples(cfg.task, "train", data_dir)  # random access, python str values
    it = PromptIterator(examples, batch_size=64, seed=0)
    batch = next(it)                                       # [{"id", "prompt", "answer", "task"}]
    texts = [format_prompt(ex, "plain") for ex in batch]   # "Question: ...\\nAnswer:"
    rewards.score(ex["task"], responses, answers, prefix=response_prefix("plain"))
    host_state["data"] = it.state()  ...  it.restore(host_state["data"])

Storage: two tensorflow-datasets builders write array_record files under data_dir and are read
back with `builder.as_data_source()` (tfds' random-access data source). Neither needs TensorFlow.
A dataset is built the first time it is asked for and reused afterwards; the builder config name
encodes everything the content depends on, so different parameters build to different
directories: data_dir/trustrl_synthetic/<task>-d<difficulty>[-ops<...>]-n<train>-t<test>-s<seed>/
data_dir/trustrl_math/<dataset>-<fingerprint of the source files' names and sizes>/ and
data_dir/trustrl_prompts/<format>-<fingerprint>/ (RLHF prompt files, below).

Every example is {"id", "prompt", "answer", "task"} of python str; "prompt" is the bare question
(format_prompt adds the template), "task" is the dataset name (a trustrl.data.rewards.TASKS key).

RLHF prompt sets (PREFERENCE_DATASETS; no verifier, rewards from a reward model, "answer" is ""
except wordpref's reference response): "ultrafeedback" and "hh_rlhf" read files from
task.manual_dir (PROMPT_LAYOUTS); "wordpref" is synthetic (trustrl.data.tasks; built like
arithmetic). Preference pairs for reward-model training: trustrl.data.preferences.load_pairs.
A conversation prompt (HH-RLHF's earlier turns, a message-list prompt) is stored in "prompt" as
the JSON list of its {"role", "content"} messages (encode_prompt); a single user message stays
plain text. prompt_messages(example) gives the message list of any example, and format_prompt
renders both kinds.

Math sets come from files the user downloaded into task.manual_dir, in their published layouts
(MATH_LAYOUTS documents each). Splits:
- a dataset whose files hold only a train split (DAPO-Math-17k, or GSM8K / MATH given only train
  files) gets its "test" split held out of train at load time: task.num_test problems chosen by
  np.random.default_rng([seed, 1]); "train" is then the rest (in file order). num_test = 0 makes
  split="test" an error.
- a dataset whose files hold only a test split (AIME; MATH-500) raises for split="train": these are
  evaluation sets.
task.num_train / num_test size only the synthetic tasks (and the held-out part above).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import pathlib
import re
from typing import Mapping, Sequence

import numpy as np

from trustrl.infra import integrity
from trustrl.data import rewards, tasks

log = logging.getLogger(__name__)

SYNTHETIC_TASKS = tuple(tasks.TASK_NAMES)
MATH_DATASETS = ("gsm8k", "math", "dapo_math", "aime")
PROMPT_FORMATS = ("ultrafeedback", "hh_rlhf")  # RLHF prompt files in task.manual_dir
TASK_NAMES = SYNTHETIC_TASKS + MATH_DATASETS + PROMPT_FORMATS
# Tasks without a verifier (rewards.TASKS value REWARD_MODEL): a reward model scores them.
PREFERENCE_DATASETS = tuple(k for k in TASK_NAMES if rewards.TASKS.get(k) == rewards.REWARD_MODEL)
SPLITS = ("train", "test")
FIELDS = ("id", "prompt", "answer", "task")

# --- prompt templates ------------------------------------------------------------------------------

TEMPLATES = ("plain", "chat")
# Ends with "Answer:" so a tiny model answers directly; score with prefix=response_prefix("plain").
PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"
# The user message of the chat template; the verifiers read the last \boxed{...} of the response.
CHAT_INSTRUCTION = ("{prompt}\n\nPlease reason step by step, and put your final answer within "
                    "\\boxed{{}}.")


# Roles as the plain template writes the earlier turns of a conversation prompt.
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def prompt_text(example) -> str:
    """The "prompt" field of an example dict as str (the example itself when it is a str)."""
    if isinstance(example, str):
        return example
    if isinstance(example, Mapping) and "prompt" in example:
        prompt = example["prompt"]
        return prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
    raise TypeError(f"example must be a dict with a 'prompt' field or a str, got {type(example)}")


def encode_prompt(messages) -> str:
    """The "prompt" field of a conversation given as [{"role", "content"}, ...] messages: a lone
    user message is its plain text; anything else (earlier turns, a system message) is
    json.dumps of the message list. A plain text that would itself read back as such a list is
    stored JSON-encoded too, so prompt_messages(encode_prompt(m)) == m for every m."""
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not messages:
        raise ValueError("a prompt needs at least one message")
    if (len(messages) == 1 and messages[0]["role"] == "user"
            and _decode_messages(messages[0]["content"]) is None):
        return messages[0]["content"]
    return json.dumps(messages, ensure_ascii=False)


def _decode_messages(text: str):
    """The message list encode_prompt wrote into text, or None when text is a plain prompt."""
    if not text.startswith('[{"role": '):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and list(m) == ["role", "content"]
        and all(isinstance(v, str) for v in m.values()) for m in value)
    return value if ok else None


def prompt_messages(example) -> list:
    """The conversation of an example (a dict with "prompt", or the prompt): the decoded message
    list of an encode_prompt conversation, else [{"role": "user", "content": prompt}]."""
    text = prompt_text(example)
    messages = _decode_messages(text)
    return [{"role": "user", "content": text}] if messages is None else messages


def format_prompt(example, template: str, tokenizer=None, **chat_kwargs) -> str:
    """The prompt text the policy sees for an example (a dict with "prompt", or the bare prompt).

    "plain": PLAIN_TEMPLATE (ends with "Answer:") around the last message; a conversation's
    earlier turns come first, one "User: ..." / "Assistant: ..." / "System: ..." line each
    (PLAIN_ROLES). "chat": the conversation (prompt_messages) rendered with
    tokenizer.apply_chat_template(..., add_generation_prompt=True); the last user message of a
    task with a verifier becomes CHAT_INSTRUCTION (the question and a request for the final
    answer in \\boxed{}), a PREFERENCE_DATASETS example's messages are rendered as they are.
    chat_kwargs reach the template (e.g. enable_thinking=False for Qwen3). The tokenizer must
    carry a chat template.
    """
    messages = prompt_messages(example)
    if template == "plain":
        context = "".join(f"{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: "
                          f"{m['content']}\n" for m in messages[:-1])
        return context + PLAIN_TEMPLATE.format(prompt=messages[-1]["content"])
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template='chat' needs a tokenizer with a chat template "
                             "(trustrl.data.tokenizer.Tokenizer); got tokenizer=None")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "template='chat' but the tokenizer has no chat template (tokenizer_config.json "
                "chat_template / chat_template.jinja); use template='plain' or a tokenizer "
                "trained with a chat_template (trustrl.data.tokenizer.FALLBACK_TEMPLATES)")
        task = example.get("task") if isinstance(example, Mapping) else None
        if task not in PREFERENCE_DATASETS:
            last = messages[-1]
            messages = messages[:-1] + [
                {"role": last["role"], "content": CHAT_INSTRUCTION.format(prompt=last["content"])}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **chat_kwargs)
    raise ValueError(f"unknown prompt template {template!r}; choose one of {list(TEMPLATES)}")


def response_prefix(template: str) -> str:
    """The part of the answer format the prompt already wrote, to prepend to a response before
    scoring (trustrl.data.rewards.score(prefix=...)): "Answer:" for plain, "" for chat."""
    if template == "plain":
        return "Answer:"
    if template == "chat":
        return ""
    raise ValueError(f"unknown prompt template {template!r}; choose one of {list(TEMPLATES)}")


# --- tfds builders ---------------------------------------------------------------------------------

def _tfds():
    import tensorflow_datasets as tfds  # ~0.3 s; TensorFlow is not needed (array_record)
    return tfds


# tfds' code_path (where it looks for a checksums.tsv beside the builder's module) needs the
# importlib_resources backport for builders defined inside a package; these builders download
# nothing, so they have no code path to look in.
_NO_CODE_PATH = None


def text_features(fields=FIELDS):
    """The tfds features of examples whose fields are all text (FIELDS by default)."""
    tfds = _tfds()
    return tfds.features.FeaturesDict({k: tfds.features.Text() for k in fields})


_builders: dict = {}


def _builder_classes():
    """The builder classes, defined (and registered with tfds) on first use: returns the
    synthetic and math builders; _builders also holds the prompt-file builder ("prompts")."""
    if _builders:
        return _builders["synthetic"], _builders["math"]
    tfds = _tfds()

    class TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A builder of examples whose fields are all text (``FIELDS``), written in the order
        its ``_split_generators`` lists them; downloads nothing (no code path)."""
        FIELDS = FIELDS
        code_path = _NO_CODE_PATH

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                         features=text_features(self.FIELDS),
                                         disable_shuffling=True)

        def _generate_examples(self, examples):
            for i, ex in enumerate(examples):
                yield i, ex

    @dataclasses.dataclass(eq=False)
    class SyntheticConfig(tfds.core.BuilderConfig):
        task: str = "arithmetic"
        difficulty: int = 2
        operations: str = "+"
        num_train: int = 1
        num_test: int = 0
        seed: int = 0
        rule_seed: int = 0  # wordpref's lexicon and hidden weights

    class TrustrlSynthetic(TextBuilder):
        """Synthetic verifiable tasks from trustrl.data.tasks.generate_splits.

        Bump VERSION when trustrl.data.tasks changes what a seed generates (built data is reused).
        """
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "arithmetic and countdown (later wordpref, its own config "
                                  "names) from trustrl.data.tasks"}

        def _split_generators(self, dl_manager):
            del dl_manager
            c = self.builder_config
            splits = tasks.generate_splits(c.task, difficulty=c.difficulty, operations=c.operations,
                                           num_train=c.num_train, num_test=c.num_test, seed=c.seed,
                                           rule_seed=c.rule_seed)
            return {s: self._generate_examples(ex) for s, ex in splits.items() if ex}


    @dataclasses.dataclass(eq=False)
    class MathConfig(tfds.core.BuilderConfig):
        dataset: str = "gsm8k"

    class TrustrlMath(TextBuilder):
        """Math word-problem sets from local files (GSM8K, MATH, DAPO-Math-17k, AIME)."""
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "gsm8k, math, dapo_math, aime from manual_dir"}
        MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(f"{k}: {v}" for k, v in MATH_LAYOUTS.items())

        def _split_generators(self, dl_manager):
            dataset = self.builder_config.dataset
            rows = read_math_files(dataset, pathlib.Path(str(dl_manager.manual_dir)))
            return {s: self._generate_examples(ex) for s, ex in rows.items()}


    @dataclasses.dataclass(eq=False)
    class PromptConfig(tfds.core.BuilderConfig):
        fmt: str = "ultrafeedback"

    class TrustrlPrompts(TextBuilder):
        """RLHF prompt sets from local files (UltraFeedback, HH-RLHF): prompts without answers."""
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "ultrafeedback and hh_rlhf prompts from manual_dir"}
        MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(f"{k}: {v}" for k, v in PROMPT_LAYOUTS.items())

        def _split_generators(self, dl_manager):
            rows = read_prompt_files(self.builder_config.fmt,
                                     pathlib.Path(str(dl_manager.manual_dir)))
            return {s: self._generate_examples(ex) for s, ex in rows.items()}


    for cls in (SyntheticConfig, TrustrlSynthetic, MathConfig, TrustrlMath, PromptConfig,
                TrustrlPrompts):
        cls.__qualname__ = cls.__name__  # readable in tfds' log lines
    _builders.update(synthetic=TrustrlSynthetic, math=TrustrlMath,
                     synthetic_config=SyntheticConfig, math_config=MathConfig,
                     prompts=TrustrlPrompts, prompts_config=PromptConfig, text=TextBuilder)
    return TrustrlSynthetic, TrustrlMath


def text_builder():
    """The base class of trustrl's tfds builders (not registered): examples whose fields are
    all text (its ``FIELDS``; override in a subclass), written in order, no downloads; a
    subclass defines VERSION and ``_split_generators``."""
    _builder_classes()
    return _builders["text"]


_OP_NAMES = {"+": "plus", "-": "minus", "*": "times"}


def synthetic_config_name(task: str, difficulty: int, operations: str, num_train: int,
                          num_test: int, seed: int, rule_seed: int = 0) -> str:
    """Builder config name, e.g. "arithmetic-d2-ops_plus-n20000-t256-s0" (operations only matter
    for arithmetic and are left out otherwise; wordpref adds its rule seed: "wordpref-d24-r0-...").
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {list(SYNTHETIC_TASKS)}")
    ops = ""
    if task == "arithmetic":
        bad = sorted(set(operations) - set(_OP_NAMES))
        if not operations or bad:
            raise ValueError(f"arithmetic operations={operations!r} must be a non-empty string of "
                             f"{list(_OP_NAMES)}; invalid: {bad}")
        ops = "-ops_" + "_".join(_OP_NAMES[o] for o in operations)
    if task == "wordpref":
        ops = f"-r{int(rule_seed)}"
    return f"{task}-d{int(difficulty)}{ops}-n{int(num_train)}-t{int(num_test)}-s{int(seed)}"


def synthetic_builder(task: str, *, difficulty: int, operations: str = "+", num_train: int,
                      num_test: int, seed: int = 0, data_dir: str, rule_seed: int = 0):
    """The tfds builder of a synthetic task (not yet prepared; see build())."""
    name = synthetic_config_name(task, difficulty, operations, num_train, num_test, seed,
                                 rule_seed)
    cls, _ = _builder_classes()
    config = _builders["synthetic_config"](
        name=name, description=f"trustrl.data.tasks.generate_splits({task!r}, ...)", task=task,
        difficulty=int(difficulty), operations=operations if task == "arithmetic" else "+",
        num_train=int(num_train), num_test=int(num_test), seed=int(seed),
        rule_seed=int(rule_seed) if task == "wordpref" else 0)
    return cls(config=config, data_dir=data_dir, file_format="array_record")


def files_fingerprint(files: Mapping, manual_dir) -> str:
    """12 hex digits of a sha1 over the relative names and sizes of {split: [file, ...]}."""
    digest = hashlib.sha1()
    root = pathlib.Path(manual_dir).expanduser()
    for path in sorted(p for paths in files.values() for p in paths):
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:12]


def math_builder(dataset: str, *, manual_dir: str, data_dir: str):
    """The tfds builder of a math set read from manual_dir (not yet prepared; see build()).

    The config name is "<dataset>-<fingerprint>", the fingerprint hashing the relative names and
    sizes of the source files, so new or changed downloads build afresh. manual_dir must exist
    even when the dataset is already built (the fingerprint is how the build is found).
    """
    files = find_math_files(dataset, manual_dir)
    _, cls = _builder_classes()
    config = _builders["math_config"](name=f"{dataset}-{files_fingerprint(files, manual_dir)}",
                                      description=f"{dataset} from {manual_dir}", dataset=dataset)
    return cls(config=config, data_dir=data_dir, file_format="array_record")


def prompt_builder(fmt: str, *, manual_dir: str, data_dir: str):
    """The tfds builder of an RLHF prompt set (PROMPT_FORMATS) read from manual_dir (not yet
    prepared; see build()); config name "<fmt>-<fingerprint>" as math_builder's."""
    files = find_preference_files(fmt, manual_dir)
    _builder_classes()
    config = _builders["prompts_config"](name=f"{fmt}-{files_fingerprint(files, manual_dir)}",
                                         description=f"{fmt} prompts from {manual_dir}", fmt=fmt)
    return _builders["prompts"](config=config, data_dir=data_dir, file_format="array_record")


def build(builder, manual_dir: str | None = None):
    """download_and_prepare (a no-op when already built) and return {split: data source}.

    The built dataset directory gets an integrity record (trustrl.infra.integrity.record_tree: size
    and
    sha256 of every file) right after the build, checked before each later read. A built
    directory that fails it (a truncated or changed shard, a missing file) or has none (built by
    an older trustrl, or a kill before the record) is reported naming the file, kept aside
    (renamed ``<version>.damaged-<time>``, never deleted) and built again from the config, then
    checked again."""
    root = builder.data_dir
    if os.path.isdir(root):  # built before (or a damaged build: dataset_info.json lost)
        try:
            integrity.verify_tree(root, "tfds dataset")
        except integrity.IntegrityError as e:
            aside = integrity.keep_aside(root)
            print(f"data: {e}; kept it as {aside} and building the dataset again", flush=True)
            # a new builder: this one read the damaged directory's dataset_info.json
            builder = type(builder)(config=builder.builder_config,
                                    data_dir=builder._original_state["data_dir"],
                                    file_format="array_record")
        else:
            return builder.as_data_source()
    tfds = _tfds()
    download_config = tfds.download.DownloadConfig(
        manual_dir=manual_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP)
    builder.download_and_prepare(download_config=download_config)
    integrity.record_tree(root)
    integrity.verify_tree(root, "tfds dataset")  # what is read is what was just recorded
    return builder.as_data_source()


# --- math files ------------------------------------------------------------------------------------

MATH_LAYOUTS = {
    "gsm8k": ("GSM8K (github.com/openai/grade-school-math or huggingface openai/gsm8k): "
              "train.jsonl / test.jsonl, or train[-*].parquet / test[-*].parquet, in manual_dir or "
              "manual_dir/main or manual_dir/data; fields 'question' and 'answer' (the final "
              "answer follows '#### ')."),
    "math": ("MATH (Hendrycks): train/<subject>/<n>.json and test/<subject>/<n>.json (the MATH.tar "
             "layout; manual_dir may also hold them under MATH/), or train.jsonl / test.jsonl / "
             "train[-*].parquet / test[-*].parquet in manual_dir or manual_dir/data; fields "
             "'problem' and 'solution' (answer = the last \\boxed{...}) or 'answer' when present "
             "(MATH-500)."),
    "dapo_math": ("DAPO-Math-17k (huggingface BytedTsinghua-SIA/DAPO-Math-17k): "
                  "dapo-math-17k.parquet (any *.parquet or *.jsonl) in manual_dir or "
                  "manual_dir/data; 'prompt' is a list of chat messages (the user message is "
                  "used, without DAPO's 'Solve the following math problem...' instruction "
                  "wrapper) or a string, the answer is reward_model['ground_truth'] (or a "
                  "'solution' / 'answer' column); duplicate problems are dropped. Train only."),
    "aime": ("AIME 2024 / 2025 (e.g. huggingface HuggingFaceH4/aime_2024, math-ai/aime25, "
             "opencompass/AIME2025): every *.jsonl / *.parquet file in manual_dir or "
             "manual_dir/data, fields 'problem' or 'question' and 'answer' (any "
             "capitalisation). Test only, whatever the files' split names."),
}


def _glob(directory: pathlib.Path, patterns) -> list:
    if not directory.is_dir():
        return []
    found = {p for pattern in patterns for p in directory.glob(pattern)}
    return sorted(p for p in found if p.is_file())


def _split_patterns(split):
    return (f"{split}.jsonl", f"{split}.parquet", f"{split}-*.parquet")


def _missing(dataset, manual_dir, why):
    return FileNotFoundError(f"{dataset}: {why}. Expected layout: {MATH_LAYOUTS[dataset]}")


def find_math_files(dataset: str, manual_dir) -> dict:
    """{split: [file, ...]} of a math set's source files in manual_dir (MATH_LAYOUTS); raises
    FileNotFoundError naming the expected files when there are none."""
    if dataset not in MATH_DATASETS:
        raise ValueError(f"unknown math dataset {dataset!r}; choose one of {list(MATH_DATASETS)}")
    if not manual_dir:
        raise _missing(dataset, manual_dir, "task.manual_dir is empty; download the dataset and "
                                            "point task.manual_dir at it")
    root = pathlib.Path(manual_dir).expanduser()
    if not root.is_dir():
        raise _missing(dataset, manual_dir, f"manual_dir {str(root)!r} is not a directory")
    if dataset == "math":
        for base in (root, root / "MATH"):
            json_dirs = {s: sorted(base.glob(f"{s}/*/*.json")) for s in SPLITS}
            if any(json_dirs.values()):
                return {s: v for s, v in json_dirs.items() if v}
    if dataset in ("gsm8k", "math"):
        subdirs = ("main", "data") if dataset == "gsm8k" else ("data",)
        for base in (root, *(root / d for d in subdirs)):
            files = {s: _glob(base, _split_patterns(s)) for s in SPLITS}
            if any(files.values()):
                return {s: v for s, v in files.items() if v}
    else:
        split = "train" if dataset == "dapo_math" else "test"
        for base in (root, root / "data"):
            files = _glob(base, ("*.jsonl", "*.parquet"))
            if files:
                return {split: files}
    present = sorted(p.name for p in root.iterdir())[:20]
    raise _missing(dataset, manual_dir, f"no source files found in {str(root)!r} "
                                        f"(it holds: {present})")


def _read_parquet(path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        return pq.read_table(path).to_pylist()
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (a tensorflow-datasets dependency) or "
                          f"pandas; pip install pyarrow") from None
    return pd.read_parquet(path).to_dict("records")


def read_rows(path: pathlib.Path) -> list:
    """The rows of a .parquet, .json (one row), .jsonl or .jsonl.gz file."""
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix == ".json":
        return [json.loads(path.read_text(encoding="utf-8"))]
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
    return rows


def row_field(row: Mapping, *names, where=""):
    """The first of names present in row (case-insensitive), as str."""
    lower = {str(k).lower(): v for k, v in row.items()}
    for name in names:
        value = lower.get(name.lower())
        if value is not None:
            return value
    raise ValueError(f"{where}: none of the fields {list(names)} (has {sorted(row)})")


def cell_text(value) -> str:
    """A file cell as stripped str (bytes decoded; 7.0 -> "7")."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")


def gsm8k_answer(solution: str) -> str | None:
    """The final answer after the last '#### ' of a GSM8K solution, thousands separators removed
    ("#### 1,234" -> "1234"); None when there is no marker."""
    if "####" not in solution:
        return None
    answer = solution[solution.rindex("####") + 4:].strip().split("\n", 1)[0].strip()
    return answer.replace(",", "") if _THOUSANDS.fullmatch(answer) else answer


_BOXED_BARE = re.compile(r"\\boxed ([^$\s]+)")  # `\boxed 8$`: up to a space or "$"


def last_boxed(text: str) -> str | None:
    """Content of the last balanced \\boxed{...} / \\fbox{...} (or `\\boxed 5`) in text, or None."""
    spans = list(rewards.boxed_spans(text))  # in order of position
    best = spans[-1] if spans else None
    for m in _BOXED_BARE.finditer(text):
        if best is None or m.start() > best[0]:
            best = (m.start(), m.group(1).rstrip("."))
    return None if best is None else best[1].strip()


_DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response "
              "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
              "to the problem.")
_DAPO_TAIL = 'Remember to put your answer on its own line after "Answer:".'


def _dapo_prompt(value) -> str:
    if isinstance(value, (str, bytes)):
        text = cell_text(value)
    else:  # a list (pyarrow) / numpy array (pandas) of {"role", "content"} messages
        messages = list(value)
        users = [m for m in messages if m.get("role") == "user"] or messages
        if not users:
            raise ValueError("empty prompt message list")
        text = cell_text(users[-1]["content"])
    if text.startswith(_DAPO_HEAD):
        text = text[len(_DAPO_HEAD):]
    if text.rstrip().endswith(_DAPO_TAIL):
        text = text.rstrip()[:-len(_DAPO_TAIL)]
    return text.strip()


def _math_example(dataset, row, where):
    """(prompt, answer) of one source row; answer None when the row has no usable answer."""
    if dataset == "gsm8k":
        prompt = cell_text(row_field(row, "question", where=where))
        return prompt, gsm8k_answer(cell_text(row_field(row, "answer", where=where)))
    if dataset == "math":
        prompt = cell_text(row_field(row, "problem", where=where))
        answer = row.get("answer")
        if answer is None or not cell_text(answer):
            answer = last_boxed(cell_text(row_field(row, "solution", where=where)))
        return prompt, None if answer is None else cell_text(answer)
    if dataset == "dapo_math":
        prompt = _dapo_prompt(row_field(row, "prompt", where=where))
        reward_model = row.get("reward_model")
        if isinstance(reward_model, Mapping) and reward_model.get("ground_truth") is not None:
            answer = reward_model["ground_truth"]
        else:
            answer = row_field(row, "solution", "answer", where=where)
        return prompt, cell_text(answer)
    prompt = cell_text(row_field(row, "problem", "question", where=where))
    return prompt, cell_text(row_field(row, "answer", where=where))


def read_math_files(dataset: str, manual_dir) -> dict:
    """{split: [example dict, ...]} parsed from a math set's files (see MATH_LAYOUTS).

    Rows without an extractable answer (a MATH solution with no \\boxed{}) are skipped with a
    warning; a GSM8K row without '#### ' means the file is not GSM8K and raises.
    """
    out = {}
    for split, paths in find_math_files(dataset, manual_dir).items():
        examples, seen, skipped = [], set(), 0
        for path in paths:
            for n, row in enumerate(read_rows(path)):
                where = f"{dataset} {path}" + ("" if path.suffix == ".json" else f" row {n}")
                prompt, answer = _math_example(dataset, row, where)
                if answer is None or not answer:
                    if dataset == "gsm8k":
                        raise ValueError(f"{where}: the answer has no '#### <final answer>'")
                    skipped += 1
                    continue
                if dataset == "dapo_math":  # the published parquet repeats each problem
                    if prompt in seen:
                        continue
                    seen.add(prompt)
                examples.append((prompt, answer))
        if skipped:
            log.warning("%s %s: skipped %d rows without an answer", dataset, split, skipped)
        if not examples:
            raise ValueError(f"{dataset} {split}: no examples in {[str(p) for p in paths]}")
        width = len(str(len(examples) - 1))
        out[split] = [{"id": f"{dataset}-{split}-{i:0{width}d}", "prompt": p, "answer": a,
                       "task": dataset} for i, (p, a) in enumerate(examples)]
    return out


# --- RLHF prompt files -----------------------------------------------------------------------------

_SPLIT_STEMS = ("{split}_prefs", "{split}", "{split}_gen", "{split}_sft")
_STEM_PATTERNS = ("{stem}.jsonl", "{stem}.jsonl.gz", "{stem}-*.jsonl", "{stem}-*.jsonl.gz",
                  "{stem}.parquet", "{stem}-*.parquet")
_ANY_PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.parquet")
_FILES = ("Files: in manual_dir or any folder directly under it (HH-RLHF's harmless-base/, "
          "helpful-base/, ...; the HF layout's data/), split by name: for split S the first of "
          "S_prefs, S, S_gen, S_sft that has files, each as S.jsonl, S.jsonl.gz, S-*.jsonl(.gz), "
          "S.parquet or S-*.parquet (S = train / test); with no such file, every *.jsonl, "
          "*.jsonl.gz and *.parquet there is train. ")
PROMPT_LAYOUTS = {
    "ultrafeedback": (
        "UltraFeedback (huggingface openbmb/UltraFeedback, or HuggingFaceH4/ultrafeedback_"
        "binarized: data/train_prefs-*.parquet, test_prefs-*.parquet, train_gen-*, ...). " + _FILES
        + "The prompt is the field 'prompt' (a string, or a list of {role, content} messages: "
        "the conversation up to its last user message) or 'instruction' (the original "
        "UltraFeedback)."),
    "hh_rlhf": (
        "Anthropic HH-RLHF (github.com/anthropics/hh-rlhf, huggingface Anthropic/hh-rlhf: "
        "<subset>/train.jsonl.gz, <subset>/test.jsonl.gz). " + _FILES + "Each row's 'chosen' "
        "(else 'rejected') transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'; the prompt is "
        "the conversation before its last '\\n\\nAssistant:' (earlier turns kept)."),
}


def find_preference_files(fmt: str, manual_dir) -> dict:
    """{split: [file, ...]} of an RLHF prompt / preference-pair set in manual_dir (the layout of
    PROMPT_LAYOUTS); raises FileNotFoundError naming the expected files when there are none."""
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown preference file format {fmt!r}; choose one of "
                         f"{list(PROMPT_FORMATS)}")
    def missing(why):
        return FileNotFoundError(f"{fmt}: {why}. Expected layout: {PROMPT_LAYOUTS[fmt]}")
    if not manual_dir:
        raise missing("manual_dir is empty; download the dataset and point manual_dir at it")
    root = pathlib.Path(manual_dir).expanduser()
    if not root.is_dir():
        raise missing(f"manual_dir {str(root)!r} is not a directory")
    bases = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    out = {}
    for split in SPLITS:
        for stem in (s.format(split=split) for s in _SPLIT_STEMS):
            files = sorted({f for b in bases
                            for f in _glob(b, [p.format(stem=stem) for p in _STEM_PATTERNS])})
            if files:
                out[split] = files
                break
    if not out:
        files = sorted({f for b in bases for f in _glob(b, _ANY_PATTERNS)})
        if files:
            out["train"] = files
    if not out:
        present = sorted(p.name for p in root.iterdir())[:20]
        raise missing(f"no source files found in {str(root)!r} (it holds: {present})")
    return out


def message_list(value, where: str) -> list:
    """{role, content} dicts of a message list (pyarrow: list of dicts; pandas: numpy array)."""
    try:
        return [{"role": cell_text(m["role"]), "content": cell_text(m["content"])} for m in value]
    except (TypeError, KeyError, IndexError):
        raise ValueError(f"{where}: expected a string or a list of {{'role', 'content'}} "
                         f"messages, got {str(value)[:200]!r}") from None


def prompt_from_value(value, where: str) -> list:
    """The prompt messages of an UltraFeedback-style 'prompt' value: a string (one user message)
    or a message list cut after its last user message."""
    if isinstance(value, (str, bytes)):
        return [{"role": "user", "content": cell_text(value)}]
    messages = message_list(value, where)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError(f"{where}: the prompt message list has no user message")
    return messages[:users[-1] + 1]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_turns(transcript: str) -> list:
    """The {role, content} messages of an HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant:
    ..." ("Human" -> user, "Assistant" -> assistant, contents stripped); raises ValueError for
    text before the first turn marker (the leading blank line may be missing)."""
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip(" ")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"not an HH-RLHF transcript (it must start with 'Human:'): "
                         f"{transcript[:80]!r}")
    return [{"role": _HH_ROLES[role], "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def split_hh(transcript: str) -> tuple:
    """(prompt messages, response) of an HH-RLHF transcript: the turns before its last
    "\\n\\nAssistant:" and that turn's text (which may be empty)."""
    turns = hh_turns(transcript)
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"HH-RLHF transcript has no final 'Assistant:' turn: "
                         f"...{transcript[-80:]!r}")
    if len(turns) < 2:
        raise ValueError(f"HH-RLHF transcript has no turn before its 'Assistant:' turn: "
                         f"{transcript[:80]!r}")
    return turns[:-1], turns[-1]["content"]


def _row_prompt(fmt: str, row: Mapping, where: str) -> list:
    if fmt == "ultrafeedback":
        return prompt_from_value(row_field(row, "prompt", "instruction", where=where), where)
    transcript = cell_text(row_field(row, "chosen", "rejected", where=where))
    try:
        return split_hh(transcript)[0]
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_prompt_files(fmt: str, manual_dir) -> dict:
    """{split: [example dict, ...]} of an RLHF prompt set's files (PROMPT_LAYOUTS), "answer" "".

    Identical prompts (equal encode_prompt text) are kept once per split, first occurrence in
    file order; train also drops the prompts its test split holds (eval stays held out). Empty
    prompts are skipped. Both counts are logged.
    """
    files = find_preference_files(fmt, manual_dir)
    prompts = {}
    for split in ("test", "train"):  # test first: train drops its prompts
        seen = set(prompts.get("test", ()))
        kept, dropped, empty = [], 0, 0
        for path in files.get(split, ()):
            for n, row in enumerate(read_rows(path)):
                messages = _row_prompt(fmt, row, f"{fmt} {path} row {n}")
                if not messages[-1]["content"]:
                    empty += 1
                    continue
                prompt = encode_prompt(messages)
                if prompt in seen:
                    dropped += 1
                    continue
                seen.add(prompt)
                kept.append(prompt)
        if split in files:
            if dropped or empty:
                log.warning("%s %s: dropped %d duplicate prompts%s, %d empty ones", fmt, split,
                            dropped, " (or prompts of the test split)" if split == "train" else "",
                            empty)
            if not kept:
                raise ValueError(f"{fmt} {split}: no prompts in {[str(p) for p in files[split]]}")
            prompts[split] = kept
    out = {}
    for split, kept in prompts.items():
        width = len(str(len(kept) - 1))
        out[split] = [{"id": f"{fmt}-{split}-{i:0{width}d}", "prompt": p, "answer": "",
                       "task": fmt} for i, p in enumerate(kept)]
    return out


# --- loading ---------------------------------------------------------------------------------------

def _decode(example, where: str = "", key=None, fields=FIELDS) -> dict:
    """The example with str values; raises IntegrityError naming ``where`` (the split's files)
    when a field reads as None: tfds decodes the records of a truncated or changed array_record
    shard that way, and training on them must not pass silently."""
    if not isinstance(example, Mapping) or any(example.get(k) is None for k in fields):
        missing = (sorted(k for k in fields if example.get(k) is None)
                   if isinstance(example, Mapping) else "all")
        raise integrity.IntegrityError(
            f"{where or 'dataset'}: example {key} reads as None (fields {missing}): its shard is "
            f"damaged (truncated or changed); move the dataset directory away so it is built "
            f"again")
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in example.items()}


class Examples(collections.abc.Sequence):
    """Random-access examples (python str values) over a tfds data source, optionally a subset
    given by indices. ``where`` names the files read (in the error for an unreadable example);
    ``fields`` are the ones every example must have (preference pairs have their own)."""

    def __init__(self, source, indices=None, name: str = "", where: str = "", fields=FIELDS):
        self._source = source
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.name = name
        self.where = where or name
        self.fields = tuple(fields)

    def __len__(self):
        return len(self._source) if self._indices is None else len(self._indices)

    def _resolve(self, i) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} examples")
        i %= n
        return i if self._indices is None else int(self._indices[i])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        key = self._resolve(i)
        return _decode(self._source[key], self.where, key, self.fields)

    def __getitems__(self, indices) -> list:
        keys = [self._resolve(i) for i in indices]
        getitems = getattr(self._source, "__getitems__", None)
        records = getitems(keys) if getitems is not None else [self._source[k] for k in keys]
        return [_decode(r, self.where, k, self.fields) for r, k in zip(records, keys)]

    def __repr__(self):
        return f"Examples({self.name!r}, {len(self)} examples)"


def config_value(task_cfg, key, default=None):
    """task_cfg[key] (a ConfigDict, a dict or an object's attribute), default when absent."""
    if isinstance(task_cfg, Mapping):
        return task_cfg.get(key, default)
    try:
        return task_cfg.get(key, default)  # ml_collections.ConfigDict
    except AttributeError:
        return getattr(task_cfg, key, default)


def load_examples(task_cfg, split: str, data_dir: str, *, seed: int = 0) -> Sequence[dict]:
    """The examples of one split of task_cfg.name, built under data_dir on first use.

    task_cfg: name, and for synthetic tasks difficulty, operations, num_train, num_test (wordpref:
    difficulty = the lexicon size, default tasks.WORDPREF_SIZE, and rule_seed, default 0); for
    math sets and RLHF prompt files (PROMPT_FORMATS) manual_dir (and num_test, the held-out size
    when the files hold no test split). seed picks the synthetic problems and the held-out test
    problems. Returns a random-access sequence of {"id", "prompt", "answer", "task"} dicts of
    python str. See the module docstring for splits.
    """
    name = config_value(task_cfg, "name")
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASK_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if not data_dir:
        raise ValueError("data_dir is empty: give the directory the tfds dataset is built in")
    data_dir = os.fspath(pathlib.Path(data_dir).expanduser())
    num_test = int(config_value(task_cfg, "num_test", 0) or 0)
    from trustrl.infra import multihost
    # several processes sharing data_dir: process 0 builds, the others then find it built (a
    # builder made before the build would not see it, so they make theirs afterwards)
    if name in SYNTHETIC_TASKS:
        difficulty = config_value(task_cfg, "difficulty")
        if name == "wordpref" and difficulty is None:
            difficulty = tasks.WORDPREF_SIZE
        with multihost.primary_first(f"tfds:{name}:{split}"):
            builder = synthetic_builder(
                name, difficulty=difficulty, operations=config_value(task_cfg, "operations", "+"),
                num_train=config_value(task_cfg, "num_train"), num_test=num_test, seed=seed,
                data_dir=data_dir, rule_seed=int(config_value(task_cfg, "rule_seed", 0) or 0))
            sources = build(builder)
        if split not in sources:
            raise ValueError(f"{name} has no {split!r} split: task.num_{split}=0")
        return _checked(Examples(sources[split], name=f"{builder.builder_config.name}/{split}",
                                 where=_shards(builder, split)))
    manual_dir = config_value(task_cfg, "manual_dir", "")
    make = prompt_builder if name in PROMPT_FORMATS else math_builder
    with multihost.primary_first(f"tfds:{name}:{split}"):
        builder = make(name, manual_dir=manual_dir, data_dir=data_dir)
        sources = build(builder, manual_dir=os.fspath(pathlib.Path(manual_dir).expanduser()))
    return file_split(name, builder, sources, split, num_test=num_test, seed=seed,
                      manual_dir=manual_dir, what="problems")


def file_split(name: str, builder, sources: Mapping, split: str, *, num_test: int, seed: int,
               manual_dir="", what: str = "examples", key: str = "task.num_test",
               fields=FIELDS) -> Examples:
    """One split of the dataset ``name`` built from the files in manual_dir ({split: data
    source} from build()): the files' own split, or, when they hold no test split, num_test
    examples held out of train (held_out_indices(seed)) as "test" and the rest as "train".
    ``what`` and ``key`` (the config key of num_test) word the errors."""
    label = f"{builder.builder_config.name}/{split}"
    if "train" not in sources and split == "train":
        raise ValueError(f"{name}: the files in {manual_dir!r} hold only a test split (an "
                         f"evaluation set); train on another dataset")
    if "test" in sources or (split == "train" and num_test < 1):
        return _checked(Examples(sources[split], name=label, where=_shards(builder, split),
                                 fields=fields))
    # No test split in the files: hold num_test examples out of train, reproducibly (seed).
    train = sources["train"]
    if num_test < 1:
        raise ValueError(f"{name} has no test split in its files; set {key} > 0 to hold "
                         f"that many {what} out of train")
    if num_test >= len(train):
        raise ValueError(f"{name}: {key}={num_test} leaves no training {what} (train has "
                         f"{len(train)})")
    held = held_out_indices(len(train), num_test, seed)
    where = _shards(builder, "train")
    if split == "test":
        return _checked(Examples(train, held, name=f"{label} (held out of train)", where=where,
                                 fields=fields))
    return _checked(Examples(train, np.setdiff1d(np.arange(len(train)), held), name=label,
                             where=where, fields=fields))


def split_examples(builder, sources: Mapping, split: str, fields=FIELDS) -> Examples:
    """The checked Examples of a split of a built dataset ({split: data source} from build())."""
    return _checked(Examples(sources[split], name=f"{builder.builder_config.name}/{split}",
                             where=_shards(builder, split), fields=fields))


def _shards(builder, split: str) -> str:
    """The array_record files of a split (named in the error for an unreadable example)."""
    return os.path.join(builder.data_dir, f"{builder.name}-{split}.array_record-*")


def _checked(examples: Examples) -> Examples:
    """Reads the first and last example, so a damaged shard fails at load time, before any
    training (every later read is checked too: Examples raises for an example read as None)."""
    if len(examples):
        examples.__getitems__([0, len(examples) - 1])
    return examples


def held_out_indices(num_examples: int, num_test: int, seed: int = 0) -> np.ndarray:
    """The train indices load_examples holds out as the test split of a train-only dataset."""
    return np.sort(np.random.default_rng([seed, 1]).permutation(num_examples)[:num_test])


# --- prompt iteration ------------------------------------------------------------------------------

class PromptIterator:
    """Deterministic, checkpointable batches of examples from a random-access source.

    Epoch e visits the source in the order np.random.default_rng([seed, e]).permutation(len);
    next() returns a list of batch_size examples and crosses epoch boundaries seamlessly (a batch
    may end one epoch and start the next). batch_size > len(source) is allowed: the batch then
    spans several epochs and repeats examples. state() is a JSON-serialisable dict; restore(state)
    continues the exact same sequence (it checks the seed, batch size and source size match).
    """

    def __init__(self, source, batch_size: int, seed: int):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if len(source) == 0:
            raise ValueError("PromptIterator needs a non-empty source")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._epoch = 0
        self._position = 0
        self._perm = (None, None)  # (epoch, permutation) cache

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.source)))
        return self._perm[1]

    def __iter__(self):
        return self

    def __next__(self) -> list:
        n, keys = len(self.source), []
        while len(keys) < self.batch_size:
            take = min(self.batch_size - len(keys), n - self._position)
            perm = self._permutation(self._epoch)
            keys.extend(int(k) for k in perm[self._position:self._position + take])
            self._position += take
            if self._position == n:
                self._epoch, self._position = self._epoch + 1, 0
        getitems = getattr(self.source, "__getitems__", None)
        return list(getitems(keys)) if getitems is not None else [self.source[k] for k in keys]

    @property
    def epoch(self) -> int:
        return self._epoch

    def state(self) -> dict:
        """{"seed", "epoch", "position", "batch_size", "num_examples"} (ints, JSON-serialisable)."""
        return {"seed": self.seed, "epoch": self._epoch, "position": self._position,
                "batch_size": self.batch_size, "num_examples": len(self.source)}

    def restore(self, state: Mapping) -> None:
        """Continues from a state() of an iterator over the same source, batch size and seed."""
        missing = [k for k in ("seed", "epoch", "position") if k not in state]
        if missing:
            raise ValueError(f"iterator state {dict(state)} lacks {missing}")
        checks = {"seed": self.seed, "batch_size": self.batch_size,
                  "num_examples": len(self.source)}
        for key, mine in checks.items():
            if key in state and int(state[key]) != mine:
                raise ValueError(f"cannot restore iterator state: it has {key}={int(state[key])} "
                                 f"but this iterator has {key}={mine}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.source):
            raise ValueError(f"iterator state epoch={epoch} position={position} is out of range "
                             f"for {len(self.source)} examples")
        self._epoch, self._position = epoch, position
