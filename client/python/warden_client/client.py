"""Typed clients for warden's ``Check`` RPC over mutual TLS.

One channel per process, created lazily and keyed by pid: a channel made in
a parent is never used in a forked child (gunicorn and uwsgi pre-fork
workers), which gets its own on first use. Every call has a deadline. A small
circuit breaker makes a dead server cost microseconds instead of timeouts.

A client may be given several targets (the nodes of a warden cluster, as a
list or a comma-separated string; any node answers any check): calls start
at the next one in turn, and a call that finds a node unreachable
(UNAVAILABLE: refused, reset, or the node's "retry" answer while a key's
state moves) goes on to the next, so a node going away is not noticed by
the app. Other failures (a deadline passed: the node may have decided) are
not retried, since a retried request could be refused as its own replay.

Two transports carry the calls of ``WardenClient`` and ``AsyncWardenClient``: grpcio, always there,
and the compiled one of the ``warden-client-native`` package (Rust: tonic
over rustls), which costs a fraction of grpcio's time per call and is used
when installed (``pip install ./client/python-native`` from a checkout). ``transport=``
picks one: ``"auto"`` (the default: native when installed), ``"native"``
(an error when it is not installed) or ``"grpcio"``. Messages, errors,
fail-over and the breaker are the same with either.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import grpc

from warden_client._proto.warden.v1 import warden_pb2, warden_pb2_grpc

try:
    import warden_client_native as _native
except ImportError:  # the optional compiled transport is not installed
    _native = None

CheckRequest = warden_pb2.CheckRequest
LimitRequest = warden_pb2.LimitRequest
SignWebhookRequest = warden_pb2.SignWebhookRequest


@dataclass(frozen=True)
class SignedWebhook:
    """What ``sign_webhook`` returns: the headers to send with the payload,
    and the message id and time they were signed with."""

    headers: dict[str, str]
    message_id: str
    timestamp: int

    @classmethod
    def from_proto(cls, r: "warden_pb2.SignWebhookResponse") -> "SignedWebhook":
        return cls(headers=dict(r.headers), message_id=r.message_id, timestamp=r.timestamp)


def _sign_request(key_id: str, scheme: str, payload: bytes | str, message_id: str, timestamp: int) -> SignWebhookRequest:
    if isinstance(payload, str):
        payload = payload.encode()
    return SignWebhookRequest(key_id=key_id, scheme=scheme, payload=payload, message_id=message_id, timestamp=timestamp)

_REASON_NAMES = {value: name.removeprefix("REASON_").lower() for name, value in warden_pb2.Reason.items()}


def reason_name(reason: int) -> str:
    """The short name of a reason ("rate_limited"), derived from the proto
    enum's name exactly as warden's logs and metrics spell it."""
    return _REASON_NAMES.get(reason, "unspecified")


# Calls that fail with these mean "warden is not there", not "denied".
_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


# warden's own refusals: it is there, and will not take the request while
# its replay memory or a rate-limit pool is full (the messages are the
# server's, `CheckError` in server/src/check.rs). Not "unreachable": an
# attacker who fills that state would otherwise turn FAILURE_MODE "open"
# into no checks at all, and trip the breaker for everyone.
_REFUSED_WHILE_FULL = ("the replay cache is full", "rate-limit state is full")


class WardenError(Exception):
    """A call to warden failed (not a denial: denials are ``Decision``s)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class WardenUnavailable(WardenError):
    """warden could not be reached, timed out, or the breaker is open."""


@dataclass(frozen=True)
class Caller:
    """Who made the request, from the verified key."""

    key_id: str
    owner: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class LimitStatus:
    name: str
    limit: int
    remaining: int
    reset_after_ms: int


@dataclass(frozen=True)
class Decision:
    """warden's answer for one request."""

    allowed: bool
    reason: str
    http_status: int
    retry_after_ms: int = 0
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    limits: tuple[LimitStatus, ...] = ()
    caller: Caller | None = None

    @classmethod
    def from_proto(cls, r: warden_pb2.CheckResponse) -> "Decision":
        caller = None
        if r.HasField("caller"):
            caller = Caller(r.caller.key_id, r.caller.owner, tuple(r.caller.scopes))
        return cls(
            allowed=r.decision == warden_pb2.DECISION_ALLOW,
            reason=reason_name(r.reason),
            http_status=r.http_status,
            retry_after_ms=r.retry_after_ms,
            message=r.message,
            headers=dict(r.headers),
            limits=tuple(LimitStatus(l.name, l.limit, l.remaining, l.reset_after_ms) for l in r.limits),
            caller=caller,
        )


