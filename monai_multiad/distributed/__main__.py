"""``python -m monai_multiad.distributed``: ``multiad train`` (or ``screen``) as one process of torchrun's
group, or spawning ``--nproc N`` processes; see :func:`monai_multiad.cli.distributed_main`."""

import sys

from monai_multiad.cli import distributed_main

if __name__ == "__main__":  # pragma: no cover - run as `python -m monai_multiad.distributed`
    sys.exit(distributed_main())
