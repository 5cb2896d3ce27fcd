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
and data_dir/trustrl_math/<dataset>-<fingerprint of the source files' names and sizes>/.

Every example is {"id", "prompt", "answer", "task"} of python str; "prompt" is the bare question
(format_prompt adds the template), "task" is the dataset name (a trustrl.data.rewards.TASKS key).

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
TASK_NAMES = SYNTHETIC_TASKS + MATH_DATASETS
SPLITS = ("train", "test")
FIELDS = ("id", "prompt", "answer", "task")

# --- prompt templates ------------------------------------------------------------------------------

TEMPLATES = ("plain", "chat")
# Ends with "Answer:" so a tiny model answers directly; score with prefix=response_prefix("plain").
PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"
# The user message of the chat template; the verifiers read the last \boxed{...} of the response.
CHAT_INSTRUCTION = ("{prompt}\n\nPlease reason step by step, and put your final answer within "
                    "\\boxed{{}}.")


def _prompt_text(example) -> str:
    if isinstance(example, str):
        return example
    if isinstance(example, Mapping) and "prompt" in example:
        prompt = example["prompt"]
        return prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
    raise TypeError(f"example must be a dict with a 'prompt' field or a str, got {type(example)}")


def format_prompt(example, template: str, tokenizer=None, **chat_kwargs) -> str:
    """The prompt text the policy sees for an example (a dict with "prompt", or the bare prompt).

    "plain": PLAIN_TEMPLATE (ends with "Answer:"). "chat": one user message (CHAT_INSTRUCTION:
    the question and a request for the final answer in \\boxed{}) rendered with
    tokenizer.apply_chat_template(..., add_generation_prompt=True); chat_kwargs reach the template
    (e.g. enable_thinking=False for Qwen3). The tokenizer must carry a chat template.
    """
    prompt = _prompt_text(example)
    if template == "plain":
        return PLAIN_TEMPLATE.format(prompt=prompt)
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template='chat' needs a tokenizer with a chat template "
                             "(trustrl.data.tokenizer.Tokenizer); got tokenizer=None")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "template='chat' but the tokenizer has no chat template (tokenizer_config.json "
                "chat_template / chat_template.jinja); use template='plain' or a tokenizer "
                "trained with a chat_template (trustrl.data.tokenizer.FALLBACK_TEMPLATES)")
        messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=prompt)}]
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


def _features(tfds):
    return tfds.features.FeaturesDict({k: tfds.features.Text() for k in FIELDS})


_builders: dict = {}


def _builder_classes():
    """The two builder classes, defined (and registered with tfds) on first use."""
    if _builders:
        return _builders["synthetic"], _builders["math"]
    tfds = _tfds()

    @dataclasses.dataclass(eq=False)
    class SyntheticConfig(tfds.core.BuilderConfig):
        task: str = "arithmetic"
        difficulty: int = 2
        operations: str = "+"
        num_train: int = 1
        num_test: int = 0
        seed: int = 0

    class TrustrlSynthetic(tfds.core.GeneratorBasedBuilder):
        """Synthetic verifiable tasks from trustrl.data.tasks.generate_splits.

        Bump VERSION when trustrl.data.tasks changes what a seed generates (built data is reused).
        """
        VERSION = tfds.core.Version("1.0.0")
        code_path = _NO_CODE_PATH
        RELEASE_NOTES = {"1.0.0": "arithmetic and countdown from trustrl.data.tasks"}

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                         features=_features(tfds), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            del dl_manager
            c = self.builder_config
            splits = tasks.generate_splits(c.task, difficulty=c.difficulty, operations=c.operations,
                                           num_train=c.num_train, num_test=c.num_test, seed=c.seed)
            return {s: self._generate_examples(ex) for s, ex in splits.items() if ex}

        def _generate_examples(self, examples):
            for i, ex in enumerate(examples):
                yield i, ex

    @dataclasses.dataclass(eq=False)
    class MathConfig(tfds.core.BuilderConfig):
        dataset: str = "gsm8k"

    class TrustrlMath(tfds.core.GeneratorBasedBuilder):
        """Math word-problem sets from local files (GSM8K, MATH, DAPO-Math-17k, AIME)."""
        VERSION = tfds.core.Version("1.0.0")
        code_path = _NO_CODE_PATH
        RELEASE_NOTES = {"1.0.0": "gsm8k, math, dapo_math, aime from manual_dir"}
        MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(f"{k}: {v}" for k, v in MATH_LAYOUTS.items())

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                         features=_features(tfds), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            dataset = self.builder_config.dataset
            rows = read_math_files(dataset, pathlib.Path(str(dl_manager.manual_dir)))
            return {s: self._generate_examples(ex) for s, ex in rows.items()}

        def _generate_examples(self, examples):
            for i, ex in enumerate(examples):
                yield i, ex

    for cls in (SyntheticConfig, TrustrlSynthetic, MathConfig, TrustrlMath):
        cls.__qualname__ = cls.__name__  # readable in tfds' log lines
    _builders.update(synthetic=TrustrlSynthetic, math=TrustrlMath,
                     synthetic_config=SyntheticConfig, math_config=MathConfig)
    return TrustrlSynthetic, TrustrlMath


