"""Cache offers on vs off, served, in one run: scripts/served_ab.py with two arms of this checkout,
`offers` (the default) and `no_offers` (`--cache-offers off`), SD and SSD, random token-id prompts
(the comparison is of the protocol, not of the text).

    .venv/bin/python scripts/cache_offers_ab.py [--start-first offers|no_offers] [--repeats 3]
        [--prompts 6] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from served_ab import Arm, parser, run  # noqa: E402

ARMS = {"offers": Arm("offers", None, ()), "no_offers": Arm("no_offers", None, ("--cache-offers", "off"))}


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--start-first", choices=list(ARMS), default="offers",
                   help="which pair starts first (the pairs' start order can favour one; run both ways)")
    p.set_defaults(prompts=6, prompt_kind="ids", log_dir="runs/cache-offers-ab")
    args = p.parse_args()
    if args.arm:
        p.error("the arms are fixed here (offers, no_offers): use scripts/served_ab.py for others")
    args.arm = [ARMS[args.start_first], *(a for n, a in ARMS.items() if n != args.start_first)]
    return run(args, "scripts/cache_offers_ab.py")


if __name__ == "__main__":
    sys.exit(main())
