"""``python -m wsctl``: the same as the ``wsctl`` console script."""

from wsctl.cli import main

main()
