"""`python -m msbd.vm`: run the worker, or `python -m msbd.vm doctor`."""

import sys

from msbd.vm.main import main

sys.exit(main())
