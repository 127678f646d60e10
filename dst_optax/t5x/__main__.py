"""``python -m dst_optax.t5x t5x-export ...``."""

import sys

from dst_optax.t5x import _cli

sys.exit(_cli.main())
