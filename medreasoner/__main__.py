import sys

from medreasoner.cli import main

sys.exit(main())
