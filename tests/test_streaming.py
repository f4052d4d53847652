"""
Tests for L{proxy.streaming}: producers driven directly.

The consumer is a L{StringTransport} and time is a L{Clock}, so pausing,
resuming and stopping are exact.  C{Clock.advance(0)} runs the zero-delay
calls scheduled while it runs, so a producer that is not paused drains all
that is available in one advance; tests that look at a single step pause the
producer first or use L{PausingTransport}.
"""

from __future__ import annotations

import os

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface.verify import verifyObject

from tests.helpers.sources import FakeSource
from proxy.errors import UpstreamFailed
from proxy.streaming import (
    CHUNK_SIZE_BYTES,
    SourceRestarted,
    CompleteFile,
    FileProducer,
    FileSource,
    FileTruncated,
    ProducerRelay,
    ProducerStopped,
)


class PausingTransport(StringTransport):
    """A transport whose buffer is full after every write, like a slow client."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append(len(data))
        assert self.producer is not None
        # Re-entrant, as a real transport does it from inside write().
        self.producer.pauseProducing()


class StoppingTransport(StringTransport):
    """A transport that loses its client during the first write."""

    def write(self, data: bytes) -> None:
        super().write(data)
        assert self.producer is not None
        self.producer.stopProducing()


def outcome(d: Deferred[None]) -> list[object]:
    """Record what C{d} fires with; C{addBoth} also consumes a failure."""
    results: list[object] = []
    d.addBoth(results.append)
    return results


@pytest.fixture
def data() -> bytes:
    return os.urandom(5 * CHUNK_SIZE_BYTES + 1234)


@pytest.fixture
def blob(tmp_path: object, data: bytes) -> FilePath[str]:
    path = FilePath(str(tmp_path)).child("blob")
    path.setContent(data)
    return path


def test_provides_push_producer(blob: FilePath[str], data: bytes) -> None:
    transport = StringTransport()
    producer = FileProducer(CompleteFile(blob, len(data)), transport, Clock())
    assert verifyObject(IPushProducer, producer)
    assert transport.producer is producer
    assert transport.streaming is True


def test_complete_file(blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = StringTransport()
    producer = FileProducer(CompleteFile(blob, len(data)), transport, clock)
    results = outcome(producer.done)
    assert transport.value() == b"", "nothing is written before the first step"

    clock.advance(0)

    assert transport.value() == data
    assert results == [None]
    assert transport.producer is None
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "start, end", [(0, 1), (10, 20), (CHUNK_SIZE_BYTES - 1, 3 * CHUNK_SIZE_BYTES + 7), (7, None)]
)
def test_range(blob: FilePath[str], data: bytes, start: int, end: int | None) -> None:
    clock = Clock()
    transport = StringTransport()
    producer = FileProducer(CompleteFile(blob, len(data)), transport, clock, start, end)
    results = outcome(producer.done)

    clock.advance(0)

    assert transport.value() == data[start:end]
    assert results == [None]


def test_empty_range(blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = StringTransport()
    producer = FileProducer(CompleteFile(blob, len(data)), transport, clock, 100, 100)
    results = outcome(producer.done)
    clock.advance(0)
    assert transport.value() == b""
    assert results == [None]
    assert transport.producer is None


@pytest.mark.parametrize("start, end", [(-1, 10), (10, 9), (0, 10**9)])
def test_bad_range(blob: FilePath[str], data: bytes, start: int, end: int) -> None:
    transport = StringTransport()
    with pytest.raises(ValueError):
        FileProducer(CompleteFile(blob, len(data)), transport, Clock(), start, end)
    assert transport.producer is None


def test_missing_file(tmp_path: object) -> None:
    transport = StringTransport()
    missing = FilePath(str(tmp_path)).child("missing")
    with pytest.raises(OSError):
        FileProducer(CompleteFile(missing, 10), transport, Clock())
    assert transport.producer is None


def test_pause_and_resume(blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = StringTransport()
    producer = FileProducer(CompleteFile(blob, len(data)), transport, clock)
    results = outcome(producer.done)

    producer.pauseProducing()
    clock.advance(0)
    assert transport.value() == b""
    assert clock.getDelayedCalls() == []

    producer.resumeProducing()
    clock.advance(0)
    assert transport.value() == data
    assert results == [None]


def test_one_chunk_per_resume(blob: FilePath[str], data: bytes) -> None:
    """
    Under backpressure at most one chunk is written before the transport can
    pause the producer, and nothing until it resumes it.
    """
    clock = Clock()
    transport = PausingTransport()
    producer = FileProducer(CompleteFile(blob, len(data)), transport, clock)
    results = outcome(producer.done)

    clock.advance(0)
    assert transport.writes == [CHUNK_SIZE_BYTES]
    clock.advance(0)
    assert transport.writes == [CHUNK_SIZE_BYTES], "paused: no more writes"

    for _ in range(10):
        if results:
            break
        before = len(transport.writes)
        producer.resumeProducing()
        clock.advance(0)
        assert len(transport.writes) - before <= 1
    assert transport.writes == [CHUNK_SIZE_BYTES] * 5 + [1234]
    assert transport.value() == data
    assert results == [None]


def test_resume_twice_schedules_once(blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = PausingTransport()
    producer = FileProducer(CompleteFile(blob, len(data)), transport, clock)
    clock.advance(0)
    producer.resumeProducing()
    producer.resumeProducing()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert len(transport.writes) == 2


def test_growing_source(tmp_path: object) -> None:
    clock = Clock()
    content = os.urandom(3 * CHUNK_SIZE_BYTES)
    source = FakeSource(FilePath(str(tmp_path)).child("part"), len(content))
    transport = StringTransport()
    producer = FileProducer(source, transport, clock)
    results = outcome(producer.done)

    clock.advance(0)
    assert transport.value() == b""
    assert source.waiting == 1

    source.append(content[:1000])
    assert transport.value() == b"", "woken by the source, the producer steps later"
    clock.advance(0)
    assert transport.value() == content[:1000]
    assert source.waiting == 1

    source.append(content[1000 : 2 * CHUNK_SIZE_BYTES])
    clock.advance(0)
    assert transport.value() == content[: 2 * CHUNK_SIZE_BYTES]
    assert results == []

    source.append(content[2 * CHUNK_SIZE_BYTES :])
    clock.advance(0)
    assert transport.value() == content
    assert results == [None]
    assert source.waiting == 0
    assert transport.producer is None


def test_paused_while_waiting(tmp_path: object) -> None:
    """A source that grows while the producer is paused is read on resume."""
    clock = Clock()
    source = FakeSource(FilePath(str(tmp_path)).child("part"), 10)
    transport = StringTransport()
    producer = FileProducer(source, transport, clock)
    results = outcome(producer.done)
    clock.advance(0)
    assert source.waiting == 1

    producer.pauseProducing()
    source.append(b"0123456789")
    clock.advance(0)
    assert transport.value() == b""

    producer.resumeProducing()
    clock.advance(0)
    assert transport.value() == b"0123456789"
    assert results == [None]


def test_range_of_growing_source(tmp_path: object) -> None:
    clock = Clock()
    content = os.urandom(1000)
    source = FakeSource(FilePath(str(tmp_path)).child("part"), len(content))
    transport = StringTransport()
    producer = FileProducer(source, transport, clock, 300, 600)
    results = outcome(producer.done)

    source.append(content[:400])
    clock.advance(0)
    assert transport.value() == content[300:400]
    source.append(content[400:700])
    clock.advance(0)
    assert transport.value() == content[300:600]
    assert results == [None], "done as soon as the range is there"


def test_source_failure_aborts(tmp_path: object) -> None:
    clock = Clock()
    source = FakeSource(FilePath(str(tmp_path)).child("part"), 1000)
    transport = StringTransport()
    producer = FileProducer(source, transport, clock)
    results = outcome(producer.done)
    source.append(b"x" * 100)
    clock.advance(0)

    source.fail(UpstreamFailed("upstream went away"))
    clock.advance(0)

    assert transport.value() == b"x" * 100
    assert transport.disconnected, "aborted, not closed cleanly"
    assert transport.producer is None
    [failure] = results
    assert isinstance(failure, Failure)
    assert failure.check(UpstreamFailed)


def test_a_download_that_starts_over_cuts_its_followers(tmp_path: object) -> None:
    """Bytes already sent are never continued with another download's: the response is cut."""
    clock = Clock()
    source = FakeSource(FilePath(str(tmp_path)).child("part"), 1000)
    transport = StringTransport()
    producer = FileProducer(source, transport, clock)
    results = outcome(producer.done)
    source.append(b"w" * 999)
    clock.advance(0)
    assert transport.value() == b"w" * 999
    source.start_over()
    source.append(b"r" * 100)
    clock.advance(0)
    assert transport.value() == b"w" * 999
    assert transport.disconnected, "aborted, short of the length"
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(SourceRestarted)


