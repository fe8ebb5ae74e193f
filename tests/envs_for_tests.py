"""Environments the tests pass as env.cls=envs_for_tests:<Name> (tests/ is on the path under pytest)."""

from __future__ import annotations

import math
import re
import time

CALL = re.compile(r"CALL (\d+)\+(\d+)")


class Adder:
    """`CALL a+b` gets the sum back as a tool turn; any other turn is the final answer, rewarded 1 when it equals the
    row's reference."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def reset(self, row: dict) -> list[dict]:
        self.reference = row["reference"]
        return row["prompt"]

    def step(self, messages: list[dict]) -> dict:
        text = messages[-1]["content"].strip()
        call = CALL.fullmatch(text)
        if call:
            return {"messages": [{"role": "tool", "content": str(int(call[1]) + int(call[2]))}], "reward": None,
                    "done": False}
        return {"messages": [], "reward": float(text == (self.reference or "").strip()), "done": True}


class Misbehaving(Adder):
    """An Adder whose `how` (env.kwargs) goes wrong on the second turn of every episode whose prompt contains `when`."""

    def __init__(self, how: str = "raises", when: str = "", **kwargs):
        super().__init__(**kwargs)
        self.how, self.when, self.turn = how, when, 0

    def reset(self, row: dict) -> list[dict]:
        self.bad = self.when in row["prompt"][-1]["content"]
        return super().reset(row)

    def step(self, messages: list[dict]):
        self.turn += 1
        if not (self.bad and self.turn == 2):
            return super().step(messages)
        if self.how == "raises":
            raise KeyError("no such register")
        if self.how == "hangs":
            time.sleep(60)
        if self.how == "not_a_dict":
            return ["42"]
        if self.how == "nan_reward":
            return {"messages": [], "reward": math.nan, "done": True}
        if self.how == "unknown_role":
            return {"messages": [{"role": "oracle", "content": "42"}], "reward": None, "done": False}
        raise AssertionError(self.how)


class Uneven:
    """Episodes of different lengths on any prompt: a prompt of even length ends after the model's first turn, an
    odd one gets a tool turn after every model turn until the turn limit (so ranks finish their episodes at
    different turns)."""

    def __init__(self, **kwargs):
        pass

    def reset(self, row: dict) -> list[dict]:
        self.long = len(row["prompt"][-1]["content"]) % 2 == 1
        return row["prompt"]

    def step(self, messages: list[dict]) -> dict:
        if not self.long:
            return {"messages": [], "reward": 1.0, "done": True}
        return {"messages": [{"role": "tool", "content": "noted"}], "reward": 0.0, "done": False}
