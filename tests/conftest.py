"""Shared test settings: hypothesis without per-example deadlines.

The suite runs on 2 shared cores next to live daemons; a 200 ms deadline there measures the
machine's load, not the code (timing claims belong in scripts/, not in tests).
"""

from hypothesis import settings

settings.register_profile("fabric", deadline=None, print_blob=True)
settings.load_profile("fabric")
