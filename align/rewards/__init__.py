"""The reward group (`reward=`): what scores a sampled response in the online stages.

  checker   the data's task checker (data.checker: demo, exact, regex, json): 1 right, 0 wrong (json: the share
            of fields right)
  rm        a reward model: the run's rm stage or reward.model=PATH, normalised with its stored mean/std
  python    reward.fn=module:function, importable from the working directory or PYTHONPATH, called as
            fn(prompts, completions, **fields) -> list[float]: the last user turns, the decoded responses, and
            the data rows' other fields as lists (`reference` among them: the row's answer, or None)
  weighted  reward.weights={checker: 1.0, rm: 0.5, python: 1.0}: the weighted sum of the named components

Each component is logged on its own (reward/<name>). A python function that raises, returns the wrong number
of values or a non-finite one stops the run naming the function and the prompt; with data.on_error=skip the
response is left out of the update instead, and counted (reward/errors).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from align import checkers

log = logging.getLogger("align")
KINDS = ("auto", "checker", "rm", "python", "weighted")
AUTO = {"ppo": "rm", "grpo": "checker"}  # reward=auto per stage
COMPONENTS = ("checker", "rm", "python")


class RewardError(ValueError):
    pass


@dataclass
class Scored:
    total: torch.Tensor  # [N] the reward the update uses
    components: dict[str, torch.Tensor]  # [N] each, unweighted
    valid: torch.Tensor  # [N] bool: False where a function failed and data.on_error=skip left it out
    errors: int = 0


def kind_of(reward_cfg, stage: str) -> str:
    """reward.kind with auto resolved for `stage`."""
    return AUTO.get(stage, "checker") if reward_cfg.kind == "auto" else reward_cfg.kind


def components_of(reward_cfg, stage: str = "grpo") -> dict[str, float]:
    """{component: weight} of a reward config, for `stage`."""
    kind = kind_of(reward_cfg, stage)
    if kind == "weighted":
        weights = dict(reward_cfg.weights or {})
        unknown = [k for k in weights if k not in COMPONENTS]
        if not weights or unknown:
            raise RewardError(f"reward=weighted needs reward.weights naming components among {', '.join(COMPONENTS)}"
                              f" (e.g. reward.weights={{checker:1.0,rm:0.5}}); got {weights or 'none'}")
        return {k: float(v) for k, v in weights.items()}
    if kind not in COMPONENTS:
        raise RewardError(f"reward.kind must be one of {', '.join(KINDS)}, got {reward_cfg.kind!r}")
    return {kind: 1.0}


def load_function(spec: str):
    """`module:function` from the working directory or PYTHONPATH."""
    if not spec or ":" not in spec:
        raise RewardError(f"reward.fn must be module:function (e.g. reward.fn=my_rewards:score), got {spec!r}")
    module_name, name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward.fn={spec}: cannot import {module_name!r} ({e}); put {module_name}.py in the working "
                          "directory or on PYTHONPATH") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward.fn={spec}: {module_name} has no function {name!r}")
    return fn


@dataclass
class PythonReward:
    fn: object
    spec: str
    skip: bool

    def __call__(self, prompts: list[str], responses: list[str], items: list[dict]) -> tuple[list[float], list[bool]]:
        fields = _fields(items)
        try:
            values = list(self.fn(prompts, responses, **fields))
        except Exception as e:  # noqa: BLE001 - the user's function: any failure is reported with its prompt
            if not self.skip:
                raise RewardError(f"reward function {self.spec} raised {type(e).__name__}: {e} on a batch whose first "
                                  f"prompt is {prompts[0]!r}; fix the function, or set data.on_error=skip to leave "
                                  "such responses out of the update") from e
            return self._one_by_one(prompts, responses, items)
        if len(values) != len(prompts):
            raise RewardError(f"reward function {self.spec} returned {len(values)} values for {len(prompts)} "
                              f"completions (first prompt {prompts[0]!r}); it must return one float per completion")
        return self._checked(values, prompts)

    def _one_by_one(self, prompts, responses, items):
        values, ok = [], []
        for i in range(len(prompts)):
            try:
                v = list(self.fn([prompts[i]], [responses[i]], **_fields([items[i]])))[0]
                values.append(float(v))
                ok.append(math.isfinite(float(v)))
            except Exception:  # noqa: BLE001
                values.append(0.0)
                ok.append(False)
        return [v if good else 0.0 for v, good in zip(values, ok)], ok

    def _checked(self, values, prompts):
        out, ok = [], []
        for v, prompt in zip(values, prompts):
            try:
                f = float(v)
            except (TypeError, ValueError):
                f = float("nan")
            if not math.isfinite(f):
                if not self.skip:
                    raise RewardError(f"reward function {self.spec} returned {v!r} for the prompt {prompt!r}; "
                                      "rewards must be finite numbers (or set data.on_error=skip)")
                out.append(0.0)
                ok.append(False)
            else:
                out.append(f)
                ok.append(True)
        return out, ok


def _fields(items: list[dict]) -> dict[str, list]:
    rows = [{"reference": it.get("reference"), **json.loads(it.get("fields") or "{}")} for it in items]
    keys = sorted({k for r in rows for k in r})
    return {k: [r.get(k) for r in rows] for k in keys}


@dataclass
class Reward:
    """Scores a batch of sampled responses with the configured components."""

    weights: dict[str, float]
    checker: object = None
    python: PythonReward | None = None
    rm_score: object = None  # fn(batch) -> [N] normalised RM scores
    names: list[str] = field(default_factory=list)

    def __call__(self, batch, responses: list[str], items: list[dict]) -> Scored:
        n = len(responses)
        components, valid, errors = {}, torch.ones(n, dtype=torch.bool), 0
        prompts = [it["prompt_text"] for it in items]
        if self.checker is not None:
            components["checker"] = torch.tensor([float(self.checker(p, r, it.get("reference")))
                                                  for p, r, it in zip(prompts, responses, items)])
        if "python" in self.weights:
            values, ok = self.python(prompts, responses, items)
            components["python"] = torch.tensor(values, dtype=torch.float32)
            ok = torch.tensor(ok, dtype=torch.bool)
            errors += int((~ok).sum())
            valid &= ok
        if "rm" in self.weights:
            components["rm"] = self.rm_score(batch).float().cpu()
        total = torch.zeros(n)
        for name, w in self.weights.items():
            total = total + w * components[name]
        return Scored(total, components, valid, errors)


def build(reward_cfg, data_cfg, rm_score=None, stage: str = "grpo") -> Reward:
    """The Reward of a config; `rm_score` scores a rollout batch with the loaded reward model (when rm is used).
    The data's checker, when it has one, is always evaluated (logged as reward/checker) even when not rewarded."""
    weights = components_of(reward_cfg, stage)
    checker = checkers.from_config(data_cfg)
    if "checker" in weights and checker is None:
        raise RewardError(f"reward=checker needs a task checker, and data.checker={data_cfg.checker} names none for "
                          f"{data_cfg.train}: set data.checker (exact, regex, json) for your data, or use "
                          "reward=rm (a trained reward model) or reward=python reward.fn=module:function")
    python = None
    if "python" in weights:
        python = PythonReward(load_function(reward_cfg.fn), reward_cfg.fn, data_cfg.on_error == "skip")
    if "rm" in weights and rm_score is None:
        raise RewardError("reward=rm needs a reward model (the run's rm stage, or reward.model=PATH)")
    return Reward(weights, checker, python, rm_score, list(weights))
