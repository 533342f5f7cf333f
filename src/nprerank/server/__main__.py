"""`python -m nprerank.server`: the same server as `nprerank serve`."""

import sys

from .run import main

sys.exit(main())
