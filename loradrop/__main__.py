import sys

from loradrop.cli import main

sys.exit(main())
