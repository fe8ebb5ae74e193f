"""SFT throughput: align's SFT stage (packed, padding-free batches) vs TRL's SFTTrainer with its
defaults — same tiny model, demo data, batch size and number of steps, in the same run.

    python bench/sft.py [--steps 150] [--batch-size 16]

Prints the real (non-pad) training tokens per second of each and the ratio (target >= 1.5x). Both
count tokens the same way: TRL's logged `num_tokens` (attention-mask tokens; in padding-free batches,
the packed positions)."""

from common import cli, compare, report

if __name__ == "__main__":
    ours, peer = compare("sft", cli(__doc__), ["stage.packing=true"], "trl_sft_peer.py")
    report("SFT tokens/s", "tokens/s", ours["train_tokens_per_s"], peer["tokens_per_s"], "TRL SFTTrainer (defaults)",
           1.5)
