import sys

from fastdadpo.cli import main

sys.exit(main())
