"""``python -m bench``: see bench/README.md."""

import sys

from bench.main import main

sys.exit(main())
