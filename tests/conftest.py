"""Suite-wide settings. Property tests explore new random cases on every local run; in CI they
replay a fixed sequence, so a landing never depends on luck. ``CI`` is set by the CI runner itself
(GitHub Actions and most others export ``CI=true``), not by .ci/run: run the suite with ``CI=1`` to
get the CI profile locally."""
import os

import pytest
from hypothesis import settings

# GENSERVE_SECTION__KEY overrides apply to every config genserve loads, the servers the tests start
# included: the container images set some (GENSERVE_AUTH__REQUIRED=true), and a developer may have
# some exported. Tests choose their settings themselves; those that test overrides pass them explicitly.
for _name in [n for n in os.environ if n.startswith("GENSERVE_") and "__" in n]:
    del os.environ[_name]

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """Tiny random-weight checkpoints of every supported family (tests/family_models.py), built
    once per test session: {name: model directory}."""
    from tests.family_models import build_all

    return build_all(tmp_path_factory.mktemp("family-models"))


# A throwaway PostgreSQL server (session) and an empty database per test: tests/server/jobs/pg_server.py.
from tests.server.jobs.pg_server import pg_database, pg_dsn  # noqa: E402,F401
