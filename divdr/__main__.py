import sys

from divdr.cli import main

sys.exit(main())
