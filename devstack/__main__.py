"""`python -m devstack`: the `make run` entry point."""

from __future__ import annotations

import sys

from devstack.runner import main

sys.exit(main())
