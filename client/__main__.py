from lstmd.client.cli import main

raise SystemExit(main())
