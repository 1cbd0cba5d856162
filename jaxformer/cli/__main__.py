"""``python -m jaxformer.cli``: the jaxformer command."""

import sys

from jaxformer.cli import main

sys.exit(main())
