"""``python -m lowrank_optim``: the ``lowrank-optim`` command line (:func:`lowrank_optim.planner.main`), e.g.
``python -m lowrank_optim estimate --model llama-1b --optimizer galore_adamw --rank 512``."""

import sys

from .planner import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
