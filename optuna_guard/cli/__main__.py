import sys

from optuna_guard.cli import main

sys.exit(main())
