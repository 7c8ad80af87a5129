import sys

from moe_worker.main import main

sys.exit(main())
