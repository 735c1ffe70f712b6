"""``python -m monai_multiad ...``: the same as the ``multiad`` command."""

import sys

from monai_multiad.cli import main

sys.exit(main())
