#!/usr/bin/env python
"""`python cli.py ...`: the sitdistill command line (`sitdistill.cli`; installed as `sitdistill ...`)."""

import sys

from sitdistill.cli import main

if __name__ == "__main__":
    sys.exit(main())
