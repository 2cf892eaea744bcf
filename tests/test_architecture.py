"""The rooms of the house keep to themselves: no import cycles anywhere in pipeline/, the
model side never imports training, data imports neither, core imports nothing else.
Read from the source (every import statement, function-level ones included), so a new
cycle or a reach across rooms fails here before anyone has to untangle it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# room -> the rooms (and top-level modules) it may import. "section" is a room's config
# section (data/config.py, model/config.py, training/config.py): declared by its owner,
# composed by pipeline/config, and importing nothing but core, so the composition never
# closes a cycle.
ALLOWED = {
    "core": {"core"},
    "section": {"core"},
    "data": {"core", "data", "config", "section"},
    "model": {"core", "model", "config", "section"},
    "training": {"core", "data", "model", "training", "config", "section"},
    "config": {"core", "config", "section"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The pipeline modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:  # `from pipeline.model import gpt2` names a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(path, known) - {name} for name, path in found.items()}


def room(module: str) -> str:
    """core | section | data | model | training | config, or "stage" for what sits on top: the
    stages (pipeline.<stage>, pipeline.config.__main__), the CLI and its key reference."""
    parts = module.split(".")
    if parts[-1] == "__main__" or len(parts) < 2 or parts[1] not in ALLOWED:
        return "stage"
    if len(parts) == 3 and parts[2] == "config" and parts[1] != "config":
        return "section"
    return parts[1]


def test_there_is_no_import_cycle():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_each_room_imports_only_what_it_may():
    reaches = [
        f"{m} imports {dep}"
        for m, deps in graph().items()
        if room(m) in ALLOWED
        for dep in sorted(deps)
        if room(dep) not in ALLOWED[room(m)]
    ]
    assert not reaches, "\n".join(reaches)


def test_the_rooms_exist_and_the_stages_stay_on_top():
    found = modules()
    for stage in ("prepare", "train", "evaluate", "export", "generate", "book", "clean", "cli"):
        assert f"pipeline.{stage}" in found  # python -m pipeline.<stage> keeps working
    for name in set(ALLOWED) - {"section"}:
        assert f"pipeline.{name}" in found, name
    for owner in ("data", "model", "training"):  # each room declares its config section
        assert f"pipeline.{owner}.config" in found, owner
