"""``python -m mergekit_bico ...`` is ``mergekit-bico ...``."""

from mergekit_bico.cli import main

main()
