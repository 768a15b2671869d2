"""The ``atelier`` command line, a package of subcommand modules: :mod:`~atelier.cli.app` (the
parser, ``main``, run/rollout/demo and the store commands), :mod:`~atelier.cli.train`,
:mod:`~atelier.cli.serve` (model servers, tiny models), with :mod:`~atelier.cli.common` and
:mod:`~atelier.cli.errors` shared. argparse only at import: ``atelier --help`` loads no model.
"""

from atelier.cli.app import build_parser, main
from atelier.cli.errors import CliError, Interrupted, StoreUnavailable

__all__ = ["CliError", "Interrupted", "StoreUnavailable", "build_parser", "main"]
