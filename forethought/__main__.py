"""``python -m forethought`` is the ``forethought`` command."""

from forethought.analyses.cli import main

raise SystemExit(main())
