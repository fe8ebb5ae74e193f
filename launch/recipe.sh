''''exec "${PYTHON:-python3}" "$0" --from-bash "$@" # '''
"""launch/recipe.sh: a whole recipe (its stages in order) under the DeepSpeed launcher; valid bash and valid Python.

    bash launch/recipe.sh [--num_gpus N] [--hostfile F] recipe=NAME [overrides]
    deepspeed [--num_gpus N] launch/recipe.sh recipe=NAME [overrides]

Runs `python -m align deepspeed=zero2 recipe=NAME [overrides]` in every rank (a deepspeed= override
replaces zero2). See align/launch.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing

from align.launch import main  # noqa: E402

main("recipe", __file__)
