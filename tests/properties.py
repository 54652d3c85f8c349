"""The suite's Hypothesis settings profile, loaded by the test modules of property tests.

Each such module imports this one (`import tests.properties  # noqa: F401`) before its
`@given` tests are decorated, which is when Hypothesis reads the default settings. It is
not in conftest.py: conftest is imported by every pytest process, and importing
Hypothesis costs ~0.45 s of CPU in each (pytest rewrites its modules' asserts), also in
the runs that collect no property test (`pytest tests/test_hooks.py`, each xdist worker
and the controller; tests/hypothesis_summary.py keeps its plugin from doing it).
conftest.py fails the collection of a property test decorated without this profile
(`pytest_collection_modifyitems`).

Hypothesis fails an example slower than its deadline, 200 ms by default: wall time, so
a test process starved of the CPU for a moment (2 cores shared by a busy suite, or a
loaded CI runner) failed examples that take a millisecond (Flaky / DeadlineExceeded
in test_smtp's address memo and test_mail's parsers). 2 s still fails an example that
is really slow (a parser gone quadratic), not one that waited for its turn.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import settings

PROFILE = "sms-bridge"
DEADLINE = timedelta(seconds=2)

settings.register_profile(PROFILE, deadline=DEADLINE)
settings.load_profile(PROFILE)
