"""A multirun's bench.json files -> table, target check, trade-off plot: ``python scripts/summarize_runs.py --help`` (the code: jobs/summarize_runs.py)."""

import sys

from jobs.summarize_runs import main

if __name__ == "__main__":
    sys.exit(main())
