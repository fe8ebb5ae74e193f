"""Tasks of reasoning-gym (`pip install "align[gym]"`) as data and reward: `data=gym:<task>` (or
`data.train=gym:<task>`), the task's own options as `data.gym.<key>=<value>`.

reasoning-gym generates each task's questions from a seed and checks an answer with the task's `score_answer`.
align writes the splits the zoo tasks have, offline and from fixed seeds, into the cache (align/tasks/files.py; the
folder is keyed by the task, its options, reasoning-gym's version and this file):

  sft, sft_eval     {"messages": [user: the question, assistant: the task's answer]}
  prefs, prefs_eval {"prompt", "chosen": the task's answer, "rejected": a near miss}: a number moved by 1, else
                    by 10 (never below 0 from a non-negative answer), two neighbouring characters swapped, or
                    failing those another question's answer; only a near miss the task's own score_answer scores
                    below the answer is kept

The eval splits are drawn first and the training splits never ask their questions. The checker
(`data.checker=auto` picks it) is the task's score_answer on the row's generated entry, so a task whose scoring
reads the entry's metadata scores as reasoning-gym does; a prompt that is not one of the task's questions is
scored against the row's reference.
Unlike the zoo, the SFT split carries no deliberate error: what the preference and RL stages fix is what SFT did
not learn.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from align.config.rules import Unsupported

PREFIX = "gym:"
SEED = 20250
SPLITS = {"sft": 10000, "prefs": 2000, "sft_eval": 300, "prefs_eval": 300}  # rows per split, as the zoo's
# reasoning-gym makes question k of a dataset seeded s from Random(s + k), so two splits whose seeds differ by less
# than a split's dataset (2n questions) share questions position by position: seeds SEED * 10 + i made the prefs
# split the sft split's questions shifted by one. Split i starts STRIDE further on, past every other split's stream.
STRIDE = 10**6


def split_seed(split: str) -> int:
    """The generation seed of `split`: one stream per split, as the zoo's, no two sharing a question seed."""
    return SEED * 10 + list(SPLITS).index(split) * STRIDE


INSTALL = 'pip install "align[gym]" (reasoning-gym)'


class GymError(Unsupported):
    """A task that reasoning-gym does not have, options it refuses, or reasoning-gym not installed (exit code 2)."""


def _library():
    try:
        import reasoning_gym
    except ImportError as e:
        raise GymError(f"data=gym:<task> reads reasoning-gym, which is not installed: {INSTALL}") from e
    return reasoning_gym


def task_names() -> list[str]:
    return sorted(_library().factory.DATASETS)


def options(data_cfg) -> dict:
    """The task's options from `data.gym` (plain values), without the keys align sets itself."""
    from omegaconf import OmegaConf

    raw = data_cfg.get("gym") or {}
    found = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else dict(raw)
    for key in ("seed", "size"):
        if key in found:
            raise GymError(f"data.gym.{key} is set by align (every split has its own seed and size: "
                           f"align/tasks/gym.py); remove data.gym.{key}")
    return found


def dataset(task: str, opts: dict, size: int, seed: int):
    """reasoning-gym's dataset of `task` with `opts`, its errors turned into one that names the fix."""
    rg = _library()
    if task not in rg.factory.DATASETS:
        close = [n for n in rg.factory.DATASETS if task.split("_")[0] in n][:8]
        raise GymError(f"data=gym:{task}: reasoning-gym has no task {task!r}"
                       + (f"; similar: {', '.join(close)}" if close else "") + " (the list: reasoning_gym.factory"
                       ".DATASETS)")
    try:
        return rg.create_dataset(task, size=size, seed=seed, **opts)
    except (TypeError, AssertionError, ValueError) as e:
        keys = ", ".join(f.name for f in _fields(rg.factory.DATASETS[task][1]) if f.name not in ("seed", "size"))
        raise GymError(f"data=gym:{task} with data.gym={opts}: reasoning-gym refused the options ({e}); the task's "
                       f"options are {keys}") from e


def _fields(config_class):
    import dataclasses

    return dataclasses.fields(config_class) if dataclasses.is_dataclass(config_class) else ()


