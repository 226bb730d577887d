from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"


def test_engine_does_not_import_render():
    for f in (SERVICE / "difflens" / "engine").rglob("*.py"):
        text = f.read_text()
        assert "difflens.render" not in text and "from difflens import render" not in text, f


def test_render_needs_no_torch():
    code = "import sys, difflens.render; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(SERVICE)})
