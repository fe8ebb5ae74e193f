''''exec "${PYTHON:-python3}" "$0" --from-bash "$@" # '''
"""launch/rm.sh: the RM stage under the DeepSpeed launcher; valid bash and valid Python.

    bash launch/rm.sh [--num_gpus N] [--hostfile F] [overrides]
    deepspeed [--num_gpus N] launch/rm.sh [overrides]

Runs `python -m align stage=rm deepspeed=zero2 [overrides]` in every rank (a deepspeed= override
replaces zero2). See align/launch.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing

from align.launch import main  # noqa: E402

main("rm", __file__)
