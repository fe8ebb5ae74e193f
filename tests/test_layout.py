"""The layout (docs/architecture.md): one place for each concern, checked.

- No stage name is written in code outside align/stages: what used to branch on a name is a StageSpec field.
  A string equal to a stage's name elsewhere must be one of the few other meanings listed here (a data split,
  an advantage kind, a reward component), each with its reason.
- The import layers hold (import-linter's contracts in .importlinter): config below data/models/tasks, below
  run, below rl/rewards, below stages, below the CLI; no cycles.
- No function is over 60 lines.
- A built-in-style stage is its module plus one registry line, and runs alone and in a recipe.
- Every relative link in the README and docs/ reaches its file, and its #anchor a heading of that file.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

ALIGN = REPO / "align"
STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "eval")
# a string equal to a stage name that means something else: (file, string) -> why
OTHER_MEANINGS = {
    ("align/tasks/demo.py", "sft"): "the demo's SFT data split (sft.jsonl)",
    ("align/tasks/zoo.py", "sft"): "a zoo task's SFT data split (sft.jsonl)",
    ("align/tasks/gym.py", "sft"): "a reasoning-gym task's SFT data split (sft.jsonl)",
    ("align/data/loader.py", "sft"): "the kind of data rows (SFT conversations) and its split",
    ("align/run/fingerprint.py", "eval"): "the data.eval key",
    ("align/rl/advantages.py", "grpo"): "stage.advantage=grpo, an advantage kind",
    ("align/rewards/__init__.py", "rm"): "the reward-model component of the reward group",
    ("align/config/schema.py", "rm"): "the reward-model component of the reward group",
}
STAGE_ARG = re.compile(r"\bstage=(" + "|".join(STAGES) + r")\b")
SECTION_KEY = re.compile(r"\b(" + "|".join(STAGES) + r")\.[a-z_.]+=")  # a recipe section's key: dpo.beta=0.1


def _code_strings(path: Path):
    """(line, text) of every string constant in the module that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_stage_name_in_code_outside_the_stages():
    found = []
    for path in sorted(ALIGN.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("align/stages/"):
            continue
        for line, text in _code_strings(path):
            if (text in STAGES and (rel, text) not in OTHER_MEANINGS) or STAGE_ARG.search(text) or SECTION_KEY.search(text):
                found.append(f"{rel}:{line}: {text!r}")
    assert not found, "stage names outside align/stages (declare it in the StageSpec instead):\n" + "\n".join(found)


def test_the_name_check_catches_a_branch_on_a_stage_name(tmp_path):
    """The check above can fail: a module that branches on a stage's name is flagged."""
    module = tmp_path / "m.py"
    module.write_text('"""doc naming ppo"""\ndef f(cfg):\n    return cfg.stage.name == "ppo" or "run stage=rm first"\n')
    texts = sorted(t for _, t in _code_strings(module))
    assert texts == ["ppo", "run stage=rm first"]
    assert "ppo" in STAGES and STAGE_ARG.search(texts[1]) and SECTION_KEY.search("python -m align recipe=demo dpo.beta=0.1")


def test_import_layers_hold():
    """import-linter's contract (.importlinter): no module imports a layer above its own. In a child process:
    import-linter's logging setup disables every logger that exists (align's among them) in the process it runs in."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(REPO / '.importlinter')!r}, no_cache=True))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "1 kept, 0 broken" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]


def test_no_import_cycles():
    """No module reaches itself through its imports (grimp, import-linter's graph; imports inside functions count)."""
    import grimp

    graph = grimp.build_graph("align")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join((module, *back)))
    assert not cycles, "\n".join(cycles[:10])


def test_no_function_over_60_lines():
    long = []
    for path in sorted(ALIGN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "\n".join(long)


def test_no_module_sits_flat_in_align():
    """align/ holds the packages and the entry points only."""
    flat = sorted(p.name for p in ALIGN.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "launch.py"], flat


LINK = re.compile(r"\]\(([^)\s]+)\)")  # a markdown link's target: [text](target)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown text's headings: lower case, punctuation but - and _ dropped, spaces to -.
    A `#` line inside a fenced code block (a shell comment) is not a heading."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            anchors.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return anchors


def broken_links(files) -> list[str]:
    broken, anchors = [], {}  # each target file's headings read once
    for doc in files:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            name, _, anchor = target.partition("#")
            path = (doc.parent / name).resolve() if name else doc.resolve()
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
                continue
            if anchor and path.suffix == ".md":
                if path not in anchors:
                    anchors[path] = heading_anchors(path.read_text())
                if anchor not in anchors[path]:
                    broken.append(f"{doc.name}: {target} (no such heading in {path.name})")
    return broken


def test_every_link_in_the_docs_reaches_its_file_and_heading():
    assert broken_links([REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]) == []


def test_the_link_check_catches_a_renamed_heading_a_missing_file_and_a_code_comment(tmp_path):
    (tmp_path / "a.md").write_text("# Tool use: recipe=agent (2026-12-07)\n\n[ok](#tool-use-recipeagent-2026-12-07)\n"
                                   "```bash\n# the demo\npython -m align recipe=demo\n```\n")
    (tmp_path / "b.md").write_text("[old](a.md#tool-use-recipeagent-2026-12-05) [gone](c.md) [web](https://x.org/#y) "
                                   "[comment](a.md#the-demo)\n")
    assert broken_links([tmp_path / "a.md", tmp_path / "b.md"]) == [
        "b.md: a.md#tool-use-recipeagent-2026-12-05 (no such heading in a.md)", "b.md: c.md (no such file)",
        "b.md: a.md#the-demo (no such heading in a.md)"]
