"""``python -m compressm_cli``."""

from .app import main

raise SystemExit(main())
