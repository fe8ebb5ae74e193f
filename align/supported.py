"""Which stage x ZeRO x weights combinations align runs, checked before any model is loaded.

Every stage (sft, rm, dpo, ppo) runs under ZeRO 1, 2, 3 and 3+offload with full, LoRA and QLoRA weights
(tests/test_zero_matrix.py). What is refused here is what was measured to go wrong or cannot mean
anything; the message says what to change.
"""

from __future__ import annotations

from align import distributed, validate


class Unsupported(ValueError):
    """A configuration align refuses before loading a model (exit code 2, like bad data)."""


def problems(cfg) -> list[str]:
    out = validate.problems(cfg)  # every key against its declared range (peft, model.dtype, ...), and relations
    later = []
    try:
        distributed.deepspeed_config(cfg)
    except ValueError as e:
        later.append(str(e))
    stage = cfg.stage
    if stage.name == "dpo" and stage.precompute_ref_logps and cfg.deepspeed.zero_stage == 3:
        # TRL wraps the policy in a second (inference) ZeRO-3 engine for the precompute pass. Measured on 2 ranks:
        # the training diverges from ZeRO-2's from step 2 on and the saved adapter no longer reproduces the
        # trained model's logits (measured for tests/test_supported.py; ZeRO-2 stays allowed, tests/test_zero_matrix.py).
        later.append("stage.precompute_ref_logps=true does not work under ZeRO-3 (TRL shards the policy a second "
                     "time for the reference pass, and the trained weights come out wrong); use deepspeed=zero2 "
                     "(or zero1) with it, or keep ZeRO-3 and set stage.precompute_ref_logps=false")
    reported = {p.split("=", 1)[0] for p in out}  # one message per key (deepspeed_config checks zero_stage too)
    return out + [p for p in later if p.split(" ", 1)[0] not in reported]


def check(cfg) -> None:
    """Raise Unsupported listing every problem of `cfg` (one stage's config)."""
    found = problems(cfg)
    if found:
        where = f"stage={cfg.stage.name}"
        raise Unsupported(f"{where}: this configuration is not supported:\n" + "\n".join(f"  - {p}" for p in found))
