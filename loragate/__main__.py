import sys

from loragate.cli import main

sys.exit(main())
