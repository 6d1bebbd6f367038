"""``python -m saelab`` (what torchrun runs for ``saelab train --nproc N``)."""

import sys

from saelab.cli import main

sys.exit(main())
