"""``python -m libra_rcnn`` runs the ``libra-rcnn`` command line."""

import sys

from libra_rcnn.cli import main

if __name__ == "__main__":
    sys.exit(main())
