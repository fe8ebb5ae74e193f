''''exec "${PYTHON:-python3}" "$0" --from-bash "$@" # '''
"""launch/dpo.sh: the DPO stage under the DeepSpeed launcher; valid bash and valid Python.

    bash launch/dpo.sh [--num_gpus N] [--hostfile F] [overrides]
    deepspeed [--num_gpus N] launch/dpo.sh [overrides]

Runs `python -m align stage=dpo deepspeed=zero2 [overrides]` in every rank (a deepspeed= override
replaces zero2). See align/launch.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing

from align.launch import main  # noqa: E402

main("dpo", __file__)
