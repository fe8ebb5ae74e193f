"""Tool use on the zoo's calc task (recipe=agent: sft -> grpo with the calculator environment -> eval), over seeds:
each policy's checker accuracy on 256 held-out prompts answered as greedy episodes, the environment's reward, turns
and tool calls per episode, the share of malformed calls, and the wall time of each seed's whole pipeline.

    python bench/agent.py                       # seeds 42, 1, 2
    python bench/agent.py --seeds 42 --out docs/agent_table.md

Each seed is one `python -m align recipe=agent train.seed=S` process (its own run folder under --root); nothing is
tuned per seed. Prints one markdown table (mean, and each seed's value)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env  # noqa: E402

COLUMNS = (("checker_accuracy", "checker accuracy"), ("env_reward", "env reward"), ("episode/turns", "turns"),
           ("episode/tool_calls", "tool calls"), ("env/failed_call", "failed calls"))


def run(root: Path, seed: int) -> dict:
    name = f"agent-s{seed}"
    cmd = [sys.executable, "-m", "align", "recipe=agent", f"train.seed={seed}", f"run.root={root}",
           f"run.name={name}", "pipeline.summary=false"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=root.parent, env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((root / name / "eval" / "stage.json").read_text())["metrics"]
    return {"seed": seed, "minutes": (time.perf_counter() - t0) / 60, "metrics": metrics}


def table(results: list[dict]) -> str:
    seeds = ", ".join(str(r["seed"]) for r in results)
    lines = [f"| policy | {' | '.join(label for _, label in COLUMNS)} |", "|---|" + "---|" * len(COLUMNS)]
    for policy in ("sft", "grpo"):
        cells = []
        for key, _ in COLUMNS:
            values = [r["metrics"].get(f"{policy}/{key}") for r in results]
            values = [v for v in values if v is not None]
            cells.append(f"{statistics.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})" if values else "")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    gains = [r["metrics"]["grpo/checker_accuracy"] - r["metrics"]["sft/checker_accuracy"] for r in results]
    minutes = ", ".join(f"{r['minutes']:.1f}" for r in results)
    return ("\n".join(lines) + f"\n\nSeeds {seeds}: mean (each seed). GRPO minus SFT: "
            f"{', '.join(f'{g * 100:+.1f}' for g in gains)} points; minutes per seed (sft + grpo + eval): {minutes}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--root", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "runs"
        root.mkdir(parents=True, exist_ok=True)
        results = []
        for seed in (int(s) for s in args.seeds.split(",")):
            results.append(run(root, seed))
            print(f"seed {seed}: sft {results[-1]['metrics']['sft/checker_accuracy']:.3f} -> grpo "
                  f"{results[-1]['metrics']['grpo/checker_accuracy']:.3f} in {results[-1]['minutes']:.1f} min",
                  flush=True)
    out = table(results)
    print(out)
    if args.out:
        args.out.write_text(out)


if __name__ == "__main__":
    main()
