"""``python -m analyses`` is the ``forethought`` command."""

from analyses.cli import main

raise SystemExit(main())
