"""``python -m torchmagic install-kernel | uninstall-kernel``."""

import sys

from .kernel import main

sys.exit(main())
