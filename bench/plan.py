"""`align plan` against references that need no GPU: DeepSpeed's own estimators of model states (ZeRO-2/3, with and
without offload, 1 and 8 GPUs), and the published rule-of-thumb figures for 6B, 33B and 70B models under stated
settings. Prints two markdown tables (docs/benchmarks.md, "Memory plan").

    python bench/plan.py

Loads no weights: the shapes are align's shipped config.json values (align/plan/shapes.json).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

GB = 1e9
# (model, what the figure is, the figure in GB, what it counts, align overrides that state its settings). The 6B
# and 33B figures are a run's whole memory (compared with the plan's peak); the 70B ones are the weights alone at
# 2, 1 and 0.5 bytes a parameter (compared with the plan's weights term).
SETTINGS = ["data=custom", "train.batch_size=1", "train.max_length=1024", "model.gradient_checkpointing=true",
            "model.dtype=bf16"]
FIGURES = [
    ("01-ai/Yi-6B", "6B full fine-tuning", 68.450, "peak", ["peft=none"]),
    ("01-ai/Yi-6B", "6B LoRA", 15.226, "peak", ["peft=lora"]),
    ("01-ai/Yi-6B", "6B QLoRA (4-bit)", 8.422, "peak", ["peft=qlora"]),
    ("huggyllama/llama-30b", "33B LoRA (16-bit base)", 80.0, "peak", ["peft=lora"]),
    ("huggyllama/llama-30b", "33B QLoRA (4-bit)", 20.0, "peak", ["peft=qlora"]),
    ("meta-llama/Llama-2-70b-hf", "70B full (16-bit weights)", 140.0, "weights", ["peft=none"]),
    ("meta-llama/Llama-2-70b-hf", "70B LoRA (8-bit base)", 70.0, "weights", ["peft=qlora", "peft.quant.bits=8"]),
    ("meta-llama/Llama-2-70b-hf", "70B QLoRA (4-bit)", 35.0, "weights", ["peft=qlora"]),
]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from align.config.paths import config_dir
    from align.config.recipes import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def deepspeed_table() -> str:
    from align.plan import memory
    from align.plan.shapes import shape_of

    lines = ["| model | ZeRO | offload | GPUs | align plan (GB/GPU) | DeepSpeed estimator (GB/GPU) | equal |",
             "|---|---|---|---|---|---|---|"]
    for name in ("Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-2-70b-hf"):
        s = shape_of(name)
        for zero, opt, param in ((2, False, False), (2, True, False), (3, False, False), (3, True, False),
                                 (3, True, True)):
            for gpus in (1, 8):
                ours = int(memory.weight_bytes(2 * s.params, s.largest_layer_params, zero, gpus, param)
                           + memory.trained_states(s.params, zero, gpus, opt, 2))
                theirs = memory.deepspeed_model_states(s, zero, gpus, opt, param)
                off = "optimizer + params" if param else "optimizer" if opt else "none"
                lines.append(f"| {name} | {zero} | {off} | {gpus} | {ours / GB:.3f} | {theirs / GB:.3f} | "
                             f"{'to the byte' if ours == theirs else ours - theirs} |")
    return "\n".join(lines)


def figures_table() -> str:
    from align.plan.shapes import shape_of
    from align.plan.stage_plan import plan_stage

    lines = ["| figure | published (GB) | counts | align plan, peak (GB) | of which weights (GB) | plan / figure |",
             "|---|---|---|---|---|---|"]
    for name, what, figure, term, overrides in FIGURES:
        cfg = compose("stage=sft", f"model.name_or_path={name}", *SETTINGS, *overrides)
        plan = plan_stage(cfg, shape_of(name), 1, None)
        weights = dict(plan.rows)["policy weights"]
        compared = plan.peak if term == "peak" else weights
        lines.append(f"| {what} ({name}) | {figure:.1f} | {term} | {plan.peak / GB:.1f} | {weights / GB:.1f} | "
                     f"{compared / GB / figure:.2f} |")
    return "\n".join(lines) + ("\n\nSettings: SFT, one GPU, no DeepSpeed (torch's AdamW on the weights' dtype), "
                               "bf16, batch 1 x 1024 tokens, activation checkpointing on.")


if __name__ == "__main__":
    print("## Model states: align plan vs DeepSpeed's estimators (full fine-tuning)\n")
    print(deepspeed_table())
    print("\n## Published figures\n")
    print(figures_table())
