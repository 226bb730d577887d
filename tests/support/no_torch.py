"""Run difflens's command line in a process that cannot import torch, diffusers or transformers:
`python -m tests.support.no_torch serve ...`. Any attempt fails with an ImportError naming the module, so a code path
of the front that still reaches for them breaks the test that runs it (not only an import-time check)."""

from __future__ import annotations

import importlib.abc
import sys

BLOCKED = ("torch", "diffusers", "transformers")


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"no_torch: {name} imported in a process that must not need it")
        return None


def main() -> int:
    sys.meta_path.insert(0, _Refuse())
    from difflens.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
