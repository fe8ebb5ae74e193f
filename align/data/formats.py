"""Every common instruction format, turned into one canonical row: a list of chat messages.

Canonical SFT row: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``
with at least one assistant turn that has content or tool calls. An assistant turn's ``tool_calls`` (the form
transformers' chat templates take: ``[{"type": "function", "function": {"name": ..., "arguments": {...}}}]``) and a
tool turn's ``tool_call_id`` / ``name`` are kept for the chat template to render. The format is detected per row
from its fields, or
forced with ``data.format=<name>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from align.data.errors import RowProblem

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}


def _string(row: dict, key: str, *, required: bool = True, label: str | None = None) -> str:
    label = label or key
    value = row.get(key)
    if value is None:
        if required:
            raise RowProblem(f"field '{label}' is missing", f"give every row a '{label}'")
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"field '{label}' is {type(value).__name__}, expected a string", f"make '{label}' a string")
    return value


def _messages_list(value, label: str, role_key: str, content_key: str, role_map: dict | None) -> list[dict]:
    if not isinstance(value, list):
        raise RowProblem(f"field '{label}' is {type(value).__name__}, expected a list of turns",
                         f"make '{label}' a list of {{'{role_key}': ..., '{content_key}': ...}} objects")
    out = []
    for i, turn in enumerate(value):
        where = f"{label}[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(f"field '{where}' is {type(turn).__name__}, expected an object",
                             f"make each turn a {{'{role_key}': ..., '{content_key}': ...}} object")
        role = _string(turn, role_key, label=f"{where}.{role_key}")
        mapped = (role_map or {r: r for r in ROLES}).get(role.lower() if role_map else role)
        if mapped is None:
            allowed = sorted(role_map) if role_map else list(ROLES)
            raise RowProblem(f"field '{where}.{role_key}' is {role!r}, not a known role",
                             f"use one of {', '.join(allowed)}")
        calls = _tool_calls(turn, where) if mapped == "assistant" else None
        message = {"role": mapped, "content": _string(turn, content_key, label=f"{where}.{content_key}",
                                                      required=calls is None) or ""}
        if calls is not None:
            message["tool_calls"] = calls
        for key in TOOL_TURN_KEYS if mapped == "tool" else ():
            if turn.get(key) is not None:
                message[key] = _string(turn, key, label=f"{where}.{key}")
        out.append(message)
    return out


TOOL_TURN_KEYS = ("tool_call_id", "name")  # kept on a tool turn for the templates that render them


def _tool_calls(turn: dict, where: str) -> list[dict] | None:
    """An assistant turn's tool calls in transformers' form, or None; a call's arguments may be a dict or JSON text."""
    calls = turn.get("tool_calls")
    if calls is None:
        return None
    fix = "give tool_calls as [{'type': 'function', 'function': {'name': ..., 'arguments': {...}}}]"
    if not isinstance(calls, list) or not calls:
        raise RowProblem(f"field '{where}.tool_calls' is {type(calls).__name__}, expected a non-empty list", fix)
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowProblem(f"field '{where}.tool_calls[{i}]' has no function name", fix)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise RowProblem(f"field '{where}.tool_calls[{i}].function.arguments' is not JSON ({e})", fix) from e
        if not isinstance(arguments, dict):
            raise RowProblem(f"field '{where}.tool_calls[{i}].function.arguments' is {type(arguments).__name__}, "
                             "expected an object", fix)
        out.append({**call, "type": call.get("type", "function"),
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _check_assistant_turns(messages: list[dict], label: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem(f"'{label}' has no assistant turn", "every training conversation needs an assistant answer")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise RowProblem(f"empty assistant turn ('{label}[{i}]')", "remove the row or fill in the answer")
    return messages


def _with_system(row: dict, messages: list[dict]) -> list[dict]:
    system = _string(row, "system", required=False)
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def from_messages(row: dict) -> list[dict]:
    return _check_assistant_turns(
        _with_system(row, _messages_list(row.get("messages"), "messages", "role", "content", None)), "messages"
    )


def from_sharegpt(row: dict) -> list[dict]:
    turns = _messages_list(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    return _check_assistant_turns(_with_system(row, turns), "conversations")


def from_alpaca(row: dict) -> list[dict]:
    instruction = _string(row, "instruction")
    extra = _string(row, "input", required=False)
    output = _string(row, "output")
    if not output.strip():
        raise RowProblem("empty assistant turn ('output')", "remove the row or fill in the answer")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _with_system(row, [{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _pair(row: dict, prompt_key: str, answer_key: str) -> list[dict]:
    prompt, answer = row.get(prompt_key), row.get(answer_key)
    if isinstance(prompt, list) or isinstance(answer, list):  # conversational prompt/completion
        p = _messages_list(prompt, prompt_key, "role", "content", None) if prompt is not None else []
        a = _messages_list(answer, answer_key, "role", "content", None)
        return _check_assistant_turns(_with_system(row, p + a), answer_key)
    prompt = _string(row, prompt_key)
    answer = _string(row, answer_key)
    if not answer.strip():
        raise RowProblem(f"empty assistant turn ('{answer_key}')", "remove the row or fill in the answer")
    return _with_system(row, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


def from_prompt_completion(row: dict) -> list[dict]:
    return _pair(row, "prompt", "completion")


def from_query_response(row: dict) -> list[dict]:
    return _pair(row, "query", "response")


# name -> (fields that identify it, converter); detection tries them in this order
SFT_FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict], list[dict]]]] = {
    "messages": (("messages",), from_messages),
    "sharegpt": (("conversations",), from_sharegpt),
    "alpaca": (("instruction", "output"), from_alpaca),
    "prompt_completion": (("prompt", "completion"), from_prompt_completion),
    "query_response": (("query", "response"), from_query_response),
}


def detect_sft_format(row: dict) -> str:
    for name, (fields, _) in SFT_FORMATS.items():
        if all(f in row for f in fields):
            return name
    known = "; ".join(f"{name}: {'+'.join(fields)}" for name, (fields, _) in SFT_FORMATS.items())
    raise RowProblem(f"no recognised schema in fields {sorted(row)}",
                     f"use one of the formats ({known}) or set data.format")


def to_messages(row: dict, fmt: str = "auto") -> list[dict]:
    """Canonical messages for one SFT row, or RowProblem saying what is wrong with it."""
    if fmt == "auto":
        fmt = detect_sft_format(row)
    if fmt not in SFT_FORMATS:
        raise ValueError(f"data.format={fmt!r} is not an instruction format; use auto or one of {sorted(SFT_FORMATS)}")
    return SFT_FORMATS[fmt][1](row)
