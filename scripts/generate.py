"""Sample from a checkpoint: the same as `fastformer generate ...`
(e.g. python scripts/generate.py --checkpoint runs/tiny --prompt "def ")."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastformer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
