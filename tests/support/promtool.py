"""`promtool check metrics` (Debian's prometheus package) on a scrape, where promtool is on PATH."""

from __future__ import annotations

import shutil
import subprocess

MISSING = "promtool not on PATH (apt-get install prometheus)"


def promtool_report(scrape: str) -> str | None:
    """What promtool says about `scrape` ('' when nothing: exit 0, no output), or None without promtool."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return None
    checked = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, text=True,
                             timeout=30)
    said = (checked.stdout + checked.stderr).strip()
    return said or ("" if checked.returncode == 0 else f"exit {checked.returncode}")
