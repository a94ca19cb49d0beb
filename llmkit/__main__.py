"""`python -m llmkit …` (and `torchrun … -m llmkit …`): the same command line as `llmkit`."""

import sys

from llmkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
