import os
import sys

import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# CI draws the same hypothesis examples on every run (``derandomize``: a seed from each test's source), so a
# submission passes or fails on its code, not on the draw; a local run keeps exploring new examples. `.ci/run`
# selects the profile; `HYPOTHESIS_PROFILE=ci make test` reproduces CI's draws.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
