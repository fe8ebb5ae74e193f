"""One loader: any supported source -> canonical rows -> tokenized `datasets.Dataset`s.

Every canonical row keeps where it came from (`_source`, `_row`), so a problem found later (for
example at tokenization) still names the file and the 1-based row.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from align.data.chat import encode_chat, encode_pair, encode_prompt, encode_prompt_completions
from align.data.errors import DataError, RowErrors, RowProblem
from align.data.feedback import encode_feedback, to_feedback
from align.data.formats import to_messages
from align.data.preferences import to_preference
from align.data.prompts import prompt_text, to_prompt
from align.data.readers import read_rows
from align.tasks import demo
from align.tasks.gym import PREFIX as GYM  # data.train=gym:<task>: a reasoning-gym task, split like the zoo's

DEMO = "demo"
DEMO_SPLITS = {"sft": ("sft", "sft_eval"), "preference": ("prefs", "prefs_eval")}


@dataclass
class DataReport:
    train_rows: int = 0
    eval_rows: int = 0
    duplicates_removed: int = 0
    errors: RowErrors = field(default_factory=RowErrors)

    def metrics(self) -> dict:
        return {
            "data/train_rows": self.train_rows,
            "data/eval_rows": self.eval_rows,
            "data/duplicates_removed": self.duplicates_removed,
            "data/skipped_rows": len(self.errors.skipped),
        }


TASK = "task:"  # data.train=task:<name>: a built-in task of the zoo (align/tasks/zoo.py), split like the demo


def bundled_split(spec: str, split: str, data_cfg=None) -> str:
    """The file of `split` (sft, sft_eval, prefs, prefs_eval) of the demo, a zoo task or a reasoning-gym task (whose
    options are `data_cfg.gym`)."""
    if spec == DEMO:
        return str(demo.path(split))
    if spec.startswith(GYM):
        from align.tasks import gym
        return str(gym.path(spec[len(GYM):], gym.options(data_cfg) if data_cfg is not None else {}, split))
    from align.tasks import zoo as tasks
    return str(tasks.path(spec[len(TASK):], split))


def bundled_folder(spec: str, data_cfg=None) -> str:
    """The folder that holds every split of the demo or of a task (its fingerprint is the data's)."""
    return str(Path(bundled_split(spec, DEMO_SPLITS["sft"][0], data_cfg)).parent)


def is_task(spec) -> bool:
    """A generated task (the zoo's or reasoning-gym's): its SFT and preference splits ask different questions."""
    return isinstance(spec, str) and spec.startswith((TASK, GYM))


def is_bundled(spec) -> bool:
    return spec == DEMO or is_task(spec)


def resolve_sources(data_cfg, kind: str) -> tuple[str, str | None]:
    """Paths for train and eval; `demo` (or `task:<name>`) means the bundled split for this kind of data."""
    train, eval_ = data_cfg.train, data_cfg.eval
    if is_bundled(train):
        if eval_ is None and not data_cfg.eval_fraction:
            eval_ = train
        train = bundled_split(train, DEMO_SPLITS[kind][0], data_cfg)
    if is_bundled(eval_):
        eval_ = bundled_split(eval_, DEMO_SPLITS[kind][1], data_cfg)
    return train, eval_


def load_canonical(
    spec: str, convert: Callable[[dict], dict], errors: RowErrors, split: str = "train"
) -> list[dict]:
    rows = []
    for rownum, raw in read_rows(spec, split):
        try:
            if isinstance(raw, RowProblem):
                raise raw
            row = convert(raw)
        except RowProblem as problem:
            errors.handle(spec, rownum, problem)
            continue
        row["_source"], row["_row"] = spec, rownum
        rows.append(row)
    return rows


def dedup(rows: list[dict]) -> tuple[list[dict], int]:
    seen, out = set(), []
    for row in rows:
        key = json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out, len(rows) - len(out)


def split_rows(data_cfg, kind: str, convert: Callable[[dict], dict], seed: int, report: DataReport):
    """Canonical train and eval rows per data.train / data.eval / data.eval_fraction / data.dedup."""
    train_spec, eval_spec = resolve_sources(data_cfg, kind)
    train = load_canonical(train_spec, convert, report.errors, data_cfg.split)
    eval_rows = load_canonical(eval_spec, convert, report.errors, data_cfg.eval_split) if eval_spec else []
    if data_cfg.dedup:
        train, removed = dedup(train)
        report.duplicates_removed += removed
    if not eval_spec and data_cfg.eval_fraction:
        if not 0 < data_cfg.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {data_cfg.eval_fraction}")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train) * data_cfg.eval_fraction))
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    if data_cfg.max_rows:
        train = train[: data_cfg.max_rows]
    if not train:
        raise DataError(train_spec, None, f"no usable training rows ({report.errors.summary()})",
                        "the file is empty, or every row was bad; check data.train (and data.format)")
    return train, eval_rows


def eval_rows(data_cfg, kind: str, convert: Callable[[dict], dict], seed: int, report: DataReport) -> list[dict]:
    """Only the held-out rows: data.eval (the demo's eval split), else data.eval_fraction of data.train
    (the same rows a training stage held out)."""
    _, eval_spec = resolve_sources(data_cfg, kind)
    if eval_spec:
        return load_canonical(eval_spec, convert, report.errors, data_cfg.eval_split)
    return split_rows(data_cfg, kind, convert, seed, report)[1]


def sft_datasets(data_cfg, tokenizer, max_length: int, seed: int):
    """Tokenized train/eval datasets (input_ids, labels) for SFT, and the data report."""
    return _tokenized(data_cfg, "sft", lambda raw: {"messages": to_messages(raw, data_cfg.format)},
                      lambda row: encode_chat(tokenizer, row["messages"], max_length), seed)


def preference_datasets(data_cfg, tokenizer, max_length: int, seed: int):
    """Tokenized train/eval datasets (chosen_ids, rejected_ids[, margin]) for a reward model, and the report."""
    return _tokenized(data_cfg, "preference", to_preference, lambda row: encode_pair(tokenizer, row, max_length), seed)


def dpo_datasets(data_cfg, tokenizer, max_length: int, seed: int):
    """Tokenized train/eval datasets (prompt_ids, chosen_ids, rejected_ids) for DPO, and the report."""
    return _tokenized(data_cfg, "preference", to_preference,
                      lambda row: encode_prompt_completions(tokenizer, row, max_length), seed)


def feedback_datasets(data_cfg, tokenizer, max_length: int, seed: int):
    """Tokenized train/eval datasets (prompt_ids, completion_ids, label) for KTO, and the report: labelled answers,
    or preference pairs as two rows each (the demo and the zoo: their preference splits)."""
    return _tokenized(data_cfg, "preference", lambda raw: to_feedback(raw, data_cfg.format),
                      lambda row: encode_feedback(tokenizer, row, max_length), seed)


def prompt_datasets(data_cfg, tokenizer, max_length: int, seed: int):
    """Tokenized train/eval prompts (prompt_ids, ending with the assistant header) for PPO, and the report.
    The demo uses the prompts of its SFT splits (its checker needs no reference); a zoo task those of its
    preference splits, whose reference (the chosen answer) is right, where its SFT split carries the task's
    systematic error by design and would reward that error."""
    kind = "preference" if is_task(data_cfg.train) else "sft"
    return _tokenized(data_cfg, kind, lambda raw: to_prompt(raw, data_cfg.format),
                      lambda row: _encode_prompt_row(tokenizer, row, max_length), seed)


def _encode_prompt_row(tokenizer, row: dict, max_length: int) -> dict:
    """prompt_ids (ending with the assistant header), prompt_text and reference of a to_prompt row."""
    ids = encode_prompt(tokenizer, row["prompt"])
    if len(ids) >= max_length:
        raise RowProblem(f"the prompt is {len(ids)} tokens, not below stage.max_prompt_length={max_length}",
                         "raise stage.max_prompt_length or shorten the prompt")
    return {"prompt_ids": ids, "prompt_text": prompt_text(row["prompt"]), "reference": row["reference"],
            "fields": row.get("fields", "{}"), "messages": json.dumps(row["prompt"]),
            "where": f"{row.get('_source', '?')} row {row.get('_row', '?')}"}


def eval_prompts(data_cfg, tokenizer, max_length: int, max_chat_length: int, seed: int):
    """Held-out prompts for the eval stage: prompt_ids, prompt_text, reference, and where the row has an
    answer the whole conversation's input_ids/labels (for perplexity). Any SFT or preference format."""
    def encode(row):
        out = {**_encode_prompt_row(tokenizer, row, max_length), "input_ids": [], "labels": []}
        if row["reference"] is not None:
            out.update(encode_chat(tokenizer, [*row["prompt"], *row["answer"]], max_chat_length))
        return out

    return _eval_only(data_cfg, "sft", lambda raw: to_prompt(raw, data_cfg.format), encode, seed)


def eval_pairs(data_cfg, tokenizer, max_length: int, seed: int):
    """Held-out preference pairs (chosen_ids, rejected_ids) for a reward model's pair accuracy."""
    return _eval_only(data_cfg, "preference", to_preference, lambda row: encode_pair(tokenizer, row, max_length), seed)


def _eval_only(data_cfg, kind: str, convert, encode_row, seed: int):
    report = DataReport(errors=RowErrors(data_cfg.on_error))
    rows = _encode_rows(eval_rows(data_cfg, kind, convert, seed, report), encode_row, report)
    report.eval_rows = len(rows)
    return rows, report


def _encode_rows(rows: list[dict], encode_row, report: DataReport) -> list[dict]:
    """encode_row of each canonical row (a list: several rows); a row it rejects goes to the report (file and row
    named)."""
    out = []
    for row in rows:
        try:
            encoded = encode_row(row)
            out.extend(encoded if isinstance(encoded, list) else [encoded])
        except RowProblem as problem:
            report.errors.handle(row["_source"], row["_row"], problem)
    return out


def _tokenized(data_cfg, kind: str, convert, encode_row, seed: int):
    from datasets import Dataset

    report = DataReport(errors=RowErrors(data_cfg.on_error))
    train, held_out = split_rows(data_cfg, kind, convert, seed, report)

    def encode(rows):
        out = _encode_rows(rows, encode_row, report)
        if out and any("margin" in r for r in out):
            for r in out:
                r.setdefault("margin", 0.0)
        return Dataset.from_list(out) if out else None

    train_ds, eval_ds = encode(train), encode(held_out)
    if train_ds is None:
        raise DataError(data_cfg.train, None, f"no training rows left after tokenization ({report.errors.summary()})",
                        "raise train.max_length, or check the rows")
    report.train_rows = len(train_ds)
    report.eval_rows = len(eval_ds) if eval_ds is not None else 0
    return train_ds, eval_ds, report
