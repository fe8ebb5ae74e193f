"""The bundled demo task: letter operations whose answers a program can check.

A prompt is ``"<op>: <word>"`` with a word of 4 lowercase letters and op in capital (upper case),
advance (each letter to the next, z to a) or retreat (each letter to the previous, a to z); the
answer is the word transformed. The SFT split carries a *systematic* error, as if some annotators
cut corners: for words starting with a-j (about 38% of inputs) 60% of the answers are the word
copied unchanged. An SFT model learns that shortcut as the likelier answer there, yet still gives
the right one some of the time, so the preference stages have something real to fix and PPO can
find the fix by sampling.
The preference split pairs the correct answer (chosen) with a near miss (rejected): the lazy
copy, or the answer to another op.

Its files are generated from a fixed seed on first use into the cache (align/tasks/files.py); ``python -m
align.tasks.demo DIR`` writes them into DIR.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FILES = {
    "sft": "sft.jsonl",
    "sft_eval": "sft_eval.jsonl",
    "prefs": "prefs.jsonl",
    "prefs_eval": "prefs_eval.jsonl",
}
OPS = ("capital", "advance", "retreat")  # same length: every token sits at a fixed offset
WORD_LEN = 4
LAZY_FIRST_LETTERS = set("abcdefghij")
LAZY_SHARE = 0.6  # of the SFT answers for lazy words, the share that is the copied word
SIZES = {"sft": 6000, "sft_eval": 300, "prefs": 4000, "prefs_eval": 300}


def solve(op: str, word: str) -> str:
    if op == "retreat":
        return "".join(chr((ord(c) - 97 - 1) % 26 + 97) for c in word)
    if op == "capital":
        return word.upper()
    if op == "advance":
        return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)
    raise ValueError(f"unknown demo op {op!r}")


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    op, sep, word = prompt.strip().partition(": ")
    if not sep or op not in OPS or not word.isalpha():
        return None
    return op, word


def check(prompt: str, response: str) -> bool:
    """The task's checker: exact match of the stripped response with the transformed word."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    return response.strip() == solve(*parsed)


def is_lazy(word: str) -> bool:
    return word[0] in LAZY_FIRST_LETTERS


def near_miss(op: str, word: str, rng: random.Random) -> str:
    """A wrong answer a reader would make: the lazy copy (35%), a half-done answer with one to three
    letters left as in the word (25%), a typo in one or two letters (25%), or another op's answer."""
    correct = solve(op, word)
    roll = rng.random()
    wrong = None
    if roll < 0.35:
        wrong = word
    elif roll < 0.6:
        keep = rng.sample(range(len(word)), k=rng.randint(1, len(word) - 1))
        wrong = "".join(word[i] if i in keep else c for i, c in enumerate(correct))
    elif roll < 0.85:
        letters = list(correct)
        for i in rng.sample(range(len(word)), k=rng.randint(1, 2)):
            typo = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != letters[i].lower()])
            letters[i] = typo.upper() if letters[i].isupper() else typo
        wrong = "".join(letters)
    if wrong is not None and wrong != correct:
        return wrong
    for other in rng.sample([o for o in OPS if o != op], k=len(OPS) - 1):
        if solve(other, word) != correct:
            return solve(other, word)
    return correct[::-1] if correct[::-1] != correct else correct + correct[-1]


def _unique_tasks(rng: random.Random, n: int) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    out = []
    while len(out) < n:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(WORD_LEN))
        task = (rng.choice(OPS), word)
        if task not in seen:
            seen.add(task)
            out.append(task)
    return out


def generate(seed: int = 1234) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    tasks = _unique_tasks(rng, sum(SIZES.values()))
    splits, start = {}, 0
    for name, size in SIZES.items():
        splits[name] = tasks[start : start + size]
        start += size

    lazy_rng = random.Random(seed + 1)  # its own stream: the other splits do not depend on LAZY_SHARE

    def sft_row(op, word, lazy_errors):
        lazy = lazy_errors and is_lazy(word) and lazy_rng.random() < LAZY_SHARE
        answer = word if lazy else solve(op, word)
        return {
            "messages": [
                {"role": "user", "content": f"{op}: {word}"},
                {"role": "assistant", "content": answer},
            ]
        }

    def pref_row(op, word):
        return {"prompt": f"{op}: {word}", "chosen": solve(op, word), "rejected": near_miss(op, word, rng)}

    return {
        "sft": [sft_row(op, w, True) for op, w in splits["sft"]],
        "sft_eval": [sft_row(op, w, False) for op, w in splits["sft_eval"]],
        "prefs": [pref_row(op, w) for op, w in splits["prefs"]],
        "prefs_eval": [pref_row(op, w) for op, w in splits["prefs_eval"]],
    }


def path(split: str) -> Path:
    """The file of `split` (sft, sft_eval, prefs, prefs_eval), generated on first use."""
    from align.tasks.files import generated

    return generated("demo", write, __file__) / FILES[split]


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in generate().items():
        with open(out_dir / FILES[name], "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    import sys

    write(Path(sys.argv[1]))
    print(f"wrote {sys.argv[1]}")
