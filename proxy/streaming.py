"""Streaming a file, or a file still being written, to an HTTP response.

A L{FileSource} is anything with a file on disk and a promise about its final
size: a cached blob (L{CompleteFile}) or a download in progress.  A
L{FileProducer} sends one byte range of a source to one consumer, reading the
file from disk at its own pace; the disk is the buffer, so a slow client never
holds back the download or the other clients following it.  A L{ProducerRelay}
lets several producers write one response in turn (an image export's parts)
without losing the consumer's backpressure in between.
"""

from __future__ import annotations

from typing import IO, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.http import Request
from zope.interface import implementer

CHUNK_SIZE_BYTES = 64 * 1024


class FileSource(Protocol):
    """
    A file on disk that is complete or still growing towards a known size.

    @ivar path: The file to read.  While a download runs it is the growing
        temporary file; it keeps its inode through the rename that commits it,
        so a descriptor opened early stays valid.
    @ivar size: The final size in bytes, known up front from the catalogue.
    @ivar failure: Why the source will never complete, or L{None}.

    C{available() == size} means complete: a source that verifies its content
    after the last byte arrives (a download checking sha256) must not report
    the final byte count before the content has passed, or a follower could
    finish a response whose bytes are about to be rejected.
    """

    @property
    def path(self) -> FilePath[str]: ...

    @property
    def size(self) -> int: ...

    @property
    def failure(self) -> Failure | None: ...

    def available(self) -> int:
        """
        @return: How many bytes from the start of the file can be read now.
        """

    def wait(self) -> Deferred[None]:
        """
        @return: A new L{Deferred} that fires once, with L{None}, when more
            bytes become available or the source completes or fails.
            Cancelling it affects no other waiter and not the source.
        """


@frozen
class CompleteFile:
    """
    The trivial L{FileSource}: a file that is already whole, such as a blob
    served from the cache.
    """

    path: FilePath[str]
    size: int

    @property
    def failure(self) -> Failure | None:
        return None

    def available(self) -> int:
        return self.size

    def wait(self) -> Deferred[None]:
        return succeed(None)


class FileTruncated(Exception):
    """
    The file ended before the number of bytes its source said were there.
    """


class BytesTakenBack(Exception):
    """
    The source's download started over after bytes that did not verify (from a peer, a mirror,
    or a resume's pieces) while this response had sent some: what the client has may not be a
    prefix of the right file, so its response is cut rather than continued.
    """


class ProducerStopped(Exception):
    """
    The consumer stopped the producer (the client went away) before the
    range was sent.
    """


def abort_connection(consumer: IConsumer) -> None:
    """
    Drop the connection under C{consumer} without sending what is buffered.

    An aborted response is short against its C{Content-Length} (or lacks the
    final chunk), so the client can never take it for a complete body.

    @param consumer: A L{twisted.web.http.Request}, whose transport is
        aborted, or a transport itself.
    """
    transport: object = consumer.transport if isinstance(consumer, Request) else consumer
    if transport is None or getattr(transport, "disconnecting", False):
        # Already on its way down: a TLS transport must not be aborted twice.
        return
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        getattr(transport, "loseConnection")()


