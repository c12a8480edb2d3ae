import sys

from toolkit.cli.commands import main

sys.exit(main())
