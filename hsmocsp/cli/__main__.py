"""``python -m hsmocsp.cli`` (the same as the ``hsmocsp`` console script)."""

import sys

from hsmocsp.cli import main

sys.exit(main())
