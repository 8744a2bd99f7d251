import sys

from relux.cli import main

sys.exit(main())
