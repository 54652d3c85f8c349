"""Hypothesis' pytest plugin left out of the end of a run that has nothing of it to show.

The plugin imports nothing of Hypothesis until a test module does, except at the very
end: its terminal summary imports `hypothesis.internal.observability` whatever the run,
~0.45 s of CPU in each pytest process (the xdist controller and its workers) for a run
of `tests/test_hooks.py` that has no property test. Where Hypothesis was never imported
(so it observed nothing) and no test report carries its statistics or failing examples
(which xdist's workers send the controller), that summary has nothing to say, and the
plugin is unregistered before it is called. Loaded by conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import sys

import _hypothesis_pytestplugin as plugin
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Before the terminal reporter's own (a wrapper that writes the summary after)."""
    manager = session.config.pluginmanager
    hypothesis = manager.get_plugin("hypothesispytest")
    if hypothesis is None or "hypothesis" in sys.modules:
        return
    reporter = manager.get_plugin("terminalreporter")
    reports = [r for kind in (reporter.stats.values() if reporter else ()) for r in kind]
    keys = (plugin.STATS_KEY, plugin.FAILING_EXAMPLES_KEY)
    if not any(key in getattr(r, "__dict__", {}) for r in reports for key in keys):
        manager.unregister(hypothesis)
