"""`python -m workbench ...`, the entry `accelerate launch -m workbench run CONFIG` needs."""

import sys

from workbench.cli import main

sys.exit(main())
