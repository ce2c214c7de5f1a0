import sys

from agm.cli import main

sys.exit(main())
