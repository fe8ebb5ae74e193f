"""The task zoo: built-in verifiable tasks besides the demo, each different in kind, selected with
`data=task/<name>` (conf/data/task/<name>.yaml). Like the demo, every SFT split carries a *systematic* error (as
if some annotators cut corners on one kind of input), so the preference stages have something real to fix;
the preference pairs put the right answer (chosen) against a plausible near miss (rejected); the eval splits
are correct; a checker (`data.checker`) scores answers against the row's reference.

  arith   two-digit addition, "add: 47+86" -> "133"; error: the carry out of the ones digit dropped
  sort    sort and deduplicate letters, "sort: d b a d c" -> "a b c d"; error: duplicates kept
  json    fields of a sentence as JSON, -> {"name": "Ana", "age": 31, "city": "Lima"}; error: age quoted as a
          string (the json checker gives such an answer 2/3)
  recall  two turns: "remember: kqdm" / "ok" / "reverse it" -> "mdqk"; error: the word not reversed
  calc    three-digit subtraction with a calculator tool (align/tasks/calc.py): "subtract: 347-829" -> a call
          "calc(347-829)", the tool's "-482", the answer "-482"; error: the numbers swapped in the call when the
          first is below 500. Its environment is align.tasks.calc:Calculator (recipe=agent)

Each task's files are generated from fixed seeds on first use into the cache (align/tasks/files.py);
`python -m align.tasks.zoo DIR` writes every task's into DIR/<name>/.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

SIZES = {"sft": 10000, "prefs": 2000, "sft_eval": 300, "prefs_eval": 300}  # rows per split (docs/quality.md)
ERROR_SHARE = 0.6  # of the SFT answers for the inputs the error pattern applies to, the share that carry it
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMES = ("Ana", "Ben", "Caro", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lea", "Milo", "Nia")
CITIES = ("Lima", "Oslo", "Rome", "Kyiv", "Doha", "Baku", "Riga", "Bern", "Lome", "Suva", "Apia", "Male")


class Example:
    """One input: its prompt turns, the right answer, the erroneous one (or None when the error does not
    apply), and a near miss for the rejected side of a pair. An answer is a string (one assistant turn) or the
    turns of a transcript (a tool's task: the calls, the tool's turns, the final answer)."""

    def __init__(self, turns: list[dict], right, wrong, near):
        self.turns, self.right, self.wrong, self.near = turns, right, wrong, near


def answer_turns(answer) -> list[dict]:
    return answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


ARITH_OPERANDS = (10, 99)  # both ends included; two digits: three-digit sums were beyond the tiny model's SFT


def arith_prompt(a: int, b: int) -> str:
    return f"add: {a}+{b}"


def arith(rng: random.Random) -> Example:
    a, b = rng.randint(*ARITH_OPERANDS), rng.randint(*ARITH_OPERANDS)
    right = str(a + b)
    carry = (a % 10) + (b % 10) >= 10
    wrong = str(a + b - 10) if carry else None  # the ones digit right, its carry into the tens lost
    near = wrong or str(a + b + rng.choice((-1, 1, 10, -10)))
    return Example(_user(arith_prompt(a, b)), right, wrong, near)


def sort(rng: random.Random) -> Example:
    items = [rng.choice(LETTERS[:8]) for _ in range(rng.randint(4, 6))]
    right = " ".join(sorted(set(items)))
    wrong = " ".join(sorted(items)) if len(set(items)) < len(items) else None
    if wrong:
        near = wrong
    else:
        s = sorted(set(items))
        i = rng.randrange(len(s) - 1)
        s[i], s[i + 1] = s[i + 1], s[i]
        near = " ".join(s)
    return Example(_user(f"sort: {' '.join(items)}"), right, wrong, near)


def json_fields(rng: random.Random) -> Example:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    sentence = rng.choice(("{n} is {a} and lives in {c}.", "{n} lives in {c} and is {a}."))
    record = {"name": name, "age": age, "city": city}
    right = json.dumps(record)
    wrong = json.dumps({**record, "age": str(age)}) if age < 50 else None  # the younger half: age quoted
    near = wrong or json.dumps({**record, "city": rng.choice([c for c in CITIES if c != city])})
    return Example(_user("extract: " + sentence.format(n=name, a=age, c=city)), right, wrong, near)


def recall(rng: random.Random) -> Example:
    word = "".join(rng.choice(LETTERS) for _ in range(4))
    op = rng.choice(("reverse it", "repeat it", "capitalise it"))
    right = {"reverse it": word[::-1], "repeat it": word, "capitalise it": word.upper()}[op]
    wrong = word if op == "reverse it" and word != right else None  # the second turn's instruction ignored
    near = wrong or next(c for c in (word[::-1], word.upper(), word + word) if c != right)
    turns = [{"role": "user", "content": f"remember: {word}"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": op}]
    return Example(turns, right, wrong, near)


def calc(rng: random.Random) -> Example:
    from align.tasks import calc as calc_task

    return Example(*calc_task.example(rng))


TASKS: dict[str, Callable[[random.Random], Example]] = {"arith": arith, "sort": sort, "json": json_fields,
                                                         "recall": recall, "calc": calc}
CHECKERS = {"arith": "exact", "sort": "exact", "json": "json", "recall": "exact", "calc": "exact"}
SEEDS = {"arith": 101, "sort": 202, "json": 303, "recall": 404, "calc": 505}


def path(task: str, split: str) -> Path:
    if task not in TASKS:
        raise ValueError(f"no built-in task {task!r}; the tasks are {', '.join(TASKS)}")
    from align.tasks import calc as calc_task
    from align.tasks.files import generated

    sources = (__file__, calc_task.__file__) if task == "calc" else (__file__,)
    return generated(task, lambda folder: write(task, folder), *sources) / f"{split}.jsonl"


def rows(task: str, split: str, n: int, rng: random.Random, unseen: set[str] | None = None) -> list[dict]:
    """n rows of one split; with `unseen`, only prompts not in it (the held-out splits skip the training prompts)."""
    make, out = TASKS[task], []
    while len(out) < n:
        ex = make(rng)
        if unseen is not None and _key(ex.turns) in unseen:
            continue
        if split.startswith("prefs"):
            out.append({"prompt": ex.turns, "chosen": answer_turns(ex.right), "rejected": answer_turns(ex.near)})
        else:
            answer = ex.wrong if (split == "sft" and ex.wrong and rng.random() < ERROR_SHARE) else ex.right
            out.append({"messages": [*ex.turns, *answer_turns(answer)]})
    return out


def _key(turns: list[dict]) -> str:
    return json.dumps(turns, sort_keys=True)


def prompt_turns(row: dict) -> list[dict]:
    """A row's prompt: a pair's, or an SFT row's turns up to its last user turn (a tool transcript's answer, its calls
    and the tool's turns, comes after it)."""
    if "prompt" in row:
        return row["prompt"]
    messages = row["messages"]
    return messages[: max(i for i, m in enumerate(messages) if m["role"] == "user") + 1]


def write(task: str, folder: Path) -> None:
    """Every split of `task` into `folder`, from the task's fixed seeds."""
    seen: set[str] = set()
    for i, (split, n) in enumerate(SIZES.items()):  # the training splits come first: the eval splits avoid them
        rng = random.Random(SEEDS[task] * 10 + i)  # one stream per split: resizing one leaves the others as they are
        held_out = split.endswith("_eval")
        out = rows(task, split, n, rng, unseen=seen if held_out else None)
        if not held_out:
            seen |= {_key(prompt_turns(r)) for r in out}
        target = folder / f"{split}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(r) + "\n" for r in out))


if __name__ == "__main__":
    import sys

    for name in TASKS:
        write(name, Path(sys.argv[1]) / name)
        print(f"wrote {Path(sys.argv[1]) / name}")
