"""The peer for bench/sft.py: TRL's SFTTrainer with its defaults (or `--set key=value` settings) on align's
tiny model and the demo's SFT split (conversational `messages` rows). Prints {"tokens_per_s", "tokens",
"runtime_s"}: real tokens over the time inside train()."""

import json

from common import train_trl_peer

from align.tasks.demo import path as demo_path


def main():
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in demo_path("sft").read_text().splitlines()]
    trainer, runtime = train_trl_peer(SFTTrainer, SFTConfig, rows, lr=3e-3)
    tokens = next(h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h)
    print(json.dumps({"tokens_per_s": tokens / runtime, "tokens": tokens, "runtime_s": runtime}))


if __name__ == "__main__":
    main()
