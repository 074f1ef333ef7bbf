"""The module graph against docs/design.md's layer table: acyclic, project imports at the top of each
file, layers one way; and the tree's other structural rules (no function over 80 lines, the
contract sections the code cites exist).

Read from the source with `ast` (nothing is imported): an edge A -> B for every `import B` /
`from B import x` in A (B.x when that is a module).
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tttjax", "conversion", "configs", "launch")
# Optional heavy dependencies: a module that imports one at its top (the torch side, e.g. Mimi) may
# itself be imported inside a function, so that importing its user does not need it.
HEAVY = ("torch", "moshi", "tensorflow_datasets", "matplotlib", "wandb")
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


def layer_table() -> list[list[str]]:
    """The backticked paths of each row of docs/design.md's layer table, bottom layer first."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split("## Layers and the direction of imports")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    return [re.findall(r"`([\w/.]+)`", row.split("|")[2]) for row in rows]


def layer_of(module: str, table: list[list[str]]) -> int:
    """The layer whose most specific entry (a file, else the longest package prefix) holds `module`."""
    path = module.replace(".", "/")
    best = None
    for layer, entries in enumerate(table):
        for entry in entries:
            if entry.endswith(".py") and entry[:-3] in (path, f"{path}/__init__"):
                return layer
            if entry.endswith("/") and (path + "/").startswith(entry) and (best is None or len(entry) > best[1]):
                best = (layer, len(entry))
    assert best is not None, f"{module} is in no layer of docs/design.md"
    return best[0]


def test_layer_table_names_real_paths():
    table = layer_table()
    assert len(table) >= 8
    missing = [e for row in table for e in row if not (ROOT / e).exists()]
    assert not missing, missing


def test_layers_run_one_way():
    edges, _ = graph()
    table = layer_table()
    layers = {m: layer_of(m, table) for m in edges}
    upward = [f"{m} (layer {layers[m]}) imports {t} (layer {layers[t]})"
              for m in edges for t in edges[m] if layers[t] > layers[m]]
    assert not upward, "\n".join(upward)
    assert layers["tttjax.train.loop"] > layers["tttjax.eval.evaluators"] > layers["tttjax.objective"]
    assert max(layers.values()) == layers["configs.base"]  # core code never imports configs


def test_no_long_functions_outside_tests_and_bench():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_contract_citations_resolve():
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "contract.md").read_text(), re.M))
    cited = {}
    for path in [*ROOT.glob("tttjax/**/*.py"), *ROOT.glob("conversion/*.py"), *ROOT.glob("tests/*.py"),
                 *ROOT.glob("docs/*.md")]:
        for number in re.findall(r"contract\.md §(\d+)", path.read_text()):
            cited.setdefault(number, path.relative_to(ROOT))
    assert cited and not {n: p for n, p in cited.items() if n not in sections}
