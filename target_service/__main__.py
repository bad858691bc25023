"""`python -m target_service --model DIR --port P ...`: one target replica."""

import argparse
import logging
import os
import sys

from target_service.cli import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m target_service", description="SSD target replica")
    parser.add_argument("--log-level", default=os.environ.get("SSD_LOG_LEVEL", "INFO"))
    add_arguments(parser)
    args = parser.parse_args()
    from ssd_core.malloc import tune
    from ssd_core.models import BACKEND_ENV

    args.backend = args.backend or os.environ.get(BACKEND_ENV)  # read once, here; the core never reads it

    tune()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
