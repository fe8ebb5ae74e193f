"""Quality across tasks and seeds: SFT, then each preference method at its defaults, judged by the task's
checker on held-out prompts (the eval stage), over several seeds; one markdown table of checker accuracy
(mean ± half the range over seeds) and the KL to SFT, and a plot.

    python bench/quality.py                                   # every zoo task and the demo, 3 seeds
    python bench/quality.py --tasks sort,json --seeds 42 --methods dpo,grpo
    python bench/quality.py --out docs/quality_table.md --plot docs/quality.png
    python bench/quality.py --tasks gym_chain_sum,gym_lcm --seeds 42 --methods dpo,grpo   # reasoning-gym tasks

Each (task, seed, method) is one `python -m align` pipeline, `sft -> <method's stages> -> eval`, under one
`--root`; runs of the same task and seed share their SFT through the stage cache, so SFT trains once per
task and seed. `train.seed` is the seed of every stage (data order, new heads, sampling). A method is its
stages at their defaults plus the budget below, nothing tuned per task. Results are appended to
`<root>/results.jsonl` as they come, and a re-run skips what is there (stages are cached too)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env  # noqa: E402

TASKS = ["demo", "sort", "json", "recall", "arith"]
# reasoning-gym tasks (align/tasks/gym.py) with options the tiny model can learn; the name is gym_<task>
GYM_TASKS = {
    "gym_chain_sum": ["data=gym:chain_sum", "data.gym.max_terms=2", "data.gym.max_digits=2"],
    "gym_basic_arithmetic": ["data=gym:basic_arithmetic", "data.gym.max_terms=3", "data.gym.max_digits=1",
                             "data.gym.operators=[+,-]", "data.gym.allow_parentheses=false",
                             "data.gym.allow_negation=false"],
    "gym_spell_backward": ["data=gym:spell_backward", "data.gym.min_word_len=7", "data.gym.max_word_len=10"],
    "gym_letter_counting": ["data=gym:letter_counting", "data.gym.min_words=1", "data.gym.max_words=2"],
    "gym_lcm": ["data=gym:lcm", "data.gym.max_value=30"],
    "gym_gcd": ["data=gym:gcd", "data.gym.max_value=30"],
    "gym_simple_equations": ["data=gym:simple_equations", "data.gym.max_terms=2", "data.gym.max_value=20",
                             "data.gym.operators=[+,-]", "data.gym.operators_weights=[0.5,0.5]"],
}
# method: (stages after sft, overrides). The budget: DPO its data group's 3 epochs over the pairs; PPO 100
# steps of 64 prompts (6,400 answers); GRPO/RLOO 800 steps of 8 prompts x 8 answers (51,200 answers). The
# variants beside the defaults: DPO's plain sigmoid loss, GRPO sampling at temperature 0.7 (the demo recipe's),
# PPO with kl_coef 0.05 (its default before docs/quality.md's table).
METHODS = {
    "dpo": (["dpo"], []),
    "dpo_sigmoid": (["dpo"], ["dpo.loss_type=[sigmoid]"]),
    "simpo": (["dpo"], ["dpo.loss_type=simpo"]),  # reference-free, from the SFT
    "simpo_sft": (["dpo"], ["dpo.loss_type=[simpo,sft]"]),
    "orpo": (["dpo"], ["dpo.loss_type=orpo"]),
    "kto": (["kto"], ["kto.train.epochs=1"]),
    "iterative_dpo": (["iterative_dpo"], []),  # two rounds of sample -> checker -> DPO, at its defaults
    "ppo": (["rm", "ppo"], ["ppo.train.max_steps=100"]),
    "ppo_kl005": (["rm", "ppo"], ["ppo.train.max_steps=100", "ppo.kl_coef=0.05"]),
    "grpo": (["grpo"], ["grpo.train.max_steps=800"]),
    # dynamic sampling off: the `grpo` cells of docs/quality.md measured before it became the default (2026-12-07)
    "grpo_no_dynamic": (["grpo"], ["grpo.train.max_steps=800", "grpo.dynamic_sampling=0"]),
    "grpo_t07": (["grpo"], ["grpo.train.max_steps=800", "grpo.temperature=0.7"]),
    "rloo": (["grpo"], ["grpo.train.max_steps=800", "grpo.advantage=rloo"]),
    # dynamic sampling: extra rounds for the failing flat groups (dynamic_sampling_replaces' default), and DAPO's form
    "grpo_dynamic": (["grpo"], ["grpo.train.max_steps=800", "grpo.dynamic_sampling=4"]),
    "grpo_dynamic_flat": (["grpo"], ["grpo.train.max_steps=800", "grpo.dynamic_sampling=4",
                                     "grpo.dynamic_sampling_replaces=flat"]),
    # sparse signal (a deliberately weak SFT, docs/quality.md): 300 steps without and with DAPO's dynamic sampling
    "grpo_300": (["grpo"], ["grpo.train.max_steps=300", "grpo.dynamic_sampling=0"]),
    "grpo_300_dynamic": (["grpo"], ["grpo.train.max_steps=300", "grpo.dynamic_sampling=4",
                                    "grpo.dynamic_sampling_replaces=flat"]),
    # flat groups kept in the update at advantage 0: the step divides by every answer's tokens, not only theirs
    "grpo_300_keep_flat": (["grpo"], ["grpo.train.max_steps=300", "grpo.drop_zero_variance=false",
                                      "grpo.dynamic_sampling=0"]),
    # rollouts on vLLM (the environment with vLLM), each correction of the engine/trainer mismatch (docs/rollouts.md)
    "grpo_vllm_none": (["grpo"], ["grpo.train.max_steps=800", "grpo.rollout.engine=vllm",
                                  "grpo.rollout.is_correction=none"]),
    "grpo_vllm_tis": (["grpo"], ["grpo.train.max_steps=800", "grpo.rollout.engine=vllm",
                                 "grpo.rollout.is_correction=token_tis"]),
    "grpo_vllm_seq": (["grpo"], ["grpo.train.max_steps=800", "grpo.rollout.engine=vllm",
                                 "grpo.rollout.is_correction=seq_mask"]),
}
RECIPE = "pipeline: {name: quality, stages: [sft, eval]}\neval: {reward: none}\n"


def run(root: Path, task: str, seed: int, method: str, extra: tuple = ()) -> dict | None:
    stages, overrides = METHODS[method]
    name = f"{task}-s{seed}-{method}"
    data = [] if task == "demo" else GYM_TASKS[task] if task in GYM_TASKS else [f"data=task/{task}"]
    cmd = [sys.executable, "-m", "align", "recipe=quality", *data, f"train.seed={seed}", f"run.root={root}",
           f"run.name={name}", f"pipeline.stages=[sft,{','.join(stages)},eval]", "pipeline.summary=false",
           *overrides, *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=root.parent, env=env(), capture_output=True, text=True)
    if done.returncode != 0:  # reported and left out of the table; the other cells still run
        print(f"FAILED: {' '.join(cmd)}\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    metrics = json.loads((root / name / "eval" / "stage.json").read_text())["metrics"]
    policy = stages[-1]
    trained = json.loads((root / name / policy / "stage.json").read_text())["metrics"]
    return {"task": task, "seed": seed, "method": method, "overrides": list(extra),
            "wall_s": round(time.perf_counter() - t0, 1),
            "sft": metrics["sft/checker_accuracy"], "policy": metrics[f"{policy}/checker_accuracy"],
            "kl": metrics.get(f"{policy}/kl"),
            **{k: v for k, v in trained.items() if k.startswith("mismatch/")}}  # rollouts on vLLM: the last step's


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.3f} ± {half:.3f}" if len(values) > 1 else f"{mean:.3f}"


def table(rows: list[dict], tasks: list[str], methods: list[str]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    head = "| task | SFT | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (2 + len(methods))]
    for task in tasks:
        sft = [r["sft"] for r in rows if r["task"] == task and r["method"] == methods[0]] or \
              [r["sft"] for r in rows if r["task"] == task]
        if not sft:
            continue
        cells = [spread(sft)]
        for m in methods:
            got = [r for r in rows if r["task"] == task and r["method"] == m]
            if not got:
                cells.append("")
                continue
            gain = statistics.fmean(r["policy"] - r["sft"] for r in got) * 100
            kl = [r["kl"] for r in got if r["kl"] is not None]
            cells.append(f"{spread([r['policy'] for r in got])} ({gain:+.1f}; KL {statistics.fmean(kl):.2f})"
                         if kl else f"{spread([r['policy'] for r in got])} ({gain:+.1f})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nSeeds: {', '.join(map(str, seeds))}. Cells: checker accuracy, mean ± half the " \
                              "range over seeds (gain over SFT in points; KL to SFT in nats per sampled answer).\n"


def plot(rows: list[dict], tasks: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["sft", *methods]
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.5))
    width = 0.8 / len(names)
    for i, m in enumerate(names):
        for j, task in enumerate(tasks):
            got = [r for r in rows if r["task"] == task and (m == "sft" or r["method"] == m)]
            vals = [r["sft"] for r in got] if m == "sft" else [r["policy"] for r in got]
            if not vals:
                continue
            x = j + (i - (len(names) - 1) / 2) * width
            ax.bar(x, statistics.fmean(vals), width, color=f"C{i}", label=m if j == 0 else None)
            ax.errorbar(x, statistics.fmean(vals), yerr=[[statistics.fmean(vals) - min(vals)],
                                                         [max(vals) - statistics.fmean(vals)]], color="k", lw=1)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("checker accuracy (held-out)")
    ax.set_ylim(0, 1.05)
    ax.legend(ncol=len(names), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--methods", default="dpo,grpo")
    ap.add_argument("--root", type=Path, default=Path("quality_runs/runs"))
    ap.add_argument("--out", type=Path, help="write the table here too")
    ap.add_argument("--plot", type=Path, help="a bar chart of the table (PNG)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="appended to every cell's command (sft.train.lr=3e-3); part of a cell's identity")
    args = ap.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS] + [t for t in tasks if t not in TASKS and t not in GYM_TASKS]
    if unknown:
        raise SystemExit(f"unknown: {unknown}; methods: {list(METHODS)}; tasks: {TASKS + list(GYM_TASKS)}")
    root = args.root.resolve()
    (root.parent / "recipes").mkdir(parents=True, exist_ok=True)
    (root.parent / "recipes" / "quality.yaml").write_text(RECIPE)
    log = root / "results.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for task in tasks:
        for seed in map(int, args.seeds.split(",")):
            for method in methods:
                if any(r["task"] == task and r["seed"] == seed and r["method"] == method and
                       r.get("overrides", []) == args.override for r in rows):
                    continue
                row = run(root, task, seed, method, tuple(args.override))
                if row is None:
                    continue
                print(json.dumps(row), flush=True)
                rows.append(row)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = [r for r in rows if r["task"] in tasks and r["method"] in methods and
            r.get("overrides", []) == args.override]
    text = table(rows, tasks, methods)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.plot:
        plot(rows, tasks, methods, args.plot)


if __name__ == "__main__":
    main()
