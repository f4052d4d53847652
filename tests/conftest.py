"""Fixtures every test module may ask for."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from twisted.logger import ILogObserver, globalLogPublisher

from tests.helpers.harness import Closing
from tests.helpers.logs import Logged


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
