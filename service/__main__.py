"""`python -m service` = the `rwkvd` command."""

from service.cli import main

raise SystemExit(main())
