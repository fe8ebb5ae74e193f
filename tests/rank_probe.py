"""A DeepSpeed-launched rank that runs `python -m align <overrides>` and then records what the trained model,
still in memory, outputs on a fixed input: the reference a reloaded stage output must reproduce.

    ALIGN_TEST_PROBE=probe.safetensors deepspeed --num_gpus 2 tests/rank_probe.py stage=sft deepspeed=zero3 ...

Every rank runs the probe forward (under ZeRO-3 each layer's parameters are gathered from all ranks, so
all must take part); rank 0 writes the logits.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROBE_IDS = [[259, 81, 68, 85, 257, 260, 70, 71]]


def probe_logits(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE_IDS)).logits.float()


if __name__ == "__main__":
    import align.__main__ as entry

    dispatch = entry.dispatch

    def dispatch_and_probe(*args, **kwargs):
        result = dispatch(*args, **kwargs)
        logits = probe_logits(result.model)
        if int(os.environ.get("RANK", "0")) == 0:
            from safetensors.torch import save_file

            save_file({"logits": logits.contiguous()}, os.environ["ALIGN_TEST_PROBE"])
        return result

    entry.dispatch = dispatch_and_probe
    entry.main()
