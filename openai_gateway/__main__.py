"""`python -m openai_gateway`: run the gateway standalone."""

import sys

from openai_gateway.cli import main

sys.exit(main())
