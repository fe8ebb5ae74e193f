"""`python -m align plan`: whether every stage of a run fits in GPU memory, before anything loads.

shapes.py reads a model's shape from its config.json (a local folder, the hub cache, or the shapes shipped for
align's model groups) and counts its parameters on the meta device; memory.py is the arithmetic (pure functions:
model states under each ZeRO stage, activations, log-prob chunks, KV cache); stage_plan.py puts together what each
stage holds (its StageSpec's `held`); report.py prints the table, the verdict and the overrides that make it fit.
"""
