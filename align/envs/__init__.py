"""Environments for multi-turn episodes (`env=python env.cls=module:Class`, stage=grpo): the interface a user's class
implements, its loading, and the checks of what it returns. docs/environments.md is the reference.

    class Calculator:
        def __init__(self, **kwargs): ...            # env.kwargs; one instance per episode
        def reset(self, row: dict) -> list[dict]: ...
            # the opening messages of the episode, from the data row: {"prompt": [messages], "reference": ...,
            # and the row's other fields}
        def step(self, messages: list[dict]) -> dict: ...
            # the conversation so far, the last message the model's turn ({"role": "assistant", "content": text});
            # returns {"messages": [new turns, e.g. {"role": "tool", "content": "42"}], "reward": float | None,
            #          "done": bool, "info": {name: number} (optional: logged as env/<name>, the mean over calls)}

An episode ends when `done` is true, when `step` gives no new turn (the model made no call), when the model's turn
did not end (it ran out of tokens), or at stage.max_turns / stage.max_episode_tokens. Its reward is the one the last
`step` returned (None counts 0).
"""

from __future__ import annotations

import importlib.util
import math
import os

ENV_ROLES = ("tool", "user")  # the roles of the turns an environment may add
OPENING_ROLES = ("system", "user", "assistant", "tool")


def selected(cfg) -> bool:
    """The run's config picks an environment (env=python): its stages run episodes against it."""
    return "env" in cfg and cfg.env.kind != "none"


class EnvError(RuntimeError):
    """An environment failed (raised, timed out, returned something align cannot use): the message names the env,
    the data row and the turn."""


def load_class(spec: str | None):
    """`module:Class` from the working directory or PYTHONPATH, with reset and step methods."""
    from align.config.paths import user_object

    try:
        cls = user_object(spec, "env.cls", "my_envs:Calculator", "class")
    except ValueError as e:
        if not spec or ":" not in spec:
            raise EnvError(f"env=python needs env.cls=module:Class (e.g. env.cls=my_envs:Calculator), got {spec!r}")
        raise EnvError(str(e)) from e.__cause__
    name = spec.split(":", 1)[1]
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise EnvError(f"env.cls={spec}: {name} has no {' or '.join(missing)} method; an environment implements "
                       "reset(row) -> messages and step(messages) -> {messages, reward, done}")
    return cls


def module_file(spec: str | None) -> str | None:
    """The file that defines env.cls's module (its content is part of the stage's identity), None when not found."""
    from align.config.paths import working_directory_on_path

    if not spec or ":" not in spec:
        return None
    working_directory_on_path()
    try:
        found = importlib.util.find_spec(spec.split(":", 1)[0])
    except (ImportError, ValueError):
        return None
    return found.origin if found is not None and found.origin and os.path.isfile(found.origin) else None


def checked_messages(value, roles: tuple, what: str) -> list[dict]:
    """`value` as a list of {"role", "content"} turns with roles among `roles` (extra keys such as tool_call_id or
    name kept), or ValueError saying what is wrong."""
    if not isinstance(value, list):
        raise ValueError(f"{what} is {type(value).__name__}, expected a list of {{'role': ..., 'content': ...}} turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ValueError(f"{what}[{i}] is {type(turn).__name__}, expected a dict with role and content")
        role, content = turn.get("role"), turn.get("content")
        if role not in roles:
            raise ValueError(f"{what}[{i}] has role {role!r}; an environment's turns take one of {', '.join(roles)}")
        if not isinstance(content, str):
            raise ValueError(f"{what}[{i}].content is {type(content).__name__}, expected a string")
        out.append(dict(turn))
    return out


def checked_step(value) -> tuple[list[dict], float | None, bool, dict[str, float]]:
    """(new turns, reward, done, info) of what step() returned, or ValueError saying what is wrong."""
    if not isinstance(value, dict):
        raise ValueError(f"step() returned {type(value).__name__}, expected a dict "
                         "{'messages': [...], 'reward': float | None, 'done': bool}")
    unknown = sorted(set(value) - {"messages", "reward", "done", "info"})
    if unknown:
        raise ValueError(f"step() returned unknown keys {unknown}; it returns messages, reward, done and info")
    turns = checked_messages(value.get("messages") or [], ENV_ROLES, "step()['messages']")
    reward = value.get("reward")
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(float(reward)):
            raise ValueError(f"step() returned reward {reward!r}; a reward is a finite number or None")
        reward = float(reward)
    done = value.get("done", False)
    if not isinstance(done, bool):
        raise ValueError(f"step() returned done={done!r}; done is True or False")
    info = value.get("info") or {}
    if not isinstance(info, dict) or not all(isinstance(k, str) and _finite(v) for k, v in info.items()):
        raise ValueError(f"step() returned info={info!r}; info maps names to finite numbers")
    return turns, reward, done, {k: float(v) for k, v in info.items()}


def _finite(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
