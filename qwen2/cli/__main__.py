import sys

from qwen2.cli import main

sys.exit(main())
