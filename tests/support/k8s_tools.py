"""Where the Kubernetes tools the deploy tests use live: helm, kubectl, kube-apiserver, etcd.

`make tools` (deploy/tools/) puts them in DIFFLENS_TOOLS_DIR (default ~/.cache/difflens/tools)/bin, outside the
repository: helm and kubectl come out of a PyPI wheel, kube-apiserver is built once from Debian's source package.
A test whose tool is missing skips naming the make target that provides it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def tools_dir() -> Path:
    return Path(os.environ.get("DIFFLENS_TOOLS_DIR") or Path.home() / ".cache" / "difflens" / "tools")


def tool(name: str) -> str | None:
    """The tool's path: DIFFLENS_TOOLS_DIR/bin first, then PATH; None when neither has it."""
    own = tools_dir() / "bin" / name
    if own.is_file() and os.access(own, os.X_OK):
        return str(own)
    return shutil.which(name)


def require(name: str) -> str:
    """The tool's path, or skip the test saying how to get it."""
    found = tool(name)
    if found is None:
        pytest.skip(f"{name} not found in {tools_dir() / 'bin'} or on PATH (make tools)")
    return found