class CircuitBreaker:
    """Opens after ``failures`` consecutive unreachable calls; while open,
    calls fail at once; after ``reset_after`` seconds one trial call is let
    through (half-open), and its outcome closes or re-opens the breaker."""

    def __init__(self, failures: int = 3, reset_after: float = 5.0) -> None:
        self.failures = failures
        self.reset_after = reset_after
        self._lock = threading.Lock()
        self._consecutive = 0
        self._open_until = 0.0

    def allow(self) -> bool:
        with self._lock:
            if self._consecutive < self.failures:
                return True
            now = time.monotonic()
            if now >= self._open_until:
                # Half-open: let this one call through, hold the others.
                self._open_until = now + self.reset_after
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._consecutive = 0

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._consecutive >= self.failures:
                self._open_until = time.monotonic() + self.reset_after

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._consecutive >= self.failures and time.monotonic() < self._open_until


def _read(path: str | os.PathLike | bytes | None) -> bytes | None:
    if path is None:
        return None
    if isinstance(path, bytes):
        return path
    return Path(path).read_bytes()


def _request(request: CheckRequest | None, fields: dict) -> CheckRequest:
    if request is not None and fields:
        raise TypeError("give a CheckRequest or keyword fields, not both")
    if request is not None:
        return request
    limits = fields.pop("limits", ())
    req = CheckRequest(**fields)
    for lim in limits:
        req.limits.append(lim if isinstance(lim, LimitRequest) else LimitRequest(policy=lim[0], descriptor=lim[1]))
    return req


def _targets(target: str | Sequence[str]) -> list[str]:
    names = target.split(",") if isinstance(target, str) else list(target)
    names = [t.strip() for t in names if t.strip()]
    if not names:
        raise ValueError("warden client: no target given")
    return names


TRANSPORTS = ("auto", "native", "grpcio")

# The compiled transport's busy wait, in microseconds: its default for a
# thread that waits (WardenClient), for an event loop's lone call
# (AsyncWardenClient), and the longest accepted (beyond it, sleeping costs
# less). The async default is longer because a lone async call not answered
# in time costs three thread wake-ups, not one: under Django's ASGI handler
# on a 2-core VM its answers came in 200 µs at the median and 310-350 µs at
# p99, so a budget of 200 missed half of them (benches/python_overhead.py).
BUSY_WAIT_US = 200
ASYNC_BUSY_WAIT_US = 500
MAX_BUSY_WAIT_US = 10_000


def is_valid_busy_wait(value) -> bool:
    """An integer (not a bool) from 0 to ``MAX_BUSY_WAIT_US``."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BUSY_WAIT_US


def native_transport_available() -> bool:
    """Whether the compiled transport (``warden-client-native``) is installed."""
    return _native is not None


_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}
_WARDEN = warden_pb2.DESCRIPTOR.services_by_name["Warden"]


def _method_path(name: str) -> str:
    return f"/{_WARDEN.full_name}/{_WARDEN.methods_by_name[name].name}"


class NativeRpcError(grpc.RpcError):
    """A failed call on the compiled transport, with the same ``code()`` and
    ``details()`` as grpcio's errors, so one path handles both."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _native_error(code: int, details: str) -> NativeRpcError:
    """A compiled-transport failure (a status code number and its details)."""
    return NativeRpcError(_STATUS_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN), details)


def _as_rpc_error(e: Exception) -> NativeRpcError:
    return _native_error(*e.args)


class _NativeStub:
    """The generated stub's calls that the client makes, over the compiled
    transport: messages are built and read by the generated classes here,
    and travel as their serialized bytes."""

    _CHECK = _method_path("Check")
    _FORGET = _method_path("Forget")
    _SIGN_WEBHOOK = _method_path("SignWebhook")
    _CHECK_STREAM = _method_path("CheckStream")

    def __init__(self, channel) -> None:
        self._channel = channel

    def _unary(self, path: str, request, answer_type, timeout: float):
        try:
            raw = self._channel.unary(path, request.SerializeToString(), timeout)
        except _native.RpcError as e:
            raise _as_rpc_error(e) from None
        return answer_type.FromString(raw)

    def Check(self, request: CheckRequest, timeout: float) -> warden_pb2.CheckResponse:
        return self._unary(self._CHECK, request, warden_pb2.CheckResponse, timeout)

    def Forget(self, request: CheckRequest, timeout: float) -> warden_pb2.CheckResponse:
        return self._unary(self._FORGET, request, warden_pb2.CheckResponse, timeout)

    def SignWebhook(self, request: SignWebhookRequest, timeout: float) -> warden_pb2.SignWebhookResponse:
        return self._unary(self._SIGN_WEBHOOK, request, warden_pb2.SignWebhookResponse, timeout)

    def CheckStream(self, requests: Iterable[CheckRequest], timeout: float) -> list[warden_pb2.CheckResponse]:
        try:
            raw = self._channel.stream(self._CHECK_STREAM, [r.SerializeToString() for r in requests], timeout)
        except _native.RpcError as e:
            raise _as_rpc_error(e) from None
        return [warden_pb2.CheckResponse.FromString(r) for r in raw]


