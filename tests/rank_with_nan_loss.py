"""NaN losses on chosen SFT steps, for the non-finite guard's tests; run directly, a DeepSpeed-launched
rank: `python -m align <overrides>` with the loss made NaN on some optimizer steps of one rank.

    deepspeed --num_gpus 2 tests/rank_with_nan_loss.py stage=sft deepspeed=zero2 ...
    ALIGN_TEST_NAN_STEPS="3,4" (1-based steps) or "3+" (every step from 3); ALIGN_TEST_NAN_RANK=1
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def nan_compute_loss(spec: str, rank: int | None = None):
    """SFTTrainer.compute_loss, with the training loss times NaN on the steps `spec` names ("3,4" or "3+"),
    on process `rank` only (None: every process)."""
    from trl import SFTTrainer

    original, calls = SFTTrainer.compute_loss, {"n": 0}
    if spec.endswith("+"):
        bad = lambda n: n >= int(spec[:-1])  # noqa: E731
    else:
        bad = {int(s) for s in spec.split(",")}.__contains__

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = original(self, model, inputs, *args, **kwargs)
        if model.training:
            calls["n"] += 1
            if (rank is None or int(os.environ.get("RANK", "0")) == rank) and bad(calls["n"]):
                out = (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    return compute_loss


if __name__ == "__main__":
    from trl import SFTTrainer

    SFTTrainer.compute_loss = nan_compute_loss(os.environ["ALIGN_TEST_NAN_STEPS"],
                                               int(os.environ.get("ALIGN_TEST_NAN_RANK", "1")))
    from align.__main__ import main

    main()
