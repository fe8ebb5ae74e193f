"""The reward group (`reward=`): what scores a sampled response in the online stages.

  checker   the data's task checker (data.checker: demo, exact, regex, json): 1 right, 0 wrong (json: the share
            of fields right)
  rm        a reward model: the run's rm stage or reward.model=PATH, normalised with its stored mean/std
  python    reward.fn=module:function, importable from the working directory or PYTHONPATH, called as
            fn(prompts, completions, **fields) -> list[float]: the last user turns, the decoded responses, and
            the data rows' other fields as lists (`reference` among them: the row's answer, or None)
  env       the environment's reward at the end of each episode (env=python, stage=grpo): what reward=auto means
            there; the other components then score the episode's last model turn
  weighted  reward.weights={checker: 1.0, rm: 0.5, python: 1.0, env: 1.0}: the weighted sum of the named components

Each component is logged on its own (reward/<name>). A python function that raises, returns the wrong number
of values or a non-finite one stops the run naming the function and the prompt; with data.on_error=skip the
response is left out of the update instead, and counted (reward/errors).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from align.config.schema import REWARD_COMPONENTS as COMPONENTS
from align.config.schema import REWARD_KINDS as KINDS
from align.data.prompts import Prompt
from align.run import tracking
from align.tasks import checkers

log = logging.getLogger("align")


class RewardError(ValueError):
    pass


@dataclass
class Scored:
    total: torch.Tensor  # [N] the reward the update uses
    components: dict[str, torch.Tensor]  # [N] each, unweighted
    valid: torch.Tensor  # [N] bool: False where a function failed and data.on_error=skip left it out
    errors: int = 0


def kind_of(reward_cfg, auto: str = "checker") -> str:
    """reward.kind with auto resolved to `auto` (the stage's StageSpec.default_reward)."""
    return auto if reward_cfg.kind == "auto" else reward_cfg.kind


def components_of(reward_cfg, auto: str = "checker") -> dict[str, float]:
    """{component: weight} of a reward config; `auto`: what reward.kind=auto means for the stage."""
    kind = kind_of(reward_cfg, auto)
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
    from align.config.paths import user_object

    try:
        return user_object(spec, "reward.fn", "my_rewards:score", "function")
    except ValueError as e:
        raise RewardError(str(e)) from e.__cause__


@dataclass
class PythonReward:
    fn: object
    spec: str
    skip: bool

    def __call__(self, batch, responses: list[str], prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """A component of the Reward: the function's values and which of them are valid (finite, no exception)."""
        values, ok = self._values(prompts, responses)
        return torch.tensor(values, dtype=torch.float32), torch.tensor(ok, dtype=torch.bool)

    def _values(self, prompts: list[Prompt], responses: list[str]) -> tuple[list[float], list[bool]]:
        texts, fields = [p.text for p in prompts], _fields(prompts)
        try:
            values = list(self.fn(texts, responses, **fields))
        except Exception as e:  # noqa: BLE001 - the user's function: any failure is reported with its prompt
            if not self.skip:
                raise RewardError(f"reward function {self.spec} raised {type(e).__name__}: {e} on a batch whose first "
                                  f"prompt is {texts[0]!r}; fix the function, or set data.on_error=skip to leave "
                                  "such responses out of the update") from e
            return self._one_by_one(prompts, responses)
        if len(values) != len(prompts):
            raise RewardError(f"reward function {self.spec} returned {len(values)} values for {len(prompts)} "
                              f"completions (first prompt {texts[0]!r}); it must return one float per completion")
        return self._checked(values, texts)

    def _one_by_one(self, prompts: list[Prompt], responses):
        values, ok = [], []
        for i in range(len(prompts)):
            try:
                v = list(self.fn([prompts[i].text], [responses[i]], **_fields([prompts[i]])))[0]
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


def _fields(prompts: list[Prompt]) -> dict[str, list]:
    rows = [{"reference": p.reference, **json.loads(p.fields or "{}")} for p in prompts]
    keys = sorted({k for r in rows for k in r})
    return {k: [r.get(k) for r in rows] for k in keys}


# a component: fn(batch, responses, prompts) -> (scores [N] float32 on the CPU, valid [N] bool or None: all valid)
Component = Callable[[object, list[str], list[Prompt]], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class Reward:
    """The reward group, built once per stage: named components, each a callable, and the weights of those that are
    rewarded. Every component is evaluated and logged (reward/<name>); the data's checker is one even when it is not
    rewarded."""

    weights: dict[str, float]
    components: dict[str, Component]
    checker: object = None  # the data's task checker (the loops' held-out accuracy), or None

    def bind_rm(self, rm_score) -> None:
        """The rm component scores with `rm_score(batch)`, the loaded reward model (the loop binds it)."""
        if "rm" not in self.weights:  # not rewarded: the reward model is not run for the reward
            return
        self.components["rm"] = lambda batch, responses, prompts: (rm_score(batch).float().cpu(), None)

    def __call__(self, batch, responses: list[str], prompts: list[Prompt],
                 given: dict[str, tuple] | None = None) -> Scored:
        """Every component's scores of the responses, and the weighted total; `given`: components already scored
        elsewhere, {name: (scores, valid)} (the environment's rewards of a step's episodes)."""
        n = len(responses)
        scores, valid, errors = {}, torch.ones(n, dtype=torch.bool), 0
        results = [(name, c(batch, responses, prompts)) for name, c in self.components.items()]
        for name, (scores[name], ok) in [*results, *(given or {}).items()]:
            if ok is not None:
                errors += int((~ok).sum())
                valid &= ok
        total = torch.zeros(n)
        for name, w in self.weights.items():
            total = total + w * scores[name]
        return Scored(total, scores, valid, errors)


def build(reward_cfg, data_cfg, rm_score=None, auto: str = "checker", env: bool = False) -> Reward:
    """The Reward of a config; `rm_score` scores a rollout batch with the loaded reward model (when rm is used;
    the loop may bind it later with Reward.bind_rm); `env`: the stage runs episodes, whose environment gives the env
    component at each call. The data's checker, when it has one, is always evaluated (logged as reward/checker) even
    when not rewarded."""
    weights = components_of(reward_cfg, auto)
    if "env" in weights and not env:
        raise RewardError("reward=env (or an env weight) scores with an environment's reward: set env=python "
                          "env.cls=module:Class, or choose another reward")
    checker = checkers.from_config(data_cfg)
    if "checker" in weights and checker is None:
        raise RewardError(f"reward=checker needs a task checker, and data.checker={data_cfg.checker} names none for "
                          f"{data_cfg.train}: set data.checker (exact, regex, json) for your data, or use "
                          "reward=rm (a trained reward model) or reward=python reward.fn=module:function")
    if "rm" in weights and rm_score is None:
        raise RewardError("reward=rm needs a reward model (the run's rm stage, or reward.model=PATH)")
    components: dict[str, Component] = {}
    if checker is not None:
        components["checker"] = lambda batch, responses, prompts: (checkers.score_each(
            checker, [p.text for p in prompts], responses, [p.reference for p in prompts]), None)
    if "python" in weights:
        components["python"] = PythonReward(load_function(reward_cfg.fn), reward_cfg.fn, data_cfg.on_error == "skip")
    reward = Reward(weights, components, checker)
    if "rm" in weights:
        reward.bind_rm(rm_score)
    return reward


def at_chance(parent, stage: str) -> list[dict]:
    """[a warning] when the reward model ranks its held-out pairs no better than a coin flip would, as its stage
    recorded it: accuracy under 0.5 + 1/sqrt(n) on n pairs (two standard errors of chance); [] otherwise, when
    there is no reward model (None), and when it recorded no accuracy (a model folder named by path). A policy
    trained on such a model optimises noise."""
    stats = parent.info.get("metrics", {}) if parent is not None else {}
    accuracy, pairs = stats.get("eval_accuracy"), stats.get("data/eval_rows")
    bound = 0.5 + 1 / math.sqrt(pairs) if pairs else None
    if accuracy is None or bound is None or accuracy >= bound:
        return []
    message = (f"the reward model {parent.path} ranks {accuracy:.1%} of its {pairs} held-out pairs right "
               f"(eval_accuracy in its stage.json), within chance (under {bound:.1%}): "
               f"{stage} would optimise noise. Check that its chosen answers differ from the rejected ones in "
               "a way the model can see, train it longer, or reward with a checker (reward=checker)")
    if tracking.is_main_process():
        log.warning("%s: %s", stage, message)
    return [{"kind": "reward_model_at_chance", "step": 0, "message": message}]


def rm_statistics(parent) -> tuple[float | None, float | None]:
    """(mean, std) of the reward model's scores that its stage recorded, for normalising them; (None, None), with
    a warning, when it recorded none (its scores are then used raw)."""
    stats = parent.info.get("metrics", {})
    mean, std = stats.get("reward_mean"), stats.get("reward_std")
    if mean is None or std is None:
        log.warning("%s records no reward_mean/reward_std; its scores are used raw", parent.path)
        return None, None
    return mean, std
