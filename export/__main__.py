from lstmd.export.cli import main

raise SystemExit(main())
