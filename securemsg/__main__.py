from securemsg.cli.main import main

raise SystemExit(main())