class _NativeAsyncStub:
    """``_NativeStub`` for asyncio. A call made while no other is in flight
    on the channel is looked for on the loop's thread, in short turns
    between the loop's other work, for up to the channel's busy wait (its
    answer usually comes by then, and no thread is woken for it); any
    other call, and one not answered by then, goes on on the compiled
    transport's own thread while the event loop awaits it, and its answer
    is collected on the loop when the transport's descriptor turns
    readable."""

    def __init__(self, channel, loop) -> None:
        self._channel = channel
        self._loop = loop
        self._waiting: dict[int, asyncio.Future] = {}
        # A lone call is being looked for: the calls made meanwhile are
        # handed over (one call looked for at a time is enough to drive the
        # connection), and then so is it.
        self._looking = False
        loop.add_reader(channel.fileno(), self._collect)

    def _collect(self) -> None:
        for call, raw, code, details in self._channel.finished():
            waiter = self._waiting.pop(call, None)
            if waiter is None or waiter.done():  # given up on (cancelled)
                continue
            if raw is None:
                waiter.set_exception(_native_error(code, details))
            else:
                waiter.set_result(raw)

    async def _unary(self, path: str, request, answer_type, timeout: float):
        payload = request.SerializeToString()
        if self._waiting or self._looking:
            call = self._channel.start_unary(path, payload, timeout)
        else:
            self._looking = True
            try:
                call = self._channel.try_unary(path, payload, timeout)
                while isinstance(call, _native.Looking):
                    # Every other task ready on the loop runs before the next turn.
                    await asyncio.sleep(0)
                    call = self._channel.look_again(call, bool(self._waiting))
            except _native.RpcError as e:
                raise _as_rpc_error(e) from None
            finally:
                self._looking = False
            if isinstance(call, bytes):
                return answer_type.FromString(call)
        waiter = self._loop.create_future()
        self._waiting[call] = waiter
        return answer_type.FromString(await waiter)

    def Check(self, request: CheckRequest, timeout: float):
        return self._unary(_NativeStub._CHECK, request, warden_pb2.CheckResponse, timeout)

    def Forget(self, request: CheckRequest, timeout: float):
        return self._unary(_NativeStub._FORGET, request, warden_pb2.CheckResponse, timeout)

    def SignWebhook(self, request: SignWebhookRequest, timeout: float):
        return self._unary(_NativeStub._SIGN_WEBHOOK, request, warden_pb2.SignWebhookResponse, timeout)

    def close(self) -> None:
        self._loop.remove_reader(self._channel.fileno())
        for waiter in self._waiting.values():
            waiter.cancel()
        self._waiting.clear()


class _Base:
    DEFAULT_BUSY_WAIT_US = BUSY_WAIT_US

    def __init__(
        self,
        target: str | Sequence[str],
        cert: str | os.PathLike | bytes,
        key: str | os.PathLike | bytes,
        ca: str | os.PathLike | bytes,
        server_name: str | None = None,
        timeout: float = 0.5,
        breaker: CircuitBreaker | None = None,
        transport: str = "auto",
        busy_wait_us: int | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"warden client: transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        if transport == "native" and _native is None:
            raise ValueError(
                'warden client: transport "native" needs the warden-client-native package '
                "(pip install ./client/python-native)"
            )
        if transport == "auto":
            transport = "native" if _native is not None else "grpcio"
        self.transport = transport
        self.targets = _targets(target)
        self.target = ",".join(self.targets)
        self._turn = 0
        if timeout <= 0:
            raise ValueError("warden client: timeout must be positive")
        self.timeout = timeout
        self.server_name = server_name
        self.breaker = breaker or CircuitBreaker()
        if busy_wait_us is None:
            busy_wait_us = self.DEFAULT_BUSY_WAIT_US
        if not is_valid_busy_wait(busy_wait_us):
            raise ValueError(f"warden client: busy_wait_us must be an integer from 0 to {MAX_BUSY_WAIT_US}")
        self.busy_wait_us = busy_wait_us
        # Files are read once, here: a reload needs a new client.
        self._credentials = (_read(ca), _read(key), _read(cert))
        self._options: list[tuple[str, object]] = [("grpc.max_receive_message_length", 4 * 1024 * 1024)]
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r})"

    def _ssl(self) -> grpc.ChannelCredentials:
        ca, key, cert = self._credentials
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def _order(self) -> list[int]:
        """Target indexes for one call: the next in turn first."""
        n = len(self.targets)
        start = self._turn % n
        self._turn += 1
        return [(start + i) % n for i in range(n)]

    @staticmethod
    def _next_target_may_help(e: grpc.RpcError) -> bool:
        return hasattr(e, "code") and e.code() == grpc.StatusCode.UNAVAILABLE

    def _failed(self, e: grpc.RpcError) -> WardenError:
        code = e.code() if hasattr(e, "code") else None
        details = (e.details() if hasattr(e, "details") else None) or ""
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(_REFUSED_WHILE_FULL):
            return WardenError(f"warden refused the call: {details}", code)
        if code in _UNREACHABLE:
            self.breaker.failure()
            return WardenUnavailable(f"warden unavailable: {code.name if code else 'error'}", code)
        return WardenError(f"warden refused the call: {code.name if code else 'error'}: {e.details()}", code)


