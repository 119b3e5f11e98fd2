import sys

from fastformer.cli import main

sys.exit(main())