_OP_NAMES = {"+": "plus", "-": "minus", "*": "times"}


def synthetic_config_name(task: str, difficulty: int, operations: str, num_train: int,
                          num_test: int, seed: int) -> str:
    """Builder config name, e.g. "arithmetic-d2-ops_plus-n20000-t256-s0" (operations only matter
    for arithmetic and are left out for countdown)."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {list(SYNTHETIC_TASKS)}")
    ops = ""
    if task == "arithmetic":
        bad = sorted(set(operations) - set(_OP_NAMES))
        if not operations or bad:
            raise ValueError(f"arithmetic operations={operations!r} must be a non-empty string of "
                             f"{list(_OP_NAMES)}; invalid: {bad}")
        ops = "-ops_" + "_".join(_OP_NAMES[o] for o in operations)
    return f"{task}-d{int(difficulty)}{ops}-n{int(num_train)}-t{int(num_test)}-s{int(seed)}"


def synthetic_builder(task: str, *, difficulty: int, operations: str = "+", num_train: int,
                      num_test: int, seed: int = 0, data_dir: str):
    """The tfds builder of a synthetic task (not yet prepared; see build())."""
    name = synthetic_config_name(task, difficulty, operations, num_train, num_test, seed)
    cls, _ = _builder_classes()
    config = _builders["synthetic_config"](
        name=name, description=f"trustrl.data.tasks.generate_splits({task!r}, ...)", task=task,
        difficulty=int(difficulty), operations=operations if task == "arithmetic" else "+",
        num_train=int(num_train), num_test=int(num_test), seed=int(seed))
    return cls(config=config, data_dir=data_dir, file_format="array_record")


def math_builder(dataset: str, *, manual_dir: str, data_dir: str):
    """The tfds builder of a math set read from manual_dir (not yet prepared; see build()).

    The config name is "<dataset>-<fingerprint>", the fingerprint hashing the relative names and
    sizes of the source files, so new or changed downloads build afresh. manual_dir must exist
    even when the dataset is already built (the fingerprint is how the build is found).
    """
    files = find_math_files(dataset, manual_dir)
    digest = hashlib.sha1()
    root = pathlib.Path(manual_dir).expanduser()
    for path in sorted(p for paths in files.values() for p in paths):
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\n".encode())
    _, cls = _builder_classes()
    config = _builders["math_config"](name=f"{dataset}-{digest.hexdigest()[:12]}",
                                      description=f"{dataset} from {manual_dir}", dataset=dataset)
    return cls(config=config, data_dir=data_dir, file_format="array_record")


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


def _read_rows(path: pathlib.Path) -> list:
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix == ".json":
        return [json.loads(path.read_text(encoding="utf-8"))]
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
    return rows


def _field(row: Mapping, *names, where=""):
    """The first of names present in row (case-insensitive), as str."""
    lower = {str(k).lower(): v for k, v in row.items()}
    for name in names:
        value = lower.get(name.lower())
        if value is not None:
            return value
    raise ValueError(f"{where}: none of the fields {list(names)} (has {sorted(row)})")


def _text(value) -> str:
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
        text = _text(value)
    else:  # a list (pyarrow) / numpy array (pandas) of {"role", "content"} messages
        messages = list(value)
        users = [m for m in messages if m.get("role") == "user"] or messages
        if not users:
            raise ValueError("empty prompt message list")
        text = _text(users[-1]["content"])
    if text.startswith(_DAPO_HEAD):
        text = text[len(_DAPO_HEAD):]
    if text.rstrip().endswith(_DAPO_TAIL):
        text = text.rstrip()[:-len(_DAPO_TAIL)]
    return text.strip()


def _math_example(dataset, row, where):
    """(prompt, answer) of one source row; answer None when the row has no usable answer."""
    if dataset == "gsm8k":
        prompt = _text(_field(row, "question", where=where))
        return prompt, gsm8k_answer(_text(_field(row, "answer", where=where)))
    if dataset == "math":
        prompt = _text(_field(row, "problem", where=where))
        answer = row.get("answer")
        if answer is None or not _text(answer):
            answer = last_boxed(_text(_field(row, "solution", where=where)))
        return prompt, None if answer is None else _text(answer)
    if dataset == "dapo_math":
        prompt = _dapo_prompt(_field(row, "prompt", where=where))
        reward_model = row.get("reward_model")
        if isinstance(reward_model, Mapping) and reward_model.get("ground_truth") is not None:
            answer = reward_model["ground_truth"]
        else:
            answer = _field(row, "solution", "answer", where=where)
        return prompt, _text(answer)
    prompt = _text(_field(row, "problem", "question", where=where))
    return prompt, _text(_field(row, "answer", where=where))


def read_math_files(dataset: str, manual_dir) -> dict:
    """{split: [example dict, ...]} parsed from a math set's files (see MATH_LAYOUTS).

    Rows without an extractable answer (a MATH solution with no \\boxed{}) are skipped with a
    warning; a GSM8K row without '#### ' means the file is not GSM8K and raises.
    """
    out = {}
    for split, paths in find_math_files(dataset, manual_dir).items():
        examples, seen, skipped = [], set(), 0
        for path in paths:
            for n, row in enumerate(_read_rows(path)):
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


# --- loading ---------------------------------------------------------------------------------------

def _decode(example, where: str = "", key=None) -> dict:
    """The example with str values; raises IntegrityError naming ``where`` (the split's files)
    when a field reads as None: tfds decodes the records of a truncated or changed array_record
    shard that way, and training on them must not pass silently."""
    if not isinstance(example, Mapping) or any(example.get(k) is None for k in FIELDS):
        missing = (sorted(k for k in FIELDS if example.get(k) is None)
                   if isinstance(example, Mapping) else "all")
        raise integrity.IntegrityError(
            f"{where or 'dataset'}: example {key} reads as None (fields {missing}): its shard is "
            f"damaged (truncated or changed); move the dataset directory away so it is built "
            f"again")
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in example.items()}


class Examples(collections.abc.Sequence):
    """Random-access examples (python str values) over a tfds data source, optionally a subset
    given by indices. ``where`` names the files read (in the error for an unreadable example)."""

    def __init__(self, source, indices=None, name: str = "", where: str = ""):
        self._source = source
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.name = name
        self.where = where or name

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
        return _decode(self._source[key], self.where, key)

    def __getitems__(self, indices) -> list:
        keys = [self._resolve(i) for i in indices]
        getitems = getattr(self._source, "__getitems__", None)
        records = getitems(keys) if getitems is not None else [self._source[k] for k in keys]
        return [_decode(r, self.where, k) for r, k in zip(records, keys)]

    def __repr__(self):
        return f"Examples({self.name!r}, {len(self)} examples)"


def _cfg(task_cfg, key, default=None):
    if isinstance(task_cfg, Mapping):
        return task_cfg.get(key, default)
    try:
        return task_cfg.get(key, default)  # ml_collections.ConfigDict
    except AttributeError:
        return getattr(task_cfg, key, default)


def load_examples(task_cfg, split: str, data_dir: str, *, seed: int = 0) -> Sequence[dict]:
    """The examples of one split of task_cfg.name, built under data_dir on first use.

    task_cfg: name, and for synthetic tasks difficulty, operations, num_train, num_test; for math
    sets manual_dir (and num_test, the held-out size when the files hold no test split). seed
    picks the synthetic problems and the held-out test problems. Returns a random-access sequence
    of {"id", "prompt", "answer", "task"} dicts of python str. See the module docstring for splits.
    """
    name = _cfg(task_cfg, "name")
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASK_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if not data_dir:
        raise ValueError("data_dir is empty: give the directory the tfds dataset is built in")
    data_dir = os.fspath(pathlib.Path(data_dir).expanduser())
    num_test = int(_cfg(task_cfg, "num_test", 0) or 0)
    from trustrl.infra import multihost
    # several processes sharing data_dir: process 0 builds, the others then find it built (a
    # builder made before the build would not see it, so they make theirs afterwards)
    if name in SYNTHETIC_TASKS:
        with multihost.primary_first(f"tfds:{name}:{split}"):
            builder = synthetic_builder(
                name, difficulty=_cfg(task_cfg, "difficulty"),
                operations=_cfg(task_cfg, "operations", "+"),
                num_train=_cfg(task_cfg, "num_train"), num_test=num_test, seed=seed,
                data_dir=data_dir)
            sources = build(builder)
        if split not in sources:
            raise ValueError(f"{name} has no {split!r} split: task.num_{split}=0")
        return _checked(Examples(sources[split], name=f"{builder.builder_config.name}/{split}",
                                 where=_shards(builder, split)))
    manual_dir = _cfg(task_cfg, "manual_dir", "")
    with multihost.primary_first(f"tfds:{name}:{split}"):
        builder = math_builder(name, manual_dir=manual_dir, data_dir=data_dir)
        sources = build(builder, manual_dir=os.fspath(pathlib.Path(manual_dir).expanduser()))
    label = f"{builder.builder_config.name}/{split}"
    if "train" not in sources and split == "train":
        raise ValueError(f"{name}: the files in {manual_dir!r} hold only a test split (an "
                         f"evaluation set); train on another dataset")
    if "test" in sources or (split == "train" and num_test < 1):
        return _checked(Examples(sources[split], name=label, where=_shards(builder, split)))
    # No test split in the files: hold num_test problems out of train, reproducibly (seed).
    train = sources["train"]
    if num_test < 1:
        raise ValueError(f"{name} has no test split in its files; set task.num_test > 0 to hold "
                         f"that many problems out of train")
    if num_test >= len(train):
        raise ValueError(f"{name}: task.num_test={num_test} leaves no training problems "
                         f"(train has {len(train)})")
    held = held_out_indices(len(train), num_test, seed)
    if split == "test":
        return _checked(Examples(train, held, name=f"{label} (held out of train)",
                                 where=_shards(builder, "train")))
    return _checked(Examples(train, np.setdiff1d(np.arange(len(train)), held), name=label,
                             where=_shards(builder, "train")))


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
