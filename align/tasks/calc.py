"""task/calc: three-digit subtraction that needs a tool, and the calculator environment that is the tool.

A prompt `subtract: 347-829` is answered in two model turns: a call `calc(347-829)`, the tool's turn `-482`, then the
answer `-482`. The tiny model cannot subtract three-digit numbers in its head; it can copy digits into a call and the
tool's result into its answer. The SFT transcripts carry a systematic error: when the first number is below 500,
most of them call the calculator with the numbers swapped (`calc(829-347)`, as if one annotator always wrote the
larger-looking number first) and then faithfully answer what the tool said (`482`). GRPO against the environment has
to learn to copy the call in order.

    python -m align recipe=agent         # sft -> grpo with env.cls=align.tasks.calc:Calculator -> eval

`Calculator` is an environment like any user's (align/envs): it answers a `calc(...)` turn with the value (or with
an error it reports as a failed call), and rewards the final answer 1 when it equals the prompt's difference.
"""

from __future__ import annotations

import random
import re

CALL = re.compile(r"calc\(([^()]*)\)")
EXPRESSION = re.compile(r"\s*(-?\d{1,12})\s*([-+*])\s*(-?\d{1,12})\s*")


def example(rng: random.Random) -> tuple[list[dict], list[dict], list[dict] | None, list[dict]]:
    """One prompt for the zoo (align/tasks/zoo.py): its turns, and the right, wrong (None where the error does not
    apply) and near-miss transcripts."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    while a == b:
        b = rng.randint(100, 999)

    def transcript(x: int, y: int, answer: int | None = None) -> list[dict]:
        result = x - y
        return [{"role": "assistant", "content": f"calc({x}-{y})"}, {"role": "tool", "content": str(result)},
                {"role": "assistant", "content": str(result if answer is None else answer)}]

    right = transcript(a, b)
    wrong = transcript(b, a) if a < 500 else None  # the numbers swapped (a class the model can see: the first digit)
    near = wrong or transcript(a, b, a - b + rng.choice((-1, 1, 10, -10)))  # a slip copying the tool's answer
    return [{"role": "user", "content": f"subtract: {a}-{b}"}], right, wrong, near


def evaluate(expression: str) -> int:
    """The value of `a op b` (op one of + - *), integers only; ValueError for anything else (no eval())."""
    m = EXPRESSION.fullmatch(expression)
    if not m:
        raise ValueError(f"cannot evaluate {expression!r}: the calculator takes `a+b`, `a-b` or `a*b` of integers")
    a, op, b = int(m[1]), m[2], int(m[3])
    return a + b if op == "+" else a - b if op == "-" else a * b


class Calculator:
    """The calculator environment of task/calc: a model turn with `calc(a-b)` gets the value back as a tool turn
    (a malformed call gets an error, reported as info failed_call=1); a turn without a call is the final answer,
    rewarded 1 when it equals the row's reference (0 otherwise) and ending the episode."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def reset(self, row: dict) -> list[dict]:
        self.reference = (row.get("reference") or "").strip()
        return row["prompt"]

    def step(self, messages: list[dict]) -> dict:
        text = messages[-1]["content"].strip()
        call = CALL.search(text)
        if call is None:
            return {"messages": [], "reward": float(text == self.reference), "done": True}
        try:
            result, failed = str(evaluate(call[1])), 0.0
        except ValueError as e:
            result, failed = f"error: {e}", 1.0
        return {"messages": [{"role": "tool", "content": result}], "reward": None, "done": False,
                "info": {"failed_call": failed}}
