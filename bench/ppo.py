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
import site
import subprocess
import sys
import tempfile
from pathlib import Path

from common import report, run_align, run_peer

PEER_TRL = "1.12.0"
VENV = Path.home() / ".cache" / "align" / f"trl-{PEER_TRL}-venv"


def peer_python() -> str:
    """The venv's python: trl==1.12.0 in its own site-packages, in front of this interpreter's packages
    (made on first use). `venv --system-site-packages` alone would see the *base* interpreter's packages,
    which lack torch when align lives in a virtual environment, so a .pth file adds this one's."""
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import torch, trl; print(trl.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == PEER_TRL:
        return str(python)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    # an import line in a .pth runs at start-up; addsitedir appends (after the venv's own trl) and
    # processes the .pth files there too (align's editable install)
    (Path(own) / "align_parent_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in ours) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"trl=={PEER_TRL}"], check=True)
    version = subprocess.run(check, capture_output=True, text=True)
    if version.stdout.strip() != PEER_TRL:
        raise SystemExit(f"the peer venv {VENV} does not import torch and trl {PEER_TRL}: {version.stderr[-500:]}")
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
    report("PPO samples/s (training loop)", "samples/s", samples / ours["train_runtime_s"], peer["samples_per_s"],
           f"TRL {peer['trl']} PPOTrainer", 2.0)
    report("PPO samples/s (end to end: process start to exit)", "samples/s", samples / ours["process_s"],
           samples / peer["process_s"], f"TRL {peer['trl']} PPOTrainer", 2.0)


if __name__ == "__main__":
    main()
