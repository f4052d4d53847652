"""Fixtures every test module may ask for."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import os
import tempfile

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir
from twisted.logger import ILogObserver, globalLogPublisher

from tests.helpers.harness import Closing
from tests.helpers.logs import Logged
from tests.helpers.proxy_process import ProxyProcess

# Property tests run the same examples every time and keep no example database;
# HYPOTHESIS_PROFILE=explore looks for new ones, at random and many more of them. What
# Hypothesis caches on its own goes to the temp directory, not into the checkout.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "lxd-image-proxy-hypothesis"))
settings.register_profile(
    "repeatable", max_examples=500, derandomize=True, database=None, deadline=None
)
settings.register_profile("explore", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


# The environment's outbound proxy would reach every upstream a test starts on loopback.
PROXY_VARIABLES = ("https_proxy", "http_proxy", "no_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without HTTPS_PROXY and the like; a test that wants them sets them."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def logged() -> Iterator[Logged]:
    """The events logged while the test runs (see L{Logged} for picking them)."""
    events = Logged()
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest.fixture
def closing() -> Iterator[Closing]:
    """Give it each harness a test builds: every one is closed when the test ends."""
    made = Closing()
    yield made
    made.close()


@pytest.fixture
def proxy_processes() -> Iterator[list[ProxyProcess]]:
    """Real proxy processes a test starts: each is killed at the end, whatever happened."""
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.kill()
