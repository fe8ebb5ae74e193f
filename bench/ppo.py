"""PPO speed: align's PPO stage vs the last TRL release with a PPO trainer (trl 1.12,
`trl.experimental.ppo.PPOTrainer`) — the same SFT policy, reward model (the critic's start too), demo
prompts, rollout batch, mini-batch, PPO epochs, response length, temperature and KL coefficient, in the
same run.

    python bench/ppo.py [--steps 10] [--rollout 32] [--mini 16] [--epochs 4] [--tokens 16]

trl 1.12 is installed (no dependencies: it runs on this environment's transformers, peft, accelerate)
into a virtual environment of its own under ~/.cache/align/, made once and reused; this environment's
TRL is untouched. The SFT and RM parents are trained first by align (not timed). Prints rollout samples
per second of each (generation, scoring, reference, values and the PPO updates all count) and the ratio
(target >= 2x)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import report, run_align, run_peer

PEER_TRL = "1.12.0"
VENV = Path.home() / ".cache" / "align" / f"trl-{PEER_TRL}-venv"


def peer_python() -> str:
    """The venv's python, with trl==1.12.0 over this environment's packages (made on first use)."""
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import trl; print(trl.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == PEER_TRL:
        return str(python)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"trl=={PEER_TRL}"], check=True)
    return str(python)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rollout", type=int, default=32)
    ap.add_argument("--mini", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    python = peer_python()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        run_align("sft", "train.max_steps=100", "train.batch_size=32", run_root=runs)
        run_align("rm", "stage.init=base", "train.max_steps=100", "train.batch_size=32", "train.lr=2e-3", run_root=runs)
        ours = run_align("ppo", f"train.max_steps={args.steps}", f"stage.rollout_batch_size={args.rollout}",
                         f"train.batch_size={args.mini}", f"stage.ppo_epochs={args.epochs}",
                         f"stage.max_new_tokens={args.tokens}", "stage.temperature=0.7", "stage.kl_coef=0.05",
                         "train.lr=3e-4", "stage.eval_prompts=0", f"train.logging_steps={args.steps}", run_root=runs)
        peer = run_peer("trl_ppo_peer.py", "--sft", str(runs / "demo/sft/model"), "--rm", str(runs / "demo/rm/model"),
                        "--steps", str(args.steps), "--rollout", str(args.rollout), "--mini", str(args.mini),
                        "--epochs", str(args.epochs), "--tokens", str(args.tokens), python=python)
    samples = args.steps * args.rollout
    report("PPO samples/s", "samples/s", samples / ours["train_runtime_s"], peer["samples_per_s"],
           f"TRL {peer['trl']} PPOTrainer", 2.0)


if __name__ == "__main__":
    main()
