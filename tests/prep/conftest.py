"""Fixtures of the prep tests: one local Ray per test session (worker), shared by the tests that run on it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray of 2 CPUs, started once per session: ~8 s a start, paid once for every test of the Ray engine
    (tests/prep/test_ray_engine.py, tests/prep/test_build_cache.py). A build finds it running and uses it, as
    one given `--ray-address` does. The killed-driver test of test_ray_engine.py runs two drivers in fresh
    processes: the first joins this Ray by its address, the second starts and stops a Ray of its own.

    ray.data is imported here, outside any test's capsys or CliRunner: Ray binds its log handlers to the
    sys.stderr of the moment they are made, and one bound to a stream closed since (a finished test's capsys)
    writes "--- Logging error --- Traceback ..." into every later build's output."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")  # its loggers made now, on the session's stderr
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
