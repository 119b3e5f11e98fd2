import sys

try:
    from fastformer.cli import main
except KeyboardInterrupt:  # Ctrl-C while the package loads: one line, as later
    print("\nfastformer: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
