''''exec "${PYTHON:-python3}" "$0" --from-bash "$@" # '''
"""launch/stage.sh: any stage (or a recipe) under the DeepSpeed launcher; valid bash and valid Python.

    deepspeed [--num_gpus N] launch/stage.sh stage=NAME [overrides]     any registered stage, yours included
    deepspeed [--num_gpus N] launch/dpo.sh [overrides]                  the same file under the stage's name
    bash launch/stage.sh [--num_gpus N] [--hostfile F] stage=NAME [overrides]

launch/<stage>.sh and launch/recipe.sh are links to this file: the name it is called by is the stage it runs
(`stage` itself: the stage= override; `recipe`: the recipe= override). Runs `python -m align stage=NAME
deepspeed=zero2 [overrides]` in every rank (a deepspeed= override replaces zero2). See align/launch.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing

from align.launch import main  # noqa: E402

main(Path(__file__).stem, __file__)
