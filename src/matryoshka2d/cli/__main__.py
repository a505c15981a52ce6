"""``python -m matryoshka2d.cli`` (used by torchrun / accelerate launch)."""

import sys

from matryoshka2d.cli import main

sys.exit(main())
