"""The package's layers, as the README's architecture section states them: what may import
what, read from the source with ast (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

# What each layer of alora_ds may import from the package (besides alora_ds.errors), lowest first.
ALLOWED = {
    "core": {"core"},
    "scoring": {"core", "scoring"},
    "io": {"core", "io"},
    "report": {"core", "report"},
    "methods": {"core", "scoring", "io", "methods"},
    "runtime": {"core", "scoring", "io", "runtime"},
}
DISTRIBUTED = ("deepspeed", "torch.distributed")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, fully named."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_each_layer_imports_only_the_layers_below_it():
    for layer, allowed in ALLOWED.items():
        for path in (REPO / "alora_ds" / layer).glob("*.py"):
            for name in imports(path):
                parts = name.split(".")
                if parts[0] == "launch" or parts[0] == "eval":
                    raise AssertionError(f"{path.relative_to(REPO)} imports {name}")
                if parts[0] != "alora_ds" or len(parts) < 2 or parts[1] == "errors":
                    continue
                assert parts[1] in allowed, f"{path.relative_to(REPO)} imports {name}"


def test_only_the_runtime_touches_deepspeed_or_torch_distributed():
    runtime = REPO / "alora_ds" / "runtime"
    sources = [*(REPO / "alora_ds").rglob("*.py"), *(REPO / "launch").rglob("*.py"),
               *(REPO / "eval").rglob("*.py"), *(REPO / "bench").rglob("*.py")]  # fmt: skip
    for path in sources:
        if runtime in path.parents:
            continue
        found = [n for n in imports(path) if n.startswith(DISTRIBUTED)]
        assert not found, f"{path.relative_to(REPO)} imports {found}"


def test_no_test_imports_another_test_module():
    for path in (REPO / "tests").rglob("*.py"):
        found = [
            n for n in imports(path)
            if n.startswith("tests.") and not n.startswith(("tests.helpers", "tests.golden"))
        ]  # fmt: skip
        assert not found, f"{path.relative_to(REPO)} imports {found}"
