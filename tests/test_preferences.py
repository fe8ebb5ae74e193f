"""Preference rows: every shape gives the same canonical pair; bad pairs name file and row."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from align.data.errors import DataError, RowErrors
from align.data.loader import load_canonical, preference_datasets
from align.data.preferences import to_preference
from conftest import write_jsonl

USER = {"role": "user", "content": "reverse: abcd"}
GOOD = {"role": "assistant", "content": "dcba"}
BAD = {"role": "assistant", "content": "abcd"}
CANON = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD], "margin": None}

SHAPES = {
    "text": {"prompt": "reverse: abcd", "chosen": "dcba", "rejected": "abcd"},
    "messages": {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    "prompt + full conversations": {"prompt": [USER], "chosen": [USER, GOOD], "rejected": [USER, BAD]},
    "implicit conversations": {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    "anthropic hh": {"chosen": "\n\nHuman: reverse: abcd\n\nAssistant: dcba",
                     "rejected": "\n\nHuman: reverse: abcd\n\nAssistant: abcd"},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_gives_the_same_pair(shape):
    assert to_preference(SHAPES[shape]) == CANON


def test_hh_multi_turn_splits_the_shared_prompt():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: reverse: abcd\n\nAssistant: dcba",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: reverse: abcd\n\nAssistant: abcd"}
    pair = to_preference(row)
    assert [m["content"] for m in pair["prompt"]] == ["hi", "hello", "reverse: abcd"]
    assert pair["chosen"] == [GOOD] and pair["rejected"] == [BAD]


def test_margin_column_is_kept(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{**SHAPES["text"], "margin": 1.5}, SHAPES["text"]])
    cfg = OmegaConf.create(dict(train=str(path), eval=None, eval_fraction=0.0, format="auto", split="train",
                                eval_split="test", dedup=False, on_error="raise", max_rows=0))
    train, _, _ = preference_datasets(cfg, tiny_tokenizer, 64, 0)
    assert train["margin"] == [1.5, 0.0]
    assert tiny_tokenizer.decode(train["chosen_ids"][0]).endswith("<|assistant|>dcba<|end|>")


BAD_ROWS = [
    ("missing rejected", {"prompt": "p", "chosen": "c"}, "field 'rejected' is missing"),
    ("empty chosen", {"prompt": "p", "chosen": " ", "rejected": "r"}, "empty 'chosen' answer"),
    ("identical", {"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ("wrong type", {"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' is int"),
    ("not hh", {"chosen": "just text", "rejected": "other text"}, "field 'chosen' is not Anthropic-HH text"),
]


@pytest.mark.parametrize("case,row,reason", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_pair_names_file_and_row(tmp_path, case, row, reason):
    path = write_jsonl(tmp_path / "prefs.jsonl", [SHAPES["text"], row])
    with pytest.raises(DataError) as err:
        load_canonical(str(path), to_preference, RowErrors("raise"))
    assert f"{path}, row 2: {reason}" in str(err.value)
    skipped = RowErrors("skip")
    assert len(load_canonical(str(path), to_preference, skipped)) == 1 and len(skipped.skipped) == 1


def test_prompt_alone_over_max_length_names_row(tiny_tokenizer, tmp_path):
    long = {"prompt": "x" * 80, "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [SHAPES["text"], SHAPES["text"], long])
    cfg = OmegaConf.create(dict(train=str(path), eval=None, eval_fraction=0.0, format="auto", split="train",
                                eval_split="test", dedup=False, on_error="raise", max_rows=0))
    with pytest.raises(DataError, match=r"p\.jsonl, row 3: the prompt alone is 83 tokens, over train\.max_length=64"):
        preference_datasets(cfg, tiny_tokenizer, 64, 0)
