from kedavra.cli import main

raise SystemExit(main())
