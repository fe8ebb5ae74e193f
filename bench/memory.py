"""Peak memory of SFT with full weights, LoRA and QLoRA on one model: the same data, batch and steps; and of
one PPO log-prob pass at Qwen 2.5's vocabulary, full log-softmax against align's chunks.

    python bench/memory.py [--hidden 1024] [--layers 12] [--steps 4] [--batch-size 8]
    python bench/memory.py --logprobs [--vocab 151936] [--rollout 8x512] [--hidden 896]
    python bench/memory.py --stages [--sizes small,medium,large]   # sft/dpo/ppo/grpo x none/lora/qlora vs the plan

Builds a randomly initialised Llama of the given size once (the embedded tokenizer: no download), then runs
align's SFT stage on it three times — peft=none, lora, qlora — each in a process of its own, and prints each
process's peak resident memory (the kernel's ru_maxrss: weights, gradients, optimizer states, activations and
the Python/torch runtime together) and its ratio to full fine-tuning. A fourth process that only imports
align's stack and loads the model in fp32 (its weights read, so that they are resident) gives the floor every run
pays. On a GPU the same script measures host memory only; GPU numbers come from a GPU run of the stage itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, env

LOAD_ONLY = """
import sys
sys.path.insert(0, {repo!r})
import align.stages.sft, trl, peft, deepspeed  # noqa: F401  the same imports as a stage
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({model!r})
# the weights come memory-mapped from the safetensors file and count in RSS only once a page is read: without this
# the floor held them on some runs (999 MiB for the 155M model) and not on others (467 MiB), by page-cache timing
sum(float(p.sum()) for p in model.parameters())
"""


def build_model(folder: Path, hidden: int, layers: int) -> int:
    """A random Llama (hidden, layers; head size 64, MLP 2.75 x hidden) with the tiny tokenizer; its parameter count."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from align.models.tiny import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=int(hidden * 2.75) // 64 * 64, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def peak_rss_mib(cmd: list[str], cwd: Path) -> float:
    """Run `cmd`; the peak resident memory of that process (ru_maxrss is in KiB on Linux)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{err[-3000:]}")
    return usage.ru_maxrss / 1024


LOGPROB_PASS = """
import sys, torch
sys.path.insert(0, {repo!r})
from align.rl.logprobs import token_logprobs
torch.manual_seed(0)
head = torch.nn.Linear({hidden}, {vocab}, bias=False)
hidden = torch.randn({batch}, {length}, {hidden})
targets = torch.randint(0, {vocab}, ({batch}, {length}))
with torch.no_grad():
    if {mode!r} == "full":  # what PPO did before: the whole [B, T, V] logits, then a float32 log-softmax over them
        logp = torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    elif {mode!r} == "chunked":
        logp, _ = token_logprobs(hidden, targets, head)
