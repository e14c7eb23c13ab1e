from edgecl.cli import main

raise SystemExit(main())