def version_key(task: str, opts: dict) -> str:
    """What the task's files depend on besides this file: the task, its options and reasoning-gym's version."""
    text = json.dumps({"task": task, "options": opts, "reasoning_gym": metadata.version("reasoning_gym")},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def path(task: str, opts: dict, split: str) -> Path:
    from align.tasks.files import generated

    dataset(task, opts, 1, 0)  # a bad task or option fails here, before anything is written
    name = f"gym-{task}-{version_key(task, opts)}"
    return generated(name, lambda folder: write(task, opts, folder), __file__) / f"{split}.jsonl"


def _user(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _near_misses(answer: str, rng: random.Random) -> list[str]:
    """Candidates for a plausible wrong answer, in order of preference."""
    out = []
    if re.fullmatch(r"-?\d+", answer.strip()):  # off by one first, then by ten; a count stays non-negative
        n = int(answer)
        out += [str(n + d) for d in [*rng.sample((-1, 1), 2), *rng.sample((-10, 10), 2)] if n < 0 or n + d >= 0]
    chars = list(answer)
    spots = [i for i in range(len(chars) - 1) if chars[i] != chars[i + 1]]
    rng.shuffle(spots)
    for i in spots[:3]:
        swapped = chars.copy()
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        out.append("".join(swapped))
    return out


def rejected_for(ds, entry: dict, others: list[dict], rng: random.Random) -> str | None:
    """A near miss the task scores below its answer (None when none is found)."""
    answer = str(entry["answer"])
    best = ds.score_answer(answer, entry)
    candidates = _near_misses(answer, rng) + [str(o["answer"]) for o in rng.sample(others, min(8, len(others)))]
    for c in candidates:
        if c != answer and ds.score_answer(c, entry) < best:
            return c
    return None


def write(task: str, opts: dict, folder: Path) -> None:
    """Every split of `task` into `folder`. The held-out splits are drawn first and the training splits skip their
    questions, so a task with few distinct questions still has held-out ones."""
    held_out: set[str] = set()
    order = sorted(SPLITS, key=lambda s: not s.endswith("_eval"))  # sft_eval, prefs_eval, then sft, prefs
    for split in order:
        skip = None if split.endswith("_eval") else held_out
        rows = _split_rows(task, opts, split, SPLITS[split], split_seed(split), skip)
        if not rows:
            raise GymError(f"data=gym:{task} with data.gym={opts}: no {split} row could be made (every question "
                           "is held out, or no answer has a near miss the task scores lower): widen the task's "
                           "options")
        if split.endswith("_eval"):
            held_out |= {_question(r) for r in rows}
        target = folder / f"{split}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _question(row: dict) -> str:
    return (row["messages"] if "messages" in row else row["prompt"])[0]["content"]


def _split_rows(task: str, opts: dict, split: str, n: int, seed: int, skip: set[str] | None) -> list[dict]:
    """Up to n rows of one split from a dataset of 2n questions, leaving out the questions in `skip`."""
    ds = dataset(task, opts, 2 * n, seed)
    entries = [e for e in ds if not skip or e["question"] not in skip]
    rng, out = random.Random(seed), []
    for entry in entries:
        if len(out) == n:
            break
        prompt = _user(entry["question"])
        if split.startswith("prefs"):
            rejected = rejected_for(ds, entry, entries, rng)
            if rejected is not None:
                out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": str(entry["answer"])}],
                            "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            out.append({"messages": [*prompt, {"role": "assistant", "content": str(entry["answer"])}]})
    return out


@lru_cache(maxsize=8)
def _scorer(task: str, opts_json: str):
    """(dataset, question -> entry) over every split's questions, regenerated from the same seeds."""
    opts = json.loads(opts_json)
    entries, ds = {}, None
    for split, n in SPLITS.items():
        ds = dataset(task, opts, 2 * n, split_seed(split))
        for e in ds:
            entries.setdefault(e["question"], e)
    return ds, entries


def checker(task: str, opts: dict):
    """The task's score_answer as an align checker (prompt, response, reference) -> score in [0, 1]."""
    def score(prompt: str, response: str, reference: str | None) -> float:
        ds, entries = _scorer(task, json.dumps(opts, sort_keys=True))
        entry = entries.get(prompt)
        if entry is None:
            if reference is None:
                raise ValueError(f"data.checker=gym scores against the question's entry or the row's reference; "
                                 f"this prompt is neither one of gym:{task}'s questions nor has a reference")
            entry = {"question": prompt, "answer": reference, "metadata": {}}
        return float(ds.score_answer(response, entry) or 0.0)

    return score
