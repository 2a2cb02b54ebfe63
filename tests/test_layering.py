"""The layers meet only where DESIGN.md says: trainers/ and rollout/ never import each other, and
the domain (tooltune/) imports neither of them, nor Ray."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each file of ``package`` imports, at any depth (lazy imports too)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("trainers", {"rollout"}), ("rollout", {"trainers"}), ("tooltune", {"rollout", "trainers", "ray", "ray_jobs"})],
)
def test_layers_do_not_import_each_other(package, forbidden):
    crossings = {f: sorted(names & forbidden) for f, names in imported_packages(package).items() if names & forbidden}
    assert not crossings, f"{package}/ imports what it must not: {crossings}"


def test_the_check_sees_lazy_imports(tmp_path):
    # The walk covers imports inside functions, which is where the old crossing hid.
    tree = ast.parse("def f():\n    from rollout.agent_loop import run_episodes\n")
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert found == {"rollout.agent_loop"}
