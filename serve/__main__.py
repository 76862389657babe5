"""`python -m serve [flags]` is `recsql serve [flags]`."""

import sys

from serve.cli import main

sys.exit(main())
