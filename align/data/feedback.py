"""Unpaired feedback (thumbs up / thumbs down) for KTO, in one canonical shape.

Canonical row: ``{"prompt": [messages], "answers": [[assistant messages], ...], "labels": [bool, ...]}``.

Shapes: a labelled answer in any SFT format (``prompt``/``completion``, ``messages``, ShareGPT, Alpaca, ...) with a
``label`` (true/false or 1/0): the answer is the conversation's last assistant turn (with the tool turns leading up
to it), the prompt everything before. A preference pair (``chosen``/``rejected``, no ``label``) counts as two rows,
its chosen answer desirable and its rejected one not, so the demo's and the zoo's pairs serve KTO too.
"""

from __future__ import annotations

from align.data.chat import encode_prompt_completions
from align.data.errors import RowProblem
from align.data.formats import to_messages
from align.data.preferences import to_preference
from align.data.prompts import answer_start

LABEL_FIX = "write label as true/false (or 1/0): true for an answer to learn from, false for one to move away from"


def label_of(row: dict) -> bool:
    value = row.get("label")
    if value is None:
        raise RowProblem("field 'label' is missing", f"give every row a label ({LABEL_FIX}), or give "
                                                     "chosen/rejected pairs")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise RowProblem(f"field 'label' is {value!r}, not a yes/no label", LABEL_FIX)


def to_feedback(row: dict, fmt: str = "auto") -> dict:
    """Canonical feedback row, or RowProblem saying what is wrong."""
    if "label" not in row and row.get("chosen") is not None and row.get("rejected") is not None:
        pair = to_preference(row)
        return {"prompt": pair["prompt"], "answers": [pair["chosen"], pair["rejected"]], "labels": [True, False]}
    label = label_of(row)
    messages = to_messages({k: v for k, v in row.items() if k != "label"}, fmt)
    start = answer_start(messages)
    if start == 0:
        raise RowProblem("the answer has no prompt before it", "give the turns the answer replies to (a `prompt`)")
    return {"prompt": messages[:start], "answers": [messages[start:]], "labels": [label]}


def encode_feedback(tokenizer, row: dict, max_length: int) -> list[dict]:
    """prompt_ids, completion_ids and label of each answer of a canonical feedback row (TRL's KTO columns)."""
    out = []
    for answer, label in zip(row["answers"], row["labels"]):
        ids = encode_prompt_completions(tokenizer, {"prompt": row["prompt"], "completion": answer}, max_length,
                                        keys=("completion",))
        out.append({**ids, "label": label})
    return out
