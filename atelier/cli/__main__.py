"""``python -m atelier.cli``: the ``atelier`` command."""

from atelier.cli.app import main

raise SystemExit(main())
