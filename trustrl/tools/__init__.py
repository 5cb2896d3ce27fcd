"""Command-line tools, the top floor of the package: nothing in trustrl imports them.

    python -m trustrl.tools.aot_check      compile the run's programs for a TPU topology
    python -m trustrl.tools.get_smollm2    the pretrained SmolLM2-135M as a Hugging Face directory
    python -m trustrl.tools.qwen_vocab     the Qwen tokenizer, rebuilt offline
    python -m trustrl.tools.serve_sampler  trustrl's sampler behind an OpenAI-compatible endpoint
    python -m trustrl.tools.local_cluster  a multi-process run on one machine
"""
