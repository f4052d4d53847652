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

import errno
import os
from collections.abc import Callable
from typing import IO, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IPushProducer,
    IReactorFDSet,
    IReactorTime,
    IWriteDescriptor,
)
from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.http import Request
from zope.interface import implementer

from proxy.errors import ProxyError

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
    finish a response whose bytes are about to be rejected.  A source that may drop
    the bytes it offered and start over has a C{restarts} count that grows when it does:
    a follower that sent any of them is cut.
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


class SourceRestarted(ProxyError):
    """
    The source dropped bytes already sent for others: the response cannot be completed
    (an expected fault, logged as one line per client, not as a traceback).
    """

    code = 502


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
        # A source that starts over (L{proxy.fetch.Download.restart}) counts it here.
        self._restarts: int = getattr(source, "restarts", 0)
        self._paused = False
        self._over = False
        self._client_gone = False
        self._call: IDelayedCall | None = None
        self._waiting: Deferred[None] | None = None

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

    def _restarted(self) -> bool:
        """
        Whether the source dropped bytes this response sent and started over: the response is
        then failed, since finishing it with the new bytes would splice a wrong body (a
        mirror's, a peer's or a resume's that did not verify).
        """
        restarts = getattr(self.source, "restarts", 0)
        if restarts == self._restarts:
            return False
        if self._offset > self.start:
            self._fail(Failure(SourceRestarted(
                f"{self.source.path.path} started over after {self._offset} bytes were sent"
            )))
            return True
        self._restarts = restarts
        return False

    def _readable(self) -> int | None:
        """
        How far the source may be sent now, past this response's offset; None when there is
        nothing to send now: the response ended or failed, or it waits for the source.
        """
        failure = self.source.failure
        if failure is not None:
            self._fail(failure)
            return None
        if self._restarted():
            return None
        if self._offset >= self.end:
            self._finish()
            return None
        readable = min(self.source.available(), self.end)
        if self._offset >= readable:
            self._wait_for_source()
            return None
        return readable

    def _step(self) -> None:
        self._call = None
        if self._over or self._paused:
            return
        readable = self._readable()
        if readable is None:
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


# One sendfile call sends at most this much; the socket takes what fits in its buffer and the
# rest waits for the next writable turn.  It bounds how long one call may read the disk.
SENDFILE_MAX_BYTES = 1024 * 1024
# Off: every response goes through L{FileProducer} (a benchmark's comparison, a test's).
SENDFILE_ENABLED = True


def sendfile_transport(consumer: IConsumer) -> tcp.Connection | None:
    """
    The TCP connection under C{consumer} when its body may be sent with C{os.sendfile}: a
    request on a plain (not TLS) socket of a reactor that watches descriptors; else None.
    """
    if not SENDFILE_ENABLED or not hasattr(os, "sendfile") or not isinstance(consumer, Request):
        return None
    transport = getattr(consumer.channel, "transport", None)
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    if not transport.connected or transport.disconnecting:
        return None
    reactor: object = transport.reactor
    return transport if IReactorFDSet.providedBy(reactor) else None


def file_producer(
    source: FileSource, consumer: IConsumer, clock: IReactorTime, start: int = 0,
    end: int | None = None, *, send_timeout: float,
) -> FileProducer:
    """A L{SendfileProducer} where the connection allows it, else a L{FileProducer}."""
    transport = sendfile_transport(consumer)
    if transport is None or not isinstance(consumer, Request):
        return FileProducer(source, consumer, clock, start, end)
    return SendfileProducer(
        source, consumer, clock, start, end, transport=transport, send_timeout=send_timeout
    )


# What os.sendfile fails with when the client has gone.
_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


@implementer(IWriteDescriptor)
class _Writable:
    """
    A client socket as the reactor watches it for writing, on a duplicate of its descriptor:
    the reactor keys what it watches by descriptor number, and the transport keeps watching
    the original for reading (and for writing what it buffers).
    """

    def __init__(self, fd: int, writable: Callable[[], None], lost: Callable[[], None]) -> None:
        self._fd = fd
        self._writable = writable
        self._lost = lost

    def fileno(self) -> int:
        return self._fd

    def doWrite(self) -> None:
        self._writable()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw the socket fail (or doWrite raise) and stopped watching it.
        self._lost()

    def logPrefix(self) -> str:
        return "sendfile"