@implementer(IPushProducer)
class FileProducer:
    """
    Write the byte range C{[start, end)} of a L{FileSource} to a consumer.

    Constructing one opens the file, registers it with the consumer as a
    streaming producer and schedules the first step; a push producer is never
    asked to resume first.  Each step writes at most L{CHUNK_SIZE_BYTES} and
    schedules the next with C{clock.callLater(0, ...)}, so that the transport
    can pause it in between; memory in flight is one chunk plus what the
    transport buffers.  When caught up with a growing source it waits on
    C{source.wait()}.

    At the end it unregisters, finishes the request (when the consumer is a
    L{twisted.web.http.Request}) and fires L{done} with L{None}.

    If the source fails, or the file turns out shorter than promised, it
    aborts the connection once headers have gone out, so the client sees a
    short body, and L{done} fails with the source's failure (or
    L{FileTruncated}).  If the client goes away (C{stopProducing}, or the
    request's C{notifyFinish} failing) it closes the file and L{done} fails
    with L{ProducerStopped}; cancelling L{done} stops it the same way.  The
    source is only ever read and waited on: no consumer can cancel a shared
    download.

    By default it opens C{source.path} itself.  A caller that must hold the
    file open before the producer can start (a response sending several
    files in turn, where a file not yet started could otherwise be renamed
    or deleted meanwhile) passes it as C{file}; the producer owns it from
    then on and closes it, also when the constructor raises.

    @ivar done: Fires when the range has been written and the request
        finished; see above for how it fails.
    """

    log = Logger()

    def __init__(
        self,
        source: FileSource,
        consumer: IConsumer,
        clock: IReactorTime,
        start: int = 0,
        end: int | None = None,
        *,
        file: IO[bytes] | None = None,
    ) -> None:
        if end is None:
            end = source.size
        if not 0 <= start <= end <= source.size:
            if file is not None:
                file.close()
            raise ValueError(f"bad range [{start}, {end}) of {source.size} bytes")
        self.source = source
        self.consumer = consumer
        self.clock = clock
        self.start = start
        self.end = end
        self.done: Deferred[None] = Deferred(lambda _: self._stop())
        self._offset = start
        self._paused = False
        self._over = False
        self._client_gone = False
        self._call: IDelayedCall | None = None
        self._waiting: Deferred[None] | None = None
        # A download that starts over after bytes that did not verify counts it here
        # (L{proxy.fetch.Download.discarded}); any other source never does.
        self._discarded = getattr(source, "discarded", 0)

        self._file: IO[bytes] | None = source.path.open("r") if file is None else file
        try:
            self._file.seek(start)
        except BaseException:
            self._close()
            raise
        if isinstance(consumer, Request):
            # A transport that closes does not always call stopProducing on
            # us; the request hears about it in every case.
            consumer.notifyFinish().addErrback(self._request_lost)
        try:
            consumer.registerProducer(self, True)
        except BaseException:
            self._close()
            raise
        self._schedule()

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        if self._over:
            return
        self._stop()
        self.done.errback(Failure(ProducerStopped()))

    # Stepping

    def _schedule(self) -> None:
        if self._over or self._paused:
            return
        if self._call is not None or self._waiting is not None:
            return
        self._call = self.clock.callLater(0, self._step)

    def _step(self) -> None:
        self._call = None
        if self._over or self._paused:
            return
        failure = self.source.failure
        if failure is not None:
            self._fail(failure)
            return
        if self._offset >= self.end:
            self._finish()
            return
        discarded = getattr(self.source, "discarded", 0)
        if discarded != self._discarded:
            if self._offset > self.start:
                self._fail(Failure(BytesTakenBack(
                    f"{self.source.path.path} started over after bytes that did not verify"
                )))
                return
            # Nothing sent yet: every byte this response sends is of the new attempt.
            self._discarded = discarded
        readable = min(self.source.available(), self.end)
        if self._offset >= readable:
            self._wait_for_source()
            return
        assert self._file is not None
        wanted = min(CHUNK_SIZE_BYTES, readable - self._offset)
        data = self._file.read(wanted)
        if len(data) < wanted:
            self._fail(
                Failure(
                    FileTruncated(
                        f"{self.source.path.path} ended at {self._offset + len(data)}"
                        f" bytes, {readable} were promised"
                    )
                )
            )
            return
        self._offset += wanted
        # The write may re-enter pauseProducing or stopProducing (a full
        # transport buffer, a dead connection); _schedule checks for both.
        self.consumer.write(data)
        self._schedule()

    def _wait_for_source(self) -> None:
        waiting = self._waiting = self.source.wait()
        waiting.addBoth(self._source_moved, waiting)

    def _source_moved(self, result: object, waiting: Deferred[None]) -> None:
        if self._waiting is not waiting:
            # Cancelled by _stop; the CancelledError ends here.
            return
        self._waiting = None
        if isinstance(result, Failure):
            # The contract says wait() fires rather than fails, but a source
            # that fails it anyway must not leave the response hanging.
            self._fail(result)
            return
        # Never step from inside the source's notification: the source is
        # in the middle of telling every follower.
        self._schedule()

    # Endings

    def _stop(self) -> None:
        """Stop for good without touching the consumer."""
        self._over = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _finish(self) -> None:
        self._stop()
        self.consumer.unregisterProducer()
        if isinstance(self.consumer, Request) and not self._client_gone:
            try:
                self.consumer.finish()
            except RuntimeError:
                # The connection was lost in between; notifyFinish says so.
                pass
        self.done.callback(None)

    def _fail(self, failure: Failure) -> None:
        self._stop()
        if not self._client_gone:
            self.consumer.unregisterProducer()
            started = not isinstance(self.consumer, Request) or self.consumer.startedWriting
            if started:
                self.log.debug(
                    "aborting response at byte {offset} of [{start}, {end}): {why}",
                    offset=self._offset,
                    start=self.start,
                    end=self.end,
                    why=failure.getErrorMessage(),
                )
                abort_connection(self.consumer)
        self.done.errback(failure)

    def _request_lost(self, reason: Failure) -> None:
        self._client_gone = True
        self.stopProducing()


