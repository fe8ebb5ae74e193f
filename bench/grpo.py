"""GRPO speed: align's GRPO stage vs TRL's GRPOTrainer on the same SFT policy, demo prompts, group size,
prompts per step, micro-batch, response length, temperature and reward function (the demo's checker), in
the same run, one after the other.

    python bench/grpo.py [--steps 30] [--prompts 8] [--group 8] [--micro 16] [--tokens 16]

The SFT parent is trained first by align (not timed). Prints rollout samples per second of each (generation,
scoring and the update all count): TRL's clock from before its trainer is built and from train(), align's
from its loop's start (after the models are loaded and the optimizer built, as for TRL's construction).
Target >= 1.5x."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import report, run_align, run_peer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    samples = args.prompts * args.group
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        run_align("sft", "train.max_steps=300", run_root=runs)
        ours = run_align("grpo", f"train.max_steps={args.steps}", f"stage.rollout_batch_size={args.prompts}",
                         f"stage.group_size={args.group}", f"train.batch_size={args.micro}",
                         f"train.grad_accum={samples // args.micro}", f"stage.max_new_tokens={args.tokens}",
                         "stage.temperature=0.7", "train.lr=3e-4", "stage.eval_prompts=0", "stage.dynamic_sampling=0",
                         f"train.logging_steps={args.steps}", run_root=runs)
        peer = run_peer("trl_grpo_peer.py", "--sft", str(runs / "demo/sft/model"), "--steps", str(args.steps),
                        "--prompts", str(args.prompts), "--group", str(args.group), "--micro", str(args.micro),
                        "--tokens", str(args.tokens))
    mine = args.steps * samples / ours["train_runtime_s"]
    report("GRPO samples/s (TRL clock from construction)", "samples/s", mine, peer["samples_per_s"],
           f"TRL {peer['trl']} GRPOTrainer", 1.5)
    report("GRPO samples/s (TRL clock from train())", "samples/s", mine, peer["samples_per_s_train_only"],
           f"TRL {peer['trl']} GRPOTrainer", 1.5)
    report("GRPO samples/s (end to end: process start to exit)", "samples/s", args.steps * samples / ours["process_s"],
           args.steps * samples / peer["process_s"], f"TRL {peer['trl']} GRPOTrainer", 1.5)
    print(f"mean response length: align {ours['response/length']:.1f} tokens (last step), TRL "
          f"{peer['mean_length']:.1f} tokens (mean over its steps); align's generation share of a step "
          f"{ours['time/generation_share']:.2f}")


if __name__ == "__main__":
    main()
