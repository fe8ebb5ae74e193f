"""The embedded default model: a tiny, randomly initialised Llama with a byte-level tokenizer.

The tokenizer files ship with the package (``align/models/tiny_tokenizer``); the weights are built
from a fixed seed on first use and cached, so every process (and every rank) gets the same model
without a download. ``python -m align.models.tiny`` rewrites the shipped tokenizer files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from align.config.paths import cache_root

TOKENIZER_DIR = Path(__file__).with_name("tiny_tokenizer")
BUILTIN_PREFIX = "builtin:"
TINY_VERSION = "v1"

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# ChatML-like, one special token per role; {% generation %} marks assistant text for TRL.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    initializer_range=0.02,
)


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens(
        {"pad_token": "<|pad|>", "eos_token": "<|end|>", "additional_special_tokens": SPECIAL_TOKENS[2:]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = TINY_CONFIG["max_position_embeddings"]
    return tokenizer


def tiny_model_dir() -> Path:
    """Path of the built tiny model, building it on first use (atomically, safe across processes)."""
    target = cache_root() / f"tiny-llama-{TINY_VERSION}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        _build_tiny(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process committed first: theirs is identical
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **TINY_CONFIG,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    shutil.rmtree(TOKENIZER_DIR, ignore_errors=True)
    build_tokenizer().save_pretrained(TOKENIZER_DIR)
    print(f"wrote {TOKENIZER_DIR}")
