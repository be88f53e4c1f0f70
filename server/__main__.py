from lstmd.server.cli import main

raise SystemExit(main())
