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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    out.update(WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DS_ACCELERATOR=out.get("DS_ACCELERATOR", "cpu"))
    return out


def run_align(stage: str, *overrides: str, run_root: Path | None = None) -> dict:
    """`python -m align stage=<stage> <overrides>` in `run_root` (stages of one run find each other there) or
    a fresh run directory; its stage.json metrics."""
    if run_root is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_align(stage, *overrides, run_root=Path(tmp) / "runs")
    cmd = [sys.executable, "-m", "align", f"stage={stage}", f"run.root={run_root}", "train.save_steps=1000000",
           *overrides]
    done = subprocess.run(cmd, cwd=run_root.parent, env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"align failed: stage={stage} {' '.join(overrides)}\n{done.stderr[-3000:]}")
    return json.loads((run_root / "demo" / stage / "stage.json").read_text())["metrics"]


def run_peer(script: str, *args: str, python: str = sys.executable) -> dict:
    """A peer script under bench/ that prints one JSON object as its last line."""
    done = subprocess.run([python, str(REPO / "bench" / script), *args], cwd=REPO, env=env(), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(title: str, unit: str, ours: float, peer: float, peer_name: str, target: float) -> str:
    ratio = ours / peer
    line = (f"{title}: align {ours:.1f} {unit}, {peer_name} {peer:.1f} {unit}; ratio {ratio:.2f}x "
            f"(target >= {target}x: {'met' if ratio >= target else 'NOT met'})")
    print(line)
    return line


def cli(description: str) -> argparse.Namespace:
    """--steps and --batch-size, the same for align and its peer."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    return ap.parse_args()


def compare(stage: str, args: argparse.Namespace, align_overrides: list[str], peer_script: str) -> tuple[dict, dict]:
    """align's stage and the peer, the same steps and batch size: (align's stage.json metrics, the peer's JSON)."""
    ours = run_align(stage, f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                     f"train.logging_steps={args.steps}", *align_overrides)
    peer = run_peer(peer_script, "--steps", str(args.steps), "--batch-size", str(args.batch_size))
    return ours, peer


def train_trl_peer(trainer_cls, config_cls, rows: list[dict], lr: float):
    """A TRL trainer with its defaults (bf16 only on a GPU: TRL's default fails on CPU) on align's tiny
    model; steps and batch size from the command line. Returns (trainer, train runtime in s)."""
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
                            disable_tqdm=True, bf16=torch.cuda.is_available())
        trainer = trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer)
        result = trainer.train()
    return trainer, result.metrics["train_runtime"]
