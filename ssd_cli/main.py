"""The `ssd` command: one entry point, one module per subcommand family.

Each module in SUBCOMMAND_MODULES exposes `register(subparsers)`, which adds its subcommand(s)
and sets `func` (returning an exit code) on the parsed namespace. The heavy imports (torch, the
optional extras) happen inside each subcommand's `func`, so a missing extra only breaks its own
subcommand. The `ssd` script itself comes from ssd-client (client/cli.py), which calls `main`
through the `ssd.cli` entry point.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ssd_cli.extras import MissingExtra

SUBCOMMAND_MODULES = (
    "ssd_cli.generate_cmd",  # ssd generate
    "ssd_cli.train_cmd",  # ssd train-pair, ssd models
    "client.cli",  # ssd client ... (ssd-client, torch-free)
    "ssd_cli.serve_cmd",  # ssd serve ..., ssd up
    "ssd_cli.bench_cmd",  # ssd bench
    "ssd_cli.simulate_cmd",  # ssd simulate
    "ssd_cli.autoscale_cmd",  # ssd autoscale
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd", description="Speculative speculative decoding (SSD / Saguaro)")
    parser.add_argument("--log-level", default="WARNING", help="python logging level (default WARNING)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ssd_core.malloc import tune

    tune()  # before the first big buffer: see ssd_core/malloc.py
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the bench records as its command
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError, MissingExtra) as exc:
        print(f"ssd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