"""


def logprob_pass(args) -> None:
    """Peak RSS of one log-prob pass over a rollout (no grad: the rollout's and the reference's pass), each way in
    a process of its own, above a process that only builds the same output layer and hidden states."""
    batch, length = (int(x) for x in args.rollout.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        peaks = {}
        for mode in ("none", "full", "chunked"):
            code = LOGPROB_PASS.format(repo=str(REPO), hidden=args.hidden, vocab=args.vocab, batch=batch,
                                       length=length, mode=mode)
            peaks[mode] = peak_rss_mib([sys.executable, "-c", code], Path(tmp))
    full, chunked = peaks["full"] - peaks["none"], peaks["chunked"] - peaks["none"]
    print(f"log-prob pass, vocab {args.vocab}, rollout {batch}x{length}, hidden {args.hidden}: "
          f"full log-softmax {full:.0f} MiB, chunked {chunked:.0f} MiB above the inputs ({full / max(chunked, 1):.1f}x)")
    print(json.dumps({"vocab": args.vocab, "rollout": args.rollout, "floor_mib": peaks["none"], "full_mib": full,
                      "chunked_mib": chunked}))


# --stages: each stage's own settings, the same for the measured run and for its plan (small rollouts, few steps)
STAGE_ARGS = {
    "sft": ["train.max_steps=3"],
    "dpo": ["train.max_steps=3"],
    "rm": ["train.max_steps=2"],  # the parent of ppo, not measured
    "ppo": ["train.max_steps=2", "stage.rollout_batch_size=8", "stage.max_new_tokens=16", "stage.eval_prompts=0",
            "stage.max_prompt_length=48"],
    # a random model's answers all score 0: without drop_zero_variance=false no group would train and no step happen
    "grpo": ["train.max_steps=2", "stage.rollout_batch_size=2", "stage.group_size=4", "stage.max_new_tokens=16",
             "stage.eval_prompts=0", "stage.max_prompt_length=48", "stage.drop_zero_variance=false",
             "stage.dynamic_sampling=0"],
}
MEASURED = ("sft", "dpo", "ppo", "grpo")
SIZES = {"small": (512, 6), "medium": (768, 8), "large": (1024, 12)}  # hidden, layers


def stage_matrix(args) -> None:
    """Peak RSS above the floor of sft, dpo, ppo and grpo (each in its own process, after its parents) for every
    size x peft, against what `align plan` says the same run needs above that floor."""
    common = [f"train.batch_size={args.batch_size}", "train.grad_accum=1", "data.max_rows=256", "data.eval=null",
              "data.eval_fraction=0", "train.save_steps=1000000", "model.dtype=fp32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes.split(","):
            hidden, layers = SIZES[size]
            params = build_model(tmp / size, hidden, layers)
            floor = peak_rss_mib([sys.executable, "-c", LOAD_ONLY.format(repo=str(REPO), model=str(tmp / size))], tmp)
            for peft in ("none", "lora", "qlora"):
                run = [f"model.name_or_path={tmp / size}", f"run.root={tmp / 'runs'}", f"run.name={size}-{peft}",
                       f"peft={peft}", *common]
                for stage in ("sft", "dpo", "rm", "ppo", "grpo"):
                    extra = ["reward=checker"] if stage == "grpo" else []
                    mib = peak_rss_mib([sys.executable, "-m", "align", f"stage={stage}", *run, *STAGE_ARGS[stage],
                                        *extra], tmp)
                    if stage in MEASURED:
                        overrides = [*run, *STAGE_ARGS[stage], *extra]
                        bound = planned_stage_above_floor(tmp / size, stage, overrides)
                        plan = planned_stage_above_floor(tmp / size, stage, overrides, lengths=True)
                        rows.append({"size": size, "params": params, "peft": peft, "stage": stage,
                                     "measured_mib": round(mib - floor), "plan_mib": round(plan),
                                     "plan_at_bounds_mib": round(bound)})
                        print(json.dumps(rows[-1]), flush=True)
    print_tables(rows)


def print_tables(rows: list[dict]) -> None:
    """The plan against the measurement per size, then what grows with the model between the smallest and the
    largest size (the process's fixed runtime above the floor, which no GPU holds, cancels out there)."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    cell = {(r["size"], r["peft"], r["stage"]): r for r in rows}
    print(f"\n| model | weights | {' | '.join(MEASURED)} |\n|---|---|" + "---|" * len(MEASURED))
    for size in sizes:
        for peft in ("none", "lora", "qlora"):
            line = [f"{c['plan_mib']} / {c['measured_mib']} = {c['plan_mib'] / max(c['measured_mib'], 1):.2f}"
                    for c in (cell[size, peft, s] for s in MEASURED)]
            print(f"| {size} ({cell[size, peft, 'sft']['params'] / 1e6:.0f}M) | {peft} | " + " | ".join(line) + " |")
    print("cells: align plan at the data's lengths / measured above the floor (MiB) = ratio")
    if len(sizes) < 2:
        return
    lo, hi = sizes[0], sizes[-1]
    print(f"\n| {hi} - {lo} | {' | '.join(MEASURED)} |\n|---|" + "---|" * len(MEASURED))
    for peft in ("none", "lora", "qlora"):
        grow = [(cell[hi, peft, s]["plan_mib"] - cell[lo, peft, s]["plan_mib"],
                 cell[hi, peft, s]["measured_mib"] - cell[lo, peft, s]["measured_mib"]) for s in MEASURED]
        print(f"| {peft} | " + " | ".join(f"{p} / {m} = {p / max(m, 1):.2f}" for p, m in grow) + " |")
    print("cells: growth of the plan / growth of the measurement (MiB) = ratio")


def planned_stage_above_floor(model: Path, stage: str, overrides: list[str], lengths: bool = False) -> float:
    """What `align plan` says one stage run needs beyond the floor (one fp32 copy of the weights, no CUDA context),
    in MiB; with `lengths`, at the lengths the run's data has (data_lengths)."""
    plan, shape = stage_plan(model, stage, overrides, lengths)
    from align.plan import memory  # importable once stage_plan has put the repository on the path

    return (plan.peak - memory.CUDA_CONTEXT - 4 * shape.params) / 2**20


def stage_plan(model: Path, stage: str, overrides: list[str], lengths: bool = False, gpu_memory: float | None = None):
    """(align plan's StagePlan of one stage run on one GPU, the model's shape); with `lengths`, sized at the lengths
    the run's data has (data_lengths) instead of the configured bounds."""
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from align.config.paths import config_dir
    from align.config.recipes import register
    from align.plan.shapes import shape_of
    from align.plan.stage_plan import plan_stage

    register()
    GlobalHydra.instance().clear()
    keep = [o for o in overrides if not o.startswith(("run.", "train.save_steps"))]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"stage={stage}", *keep])
        if lengths:  # the plan sized at the longest row the run's data has, instead of at the configured bounds
            cfg = compose("config", overrides=[f"stage={stage}", *keep, *data_lengths(cfg, model)])
    shape = shape_of(str(model))
    return plan_stage(cfg, shape, 1, gpu_memory), shape


