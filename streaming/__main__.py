"""`python -m streaming` runs the same command line as the `streamscribe` script."""

from streaming.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
