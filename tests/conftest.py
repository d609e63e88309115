"""Test-suite-wide settings.

Hypothesis: CI replays the same examples on every run (`derandomize`, profile "ci", which .ci/run selects with
HYPOTHESIS_PROFILE=ci), so a red CI means a change broke something, not that a new random draw found an old
edge; local runs keep the default profile and draw new examples each time (a failure they find is pinned with
`@example`)."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
