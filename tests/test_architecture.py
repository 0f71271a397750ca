"""The shape of the package: the public API, and dependencies that point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import convo

PACKAGE = Path(convo.__file__).parent

# module -> convo modules it must never import (directly): CLI -> service -> store/history -> models
FORBIDDEN = {
    "store": {"service", "cli", "client", "runner", "transfer", "demo", "render"},
    "history": {"service", "cli", "client", "store", "db", "models"},
    "models": {"service", "cli", "client", "store", "history"},
    "client": {"service", "cli", "store", "db", "models", "history"},
    "service": {"cli", "render", "demo"},
    "content": {"service", "cli", "client", "store", "db"},
}
# Third-party imports confined to one module each.
ONLY_IN = {"httpx": {"client"}, "argparse": {"cli", "standin"}}


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "convo":
                names.update(f"convo.{a.name}" for a in node.names)
    return names


def test_public_api_is_pinned() -> None:
    assert sorted(convo.__all__) == sorted(
        [
            "APIConnectionError", "APIError", "APIStatusError", "APITimeoutError", "AmbiguousId",
            "BudgetExceeded", "Conflict", "ContentError", "Conversation", "ConvoError",
            "HistoryError", "InvalidInput", "MissingApiKey", "NotFound", "OutputInvalid",
            "PrefillNotSupported", "Reply", "ReplyStream", "SchemaTooNew", "Store", "StoreError",
            "Tool", "ToolUse", "Usage", "tool",
        ]
    )
    for name in convo.__all__:
        assert getattr(convo, name) is not None


def test_dependencies_point_one_way() -> None:
    for module, forbidden in FORBIDDEN.items():
        imported = {n.removeprefix("convo.") for n in _imports(module) if n.startswith("convo.")}
        assert not imported & forbidden, f"convo.{module} imports {imported & forbidden}"


def test_third_party_edges_stay_in_their_module() -> None:
    for lib, allowed in ONLY_IN.items():
        users = {
            p.stem
            for p in PACKAGE.glob("*.py")
            if any(n == lib or n.startswith(lib + ".") for n in _imports(p.stem))
        }
        assert users <= allowed, f"{lib} imported by {users - allowed}"


def test_no_module_reads_the_environment_at_import() -> None:
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            if isinstance(node, ast.Assign | ast.AnnAssign):
                src = ast.unparse(node)
                assert "os.environ" not in src and "getenv" not in src, f"{path.name}: {src}"
