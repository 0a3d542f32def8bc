"""Suite-wide settings. Property tests explore new random cases on every local run; in CI
(``CI`` set, as .ci/run is) they replay a fixed sequence, so a landing never depends on luck."""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")
