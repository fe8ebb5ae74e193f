"""Steps under ZeRO-3: the step time of PPO and GRPO with LoRA on 2 ranks (gloo on CPU, or 2 GPUs) under ZeRO-2
and ZeRO-3, in the same run, one after the other. ZeRO-3 three ways: the step's models gathered once for the
whole step (stage.gather_for_step=auto, the default); gathered once per rollout only, every update pass gathering
layer by layer (gather_for_step=off); and layer by layer everywhere, for every generated token too
(gather_for_step=off gather_for_rollout=off: DeepSpeed's own way).

    python bench/zero3.py [--steps 3] [--rollout 16] [--tokens 32]

The SFT and RM parents are trained first on one process (not timed). Each line is the mean `time/step_s` of
the steps after the first (which pays for DeepSpeed's warm-up) and its ratio to ZeRO-2. Target: ZeRO-3 <= 2x."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, env, run_align


def deepspeed_bin() -> str:
    local = Path(sys.executable).parent / "deepspeed"
    return str(local) if local.exists() else "deepspeed"


def two_ranks(stage: str, parents: Path, root: Path, *overrides: str) -> float:
    shutil.copytree(parents, root / "demo", dirs_exist_ok=True)
    cmd = [deepspeed_bin(), "--num_gpus", "2", str(REPO / "launch" / f"{stage}.sh"), f"run.root={root}",
           "peft=lora", "train.save_steps=1000000", "train.logging_steps=1", "stage.eval_prompts=0", *overrides]
    done = subprocess.run(cmd, cwd=root.parent, env={**env(), "PYTHON": sys.executable}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    history = [json.loads(line) for line in (root / "demo" / stage / "history.jsonl").read_text().splitlines()]
    times = [h["time/step_s"] for h in history if "time/step_s" in h][1:]
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rollout", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = tmp / "parents"
        run_align("sft", "train.max_steps=100", "train.batch_size=32", run_root=runs)
        run_align("rm", "stage.init=base", "train.max_steps=50", "train.batch_size=32", run_root=runs)
        shapes = {
            "ppo": [f"stage.rollout_batch_size={args.rollout}", "train.batch_size=8", "stage.ppo_epochs=1"],
            "grpo": [f"stage.rollout_batch_size={args.rollout // 4}", "stage.group_size=4", "train.batch_size=8",
                     "reward=python", "reward.fn=tests.rewards_for_tests:length", "stage.dynamic_sampling=0"],
        }
        for stage, shape in shapes.items():
            common = [f"train.max_steps={args.steps}", f"stage.max_new_tokens={args.tokens}", *shape]
            z2 = two_ranks(stage, runs / "demo", tmp / f"{stage}-z2", "deepspeed=zero2", *common)
            z3 = two_ranks(stage, runs / "demo", tmp / f"{stage}-z3", "deepspeed=zero3", *common)
            z3_rollout = two_ranks(stage, runs / "demo", tmp / f"{stage}-z3roll", "deepspeed=zero3",
                                   "stage.gather_for_step=off", *common)
            z3_layers = two_ranks(stage, runs / "demo", tmp / f"{stage}-z3off", "deepspeed=zero3",
                                  "stage.gather_for_step=off", "stage.gather_for_rollout=off", *common)
            print(f"{stage} step, LoRA, 2 ranks: ZeRO-2 {z2:.2f} s; ZeRO-3 gathered once per step {z3:.2f} s "
                  f"({z3 / z2:.2f}x, target <= 2x: {'met' if z3 <= 2 * z2 else 'NOT met'}); once per rollout "
                  f"{z3_rollout:.2f} s ({z3_rollout / z2:.2f}x); layer by layer {z3_layers:.2f} s "
                  f"({z3_layers / z2:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
