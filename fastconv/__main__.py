import sys

from fastconv.app.cli import main

sys.exit(main())
