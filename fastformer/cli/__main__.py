import sys

from fastformer.cli.commands import main

sys.exit(main())
