"""The peer for bench/ppo.py: the last TRL release that shipped a PPO trainer (trl 1.12,
`trl.experimental.ppo.PPOTrainer`), run by bench/ppo.py in a virtual environment of its own, on the same
SFT policy, reward model (also the critic's start) and demo prompts as align's PPO stage, with the same
rollout batch, mini-batch, PPO epochs, response length, temperature and KL coefficient.

    python bench/trl_ppo_peer.py --sft DIR --rm DIR --steps N --rollout 32 --mini 16 --epochs 4 --tokens 16

Prints {"samples_per_s", "samples", "runtime_s", "trl"} as its last line."""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from align.tasks.demo import path as demo_path

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    for flag in ("--sft", "--rm"):
        ap.add_argument(flag, required=True)
    for flag in ("--steps", "--rollout", "--mini", "--epochs", "--tokens"):
        ap.add_argument(flag, type=int, required=True)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    rows = [json.loads(line) for line in demo_path("sft").read_text().splitlines()]
    prompts = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for r in rows]
    dataset = Dataset.from_dict({"input_ids": prompts})
    policy = AutoModelForCausalLM.from_pretrained(args.sft)
    reference = AutoModelForCausalLM.from_pretrained(args.sft)
    reward = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1)
    for m in (reward, value):
        m.config.pad_token_id = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        config = PPOConfig(
            output_dir=tmp, report_to=[], save_strategy="no", logging_steps=args.steps, disable_tqdm=True,
            bf16=torch.cuda.is_available(), learning_rate=args.lr,
            per_device_train_batch_size=args.mini, gradient_accumulation_steps=args.rollout // args.mini,
            num_mini_batches=args.rollout // args.mini, num_ppo_epochs=args.epochs,
            total_episodes=args.steps * args.rollout, response_length=args.tokens, temperature=args.temperature,
            kl_coef=args.kl_coef, stop_token="eos", num_sample_generations=0, sft_model_path=args.sft,
            reward_model_path=args.rm)
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward, train_dataset=dataset, value_model=value)
        start = time.perf_counter()
        trainer.train()
        runtime = time.perf_counter() - start
    samples = trainer.state.episode
    print(json.dumps({"samples_per_s": samples / runtime, "samples": samples, "runtime_s": runtime,
                      "trl": trl.__version__}))


if __name__ == "__main__":
    sys.exit(main())
