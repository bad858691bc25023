"""`python -m k8s_autoscaler`."""

import sys

from k8s_autoscaler.cli import main

sys.exit(main())
