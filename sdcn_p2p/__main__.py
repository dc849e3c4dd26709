"""``python -m sdcn_p2p``: the ``sdcn`` command, for when the script is not on PATH."""

from sdcn_p2p.cli import main

raise SystemExit(main())
