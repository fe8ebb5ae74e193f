"""The loader: every format and file type gives the same canonical rows; bad rows name file and row."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from align.data.errors import DataError, RowErrors
from align.data.formats import to_messages
from align.data.loader import load_canonical, sft_datasets
from conftest import write_jsonl

CANON = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "reverse: abcd"},
    {"role": "assistant", "content": "dcba"},
]
EQUIVALENT_ROWS = {
    "messages": {"messages": CANON},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "reverse: abcd"},
                                   {"from": "gpt", "value": "dcba"}]},
    "alpaca": {"system": "Be brief.", "instruction": "reverse: abcd", "input": "", "output": "dcba"},
    "prompt_completion": {"system": "Be brief.", "prompt": "reverse: abcd", "completion": "dcba"},
    "prompt_completion_conversational": {"prompt": CANON[:2], "completion": CANON[2:]},
    "query_response": {"system": "Be brief.", "query": "reverse: abcd", "response": "dcba"},
}


def data_cfg(**kw):
    base = dict(train="x", eval=None, eval_fraction=0.0, format="auto", split="train", eval_split="test",
                dedup=False, on_error="raise", max_rows=0)
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("name", sorted(EQUIVALENT_ROWS))
def test_every_format_gives_the_same_messages(name):
    assert to_messages(EQUIVALENT_ROWS[name]) == CANON


def test_alpaca_input_is_appended_to_instruction():
    msgs = to_messages({"instruction": "Translate", "input": "hallo", "output": "hello"})
    assert msgs == [{"role": "user", "content": "Translate\n\nhallo"}, {"role": "assistant", "content": "hello"}]


def test_explicit_format_wins_over_detection():
    row = {"prompt": "p", "completion": "c", "query": "q", "response": "r"}
    assert to_messages(row)[0]["content"] == "p"
    assert to_messages(row, "query_response")[0]["content"] == "q"


def _write_all_file_types(tmp_path, rows):
    import pandas as pd
    from datasets import Dataset

    flat = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows]
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", flat),
        "json": tmp_path / "d.json",
        "parquet": tmp_path / "d.parquet",
        "csv": tmp_path / "d.csv",
        "disk": tmp_path / "d_disk",
    }
    paths["json"].write_text(json.dumps(flat))
    pd.DataFrame(flat).to_parquet(paths["parquet"])
    pd.DataFrame(flat).to_csv(paths["csv"], index=False)
    Dataset.from_list(flat).save_to_disk(str(paths["disk"]))
    return paths


def test_every_file_type_loads_the_same_rows(tmp_path):
    rows = [{"instruction": f"reverse: w{i}", "input": "" if i % 2 else "ctx", "output": f"{i}w"} for i in range(5)]
    paths = _write_all_file_types(tmp_path, rows)
    loaded = {}
    for kind, path in paths.items():
        canon = load_canonical(str(path), lambda r: {"messages": to_messages(r)}, RowErrors())
        loaded[kind] = [r["messages"] for r in canon]
        assert [r["_row"] for r in canon] == [1, 2, 3, 4, 5]
    expected = loaded["jsonl"]
    assert len(expected) == 5 and expected[1][0]["content"] == "reverse: w1"
    assert expected[0][0]["content"] == "reverse: w0\n\nctx"
    for kind, got in loaded.items():
        assert got == expected, kind


BAD = [
    ("invalid JSON", '{"messages": [', 'invalid JSON'),
    ("no schema", {"question": "q", "answer": "a"}, "no recognised schema in fields ['answer', 'question']"),
    ("empty assistant", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "empty assistant turn"),
    ("wrong type", {"instruction": "q", "output": 42}, "field 'output' is int, expected a string"),
    ("wrong turn type", {"messages": [{"role": "user", "content": ["x"]}]}, "'messages[0].content' is list"),
    ("bad role", {"conversations": [{"from": "robot", "value": "x"}]}, "not a known role"),
]


@pytest.mark.parametrize("case,bad,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_row_names_file_row_and_reason(tmp_path, case, bad, reason):
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as err:
        load_canonical(str(path), lambda r: {"messages": to_messages(r)}, RowErrors("raise"))
    msg = str(err.value)
    assert f"{path}, row 3:" in msg and reason in msg and "Fix:" in msg
    skipped = RowErrors("skip")
    rows = load_canonical(str(path), lambda r: {"messages": to_messages(r)}, skipped)
    assert [r["_row"] for r in rows] == [1, 2, 4]
    assert [(s, r) for s, r, _ in skipped.skipped] == [(str(path), 3)]


def test_truncation_leaving_no_answer_names_row(tmp_path, tiny_tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "ok"}]}
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [good, long_prompt, good])
    with pytest.raises(DataError, match=r"t\.jsonl, row 2: no supervised token left after truncation to "
                                        r"train\.max_length=32"):
        sft_datasets(data_cfg(train=str(path)), tiny_tokenizer, 32, 0)
    train, _, report = sft_datasets(data_cfg(train=str(path), on_error="skip"), tiny_tokenizer, 32, 0)
    assert len(train) == 2 and report.metrics()["data/skipped_rows"] == 1


def test_eval_fraction_and_dedup(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"p{i % 50}", "completion": f"c{i % 50}"} for i in range(100)]  # each row twice
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, ev, report = sft_datasets(data_cfg(train=str(path), dedup=True, eval_fraction=0.1), tiny_tokenizer, 64, 0)
    assert report.duplicates_removed == 50 and (len(train), len(ev)) == (45, 5)
    train_ids = {tuple(x) for x in train["input_ids"]}
    assert not train_ids & {tuple(x) for x in ev["input_ids"]}


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_canonical(str(tmp_path / "nope.jsonl"), lambda r: r, RowErrors())


def test_a_byte_order_mark_is_accepted_and_a_non_utf8_row_is_skipped_when_asked(tmp_path):
    good = {"prompt": "p", "completion": "c"}
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n" + json.dumps(good).encode() + b"\n")
    convert = lambda raw: {"messages": to_messages(raw)}  # noqa: E731
    assert [r["_row"] for r in load_canonical(str(bom), convert, RowErrors("raise"))] == [1, 2]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(json.dumps(good).encode() + b'\n{"prompt": "caf\xe9", "completion": "c"}\n' + json.dumps(good).encode() + b"\n")
    with pytest.raises(DataError, match=r"mixed.jsonl, row 2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        load_canonical(str(mixed), convert, RowErrors("raise"))
    errors = RowErrors("skip")
    assert [r["_row"] for r in load_canonical(str(mixed), convert, errors)] == [1, 3]
    assert "row 2: not valid UTF-8" in errors.summary()
