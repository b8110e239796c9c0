"""`python -m fastclr` (and `torchrun -m fastclr`) run the CLI."""

import sys

from fastclr.entry import main

sys.exit(main())
