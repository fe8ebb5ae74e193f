"""A DeepSpeed-launched rank for tests: `python -m align <overrides>` with the training loss made NaN
on some optimizer steps of one rank.

    deepspeed --num_gpus 2 tests/rank_with_nan_loss.py stage=sft deepspeed=zero2 ...
    ALIGN_TEST_NAN_STEPS="3,4" (1-based steps) or "3+" (every step from 3); ALIGN_TEST_NAN_RANK=1
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def poison_sft_loss(spec: str, rank: int) -> None:
    from trl import SFTTrainer

    original, calls = SFTTrainer.compute_loss, {"n": 0}
    if spec.endswith("+"):
        bad = lambda n: n >= int(spec[:-1])  # noqa: E731
    else:
        steps = {int(s) for s in spec.split(",")}
        bad = steps.__contains__

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = original(self, model, inputs, *args, **kwargs)
        if model.training:
            calls["n"] += 1
            if int(os.environ.get("RANK", "0")) == rank and bad(calls["n"]):
                out = (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    SFTTrainer.compute_loss = compute_loss


if __name__ == "__main__":
    poison_sft_loss(os.environ["ALIGN_TEST_NAN_STEPS"], int(os.environ.get("ALIGN_TEST_NAN_RANK", "1")))
    from align.__main__ import main

    main()
