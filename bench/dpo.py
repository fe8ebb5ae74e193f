"""DPO speed: align's DPO stage against TRL's DPOTrainer at its default (a frozen reference copy) and with
its reference log-probs precomputed, and against a bare PyTorch loop (the floor) — the same tiny model,
demo pairs, sigmoid loss, beta, learning rate, batch size and number of optimizer steps, one after the
other in one invocation.

    python bench/dpo.py [--steps 150] [--batch-size 16]

Two clocks per run: optimizer steps per second inside the training loop (the Trainer's `train_runtime`;
the bare loop's own), and end to end: steps over the process's wall time from start to exit. A precompute
of the reference's log-probs (align's `stage.precompute_ref_logps=true`, TRL's
`precompute_ref_log_probs=True`, the bare loop's) runs before the training loop, so only the end-to-end
clock counts it; TRL runs it inside its trainer's constructor. align also evaluates its eval split and saves
at the end, which the end-to-end clock counts against it."""

from common import cli, run_align, run_peer, table


def main():
    args = cli(__doc__, 150)
    steps, batch = str(args.steps), str(args.batch_size)
    rows = []

    def align(name, *overrides):
        m = run_align("dpo", f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.logging_steps={steps}",
                      "stage.loss_type=sigmoid", *overrides)
        rows.append((name, m["global_step"] / m["train_runtime_s"], m["global_step"] / m["process_s"]))

    def peer(name, script, *extra):
        p = run_peer(script, "--steps", steps, "--batch-size", batch, *extra)
        rows.append((name, p["steps_per_s"], p["steps"] / p["process_s"]))

    align("align, reference precomputed (stage.precompute_ref_logps=true)", "stage.precompute_ref_logps=true")
    align("align, default (frozen reference copy)")
    peer("TRL DPOTrainer, default (frozen reference copy)", "trl_dpo_peer.py")
    peer("TRL DPOTrainer, precompute_ref_log_probs=True", "trl_dpo_peer.py", "--set", "precompute_ref_log_probs=true")
    peer("bare PyTorch loop, reference precomputed", "bare_dpo.py")
    table(f"DPO optimizer steps/s, {steps} steps, batch {batch}", "steps/s", rows,
          "align, reference precomputed (stage.precompute_ref_logps=true)")


if __name__ == "__main__":
    main()
