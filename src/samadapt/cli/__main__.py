"""``python -m samadapt.cli ...`` (what torchrun launches: ``torchrun ... -m -- samadapt.cli evaluate ...``)."""

import sys

from samadapt.cli import main

sys.exit(main())
