import sys

from tests.adversarial.runner import main

sys.exit(main())
