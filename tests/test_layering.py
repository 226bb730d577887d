"""The layers of difflens (issue 24; STYLE.md item 1), read from the source with ast. Every import statement counts,
those inside functions too: a function-level import is how the command line's modules hid a cycle.

- difflens.engine imports nothing of difflens outside the engine but the shared leaves (SHARED_LEAVES: errors.py,
  the domain exceptions, which itself imports nothing of difflens);
- difflens.queue imports no grpc, neither itself nor through the difflens modules it imports;
- nothing below the command line (CLI: difflens.cli, difflens.__main__, difflens.commands) imports it;
- only the gRPC front (api/) and the gRPC client (client.py) import the generated stubs (difflens._gen, or
  difflens.api.pb, api/'s door to them); everything else speaks the domain types.

The checker is run on a synthetic tree that breaks each rule, so a checker that finds nothing fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"
ENGINE = "difflens.engine"
QUEUE = "difflens.queue"
SHARED_LEAVES = ("difflens.errors",)
CLI = ("difflens.cli", "difflens.__main__", "difflens.commands")
GENERATED = "difflens._gen"  # made by `make proto`
STUBS = (GENERATED, "difflens.api.pb")
STUB_USERS = ("difflens.api", "difflens.client")


def within(name: str, packages: str | tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ((packages,) if isinstance(packages, str) else packages))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, int]]:
    """(imported name, line) of every import statement in the file. `from a.b import c` gives a.b and a.b.c (c
    may be a module); relative imports are made absolute."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def import_graph(root: Path) -> dict[str, tuple[Path, list[tuple[str, int]]]]:
    """Module name -> (its file, what it imports), for every module under root/difflens but the generated ones."""
    graph = {}
    for path in sorted((root / "difflens").rglob("*.py")):
        name = module_name(path, root)
        if not within(name, GENERATED):
            graph[name] = (path, imports_of(path, root))
    return graph


def resolve(name: str, graph: dict) -> str | None:
    """The difflens module an imported name is, or lies in (difflens.errors.InvalidArgument -> difflens.errors)."""
    while name and name not in graph:
        name = name.rpartition(".")[0]
    return name or None


def violations(root: Path) -> list[str]:
    graph = import_graph(root)
    found = []
    for module, (path, imported) in graph.items():
        where = path.relative_to(root)
        for name, line in imported:
            in_difflens = name.startswith("difflens.")  # the bare root package (a lazy __getattr__) is no layer
            if within(module, ENGINE) and in_difflens and not within(name, (ENGINE, *SHARED_LEAVES)):
                found.append(f"{where}:{line}: the engine imports {name}")
            if within(module, SHARED_LEAVES) and in_difflens:
                found.append(f"{where}:{line}: the shared leaf {module} imports {name}")
            if within(name, CLI) and not within(module, CLI):
                found.append(f"{where}:{line}: {module} imports the command line ({name})")
            if within(name, STUBS) and not within(module, STUB_USERS):
                found.append(f"{where}:{line}: {module} imports the generated stubs ({name})")
    for module in (m for m in graph if within(m, QUEUE)):
        chain = grpc_chain(module, graph)
        if chain:
            found.append(f"{graph[module][0].relative_to(root)}: the queue reaches grpc: {' -> '.join(chain)}")
    return sorted(found)


def grpc_chain(start: str, graph: dict) -> list[str] | None:
    """start -> ... -> grpc through the difflens modules each imports (breadth first: the shortest), or None."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        module = todo.pop(0)
        for name, _ in graph[module][1]:
            if within(name, "grpc"):
                return [*paths[module], name]
            target = resolve(name, graph) if name.startswith("difflens.") else None
            if target is not None and target not in paths:
                paths[target] = [*paths[module], target]
                todo.append(target)
    return None


def test_the_package_keeps_its_layers():
    assert violations(SERVICE) == []


def test_the_shared_leaves_exist_and_the_engine_uses_nothing_else_of_difflens():
    """The allowance is exactly what the engine needs today: were errors.py renamed, the rule must not silently
    allow nothing-at-all or a stale name."""
    graph = import_graph(SERVICE)
    assert all(leaf in graph for leaf in SHARED_LEAVES)
    used = {resolve(n, graph) for m, (_, imported) in graph.items() if within(m, ENGINE)
            for n, _ in imported if n.startswith("difflens.")}
    assert {u for u in used if not within(u, ENGINE)} == set(SHARED_LEAVES)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "difflens" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {"__init__.py": "", "__main__.py": "from difflens.cli import main\n", "errors.py": "",
         "cli.py": "from difflens.commands import explain\n", "commands/__init__.py": "",
         "commands/explain.py": "import grpc\nfrom difflens.engine.api import explain\n",
         "engine/__init__.py": "", "engine/hooks.py": "",
         "engine/api.py": "from difflens.errors import InvalidArgument\nfrom . import hooks\n",
         "jobs.py": "", "queue/__init__.py": "", "queue/base.py": "from difflens.jobs import x\n",
         "api/__init__.py": "", "api/pb.py": "from difflens._gen.difflens.v1 import difflens_pb2 as pb\n",
         "api/server.py": "import grpc\nfrom difflens.queue.base import Queue\nfrom difflens.api.pb import pb\n",
         "client.py": "from difflens.api.pb import pb\n"}


def test_the_checker_passes_a_clean_tree(tmp_path):
    assert violations(_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(("rel", "text", "says"), [
    ("engine/hooks.py", "def f():\n    from difflens.api import server\n", "engine/hooks.py:2: the engine imports "
                                                                          "difflens.api"),
    ("engine/hooks.py", "from ..jobs import x\n", "engine/hooks.py:1: the engine imports difflens.jobs"),
    ("errors.py", "from difflens import jobs\n", "the shared leaf difflens.errors imports difflens.jobs"),
    ("queue/base.py", "def f():\n    import grpc.aio\n", "queue/base.py: the queue reaches grpc: difflens.queue.base "
                                                         "-> grpc.aio"),
    ("jobs.py", "from grpc import StatusCode\n", "queue/base.py: the queue reaches grpc: difflens.queue.base -> "
                                                 "difflens.jobs -> grpc"),
    ("api/server.py", "def f():\n    from difflens import cli\n", "api/server.py:2: difflens.api.server imports "
                                                                   "the command line (difflens.cli)"),
    ("queue/base.py", "from ..commands.explain import x\n", "queue/base.py:1: difflens.queue.base imports the "
                                                            "command line (difflens.commands"),
    ("commands/explain.py", "def f():\n    from difflens.api.pb import pb\n", "commands/explain.py:2: "
                            "difflens.commands.explain imports the generated stubs (difflens.api.pb)"),
    ("jobs.py", "from difflens._gen.difflens.v1 import difflens_pb2\n", "jobs.py:1: difflens.jobs imports the "
                                                                       "generated stubs (difflens._gen"),
])
def test_the_checker_finds_each_kind_of_violation(tmp_path, rel, text, says):
    found = violations(_tree(tmp_path, {**CLEAN, rel: text}))
    assert any(says in v for v in found), found
