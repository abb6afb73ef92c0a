"""``python -m connector``: the same as the ``pop3-connector`` command."""

import sys

from connector.cli import main

sys.exit(main())
