"""`python -m fastblt.cli`: the same as the `fastblt` command."""

from fastblt.cli import main

main()
