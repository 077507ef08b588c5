"""The import contract of the layers, read from the code, and the picture of them in docs/layers.md.

    python scripts/layers.py            check the contract; exit 1 naming every import that breaks it
    python scripts/layers.py --write    also write docs/layers.md from the code
    python scripts/layers.py --check    also fail when docs/layers.md is not what the code draws

Why a script of our own rather than import-linter: the contract is five lines (below), it also forbids
third-party imports (torch in the core or the service, BentoML in the core or training) and import circles
between modules, and it draws the picture from the same graph it checks. Every import counts, also one
inside a function: a lazy import upward is still an upward import. Run from anywhere; CI runs it with
`--check` (scripts/test) and tests/test_layers.py shows it failing on a deliberately wrong import.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICTURE = Path("docs/layers.md")


@dataclass(frozen=True)
class Layer:
    package: str
    summary: str
    may_import: tuple[str, ...]  # our packages below it (its own is always allowed)
    forbidden: tuple[str, ...] = ()  # third-party packages it must not import


# Bottom to top. training/ and serving/ stand side by side: neither imports the other.
LAYERS = (
    Layer(
        "tsimcne_core",
        "numpy core: bundle format, preprocessing, the placement pipeline and its record, neighbour search, the flag",
        (),
        ("torch", "torchvision", "bentoml"),
    ),
    Layer(
        "training",
        "torch: data, augmentations, trainer, export with calibration and index building",
        ("tsimcne_core",),
        ("bentoml",),
    ),
    Layer("serving", "BentoML: the service, its routes, the page", ("tsimcne_core",), ("torch", "torchvision")),
    Layer("tsimcne_map", "Python API: TSimCNE, Bundle, Ray", ("tsimcne_core", "training", "serving")),
    Layer("tsimcne_cli", "the tsimcne command", ("tsimcne_core", "training", "serving", "tsimcne_map")),
)
OURS = {layer.package for layer in LAYERS}


def modules(root: Path) -> dict[str, Path]:
    """Every module of our packages, by dotted name."""
    found = {}
    for layer in LAYERS:
        for path in sorted((root / layer.package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path, name: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> our modules it imports, contract breaches as 'file:line: why')."""
    known = modules(root)
    layer_of = {layer.package: layer for layer in LAYERS}
    edges: dict[str, set[str]] = defaultdict(set)
    breaches = []
    for name, path in known.items():
        layer = layer_of[name.split(".")[0]]
        allowed = {layer.package, *layer.may_import}
        where = path.relative_to(root)
        reported = set()
        for target, line in imports(path, name):
            top = target.split(".")[0]
            if (line, top) not in reported and top in OURS and top not in allowed:
                breaches.append(f"{where}:{line}: {layer.package} may not import {target} ({top} is not below it)")
                reported.add((line, top))
            elif (line, top) not in reported and top in layer.forbidden:
                breaches.append(f"{where}:{line}: {layer.package} may not import {top}")
                reported.add((line, top))
            module = target
            while module and module not in known:
                module = module.rpartition(".")[0]
            if module and module != name and not name.startswith(module + "."):
                edges[name].add(module)
    breaches += [f"import circle among {', '.join(circle)}" for circle in circles(edges)]
    return edges, sorted(set(breaches))


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def first_line(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")


def picture(root: Path) -> str:
    """docs/layers.md: the package graph (Mermaid) with each arrow's import count, then every module."""
    edges, _ = graph(root)
    known = modules(root)
    between: dict[tuple[str, str], int] = defaultdict(int)
    for source, targets in edges.items():
        for target in targets:
            a, b = source.split(".")[0], target.split(".")[0]
            if a != b:
                between[(a, b)] += 1
    lines = [
        "# The layers, drawn from the code",
        "",
        "Written by `python scripts/layers.py --write` from the imports themselves; CI fails when this file is",
        "not what the code draws, and when an import goes against the contract (scripts/layers.py: each layer",
        "imports only the layers below it; no torch in the core or the service, no BentoML in the core or",
        "training; no import circles). An arrow reads *imports*; its number counts the module-to-module",
        "imports that cross it.",
        "",
        "```mermaid",
        "flowchart BT",
    ]
    for layer in LAYERS:
        count = sum(1 for name in known if name.split(".")[0] == layer.package)
        lines.append(f'    {layer.package}["{layer.package}/ ({count} modules)<br/>{layer.summary}"]')
    lines += [f"    {a} -->|{n}| {b}" for (a, b), n in sorted(between.items())]
    lines += ["```", ""]
    for layer in reversed(LAYERS):
        lines += [f"## {layer.package}/", "", "| module | what it is for | imports of ours |", "|---|---|---|"]
        for name, path in known.items():
            if name.split(".")[0] != layer.package:
                continue
            ours = ", ".join(sorted(t for t in edges.get(name, ()) if t.split(".")[0] != layer.package)) or "–"
            lines.append(f"| `{name}` | {first_line(path)} | {ours} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the project checkout (default: this one)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", action="store_true", help="write docs/layers.md")
    what.add_argument("--check", action="store_true", help="fail when docs/layers.md is out of date")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    _, breaches = graph(root)
    for breach in breaches:
        print(breach, file=sys.stderr)
    drawn = picture(root)
    target = root / PICTURE
    stale = False
    if args.write:
        tmp = target.with_suffix(".md.tmp")
        tmp.write_text(drawn)
        tmp.replace(target)
        print(f"wrote {PICTURE}")
    elif args.check and (not target.exists() or target.read_text() != drawn):
        print(f"{PICTURE} is not what the code draws: run python scripts/layers.py --write", file=sys.stderr)
        stale = True
    if not breaches and not stale:
        print(f"layers ok: {len(modules(root))} modules in {', '.join(layer.package for layer in LAYERS)}")
    return 1 if breaches or stale else 0


if __name__ == "__main__":
    sys.exit(main())
