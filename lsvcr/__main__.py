from lsvcr.cli import main

raise SystemExit(main())
