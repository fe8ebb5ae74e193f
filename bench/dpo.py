"""DPO speed: align's DPO stage (reference log-probs precomputed once, no reference model in the
step) vs TRL's DPOTrainer with its defaults — same tiny model, demo pairs, batch size and number of
steps, in the same run.

    python bench/dpo.py [--steps 150] [--batch-size 16]

Prints optimizer steps per second of each (the precomputation counts in align's train time) and the
ratio (target >= 1.3x)."""

from common import cli, compare, report

if __name__ == "__main__":
    ours, peer = compare("dpo", cli(__doc__), ["stage.precompute_ref_logps=true"], "trl_dpo_peer.py")
    report("DPO steps/s", "steps/s", ours["global_step"] / ours["train_runtime_s"], peer["steps_per_s"],
           "TRL DPOTrainer (defaults)", 1.3)
