from dpkd.cli import main

raise SystemExit(main())
