"""`python -m difflens` = the `difflens` command."""

from __future__ import annotations

from difflens.cli import main

raise SystemExit(main())