class SendfileProducer(FileProducer):
    """
    A L{FileProducer} for a plain TCP connection: the kernel copies the file into the socket
    (C{os.sendfile}), so no byte of the body passes through Python.

    It steps whenever the socket is writable (the reactor watches a duplicate of its
    descriptor, L{_Writable}) rather than once per reactor turn, and sends only once the
    transport's own buffer (the response's headers) is empty, so the bytes go out in order.
    A full socket (C{EAGAIN}) waits for the next writable turn; pausing stops the watching.
    A growing source is followed as by L{FileProducer}, the last byte held until verified.
    A client that reads nothing for C{send_timeout} while the socket is full is dropped, as
    L{proxy.channel.ProxyChannel} drops one whose buffered writes do not drain.
    """

    def __init__(
        self,
        source: FileSource,
        consumer: Request,
        clock: IReactorTime,
        start: int = 0,
        end: int | None = None,
        *,
        transport: tcp.Connection,
        send_timeout: float,
    ) -> None:
        self._transport = transport
        self._reactor: IReactorFDSet = transport.reactor
        self._send_timeout = send_timeout
        self._watching = False
        # Since when the producer has waited for the socket to take more (the last byte
        # sent, or the start of the watching), and the check of it against send_timeout.
        self._since = 0.0
        self._stall: IDelayedCall | None = None
        self._fd = os.dup(transport.fileno())
        self._writable = _Writable(self._fd, self._step, self._socket_lost)
        try:
            super().__init__(source, consumer, clock, start, end)
        except BaseException:
            self._release()
            raise

    def pauseProducing(self) -> None:
        self._paused = True
        self._unwatch()

    def _schedule(self) -> None:
        if self._over or self._paused or self._waiting is not None or self._watching:
            return
        self._watching = True
        self._since = self.clock.seconds()
        if self._stall is None:
            self._stall = self.clock.callLater(self._send_timeout, self._check_stall)
        self._reactor.addWriter(self._writable)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._reactor.removeWriter(self._writable)

    def _wait_for_source(self) -> None:
        # Nothing to send until the source grows: the socket's writability means nothing now.
        self._unwatch()
        super()._wait_for_source()

    def _step(self) -> None:
        if self._over or self._paused:
            self._unwatch()
            return
        readable = self._readable()
        if readable is None:
            return
        transport = self._transport
        if transport.disconnecting or not transport.connected:
            # On its way down: its connectionLost stops this producer.
            self._unwatch()
            return
        if len(transport.dataBuffer) - transport.offset + transport._tempDataLen:
            # The headers first: the transport is writing them as the socket takes them.
            return
        assert self._file is not None
        try:
            sent = os.sendfile(
                self._fd, self._file.fileno(), self._offset,
                min(readable - self._offset, SENDFILE_MAX_BYTES),
            )
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno not in _PEER_GONE:
                # Not the client's doing (a file system without sendfile, an I/O error):
                # the response is cut and the failure logged where the request ends.
                self._fail(Failure())
                return
            # The client is gone; the transport's end stops this producer.
            self.log.debug("sendfile to {peer} failed: {why}", peer=transport.getPeer(), why=e)
            self._unwatch()
            abort_connection(transport)
            return
        if sent == 0:
            self._fail(Failure(FileTruncated(
                f"{self.source.path.path} ended at {self._offset} bytes, {readable} were promised"
            )))
            return
        self._offset += sent
        self._since = self.clock.seconds()
        assert isinstance(self.consumer, Request)
        # What Request.write would have counted: the access log and the usage read it.
        self.consumer.sentLength += sent
        if self._offset >= self.end:
            self._finish()

    def _check_stall(self) -> None:
        self._stall = None
        if self._over or not self._watching:
            # Paused (the channel times that) or waiting for the source: the next watching
            # checks again.
            return
        waited = self.clock.seconds() - self._since
        if waited < self._send_timeout:
            self._stall = self.clock.callLater(self._send_timeout - waited, self._check_stall)
            return
        self.log.info(
            "client {peer} read nothing for {seconds:g} s; dropping its connection",
            peer=self._transport.getPeer(), seconds=self._send_timeout,
        )
        self._unwatch()
        abort_connection(self._transport)

    def _socket_lost(self) -> None:
        # The reactor no longer watches it.
        self._watching = False
        abort_connection(self._transport)

    def _stop(self) -> None:
        super()._stop()
        self._release()

    def _release(self) -> None:
        # Unwatched before its descriptor closes: epoll would otherwise keep reporting it.
        self._unwatch()
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
