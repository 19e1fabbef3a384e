"""The pure core stays pure: only the actor shells, cluster/ and the engine module import ray or vllm."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlfleet"
ALLOWED = {"generation/actor.py", "generation/engine.py", "replay/actor.py", "learner/actor.py", "dpo/actor.py",
           "dpo/job.py", "transport/object_store.py", "transport/gloo_backend.py",
           "transport/broadcast.py"}


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
