import sys

from moedsl.cli import main

sys.exit(main())
