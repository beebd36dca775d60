"""``python -m updatebuffer``: the same command line as the ``updatebuffer`` script."""

from __future__ import annotations

from updatebuffer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
