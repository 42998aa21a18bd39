from securemsg.cli import main

raise SystemExit(main())
