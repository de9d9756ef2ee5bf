"""python -m rdswitch.gvproxy: gvproxy's command line (what the ``gvproxy`` launcher runs)."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
