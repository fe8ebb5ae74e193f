"""The stages, one module each: its schema (the `stage.*` keys), its `run(cfg)` and its `SPEC` (a StageSpec,
align/config/registry.py). A built-in stage is its module here plus its name in BUILTIN; a stage from another
package registers through the `align.stages` entry point instead."""

BUILTIN = ("sft", "rm", "dpo", "kto", "iterative_dpo", "ppo", "grpo", "eval")  # the built-in stage modules, in the order --help lists them
