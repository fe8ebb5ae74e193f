"""docs/configuration.md from the schema (align/config/schema.py and each stage's StageSpec): every key with its type,
default, allowed values and help, so the reference cannot drift from the code.

    python -m align.config.reference            # rewrite docs/configuration.md
    python -m align.config.reference --check    # exit 1 when the committed file is stale (a test runs this)
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
HEADER = """# Configuration reference

Generated from the schema by `python -m align.config.reference` (a test fails when this file is stale).
The schema holds every default once; a config group's YAML file (`conf/<group>/<option>.yaml`) holds
only what that option changes. Inside a recipe a stage's keys take its name (`<stage>.beta=0.1`,
`<stage>.train.epochs=2`); alone they are `stage.<key>`.
"""


def _type(hint) -> str:
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    text = text or str(hint).replace("typing.", "")
    return text.replace("NoneType", "None").replace(" | None", " or null")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(group)"
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value}" if not isinstance(value, str) else value


def _rows(schema: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(schema)
    rows = []
    for f in dataclasses.fields(schema):
        if f.name == "name" and prefix == "stage.":
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            rows += _rows(kind, f"{prefix}{f.name}.")
            continue
        check = f.metadata.get("check")
        allowed = check.describe() if check is not None else ""
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {_type(kind)} | `{_default(f)}` | {allowed} | {help_text} |")
    return rows


def _groups() -> str:
    """Each config group's options (`group=option`) with the first comment line of its YAML file."""
    from align.config.paths import config_dir

    conf = config_dir()
    rows = ["\n## Config groups\n\nPick one option per group (`peft=lora`); the file lists what it changes.\n",
            "| group | option | what |", "|---|---|---|"]
    for group in sorted(p for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for f in sorted(group.rglob("*.yaml")):
            head = []  # the comment block at the top, up to its first sentence
            for ln in f.read_text().splitlines():
                if not ln.startswith("#"):
                    break
                if not ln.startswith("# @package"):
                    head.append(ln.lstrip("# ").strip())
            text = " ".join(head)
            what = (text.split(". ")[0].rstrip(".") + "." if text else "").replace("|", "\\|")
            rows.append(f"| `{group.name}` | `{f.relative_to(group).with_suffix('')}` | {what} |")
    return "\n".join(rows)


def render() -> str:
    from align.config import schema as config
    from align.config.registry import registry

    parts = [HEADER]
    for f in dataclasses.fields(config.SharedConfig):
        if f.name in ("stage", "pipeline"):
            continue
        schema = typing.get_type_hints(config.SharedConfig)[f.name]
        parts.append(f"\n## `{f.name}`\n\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|")
        parts += _rows(schema, f"{f.name}.")
    parts.append(_groups())
    for name, spec in registry().items():
        reads = (f"\n\nReads the reward group; `reward.kind=auto` is `{spec.default_reward}` here."
                 if spec.reads_reward and spec.default_reward else "")
        parts.append(f"\n## `stage={name}`{reads}\n\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|")
        parts += _rows(spec.schema, "stage.")
    return "\n".join(parts) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run `python -m align.config.reference`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
