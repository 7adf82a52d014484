"""``python -m unipeft``: the ``unipeft`` command, for environments without the console
script on ``PATH``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