@implementer(IPushProducer, IConsumer)
class ProducerRelay:
    """
    The one streaming producer of a response that several producers write in turn.

    Register the relay with the consumer (a request) for the whole response, and let each
    producer (a L{FileProducer} per file) register with the relay instead.  The relay passes
    the consumer's C{pauseProducing}, C{resumeProducing} and C{stopProducing} on to the
    current producer and remembers them in between: a producer that registers while the
    consumer is paused starts paused, and one that registers after the consumer stopped is
    stopped at once.  Registering each producer with the request directly would lose that:
    a request's channel does not tell a newly registered producer that its transport is full,
    and a TLS transport pauses its producer only on the way into backpressure, so the next
    file would be read into memory as fast as the disk allows.

    To its producers the relay is also the transport: C{abortConnection} drops the
    consumer's connection (L{abort_connection}) once, after which C{disconnecting} is true.

    @ivar producer: The producer registered now, or L{None}.
    @ivar paused: Whether the consumer has paused the relay and not resumed it since.
    @ivar stopped: Whether the consumer has stopped it; that is for good.
    """

    def __init__(self, consumer: IConsumer) -> None:
        self.consumer = consumer
        self.producer: IPushProducer | None = None
        self.paused = False
        self.stopped = False
        self.disconnecting = False
        self._stop_waiters: list[Deferred[None]] = []

    # IConsumer, for the producers taking turns

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("ProducerRelay takes push producers only")
        if self.producer is not None:
            raise RuntimeError(
                f"cannot register {producer!r}: {self.producer!r} was never unregistered"
            )
        pushing = self.producer = IPushProducer(producer)
        if self.stopped:
            pushing.stopProducing()
        elif self.paused:
            pushing.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.consumer.write(data)

    def abortConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        abort_connection(self.consumer)

    def when_stopped(self) -> Deferred[None]:
        """
        @return: A new L{Deferred} that fires with L{None} once the consumer
            has stopped the relay (at once if it has); cancelling it affects
            nothing else.
        """
        if self.stopped:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._stop_waiters.remove)
        self._stop_waiters.append(waiter)
        return waiter

    # IPushProducer, towards the consumer

    def pauseProducing(self) -> None:
        self.paused = True
        if self.producer is not None:
            self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        self.paused = False
        if self.producer is not None:
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        # A stopped producer never unregisters: forget it here.
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
