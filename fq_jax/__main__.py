"""`python -m fq_jax`: the `fq-jax` command line."""

import sys

from fq_jax.cli import main

sys.exit(main())
