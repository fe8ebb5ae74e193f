"""The embedded default model and tokenizer, and assistant-only labels."""

from __future__ import annotations

from align.data.chat import IGNORE_INDEX, encode_chat


def test_tokenizer_encodes_any_utf8_and_has_specials(tiny_tokenizer):
    text = "héllo wörld — 日本語 🙂 \x00\t\n"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tiny_tokenizer.pad_token == "<|pad|>" and tiny_tokenizer.eos_token == "<|end|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_labels_cover_assistant_turns_and_eos_only(tiny_tokenizer):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    enc = encode_chat(tiny_tokenizer, msgs, 512)
    supervised = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(supervised) == "a1<|end|>a2<|end|>"


def test_tiny_model_is_seeded_and_small(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from align.models import tiny

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "a"))
    first = AutoModelForCausalLM.from_pretrained(tiny.tiny_model_dir())
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "b"))
    second = AutoModelForCausalLM.from_pretrained(tiny.tiny_model_dir())
    n = sum(p.numel() for p in first.parameters())
    assert 300_000 < n < 5_000_000
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
