"""``python -m hsmocsp.devpki``."""

from __future__ import annotations

import sys

from hsmocsp.devpki.cli import main

sys.exit(main())
