"""SFT throughput: align's SFT stage against TRL's SFTTrainer at its default and at its best settings, and
against a bare PyTorch loop over align's own batches (the floor) — the same tiny model, demo data,
learning rate and number of optimizer steps, one after the other in one invocation.

    python bench/sft.py [--steps 300] [--batch-size 16]

Two clocks per run: real (non-pad) tokens per second inside the training loop (the Trainer's
`train_runtime`; the bare loop's own), and end to end: the run's tokens over its process's wall time from
start to exit (imports, tokenizing, packing, model load, training, and for align its end-of-run eval and
save). align's packed rows carry about 3x the tokens of TRL's padded rows of the same batch size, so TRL at
3x the batch (the same tokens per step) is its best setting on the CPU here; TRL's own packing and
padding-free modes are shown too. Both sides count tokens the same way (TRL's `num_tokens`; align's
collator count of non-padding tokens)."""

from common import cli, run_align, run_peer, table


def main():
    args = cli(__doc__, 300)
    steps, batch = str(args.steps), str(args.batch_size)
    rows = []

    def align(name, *overrides):
        m = run_align("sft", f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.logging_steps={steps}",
                      "train.lr=3e-3", *overrides)  # the peers' lr: the same work
        tokens = m["train_tokens_per_s"] * m["train_runtime_s"]
        rows.append((name, m["train_tokens_per_s"], tokens / m["process_s"]))

    def peer(name, script, *extra, batch_size=batch):
        p = run_peer(script, "--steps", steps, "--batch-size", batch_size, *extra)
        rows.append((name, p["tokens_per_s"], p["tokens"] / p["process_s"]))

    align("align, packed rows (stage.packing=true)", "stage.packing=true")
    align("align, default (padded rows)")
    peer("TRL SFTTrainer, default", "trl_sft_peer.py")
    peer(f"TRL SFTTrainer, batch {3 * args.batch_size} (align's tokens per step)", "trl_sft_peer.py",
         batch_size=str(3 * args.batch_size))
    # packed like align's rows: into 64-token sequences (TRL's default max_length, 1024, makes each step 16x the work)
    peer("TRL SFTTrainer, packing=True, max_length=64", "trl_sft_peer.py", "--set", "packing=true",
         "--set", "max_length=64")
    peer("TRL SFTTrainer, padding_free=True", "trl_sft_peer.py", "--set", "padding_free=true",
         "--set", "max_length=null")  # TRL refuses padding_free with a max_length it cannot enforce unpacked
    peer("bare PyTorch loop on align's packed rows", "bare_sft.py")
    table(f"SFT tokens/s, {steps} optimizer steps, batch {batch} (TRL's best: batch {3 * args.batch_size})",
          "tokens/s", rows, "align, packed rows (stage.packing=true)")


if __name__ == "__main__":
    main()
