"""Preference pairs in every common shape, turned into one canonical row.

Canonical row: ``{"prompt": [messages], "chosen": [assistant messages], "rejected": [...], "margin": float|None}``.

Shapes: explicit ``prompt/chosen/rejected`` (strings or message lists), implicit ``chosen/rejected``
full conversations (message lists; the shared leading turns become the prompt), and Anthropic-HH
full text (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``; the shared prompt is split off).
"""

from __future__ import annotations

import re

from align.data.errors import RowProblem
from align.data.formats import _messages_list, _string

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh(text: str, label: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> messages."""
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3 or parts[0].strip():
        raise RowProblem(f"field '{label}' is not Anthropic-HH text ('\\n\\nHuman: ...\\n\\nAssistant: ...')",
                         "use prompt/chosen/rejected fields, or HH full text")
    return [{"role": HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Shared leading turns become the prompt; the rest (from the last shared user turn on) the answers."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant" and (n >= len(chosen) or chosen[n]["role"] == "assistant"):
        n -= 1  # never split inside an assistant answer
    return chosen[:n], chosen[n:], rejected[n:]


def _answer(value, label: str) -> list[dict]:
    if isinstance(value, list):
        return _messages_list(value, label, "role", "content", None)
    if not isinstance(value, str):
        raise RowProblem(f"field '{label}' is {type(value).__name__}, expected a string or a list of messages",
                         f"make '{label}' the answer text")
    return [{"role": "assistant", "content": value}]


def _margin(row: dict) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(f"field 'margin' is {type(value).__name__}, expected a number", "make 'margin' a number")
    return float(value)


def to_preference(row: dict) -> dict:
    """Canonical preference row, or RowProblem saying what is wrong."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RowProblem(f"field '{key}' is missing", "give every row 'chosen' and 'rejected' answers")
    chosen_raw, rejected_raw = row["chosen"], row["rejected"]
    if row.get("prompt") is not None:
        prompt_raw = row["prompt"]
        prompt = (_messages_list(prompt_raw, "prompt", "role", "content", None) if isinstance(prompt_raw, list)
                  else [{"role": "user", "content": _string(row, "prompt")}])
        chosen, rejected = _answer(chosen_raw, "chosen"), _answer(rejected_raw, "rejected")
        if prompt and chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:  # full conversations
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    elif isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        prompt, chosen, rejected = split_shared_prompt(parse_hh(chosen_raw, "chosen"), parse_hh(rejected_raw, "rejected"))
    else:
        prompt, chosen, rejected = split_shared_prompt(_answer(chosen_raw, "chosen"), _answer(rejected_raw, "rejected"))
    system = _string(row, "system", required=False)
    if system and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}, *prompt]
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or not any(m["role"] == "assistant" and m["content"].strip() for m in answer):
            raise RowProblem(f"empty '{key}' answer", "remove the row or fill in the answer")
    if chosen == rejected:
        raise RowProblem("'chosen' and 'rejected' are identical", "remove the row: it carries no preference")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": _margin(row)}

