"""Task checkers: programs that say whether a response answers its prompt, configured per data set.

`data.checker` picks one (default `auto`: demo on the bundled data, a zoo task's own for `data=task/<name>`, the task's
score_answer for `data=gym:<task>`, none otherwise):
  demo   the bundled letter-operation task (align/tasks/demo.py)
  exact  the stripped response equals the row's reference answer
  regex  the response matches `data.checker_pattern` (re.fullmatch, after stripping)
  json   the response is a JSON object; score = share of the reference object's fields it matches
         (a response that is not valid JSON scores 0)
  gym    a reasoning-gym task's own score_answer (data=gym:<task>; align/tasks/gym.py)
Each returns a score in [0, 1] per response; the reported accuracy is their mean.
"""

from __future__ import annotations

import json
import re
from typing import Callable

from align.config.schema import CHECKERS
from align.tasks import gym

Checker = Callable[[str, str, "str | None"], float]


def _needs_reference(name: str, reference: str | None) -> str:
    if reference is None:
        raise ValueError(f"data.checker={name} compares with the row's reference answer, but this row has none: "
                         "use eval rows with an answer (SFT format or a preference pair's chosen)")
    return reference


def exact(prompt: str, response: str, reference: str | None) -> float:
    return float(response.strip() == _needs_reference("exact", reference).strip())


def json_fields(prompt: str, response: str, reference: str | None) -> float:
    want = json.loads(_needs_reference("json", reference))
    try:
        got = json.loads(response.strip())
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(want, dict):
        return float(got == want)
    if not isinstance(got, dict) or not want:
        return float(got == want)
    return sum(1 for k, v in want.items() if k in got and got[k] == v) / len(want)


def demo(prompt: str, response: str, reference: str | None) -> float:
    from align.tasks.demo import check

    return float(check(prompt, response))


def from_config(data_cfg) -> Checker | None:
    """The checker `data.checker` names; `auto` is the demo checker on the bundled data, else none."""
    name = data_cfg.get("checker")
    if name == "auto":
        train = str(data_cfg.train)
        if train == "demo":
            name = "demo"
        elif train.startswith("task:"):
            from align.tasks.zoo import CHECKERS

            name = CHECKERS.get(train[len("task:"):])
        else:
            name = "gym" if train.startswith(gym.PREFIX) else None
    if name == "gym":
        train = str(data_cfg.train)
        if not train.startswith(gym.PREFIX):
            raise ValueError(f"data.checker=gym scores a reasoning-gym task's answers; data.train={train} is not one "
                             "(data=gym:<task>)")
        return gym.checker(train[len(gym.PREFIX):], gym.options(data_cfg))
    return build(name, data_cfg.get("checker_pattern"))


def build(name: str | None, pattern: str | None = None) -> Checker | None:
    """The checker named `name` (None when unset)."""
    if not name or name == "none":
        return None
    if name == "regex":
        if not pattern:
            raise ValueError("data.checker=regex needs data.checker_pattern (a Python regular expression)")
        compiled = re.compile(pattern, re.DOTALL)
        return lambda prompt, response, reference: float(compiled.fullmatch(response.strip()) is not None)
    table = {"demo": demo, "exact": exact, "json": json_fields}
    if name not in table:
        raise ValueError(f"data.checker must be one of {', '.join(CHECKERS)}, got {name!r}")
    return table[name]


def accuracy(checker: Checker, prompts: list[str], responses: list[str], references: list) -> float:
    if not prompts:
        return float("nan")
    return sum(_scores(checker, prompts, responses, references)) / len(prompts)


def score_each(checker: Checker, prompts: list[str], responses: list[str], references: list):
    """The checker's score of each response, as a float tensor [N]."""
    import torch

    return torch.tensor(_scores(checker, prompts, responses, references))


def _scores(checker: Checker, prompts: list[str], responses: list[str], references: list) -> list[float]:
    return [float(checker(p, r, ref)) for p, r, ref in zip(prompts, responses, references)]
