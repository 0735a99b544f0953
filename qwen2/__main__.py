"""`python -m qwen2 ...` (and `torchrun -m qwen2 ...`): the qwen2 command."""
import sys

from qwen2.cli import main

sys.exit(main())
