"""`python -m nprerank ...`: the same command line as the `nprerank` script (cli.py)."""

from .cli import main

raise SystemExit(main())
