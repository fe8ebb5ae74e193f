"""Shared by the bench scripts: run align's stage and a peer script, each in its own process, and
print one comparison line. Numbers are measured in the same run, on the same machine, one after the
other; nothing here asserts a time."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    out.update(WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DS_ACCELERATOR=out.get("DS_ACCELERATOR", "cpu"))
    return out


def run_align(stage: str, *overrides: str, run_root: Path | None = None) -> dict:
    """`python -m align stage=<stage> <overrides>` in `run_root` (stages of one run find each other there) or
    a fresh run directory; its stage.json metrics and `process_s`, the process's wall time from its start
    to its exit (imports, data, model, training, saving: what a user waits for)."""
    if run_root is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_align(stage, *overrides, run_root=Path(tmp) / "runs")
    cmd = [sys.executable, "-m", "align", f"stage={stage}", f"run.root={run_root}", "train.save_steps=1000000",
           *overrides]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=run_root.parent, env=env(), capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"align failed: stage={stage} {' '.join(overrides)}\n{done.stderr[-3000:]}")
    metrics = json.loads((run_root / "demo" / stage / "stage.json").read_text())["metrics"]
    return {**metrics, "process_s": process_s}


def run_peer(script: str, *args: str, python: str = sys.executable) -> dict:
    """A peer script under bench/ that prints one JSON object as its last line; with `process_s`, its
    process's wall time from start to exit."""
    t0 = time.perf_counter()
    done = subprocess.run([python, str(REPO / "bench" / script), *args], cwd=REPO, env=env(), capture_output=True,
                          text=True)
    process_s = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{script} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": process_s}


def report(title: str, unit: str, ours: float, peer: float, peer_name: str, target: float) -> str:
    """One line: align against one peer, the ratio, and whether it meets the target."""
    ratio = ours / peer
    line = (f"{title}: align {ours:.1f} {unit}, {peer_name} {peer:.1f} {unit}; ratio {ratio:.2f}x "
            f"(target >= {target}x: {'met' if ratio >= target else 'NOT met'})")
    print(line)
    return line


def cli(description: str, steps: int = 150) -> argparse.Namespace:
    """--steps and --batch-size, the same for align, its peers and the bare loops; --set KEY=VALUE
    (repeatable) for a peer's config (`--set packing=true`), VALUE read as JSON when it parses."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return ap.parse_args()


def tiny_setup(*overrides: str):
    """For the bare loops: align's config for `overrides`, the tiny model's tokenizer, and its directory."""
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir

    from align.config.paths import config_dir
    from align.config.recipes import register
    from align.models.loading import load_tokenizer
    from align.models.tiny import tiny_model_dir

    register()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return cfg, load_tokenizer(str(tiny_model_dir()), cfg.model), tiny_model_dir()


def peer_settings(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def table(title: str, unit: str, rows: list[tuple[str, float, float]], ours: str) -> str:
    """A markdown table: each row's rate in the training loop and end to end, and the row named `ours`
    against each."""
    base = next(r for r in rows if r[0] == ours)
    lines = [f"{title}", "", f"| run | {unit}, training loop | {unit}, end to end (process start to exit) "
             f"| {ours} / run (loop) | {ours} / run (end to end) |", "|---|---|---|---|---|"]
    for name, loop, e2e in rows:
        lines.append(f"| {name} | {loop:.1f} | {e2e:.1f} | {base[1] / loop:.2f}x | {base[2] / e2e:.2f}x |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def train_trl_peer(trainer_cls, config_cls, rows: list[dict], lr: float):
    """A TRL trainer with its defaults (bf16 only on a GPU: TRL's default fails on CPU) on align's tiny
    model; steps, batch size and --set settings from the command line. Returns (trainer, the time inside
    train() in s); the bench scripts time the whole process too (construction, where TRL tokenizes, packs
    and precomputes, included)."""
    sys.path.insert(0, str(REPO))
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models.tiny import tiny_model_dir

    args = cli("peer")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    with tempfile.TemporaryDirectory() as tmp:
        config = config_cls(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                            learning_rate=lr, report_to=[], save_strategy="no", logging_steps=args.steps,
                            disable_tqdm=True, bf16=torch.cuda.is_available(), **peer_settings(args.set))
        trainer = trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer)
        result = trainer.train()
    return trainer, result.metrics["train_runtime"]
