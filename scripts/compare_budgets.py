"""The benchmark at several budgets: does the order hold?: ``python scripts/compare_budgets.py --help`` (the code: jobs/compare_budgets.py)."""

import sys

from jobs.compare_budgets import main

if __name__ == "__main__":
    sys.exit(main())
