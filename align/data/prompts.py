"""Prompts for on-policy stages (PPO): taken from any SFT or preference row, or a bare `prompt`."""

from __future__ import annotations

from align.data.errors import RowProblem
from align.data.formats import _messages_list, _string, to_messages
from align.data.preferences import to_preference


def to_prompt(row: dict, fmt: str = "auto") -> dict:
    """{"prompt": messages}: the turns before the last assistant turn of an SFT row, the prompt of a
    preference pair, or a row that only has `prompt` (a string or a message list)."""
    if "chosen" in row or "rejected" in row:
        prompt = to_preference(row)["prompt"]
    elif "prompt" in row and "completion" not in row:
        raw = row["prompt"]
        prompt = (_messages_list(raw, "prompt", "role", "content", None) if isinstance(raw, list)
                  else [{"role": "user", "content": _string(row, "prompt")}])
        system = _string(row, "system", required=False)
        if system and not (prompt and prompt[0]["role"] == "system"):
            prompt = [{"role": "system", "content": system}, *prompt]
    else:
        messages = to_messages(row, fmt)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:last]
    if not prompt or prompt[-1]["role"] == "assistant":
        raise RowProblem("no prompt to answer (the row has no user turn before the answer)",
                         "give each row a user turn, or a `prompt` field")
    return {"prompt": prompt}
