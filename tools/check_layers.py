"""The house's import rules (DESIGN §2), checked from every import statement in `supervise/`.

Counts module-level imports, imports inside functions and under ``TYPE_CHECKING`` alike.
Fails (exit 1, one line per problem) when a room imports a room above it, when an import
loop crosses two rooms or sits inside a room that must be loop-free, or when a module imports
its own package through the package's face. Run: ``python tools/check_layers.py [PACKAGE_DIR]``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "supervise"
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Rooms from the top down; a room may import only rooms below it. Rooms on one line share a
# level and may not import each other. The face (`supervise/__init__.py`), `__main__`, the
# version and the private top-level helpers are handled separately below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("_demo",),
    ("_testing",),
    ("agents",),
    ("tasks", "torch"),
    ("cluster", "store"),
    ("snapshot",),
    ("policy",),
    ("runtime",),
    ("_warm",),
    ("_validation",),
    ("telemetry",),
    ("_version",),
)
# Rooms in which no import loop may sit at all (a loop between two modules of one room).
LOOP_FREE: frozenset[str] = frozenset({"agents", "torch", "cluster", "telemetry", "cli"})
# Where torch may be imported: the training-process side, and the showcase's model side (its
# training program, run as a worker, and the bit-for-bit comparison of its results, imported
# lazily) — never by an agent.
TORCH_ROOMS: frozenset[str] = frozenset({"torch"})
TORCH_MODULES: frozenset[str] = frozenset({f"{PACKAGE}._demo.train", f"{PACKAGE}._demo.compare"})
# Rooms above the library that may import the package face (`import supervise`).
FACE_USERS: frozenset[str] = frozenset({"cli", "_demo", "_testing"})


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """Every module ``name`` imports (absolute names; ``supervise.*`` and torch), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in (PACKAGE, "torch"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "torch":
                yield mod, node.lineno
            if mod.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                yield (sub if sub in modules else mod), node.lineno


def room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def level(r: str) -> int | None:
    for i, rooms in enumerate(LAYERS):
        if r in rooms:
            return i
    return None


def find_modules(root: Path) -> dict[str, Path]:
    """Every module under ``root`` by its dotted name."""
    return {module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Module -> the modules it imports, each with the line of its first import."""
    g: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for imported, line in imports(path, name, modules):
            if imported.split(".")[0] == "torch":
                edges.setdefault("torch", line)
                continue
            target = imported
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                edges.setdefault(target, line)
        g[name] = edges
    return g


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start, first in g.items():
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(first))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(g.get(w, {}))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def problems(root: Path = DEFAULT_ROOT) -> list[str]:
    """One line per broken rule, empty when the house is in order."""
    modules = find_modules(root)
    g = graph(modules)
    found: list[str] = []
    for src, edges in g.items():
        src_room = room(src)
        for dst, line in edges.items():
            dst_room = room(dst)
            where = f"{modules[src].relative_to(root.parent)}:{line}"
            if dst == "torch":
                if src_room not in TORCH_ROOMS and src not in TORCH_MODULES:
                    found.append(f"{where}: {src} imports torch (only {PACKAGE}/torch/ may)")
                continue
            if dst == PACKAGE:
                if src_room not in FACE_USERS and src not in (PACKAGE, f"{PACKAGE}.__main__"):
                    found.append(f"{where}: {src} imports the package face `{PACKAGE}`")
                continue
            if src_room == dst_room:
                pkg = f"{PACKAGE}.{src_room}"
                if dst == pkg and src != pkg and src_room:
                    found.append(f"{where}: {src} imports its own package's face {pkg}")
                continue
            if src in (PACKAGE, f"{PACKAGE}.__main__"):
                continue
            ls, ld = level(src_room), level(dst_room)
            if ls is None:
                found.append(f"{where}: {src} is in no room of the layer table")
            elif ld is None:
                found.append(f"{where}: {dst} is in no room of the layer table")
            elif ld <= ls:
                found.append(f"{where}: {src_room}/ may not import {dst_room}/ ({src} -> {dst})")
    for comp in cycles(g):
        rooms = {room(m) for m in comp}
        if len(rooms) > 1 or rooms & LOOP_FREE:
            found.append(f"import loop: {' <-> '.join(comp)}")
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve() if argv else DEFAULT_ROOT
    found = problems(root)
    for line in found:
        print(line)
    if found:
        print(f"check_layers: {len(found)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_layers: {len(find_modules(root))} modules, layers and loops OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
