"""``python -m patterncc`` is the ``patterncc`` command."""

from .cli import main

raise SystemExit(main())
