from zeroconv.cli import main

raise SystemExit(main())
