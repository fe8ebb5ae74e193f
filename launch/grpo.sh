''''exec "${PYTHON:-python3}" "$0" --from-bash "$@" # '''
"""launch/grpo.sh: the GRPO stage under the DeepSpeed launcher; valid bash and valid Python.

    bash launch/grpo.sh [--num_gpus N] [--hostfile F] [overrides]
    deepspeed [--num_gpus N] launch/grpo.sh [overrides]

Runs `python -m align stage=grpo deepspeed=zero2 [overrides]` in every rank (a deepspeed= override
replaces zero2). See align/launch.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing

from align.launch import main  # noqa: E402

main("grpo", __file__)
