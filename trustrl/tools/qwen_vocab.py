"""python -m trustrl.tools.qwen_vocab [DIR] [--source FILE]: the Qwen tokenizer, rebuilt offline.

The builder is trustrl.data.qwen_vocab (the tokenizer loader uses it too); this is its command.
"""
import sys

from trustrl.data.qwen_vocab import main

if __name__ == "__main__":
    sys.exit(main())
