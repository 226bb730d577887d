"""engine/ is pure torch: it must not import grpc, redis or prometheus (STYLE.md item 1)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ENGINE = pathlib.Path(__file__).resolve().parents[2] / "service" / "difflens" / "engine"
FORBIDDEN = ("grpc", "redis", "prometheus_client", "difflens.api", "difflens.queue", "difflens.worker",
             "difflens.render", "difflens.metrics")


def test_no_forbidden_import_statements():
    offenders = []
    for f in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [(f.name, n) for n in names if n.split(".")[0] in FORBIDDEN or n.startswith(FORBIDDEN)]
    assert offenders == []


def test_importing_the_engine_loads_none_of_them():
    code = ("import sys, difflens.engine.explain, difflens.engine.api;"
            "print([m for m in sys.modules if m.split('.')[0] in ('grpc', 'redis', 'prometheus_client')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