def test_a_download_that_starts_over_before_a_byte_is_sent_is_followed(tmp_path: object) -> None:
    clock = Clock()
    source = FakeSource(FilePath(str(tmp_path)).child("part"), 10)
    transport = StringTransport()
    producer = FileProducer(source, transport, clock)
    results = outcome(producer.done)
    source.append(b"w" * 5)
    source.start_over()
    source.append(b"r" * 10)
    clock.advance(0)
    clock.advance(0)
    assert transport.value() == b"r" * 10
    assert results == [None]


def test_file_shorter_than_promised(blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = StringTransport()
    producer = FileProducer(CompleteFile(blob, len(data) + 10), transport, clock)
    results = outcome(producer.done)

    clock.advance(0)

    assert transport.disconnected
    assert len(transport.value()) < len(data) + 10
    [failure] = results
    assert isinstance(failure, Failure)
    assert failure.check(FileTruncated)


def test_stop_leaves_source_alone(tmp_path: object) -> None:
    """
    A client that goes away stops its own producer only: the source is not
    failed and another follower still gets everything.
    """
    clock = Clock()
    content = os.urandom(2 * CHUNK_SIZE_BYTES)
    source = FakeSource(FilePath(str(tmp_path)).child("part"), len(content))
    gone, staying = StringTransport(), StringTransport()
    gone_producer = FileProducer(source, gone, clock)
    staying_producer = FileProducer(source, staying, clock)
    gone_results = outcome(gone_producer.done)
    staying_results = outcome(staying_producer.done)
    source.append(content[:100])
    clock.advance(0)
    assert source.waiting == 2

    gone_producer.stopProducing()

    [failure] = gone_results
    assert isinstance(failure, Failure)
    assert failure.check(ProducerStopped)
    assert source.failure is None
    assert source.waiting == 1, "only its own waiter was cancelled"
    assert not gone.disconnected, "the transport closes the connection, not us"

    source.append(content[100:])
    clock.advance(0)
    assert gone.value() == content[:100]
    assert staying.value() == content
    assert staying_results == [None]

    gone_producer.stopProducing()
    gone_producer.resumeProducing()
    clock.advance(0)
    assert gone.value() == content[:100], "stopped for good"


def test_stop_inside_write(blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = StoppingTransport()
    producer = FileProducer(CompleteFile(blob, len(data)), transport, clock)
    results = outcome(producer.done)
    clock.advance(0)
    assert transport.value() == data[:CHUNK_SIZE_BYTES]
    assert clock.getDelayedCalls() == []
    [failure] = results
    assert isinstance(failure, Failure)
    assert failure.check(ProducerStopped)


def test_cancel_done(tmp_path: object) -> None:
    clock = Clock()
    source = FakeSource(FilePath(str(tmp_path)).child("part"), 10)
    transport = StringTransport()
    producer = FileProducer(source, transport, clock)
    results = outcome(producer.done)
    clock.advance(0)
    assert source.waiting == 1

    producer.done.cancel()

    [failure] = results
    assert isinstance(failure, Failure)
    assert failure.check(CancelledError)
    assert source.waiting == 0
    assert source.failure is None
    source.append(b"0123456789")
    clock.advance(0)
    assert transport.value() == b""


def test_two_consumers_different_paces(tmp_path: object) -> None:
    """A paused consumer does not hold back another one of the same source."""
    clock = Clock()
    content = os.urandom(4 * CHUNK_SIZE_BYTES)
    source = FakeSource(FilePath(str(tmp_path)).child("part"), len(content))
    slow, fast = PausingTransport(), StringTransport()
    slow_producer = FileProducer(source, slow, clock)
    fast_producer = FileProducer(source, fast, clock)
    slow_results = outcome(slow_producer.done)
    fast_results = outcome(fast_producer.done)

    source.append(content[: 2 * CHUNK_SIZE_BYTES])
    clock.advance(0)
    source.append(content[2 * CHUNK_SIZE_BYTES :])
    clock.advance(0)

    assert fast.value() == content
    assert fast_results == [None]
    assert slow.value() == content[:CHUNK_SIZE_BYTES]
    assert slow_results == []

    for _ in range(10):
        if slow_results:
            break
        slow_producer.resumeProducing()
        clock.advance(0)
    assert slow.value() == content
    assert slow_results == [None]


def test_complete_file_is_a_source(blob: FilePath[str]) -> None:
    source: FileSource = CompleteFile(blob, 7)
    assert source.available() == 7
    assert source.failure is None
    assert outcome(source.wait()) == [None]


# A file opened by the caller


def test_given_file(blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = StringTransport()
    opened = blob.open("r")
    # The path may go away once the file is open: the descriptor is what is read.
    blob.remove()
    producer = FileProducer(CompleteFile(blob, len(data)), transport, clock, 10, file=opened)
    results = outcome(producer.done)
    clock.advance(0)
    assert transport.value() == data[10:]
    assert results == [None]
    assert opened.closed, "the producer owns the file it was given"


def test_given_file_closed_on_bad_range(blob: FilePath[str], data: bytes) -> None:
    opened = blob.open("r")
    with pytest.raises(ValueError):
        FileProducer(CompleteFile(blob, len(data)), StringTransport(), Clock(), 5, 1, file=opened)
    assert opened.closed


# ProducerRelay


def relayed(transport: StringTransport) -> ProducerRelay:
    relay = ProducerRelay(transport)
    transport.registerProducer(relay, True)
    return relay


def test_relay_provides_interfaces() -> None:
    relay = ProducerRelay(StringTransport())
    assert verifyObject(IPushProducer, relay)
    assert verifyObject(IConsumer, relay)


def test_relay_producers_in_turn(tmp_path: object) -> None:
    clock = Clock()
    transport = StringTransport()
    relay = relayed(transport)
    first, second = os.urandom(CHUNK_SIZE_BYTES + 1), os.urandom(10)
    sources = []
    for name, content in (("first", first), ("second", second)):
        path = FilePath(str(tmp_path)).child(name)
        path.setContent(content)
        sources.append(CompleteFile(path, len(content)))

    producer = FileProducer(sources[0], relay, clock)
    registered: object = relay.producer
    assert registered is producer
    results = outcome(producer.done)
    clock.advance(0)
    assert results == [None]
    assert relay.producer is None
    assert transport.producer is relay, "the relay stays registered for the response"

    relay.write(b"|")
    producer = FileProducer(sources[1], relay, clock)
    results = outcome(producer.done)
    clock.advance(0)
    assert results == [None]
    assert transport.value() == first + b"|" + second


def test_relay_pause_held_for_the_next_producer(blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = StringTransport()
    relay = relayed(transport)
    relay.pauseProducing()
    producer = FileProducer(CompleteFile(blob, len(data)), relay, clock)
    results = outcome(producer.done)
    clock.advance(0)
    assert transport.value() == b"", "registered while paused: starts paused"
    assert clock.getDelayedCalls() == []

    relay.resumeProducing()
    clock.advance(0)
    assert transport.value() == data
    assert results == [None]


def test_relay_passes_pause_on(blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = StringTransport()
    relay = relayed(transport)
    producer = FileProducer(CompleteFile(blob, len(data)), relay, clock)
    relay.pauseProducing()
    clock.advance(0)
    assert transport.value() == b""
    relay.resumeProducing()
    clock.advance(0)
    assert transport.value() == data
    assert outcome(producer.done) == [None]


def test_relay_stop(tmp_path: object, blob: FilePath[str], data: bytes) -> None:
    clock = Clock()
    transport = StringTransport()
    relay = relayed(transport)
    source = FakeSource(FilePath(str(tmp_path)).child("part"), 10)
    producer = FileProducer(source, relay, clock)
    results = outcome(producer.done)
    stopped = outcome(relay.when_stopped())
    clock.advance(0)
    assert stopped == []

    relay.stopProducing()

    [failure] = results
    assert isinstance(failure, Failure) and failure.check(ProducerStopped)
    assert stopped == [None]
    assert source.failure is None
    assert outcome(relay.when_stopped()) == [None], "at once once stopped"

    relay.resumeProducing()
    assert relay.stopped, "for good"
    later = FileProducer(CompleteFile(blob, len(data)), relay, clock)
    [failure] = outcome(later.done)
    assert isinstance(failure, Failure) and failure.check(ProducerStopped)
    clock.advance(0)
    assert transport.value() == b""


def test_relay_when_stopped_cancelled() -> None:
    relay = ProducerRelay(StringTransport())
    waiter = relay.when_stopped()
    waiter.cancel()
    assert isinstance(outcome(waiter)[0], Failure)
    relay.stopProducing()


def test_relay_aborts_once(tmp_path: object) -> None:
    clock = Clock()
    transport = StringTransport()
    relay = relayed(transport)
    source = FakeSource(FilePath(str(tmp_path)).child("part"), 10)
    producer = FileProducer(source, relay, clock)
    results = outcome(producer.done)
    source.append(b"01234")
    clock.advance(0)

    source.fail(UpstreamFailed("upstream went away"))
    clock.advance(0)

    assert transport.disconnected
    assert relay.disconnecting
    assert relay.producer is None
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(UpstreamFailed)
    transport.disconnected = False
    relay.abortConnection()
    assert not transport.disconnected, "only once"


def test_relay_refuses_misuse(blob: FilePath[str], data: bytes) -> None:
    relay = ProducerRelay(StringTransport())
    clock = Clock()
    FileProducer(CompleteFile(blob, len(data)), relay, clock)
    opened = blob.open("r")
    with pytest.raises(RuntimeError):
        FileProducer(CompleteFile(blob, len(data)), relay, clock, file=opened)
    assert opened.closed
    relay.unregisterProducer()
    with pytest.raises(ValueError):
        relay.registerProducer(PausingTransport(), False)
