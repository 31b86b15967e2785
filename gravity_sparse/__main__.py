"""`python -m gravity_sparse ...` is the `gravity-sparse` command."""

import sys

from .cli import main

sys.exit(main())
