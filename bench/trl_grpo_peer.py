"""The peer for bench/grpo.py: TRL's GRPOTrainer (this environment's TRL) on the same SFT policy, demo prompts,
group size, prompts per step, micro-batch, response length, temperature and reward function (the demo's
checker) as align's GRPO stage: one optimizer step per generation batch in both, no reference (beta 0).

    python bench/trl_grpo_peer.py --sft DIR --steps N --prompts 8 --group 8 --micro 16 --tokens 16

Prints {"samples_per_s", "samples_per_s_train_only", "samples", "runtime_s", "trl"} as its last line: the
first clock starts before the trainer is built (TRL prepares the model there), the second at train()."""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from align.tasks.demo import path as demo_path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", required=True)
    for flag in ("--steps", "--prompts", "--group", "--micro", "--tokens"):
        ap.add_argument(flag, type=int, required=True)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from align.tasks.demo import check

    rows = [json.loads(line) for line in demo_path("sft").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["messages"][:1]} for r in rows])

    def checker(prompts, completions, **kwargs):
        return [float(check(p[-1]["content"], c[0]["content"])) for p, c in zip(prompts, completions)]

    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    policy = AutoModelForCausalLM.from_pretrained(args.sft)
    samples = args.prompts * args.group
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, report_to=[], save_strategy="no", logging_steps=args.steps, disable_tqdm=True,
            bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), learning_rate=args.lr,
            max_steps=args.steps, per_device_train_batch_size=args.micro,
            gradient_accumulation_steps=samples // args.micro, num_generations=args.group,
            max_completion_length=args.tokens, temperature=args.temperature, beta=0.0)
        start = time.perf_counter()
        trainer = GRPOTrainer(model=policy, reward_funcs=checker, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
        begin_train = time.perf_counter()
        trainer.train()
        end = time.perf_counter()
    total = args.steps * samples
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    print(json.dumps({"mean_length": sum(lengths) / max(len(lengths), 1), "samples_per_s": total / (end - start), "samples_per_s_train_only": total / (end - begin_train),
                      "samples": total, "runtime_s": end - start, "trl": trl.__version__}))


if __name__ == "__main__":
    sys.exit(main())