class WardenClient(_Base):
    """Synchronous client. Thread-safe; safe to create before a fork.

    ``transport``: ``"auto"`` (compiled when ``warden-client-native`` is
    installed, else grpcio), ``"native"`` or ``"grpcio"``; see the module's
    documentation.

    ``busy_wait_us`` (compiled transport only): how long a call looks for
    its answer before its thread sleeps, in microseconds (0 to 10000; 0
    sleeps at once). Waking a sleeping thread when the answer arrives costs
    tens of microseconds on virtual machines; looking costs CPU, so it is
    done only while answers usually arrive within this time (a warden on
    the same host or network), and the CPU is offered to other runnable
    threads between looks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._channels: list = []
        self._stubs: list = []

    def _connect(self, target: str):
        """A channel to ``target`` and the stub that calls through it."""
        if self.transport == "native":
            ca, key, cert = self._credentials
            channel = _native.Channel(target, ca, cert, key, self.server_name, self.busy_wait_us)
            return channel, _NativeStub(channel)
        channel = grpc.secure_channel(target, self._ssl(), options=self._options)
        return channel, warden_pb2_grpc.WardenStub(channel)

    def _get_stubs(self) -> list:
        pid = os.getpid()
        with self._lock:
            if self._pid != pid or not self._stubs:
                # In a forked child the parent's channels are abandoned, never
                # used or closed here: their threads do not exist in the child.
                made = [self._connect(t) for t in self.targets]
                self._channels = [channel for channel, _ in made]
                self._stubs = [stub for _, stub in made]
                self._pid = pid
            return self._stubs

    def _call(self, call):
        """``call(stub)`` on the next target, going on to the others while
        they are unreachable."""
        if not self.breaker.allow():
            raise WardenUnavailable("warden unavailable: circuit breaker open")
        stubs = self._get_stubs()
        last: grpc.RpcError | None = None
        for i in self._order():
            try:
                answer = call(stubs[i])
            except grpc.RpcError as e:
                last = e
                if self._next_target_may_help(e):
                    continue
                raise self._failed(e) from None
            self.breaker.success()
            return answer
        assert last is not None
        raise self._failed(last) from None

    @property
    def channel_pid(self) -> int | None:
        """The pid the current channel was made in (for fork tests)."""
        return self._pid

    def check(self, request: CheckRequest | None = None, /, **fields) -> Decision:
        """Checks one request: a ``CheckRequest`` or its fields as keywords."""
        req = _request(request, fields)
        return Decision.from_proto(self._call(lambda stub: stub.Check(req, timeout=self.timeout)))

    def forget(self, request: CheckRequest) -> Decision:
        """Forgets that ``request`` was accepted, so that it may be accepted
        once more: for a webhook delivery whose processing failed, which the
        provider will send again. Judged as ``check`` judges it (allowed when
        forgotten); asking twice does no harm."""
        return Decision.from_proto(self._call(lambda stub: stub.Forget(request, timeout=self.timeout)))

    def sign_webhook(
        self, key_id: str, scheme: str, payload: bytes | str, *, message_id: str = "", timestamp: int = 0
    ) -> SignedWebhook:
        """Signs an outbound webhook with ``key_id``'s secrets, which never
        leave warden: ``scheme`` is ``"standard-webhooks"`` or ``"stripe"``.
        Needs a client certificate with the "sign" role."""
        req = _sign_request(key_id, scheme, payload, message_id, timestamp)
        return SignedWebhook.from_proto(self._call(lambda stub: stub.SignWebhook(req, timeout=self.timeout)))

    def check_many(self, requests: Iterable[CheckRequest]) -> list[Decision]:
        """Checks many requests over one ``CheckStream``; answers in order."""
        reqs = list(requests)
        answers = self._call(lambda stub: list(stub.CheckStream(iter(reqs), timeout=self.timeout * 10)))
        return [Decision.from_proto(r) for r in answers]

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for channel in self._channels:
                    # A compiled channel closes when it is dropped, below.
                    if hasattr(channel, "close"):
                        channel.close()
            self._channels = []
            self._stubs = []
            self._pid = None


class AsyncWardenClient(_Base):
    """asyncio client: ``await client.check(...)``. Channels are made per
    process and event loop, as for ``WardenClient`` per process.

    ``transport`` as for ``WardenClient``; grpcio uses ``grpc.aio``. On the
    compiled transport a call made while no other is in flight on its
    channel looks for its answer on the loop's thread for up to
    ``busy_wait_us`` (0 to 10000; 500 by default): a lone call then wakes
    no thread, where handing it to another thread costs three wake-ups. It
    looks in turns of up to 50 µs, and every other task ready on the loop
    runs between two turns. A call not answered by then, and every call
    made while another is in flight, goes on on the transport's own
    thread, and the event loop awaits its answer without waiting on it.
    Looking costs CPU: with a warden whose answers take longer than the
    budget (a remote one), it stops by itself after six late answers in a
    row, and only one call in 32 looks until answers come in time again.
    ``busy_wait_us=0`` hands every call over at once."""

    DEFAULT_BUSY_WAIT_US = ASYNC_BUSY_WAIT_US

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._key: tuple[int, int] | None = None
        self._channels: list = []
        self._stubs: list = []

    def _connect(self, target: str, loop):
        if self.transport == "native":
            ca, key, cert = self._credentials
            channel = _native.AsyncChannel(target, ca, cert, key, self.server_name, self.busy_wait_us)
            stub = _NativeAsyncStub(channel, loop)
            return stub, stub
        channel = grpc.aio.secure_channel(target, self._ssl(), options=self._options)
        return channel, warden_pb2_grpc.WardenStub(channel)

    def _get_stubs(self) -> list:
        loop = asyncio.get_running_loop()
        key = (os.getpid(), id(loop))
        if self._key != key or not self._stubs:
            made = [self._connect(t, loop) for t in self.targets]
            self._channels = [channel for channel, _ in made]
            self._stubs = [stub for _, stub in made]
            self._key = key
        return self._stubs

    async def _call(self, call):
        """``await call(stub)`` on the next target, going on to the others
        while they are unreachable (as ``WardenClient._call``)."""
        if not self.breaker.allow():
            raise WardenUnavailable("warden unavailable: circuit breaker open")
        stubs = self._get_stubs()
        last: grpc.RpcError | None = None
        for i in self._order():
            try:
                answer = await call(stubs[i])
            except grpc.RpcError as e:
                last = e
                if self._next_target_may_help(e):
                    continue
                raise self._failed(e) from None
            self.breaker.success()
            return answer
        assert last is not None
        raise self._failed(last) from None

    async def check(self, request: CheckRequest | None = None, /, **fields) -> Decision:
        req = _request(request, fields)
        return Decision.from_proto(await self._call(lambda stub: stub.Check(req, timeout=self.timeout)))

    async def forget(self, request: CheckRequest) -> Decision:
        """``WardenClient.forget``, awaited."""
        return Decision.from_proto(await self._call(lambda stub: stub.Forget(request, timeout=self.timeout)))

    async def sign_webhook(
        self, key_id: str, scheme: str, payload: bytes | str, *, message_id: str = "", timestamp: int = 0
    ) -> SignedWebhook:
        """As ``WardenClient.sign_webhook``."""
        req = _sign_request(key_id, scheme, payload, message_id, timestamp)
        return SignedWebhook.from_proto(await self._call(lambda stub: stub.SignWebhook(req, timeout=self.timeout)))

    async def close(self) -> None:
        for channel in self._channels:
            closed = channel.close()
            if closed is not None:  # grpc.aio's close is a coroutine
                await closed
        self._channels = []
        self._stubs = []
        self._key = None


def limits(pairs: Sequence[tuple[str, str]]) -> list[LimitRequest]:
    """``[("per-ip", "ip:1.2.3.4")]`` as LimitRequests."""
    return [LimitRequest(policy=p, descriptor=d) for p, d in pairs]
