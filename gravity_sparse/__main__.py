"""`python -m gravity_sparse ...` is the `gravity-sparse` command."""

import sys

from gravity_sparse.cli import main

sys.exit(main())
