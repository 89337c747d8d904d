import sys

from diffspeed.cli import main

sys.exit(main())
