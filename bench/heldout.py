"""Every prompt of a zoo task that its training splits never ask, with its right answer: a held-out set as large as
the task allows, for differences of a few answers that 256 sampled prompts cannot separate; and, for the runs of
a bench/quality.py root, which prompts each policy and its SFT answer right, paired (docs/quality.md, "Sparse
reward signal").

    python bench/heldout.py write arith /tmp/arith_heldout.jsonl
    python bench/quality.py --tasks arith ... --override data.eval=/tmp/arith_heldout.jsonl --override eval.prompts=0
    python bench/heldout.py compare /tmp/arith_heldout.jsonl ROOT      # after it: ROOT is quality.py's --root

Only arith is enumerable (two-digit a + b: 8,100 prompts); the file holds SFT rows (`messages`), in a fixed order.
`compare` answers greedily with plain transformers (each run's saved `sft/model` and `<stage>/model`, the chat
template the model carries), checks its counts against the eval stage's, and prints per run the prompts only SFT
answers right, only the policy does, and McNemar's exact two-sided p of that split."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from align.tasks import checkers, zoo  # noqa: E402

TRAINING_SPLITS = ("sft", "prefs")


def asked(task: str) -> set[str]:
    """The prompts (their text) that the task's training splits ask."""
    out = set()
    for split in TRAINING_SPLITS:
        for line in zoo.path(task, split).read_text().splitlines():
            out.add(zoo.prompt_turns(json.loads(line))[-1]["content"])
    return out


def arith_unseen() -> list[dict]:
    seen = asked("arith")
    rows = []
    low, high = zoo.ARITH_OPERANDS
    for a in range(low, high + 1):
        for b in range(low, high + 1):
            prompt = zoo.arith_prompt(a, b)
            if prompt not in seen:
                rows.append({"messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": str(a + b)}]})
    return rows


def right_answers(model_dir: Path, rows: list[dict], batch: int = 128) -> list[bool]:
    """Whether the model's greedy answer to each row's prompt passes the task's checker (exact) against the row's
    answer, as in the eval stage."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        texts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
                 for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            done = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        for row, answer in zip(chunk, done[:, enc["input_ids"].shape[1] :]):
            text = tokenizer.decode(answer, skip_special_tokens=True)
            out.append(checkers.exact(row["messages"][0]["content"], text, row["messages"][-1]["content"]) == 1.0)
    return out


def mcnemar(only_a: int, only_b: int) -> float:
    """Exact two-sided p that the two split the prompts they disagree on evenly (a binomial test at 1/2)."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def compare(rows: list[dict], root: Path, stage: str) -> None:
    answered: dict[Path, list[bool]] = {}  # runs of one task and seed share their SFT folder's weights

    def right(folder: Path) -> list[bool]:
        key = folder.resolve()
        if key not in answered:
            answered[key] = right_answers(key, rows)
        return answered[key]

    for run in sorted(p for p in root.iterdir() if (p / stage / "model").is_dir()):
        sft, policy = right(run / "sft" / "model"), right(run / stage / "model")
        metrics = json.loads((run / "eval" / "stage.json").read_text())["metrics"]
        for label, hits in (("sft", sft), (stage, policy)):  # the same answers as the eval stage's, or say so
            logged = round(metrics[f"{label}/checker_accuracy"] * metrics["eval/prompts"])
            if metrics["eval/prompts"] != len(rows) or logged != sum(hits):
                raise SystemExit(f"{run.name}: {label} answers {sum(hits)} of {len(rows)} right here, the eval stage "
                                 f"logged {logged} of {metrics['eval/prompts']}: not the same prompts or answers")
        only_sft = sum(s and not p for s, p in zip(sft, policy))
        only_policy = sum(p and not s for s, p in zip(sft, policy))
        print(json.dumps({"run": run.name, "prompts": len(rows), "sft": sum(sft), stage: sum(policy),
                          "only_sft": only_sft, f"only_{stage}": only_policy,
                          "mcnemar_p": round(mcnemar(only_sft, only_policy), 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write the task's held-out file")
    write.add_argument("task", choices=["arith"])
    write.add_argument("out", type=Path)
    paired = sub.add_parser("compare", help="paired right answers of each run's SFT and policy")
    paired.add_argument("heldout", type=Path)
    paired.add_argument("root", type=Path)
    paired.add_argument("--stage", default="grpo", help="the policy stage's folder in each run (default: grpo)")
    args = ap.parse_args()
    if args.command == "write":
        rows = arith_unseen()
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} held-out {args.task} prompts to {args.out}")
    else:
        compare([json.loads(line) for line in args.heldout.read_text().splitlines()], args.root, args.stage)


if __name__ == "__main__":
    main()
