"""The pure core stays pure: only the actor shells, cluster/ and the engine module import ray or vllm. The package's
imports point down its layers (base, pure math, actors, the job, the CLI), with no cycle between subpackages."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlfleet"
ALLOWED = {"generation/actor.py", "generation/engine.py", "replay/actor.py", "learner/actor.py",
           "transport/object_store.py", "transport/gloo_backend.py", "transport/broadcast.py"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_shells_import_ray_or_vllm():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED or rel.startswith("cluster/"):
            continue
        if bad := imported_roots(path) & {"ray", "vllm"}:
            offenders.append(f"{rel} imports {sorted(bad)}")
    assert offenders == []


def test_the_check_can_fail(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ray.util import metrics\n")
    assert imported_roots(module) == {"ray"}


# The package's layers, lowest first: a module imports only modules of its own layer or lower ones.
LAYERS = {
    "base": ("__init__.py", "types.py", "config.py", "config_sections.py", "config_algorithm.py", "config_root.py",
             "errors.py", "models.py", "data.py", "lora.py", "rewards.py", "user_code.py", "rendezvous.py",
             "sandbox.py", "code_task.py"),
    "pure": ("learner/losses.py", "generation/scoring.py", "replay/buffer.py", "replay/order.py", "dpo/bema.py",
             "cluster/admission.py"),
    "actors": ("generation/", "environments/", "replay/", "learner/", "dpo/", "transport/"),
    "job": ("cluster/",),
    "cli": ("cli.py",),
}
RANK = {name: i for i, name in enumerate(LAYERS)}


def layer(rel: str) -> str:
    """The layer of module ``rel`` (a path under rlfleet/): the most specific entry that names it."""
    best = max(((len(entry), name) for name, entries in LAYERS.items() for entry in entries
                if rel == entry or (entry.endswith("/") and rel.startswith(entry))), default=None)
    assert best is not None, f"rlfleet/{rel} is in no layer of tests/test_layering.py: add it"
    return best[1]


def module_path(module: str) -> str | None:
    """``rlfleet.a.b`` -> ``a/b.py`` or ``a/b/__init__.py`` (None when it is not a module of the package)."""
    parts = module.split(".")[1:]
    for rel in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
        if (PACKAGE / rel).is_file():
            return rel
    return None


def rlfleet_imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports, at the top or inside functions (``from rlfleet.x import y`` names
    module ``x.y`` when y is a module, else ``x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if module_path(f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        found |= {rel for name in names if name.split(".")[0] == "rlfleet" and (rel := module_path(name))}
    return found


def unit(rel: str) -> str:
    """The unit cycles are checked between: a subpackage, or a top-level module."""
    return rel.split("/")[0] if "/" in rel else rel


def import_graph() -> dict[str, set[str]]:
    return {path.relative_to(PACKAGE).as_posix(): rlfleet_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{rel} ({layer(rel)}) imports {dep} ({layer(dep)})" for rel, deps in graph.items() for dep in sorted(deps)
            if RANK[layer(dep)] > RANK[layer(rel)]]


def unit_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between subpackages and top-level modules (a package's own modules may import each other)."""
    edges: dict[str, set[str]] = {}
    for rel, deps in graph.items():
        edges.setdefault(unit(rel), set()).update(unit(d) for d in deps if unit(d) != unit(rel))
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_imports_point_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_no_import_cycles_between_subpackages():
    assert unit_cycles(import_graph()) == []


def test_the_layer_checks_can_fail():
    graph = {"learner/actor.py": {"cluster/driver.py"}, "cluster/driver.py": {"learner/actor.py"},
             "config.py": set()}
    assert layer_violations(graph) == ["learner/actor.py (actors) imports cluster/driver.py (job)"]
    assert unit_cycles(graph) == [["cluster", "learner", "cluster"]]
    assert unit_cycles({"learner/a.py": {"learner/b.py"}, "learner/b.py": {"learner/a.py"}}) == []
