"""``python -m monai_multiad.bundles [list | path NAME]``: the same as ``multiad bundle``, quicker (it
imports neither PyTorch nor MONAI)."""

import sys

from monai_multiad.bundles import main

sys.exit(main())
