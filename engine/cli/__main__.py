"""`python -m engine.cli ...` is `cvr ...`."""
import sys

from engine.cli import main

sys.exit(main())
