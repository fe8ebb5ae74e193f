"""One prepared script for one GPU, at most about 8 minutes, to run as soon as a GPU is lent (no hub is reachable
there either: the model is a random-initialised Qwen2.5-1.5B shape with the tiny byte-level tokenizer, on the demo's
data). In the environment with vLLM (`pip install -e ".[vllm]"`):

    python bench/gpu.py [--sft-steps 60] [--dpo-steps 30] [--grpo-steps 6]

Prints one table: SFT tokens/s and MFU (6 x parameters x tokens/s over the card's dense bf16 peak), DPO steps/s, GRPO
step time with rollout.engine=hf and =vllm (the first step left out) and the rollout's share of it, and each run's
peak GPU memory (nvidia-smi, sampled every 0.2 s) beside what `align plan` says the same run needs (sized at the
lengths the demo's rows have: bench/memory.py's stage_plan). bf16, full weights, one process per run; then SFT with
LoRA and with QLoRA, whose terms the CPU cannot check (docs/benchmarks.md). Nothing asserts a time."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, run_align
from memory import stage_plan

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
QWEN2_5_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                    intermediate_size=8960, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)


class PeakMemory:
    """The largest memory.used nvidia-smi reports while the block runs (MiB)."""

    def __enter__(self):
        self.peak, self.stop = 0, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.peak = max(self.peak, int(out[0]))
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def build(root: Path) -> tuple[Path, float]:
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from align.models.tiny import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = Qwen2Config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         dtype="bfloat16", **QWEN2_5_1_5B)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--dpo-steps", type=int, default=30)
    ap.add_argument("--grpo-steps", type=int, default=6)
    args = ap.parse_args()
    import torch

    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    gpu_memory = torch.cuda.get_device_properties(0).total_memory
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, params = build(Path(tmp))
        common = [f"model.name_or_path={folder}", "stage.init=base", "model.dtype=bf16"]
        runs = Path(tmp) / "runs"

        def measured(label: str, stage: str, overrides: list[str], root: Path, speed) -> None:
            with PeakMemory() as mem:
                m = run_align(stage, *common, *overrides, run_root=root)
            plan, _ = stage_plan(folder, stage, [*common, *overrides], lengths=True, gpu_memory=gpu_memory)
            rows.append((label, speed(m), mem.peak, plan.peak / 2**20))

        def mfu(m) -> str:
            share = f"{6 * params * m['train_tokens_per_s'] / peak:.1%}" if peak else "n/a (unknown card)"
            return f"{m['train_tokens_per_s']:.0f} tokens/s, MFU {share}"

        measured("SFT", "sft", ["peft=none", f"train.max_steps={args.sft_steps}", "train.batch_size=16"], runs, mfu)
        measured("DPO", "dpo", ["peft=none", f"train.max_steps={args.dpo_steps}", "train.batch_size=8"], runs,
                 lambda m: f"{m['global_step'] / m['train_runtime_s']:.2f} steps/s")
        for engine in ("hf", "vllm"):
            root = runs / engine

            def step_time(m, root=root) -> str:
                steps = [json.loads(x) for x in (root / "demo/grpo/history.jsonl").read_text().splitlines()][1:]
                return (f"{statistics.mean(h['time/step_s'] for h in steps):.2f} s/step, rollout "
                        f"{statistics.mean(h['time/generation_share'] for h in steps):.0%}")

            measured(f"GRPO ({engine})", "grpo", [
                "peft=none", f"rollout.engine={engine}", f"train.max_steps={args.grpo_steps}",
                "stage.rollout_batch_size=16", "stage.group_size=8", "train.batch_size=16", "train.grad_accum=8",
                "stage.max_new_tokens=256", "stage.eval_prompts=0", "stage.drop_zero_variance=false",
                "stage.dynamic_sampling=0", "train.logging_steps=1"], root, step_time)
        for peft in ("lora", "qlora"):
            measured(f"SFT ({peft})", "sft", [f"peft={peft}", "train.max_steps=20", "train.batch_size=16"],
                     runs / peft, mfu)
    print(f"\n{name}; random-initialised Qwen2.5-1.5B shape ({params / 1e9:.2f}B), bf16")
    print("| run | speed | peak GPU memory | align plan | plan / measured |\n|---|---|---|---|---|")
    for run, speed, peak_mib, plan_mib in rows:
        print(f"| {run} | {speed} | {peak_mib / 1024:.1f} GiB | {plan_mib / 1024:.1f} GiB | "
              f"{plan_mib / max(peak_mib, 1):.2f} |")


if __name__ == "__main__":
    main()
