"""`python -m edgecl`: the same command line as `edgecl` (edgecl.cli)."""
from edgecl.cli import main

raise SystemExit(main())
