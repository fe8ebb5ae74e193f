"""The peer for bench/dpo.py: TRL's DPOTrainer with its defaults (a frozen reference copy, sigmoid
loss) on align's tiny model and the demo's preference pairs, as conversations like align feeds them.
Prints {"steps_per_s", "steps", "runtime_s"}: steps over the time inside train(); `--set key=value`
changes a DPOConfig setting (bench/dpo.py: precompute_ref_log_probs=true)."""

import json

from common import train_trl_peer

from align.tasks.demo import path as demo_path


def main():
    from trl import DPOConfig, DPOTrainer

    rows = []
    for line in demo_path("prefs").read_text().splitlines():
        r = json.loads(line)
        rows.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                     "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    trainer, runtime = train_trl_peer(DPOTrainer, DPOConfig, rows, lr=3e-4)
    steps = trainer.state.global_step
    print(json.dumps({"steps_per_s": steps / runtime, "steps": steps, "runtime_s": runtime}))


if __name__ == "__main__":
    main()
