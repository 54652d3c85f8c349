"""`python -m bridge` runs the same commands as the `sms-bridge` script."""

from bridge.cli import main

raise SystemExit(main())