def data_lengths(cfg, model: Path) -> list[str]:
    """Overrides that bound the plan's lengths by the data: train.max_length at the longest tokenized row (sft, dpo),
    stage.max_prompt_length at the longest prompt (ppo, grpo: the plan adds stage.max_new_tokens). The plan sizes
    activations at the configured bound, which a batch of short rows never reaches (the demo's rows are ~21 tokens
    against train.max_length 64); here both sides see the same rows."""
    from align.data import loader
    from align.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model), cfg.model)
    name = cfg.stage.name
    if name in ("ppo", "grpo"):
        rows, _, _ = loader.prompt_datasets(cfg.data, tokenizer, cfg.stage.max_prompt_length, cfg.train.seed)
        return [f"stage.max_prompt_length={max(len(r) for r in rows['prompt_ids'])}"]
    if name == "dpo":
        rows, _, _ = loader.dpo_datasets(cfg.data, tokenizer, cfg.train.max_length, cfg.train.seed)
        longest = max(len(p) + max(len(c), len(r))
                      for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]))
        return [f"train.max_length={longest}"]
    rows, _, _ = loader.sft_datasets(cfg.data, tokenizer, cfg.train.max_length, cfg.train.seed)
    return [f"train.max_length={max(len(r) for r in rows['input_ids'])}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--logprobs", action="store_true", help="the log-prob pass comparison instead of SFT")
    ap.add_argument("--stages", action="store_true", help="sft, dpo, ppo, grpo x none/lora/qlora x --sizes vs the plan")
    ap.add_argument("--sizes", default="small,medium,large", help=f"for --stages: of {list(SIZES)}")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rollout", default="8x512", help="BxT of the rollout for --logprobs")
    ap.add_argument("--hidden", type=int, default=None, help="default: 1024 (SFT), 896 (Qwen 2.5 0.5B, --logprobs)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    if args.logprobs:
        args.hidden = args.hidden or 896
        return logprob_pass(args)
    if args.stages:
        return stage_matrix(args)
    args.hidden = args.hidden or 1024
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = build_model(tmp / "model", args.hidden, args.layers)
        print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f}M parameters "
              f"({params * 4 / 2**20:.0f} MiB in fp32); SFT {args.steps} steps of {args.batch_size} on the demo data")
        floor = peak_rss_mib([sys.executable, "-c", LOAD_ONLY.format(repo=str(REPO), model=str(tmp / "model"))], tmp)
        results = {}
        for peft in ("none", "lora", "qlora"):
            cmd = [sys.executable, "-m", "align", "stage=sft", f"peft={peft}", f"model.name_or_path={tmp / 'model'}",
                   f"run.root={tmp / 'runs'}", f"run.name={peft}", f"train.max_steps={args.steps}",
                   f"train.batch_size={args.batch_size}", "train.save_steps=1000000", "data.max_rows=256",
                   "data.eval=null", "data.eval_fraction=0"]
            results[peft] = peak_rss_mib(cmd, tmp)
        print(f"{'weights':<8} {'peak RSS MiB':>12} {'vs full':>8} {'above the floor':>16}")
        for peft, mib in results.items():
            print(f"{peft:<8} {mib:>12.0f} {mib / results['none']:>7.2f}x {mib - floor:>15.0f}")
        print(f"{'floor':<8} {floor:>12.0f}   (imports + the model loaded once in fp32, no training)")
        predicted = planned_above_floor(tmp / "model", args)
        print(f"\n{'weights':<8} {'measured above floor':>21} {'align plan':>11} {'plan / measured':>16}")
        for peft, mib in results.items():
            print(f"{peft:<8} {mib - floor:>21.0f} {predicted[peft]:>11.0f} {predicted[peft] / (mib - floor):>16.2f}")
        print(json.dumps({"params": params, "floor_mib": floor, **{f"{k}_mib": v for k, v in results.items()},
                          **{f"{k}_plan_above_floor_mib": v for k, v in predicted.items()}}))


def planned_above_floor(model: Path, args) -> dict[str, float]:
    """What `align plan` says the same SFT runs need beyond the floor, per peft, in MiB."""
    return {peft: planned_stage_above_floor(model, "sft", [f"peft={peft}", f"model.name_or_path={model}",
                                                           "model.dtype=fp32", f"train.batch_size={args.batch_size}"])
            for peft in ("none", "lora", "qlora")}


if __name__ == "__main__":
    main()
