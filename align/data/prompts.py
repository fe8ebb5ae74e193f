"""Prompts for on-policy stages (PPO): taken from any SFT or preference row, or a bare `prompt`."""

from __future__ import annotations

import json
from dataclasses import dataclass

from align.data.errors import RowProblem
from align.data.formats import _messages_list, _string, to_messages
from align.data.preferences import to_preference


def to_prompt(row: dict, fmt: str = "auto") -> dict:
    """{"prompt": messages, "reference": the row's answer or None, "answer": the answer's turns or None}: an SFT
    row's turns before its answer (the last assistant turn, with the tool calls and tool turns that lead to it:
    an episode starts where the model first speaks), the prompt of a preference pair (answer: chosen), or a row
    that only has `prompt` (a string or a message list; no reference). Task checkers read the reference: the
    answer's last assistant turn."""
    reference, answer = None, None
    if "chosen" in row or "rejected" in row:
        pair = to_preference(row)
        prompt, answer = pair["prompt"], pair["chosen"]
        reference = _last_assistant(pair["chosen"])
    elif "prompt" in row and "completion" not in row:
        raw = row["prompt"]
        prompt = (_messages_list(raw, "prompt", "role", "content", None) if isinstance(raw, list)
                  else [{"role": "user", "content": _string(row, "prompt")}])
        system = _string(row, "system", required=False)
        if system and not (prompt and prompt[0]["role"] == "system"):
            prompt = [{"role": "system", "content": system}, *prompt]
    else:
        messages = to_messages(row, fmt)
        start = answer_start(messages)
        prompt, answer = messages[:start], messages[start:]
        reference = _last_assistant(answer)
    if not prompt or prompt[-1]["role"] == "assistant":
        raise RowProblem("no prompt to answer (the row has no user turn before the answer)",
                         "give each row a user turn, or a `prompt` field")
    fields = {k: v for k, v in row.items() if k not in CONVERSATION_KEYS and not k.startswith("_")}
    return {"prompt": prompt, "reference": reference, "answer": answer, "fields": json.dumps(fields, default=str)}


def answer_start(messages: list[dict]) -> int:
    """Where a conversation's answer starts: its last assistant turn, or the first of the assistant and tool turns
    that lead up to it (a tool-use transcript's calls and results)."""
    start = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    while start > 0 and messages[start - 1]["role"] in ("assistant", "tool"):
        start -= 1
    while messages[start]["role"] != "assistant":  # an answer starts with the model's turn
        start += 1
    return start


# the keys a row's conversation is read from; the others reach a python reward function (reward=python)
CONVERSATION_KEYS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected", "instruction",
                     "input", "output", "query", "response", "system")


def _last_assistant(messages: list[dict]) -> str | None:
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    return answers[-1] if answers else None


def prompt_text(messages: list[dict]) -> str:
    """The last user turn: what a task checker reads as the prompt."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


@dataclass(frozen=True)
class Prompt:
    """One prompt as the online stages use it, from sampling to the reward: its token ids (ending with the assistant
    header), its text (the last user turn), the row's reference answer (None without one) and the row's other
    fields as JSON (what reward=python receives beside the completions)."""

    ids: list[int]
    text: str
    reference: str | None = None
    fields: str = "{}"
    messages: str = "[]"  # the prompt's turns as JSON (an environment's reset() reads them)
    where: str = ""  # the data file and 1-based row, for messages about this prompt

    def row(self) -> dict:
        """The data row as an environment's reset() receives it: its prompt turns, reference and other fields."""
        return {"prompt": json.loads(self.messages), "reference": self.reference, **json.loads(self.fields or "{}")}


def prompt_records(ds) -> list[Prompt]:
    """The Prompt of each row of a prompt dataset (align.data.loader.prompt_datasets); [] for none."""
    if ds is None:
        return []
    return [Prompt(row["prompt_ids"], row["prompt_text"], row["reference"], row.get("fields") or "{}",
                   row.get("messages") or "[]", row.get("where") or "") for row in ds]
