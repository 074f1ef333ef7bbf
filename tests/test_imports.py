"""The module graph (docs/design.md): acyclic, project imports at the top of each file, layers one way.

Read from the source with `ast` (nothing is imported): an edge A -> B for every `import B` /
`from B import x` in A (B.x when that is a module).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tttjax", "conversion", "configs", "launch")
# Optional heavy dependencies: a module that imports one at its top (the torch side, e.g. Mimi) may
# itself be imported inside a function, so that importing its user does not need it.
HEAVY = ("torch", "moshi", "tensorflow_datasets", "matplotlib", "wandb")
# Command-line modules: nothing below them may import them.
CLIS = {"tttjax.main", "tttjax.forward", "tttjax.generate", "tttjax.compile", "tttjax.eval.__main__",
        "conversion.from_pytorch", "conversion.to_pytorch", "conversion.moshi_server"}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def project_imports(tree: ast.AST, known: dict) -> list[tuple[str, ast.AST]]:
    """(imported project module, node) for every import statement anywhere in `tree`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES:
            targets = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            out += [(t, node) for t in targets] or [(node.module, node)]
    return out


def imports_heavy(tree: ast.Module) -> bool:
    names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
    return any(name.split(".")[0] in HEAVY for name in names)


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """(edges, problems: imports inside functions / classes, imports of unknown project modules)."""
    known = modules()
    trees = {name: ast.parse(path.read_text()) for name, path in known.items()}
    heavy = {name for name, tree in trees.items() if imports_heavy(tree)}
    edges, problems = {}, []
    for name, tree in trees.items():
        top_level = {id(n) for n in tree.body} | {id(n) for stmt in tree.body if isinstance(stmt, ast.If)
                                                   for n in stmt.body}
        edges[name] = set()
        for target, node in project_imports(tree, known):
            if id(node) not in top_level and target not in heavy:
                problems.append(f"{name}:{node.lineno} imports {target} inside a function or class")
            if target not in known:
                problems.append(f"{name}:{node.lineno} imports unknown module {target}")
            elif target != name:
                edges[name].add(target)
    return edges, problems


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_project_imports_at_top_and_acyclic():
    edges, problems = graph()
    assert len(edges) > 60
    assert not problems, "\n".join(problems)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_layers_run_one_way():
    edges, _ = graph()
    below_cli = [m for m in edges if m not in CLIS]
    assert not [(m, t) for m in below_cli for t in edges[m] if t in CLIS]
    library = [m for m in edges if m.startswith("tttjax.weights.")]
    assert "tttjax.weights.export" in library and "tttjax.weights.pytorch" in library
    assert not [(m, t) for m in library for t in edges[m] if t.startswith(("tttjax.train", "tttjax.checkpoint"))]
    # The model and what it stands on never reach up into weights, checkpoints, training or evaluation.
    core = [m for m in edges if m.startswith(("tttjax.model", "tttjax.parallel")) or m in ("tttjax.rundir",)]
    upper = ("tttjax.weights", "tttjax.checkpoint", "tttjax.train", "tttjax.eval", "conversion")
    assert not [(m, t) for m in core for t in edges[m] if t.startswith(upper)]
