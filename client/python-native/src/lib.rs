//! The compiled transport of warden's Python client.
//!
//! grpcio costs a Python process about 150 µs per unary call over mTLS on
//! the machine warden is measured on: about as much as the whole Redis
//! recipe a Django app would replace with one `Check`. This module makes
//! the same call from Rust (tonic over rustls), and the Python client uses
//! it when it is installed (`warden_client.WardenClient(transport=...)`).
//!
//! It is deliberately only a transport: Python builds the protobuf message
//! with the generated classes and hands over its serialized bytes; this
//! module frames them, sends them over HTTP/2 with mutual TLS, and hands
//! back the answer's bytes (or a status). So the stubs generated from
//! `proto/` stay the one definition of the messages, and the Python client
//! keeps its one path for fail-over, the breaker and errors.
//!
//! Each `Channel` owns a single-threaded tokio runtime. A call runs it on
//! the calling thread (with the GIL released), which then drives the
//! connection itself: nothing crosses threads per call. Between calls a
//! keeper thread drives it instead, so an idle connection still answers
//! the server's GOAWAY on shutdown (an undriven connection would hold a
//! draining server up for its whole drain timeout); the keeper steps aside
//! as soon as a call begins. A channel
//! must not be used in a forked child (the Python client makes a new one
//! per process, as it does for grpcio); one dropped there is leaked, never
//! shut down, since its threads exist only in the parent.
//!
//! A call waits for its answer awake for a while before it sleeps (see
//! [`warden_client::BusyWait`]): on the machine warden is measured on, a thread put to
//! sleep in the kernel until its answer arrives gets it about 33 µs later
//! than one that keeps looking, and a Django check is exactly one such wait.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use prost::bytes::{Buf, BufMut, Bytes};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Request, Status};
use warden_client::BusyWait;

create_exception!(
    warden_client_native,
    RpcError,
    PyException,
    "A call ended with a gRPC status other than OK: args are (code number, details)."
);

/// A connection to one warden server, made on first use and made again by
/// itself after it is lost.
#[pyclass(frozen, module = "warden_client_native")]
struct Channel {
    driven: Driven,
}

/// A connection, the single-threaded runtime it runs on, and who drives
/// that runtime: what both kinds of channel are made of. A thread making a
/// call drives it while the call runs ([`Driven::drive`]); the keeper
/// thread at other times ([`Turns::keep`]).
struct Driven {
    /// Shared with the keeper thread; `None` only while being dropped.
    runtime: Option<Arc<tokio::runtime::Runtime>>,
    transport: tonic::transport::Channel,
    keeper: Option<std::thread::JoinHandle<()>>,
    turns: Arc<Turns>,
    busy_wait: BusyWait,
    /// The process this channel belongs to.
    pid: u32,
}

/// How long the connection goes undriven after a call before the keeper
/// takes it over: far below the server's drain timeout (30 s).
const KEEPER_GRACE: Duration = Duration::from_millis(50);

/// Who drives the runtime: the threads making calls, or the keeper while
/// there are none.
#[derive(Default)]
struct Turns {
    /// Calls running now.
    calls: AtomicUsize,
    /// Calls begun so far: the keeper takes over only after a quiet spell.
    begun: AtomicUsize,
    /// Calls handed to the runtime as tasks (an [`AsyncChannel`]'s): only
    /// a thread driving the runtime moves them on, so the keeper drives
    /// while there are any and no call thread does.
    handed: AtomicUsize,
    closing: AtomicBool,
    /// Tells the keeper, while it drives the runtime, to step aside: a
    /// call wants the runtime, the last handed call has ended, or the
    /// channel is closing. It then looks again at what it should do.
    step_aside: tokio::sync::Notify,
}

impl Turns {
    /// A call is about to drive the runtime itself.
    fn begin(&self) {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.step_aside.notify_one();
    }

    /// The call that began has stopped driving the runtime; the keeper
    /// takes the handed calls over (see [`Self::keep`]).
    fn end(&self, keeper: &std::thread::Thread) {
        self.calls.fetch_sub(1, Ordering::SeqCst);
        if self.handed.load(Ordering::SeqCst) > 0 {
            keeper.unpark();
        }
    }

    /// A call is handed to the runtime as a task; the keeper drives it.
    fn hand(&self, keeper: &std::thread::Thread) {
        self.handed.fetch_add(1, Ordering::SeqCst);
        keeper.unpark();
    }

    /// A handed call has ended.
    fn handed_one_ended(&self) {
        if self.handed.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.step_aside.notify_one();
        }
    }

    /// Stops the keeper, wherever it is: driving (told to step aside) or
    /// between looks (unparked).
    fn close(&self, keeper: &std::thread::Thread) {
        self.closing.store(true, Ordering::SeqCst);
        self.step_aside.notify_one();
        keeper.unpark();
    }

    /// The keeper, until closing. While no call drives the runtime it
    /// drives it: at once while calls are handed to it, until they have
    /// ended, and after [`KEEPER_GRACE`] without a call begun, until one
    /// begins. Not at once in that case: handing the runtime back to the
    /// next call costs two thread wake-ups, which calls a few milliseconds
    /// apart (a busy app) should not pay.
    fn keep(&self, runtime: &tokio::runtime::Runtime) {
        while !self.closing.load(Ordering::SeqCst) {
            let begun = self.begun.load(Ordering::SeqCst);
            if self.handed.load(Ordering::SeqCst) == 0 || self.calls.load(Ordering::SeqCst) > 0 {
                // Unparked by a call handed over, or by the end of the call
                // that drove the runtime while some were.
                std::thread::park_timeout(KEEPER_GRACE);
            }
            if self.calls.load(Ordering::SeqCst) > 0 || self.closing.load(Ordering::SeqCst) {
                continue;
            }
            let handed = self.handed.load(Ordering::SeqCst) > 0;
            if handed || self.begun.load(Ordering::SeqCst) == begun {
                // Runs the handed calls, or the idle connection's tasks,
                // until told to step aside.
                runtime.block_on(self.step_aside.notified());
            }
        }
    }
}

/// Polls `call` on this thread until `until`, without sleeping: each turn
/// polls it once; yielding to tokio makes it look at the socket without
/// sleeping (a zero-timeout epoll), and yielding to the kernel lets
/// anything else runnable go first. `None` if it has not ended by then (it
/// is polled once however soon `until` is).
async fn look<F: Future + ?Sized>(
    mut call: std::pin::Pin<&mut F>,
    until: Instant,
) -> Option<F::Output> {
    loop {
        if let Poll::Ready(done) =
            std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await
        {
            return Some(done);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
}

#[pymethods]
impl Channel {
    /// `target` is `host:port`; `ca`, `cert` and `key` are PEM: the CA that
    /// signed warden's certificate, and this client's certificate and key.
    /// `server_name` is the name to expect in warden's certificate when it
    /// is not the target's host. `busy_wait_us` is how long a call looks
    /// for its answer before sleeping (see [`BusyWait`]); 0 sleeps at once.
    #[new]
    #[pyo3(signature = (target, ca, cert, key, server_name = None, busy_wait_us = 200))]
    fn new(
        target: &str,
        ca: Vec<u8>,
        cert: Vec<u8>,
        key: Vec<u8>,
        server_name: Option<String>,
        busy_wait_us: u64,
    ) -> PyResult<Self> {
        let driven = Driven::new(
            target,
            (ca, cert, key),
            server_name,
            busy_wait_us,
            "warden-channel",
        )?;
        Ok(Self { driven })
    }

    /// One unary call: `method` is the gRPC path
    /// (`/warden.v1.Warden/Check`), `request` the serialized message.
    /// Returns the serialized answer; raises `RpcError` otherwise.
    fn unary<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        request: &[u8],
        timeout: f64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let path = method_path(method)?;
        let timeout = deadline(timeout)?;
        let message = Bytes::copy_from_slice(request);
        let transport = self.driven.transport.clone();
        let answer = py.detach(|| self.run(timeout, unary_call(transport, path, message)));
        match answer {
            Ok(bytes) => Ok(PyBytes::new(py, &bytes)),
            Err(status) => Err(rpc_error(&status)),
        }
    }

    /// One bidirectional-streaming call that sends every message of
    /// `requests` and returns every answer, in order.
    fn stream<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        requests: Vec<Vec<u8>>,
        timeout: f64,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let path = method_path(method)?;
        let timeout = deadline(timeout)?;
        let transport = self.driven.transport.clone();
        let answers = py.detach(|| {
            self.run(timeout, async move {
                let mut grpc = ready(transport).await?;
                let outgoing =
                    tonic::codegen::tokio_stream::iter(requests.into_iter().map(Bytes::from));
                let mut incoming = grpc
                    .streaming(Request::new(outgoing), path, Raw)
                    .await?
                    .into_inner();
                let mut answers = Vec::new();
                while let Some(answer) = incoming.message().await? {
                    answers.push(answer);
                }
                Ok(answers)
            })
        });
        match answers {
            Ok(answers) => Ok(answers.iter().map(|a| PyBytes::new(py, a)).collect()),
            Err(status) => Err(rpc_error(&status)),
        }
    }
}

impl Channel {
    /// Runs one call to its end or its deadline, on this thread.
    fn run<T: Send>(
        &self,
        timeout: Duration,
        call: impl Future<Output = Result<T, Status>> + Send,
    ) -> Result<T, Status> {
        if self.driven.forked() {
            return Err(made_in_another_process());
        }
        let call = std::pin::pin!(with_deadline(timeout, call));
        self.driven
            .drive(call, true)
            .expect("a call waited for ends")
    }
}

impl Driven {
    /// A connection to `target` (not made yet) and its keeper, with the
    /// looking policy for `busy_wait_us`. `ca`, `cert`, `key` and
    /// `server_name` as for `Channel.new`.
    fn new(
        target: &str,
        (ca, cert, key): (Vec<u8>, Vec<u8>, Vec<u8>),
        server_name: Option<String>,
        busy_wait_us: u64,
        keeper_name: &str,
    ) -> PyResult<Self> {
        let busy_wait = BusyWait::new(Duration::from_micros(busy_wait_us)).ok_or_else(|| {
            PyValueError::new_err(format!(
                "busy_wait_us must be between 0 and {}",
                BusyWait::MAX.as_micros()
            ))
        })?;
        let (runtime, transport) = connection(target, ca, cert, key, server_name)?;
        let runtime = Arc::new(runtime);
        let turns = Arc::new(Turns::default());
        let keeper = {
            let (runtime, turns) = (runtime.clone(), turns.clone());
            std::thread::Builder::new()
                .name(keeper_name.into())
                .spawn(move || turns.keep(&runtime))
                .map_err(cannot_start)?
        };
        Ok(Self {
            runtime: Some(runtime),
            transport,
            keeper: Some(keeper),
            turns,
            busy_wait,
            pid: std::process::id(),
        })
    }

    /// Whether this is a forked child of the process that made it, where
    /// its threads do not exist.
    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("a live channel has its runtime")
    }

    fn keeper(&self) -> &std::thread::Thread {
        self.keeper
            .as_ref()
            .expect("a live channel has its keeper")
            .thread()
    }

    /// Drives the runtime on this thread for `call`: looks for its end for
    /// up to the busy wait's budget (see [`look`]), then, if `wait`, sleeps
    /// until it ends. `None` when it has not ended and is not waited for;
    /// with no budget (no looking), such a call is not begun here at all.
    fn drive<F: Future + ?Sized>(
        &self,
        mut call: std::pin::Pin<&mut F>,
        wait: bool,
    ) -> Option<F::Output> {
        let budget = self.busy_wait.budget();
        if budget.is_zero() && !wait {
            return None;
        }
        self.turns.begin();
        let started = Instant::now();
        let ended = self.runtime().block_on(async {
            match look(call.as_mut(), started + budget).await {
                None if wait => Some(call.await),
                ended => ended,
            }
        });
        self.turns.end(self.keeper());
        self.busy_wait
            .observe(budget, took(started, ended.is_some()));
        ended
    }

    /// One turn of an event loop's lone call (see [`AsyncChannel::try_unary`]):
    /// drives the runtime on this thread and looks for the call's end
    /// until `until`, then gives the thread back.
    fn turn<F: Future + ?Sized>(
        &self,
        call: std::pin::Pin<&mut F>,
        until: Instant,
    ) -> Option<F::Output> {
        self.turns.begin();
        let ended = self.runtime().block_on(look(call, until));
        self.turns.end(self.keeper());
        ended
    }
}

/// How long a call that looked took, for [`BusyWait::observe`]: one that
/// did not end while looking was not answered in time, whatever the clock
/// says.
fn took(started: Instant, ended: bool) -> Duration {
    if ended {
        started.elapsed()
    } else {
        Duration::MAX
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        let (runtime, keeper) = (self.runtime.take(), self.keeper.take());
        if self.forked() {
            // A forked child: the keeper and the runtime's helper threads
            // exist only in the parent; joining or shutting down would wait
            // for them forever.
            std::mem::forget((runtime, keeper));
            return;
        }
        if let Some(keeper) = keeper {
            self.turns.close(keeper.thread());
            let _ = keeper.join();
        }
        drop(runtime);
    }
}

/// `call` with the one deadline, and not also sent as grpc-timeout: tonic
/// ends a call past its grpc-timeout as CANCELLED ("Timeout expired"),
/// which the Python side rightly reads as a refusal, not as warden being
/// unreachable. A paused server reads nothing anyway, so only this side can
/// end the wait.
async fn with_deadline<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(deadline_passed()))
}

/// A connection to one warden server for asyncio callers: a call is
/// started, the event loop goes on, and its answer is collected when the
/// loop hears that one is ready.
///
/// An async caller must not block its event loop. A call made while none
/// other is in flight on the channel ([`Self::try_unary`]) drives the
/// runtime on the loop's thread in short turns ([`LOOK_TURN`]), which the
/// loop takes between its other work, for up to the busy wait's budget
/// (500 µs by default, see [`BusyWait`]): its request is written from that
/// thread, and an answer that comes within the budget is returned there,
/// so a lone call pays no thread wake-up, where handing it to another
/// thread paid three (that thread's, its own for the answer, and the
/// loop's). A call not answered by then, and every call
/// started while others are in flight ([`Self::start_unary`]), is handed
/// to the runtime as a task, which the keeper thread drives; a finished
/// one is put in [`Finished`], which wakes the loop through a socket it
/// watches (`loop.add_reader(channel.fileno(), ...)`). The keeper never
/// takes the GIL: the loop collects the answers itself, with
/// [`AsyncChannel::finished`], so an answer is not held up behind whatever
/// Python code holds the GIL, and a burst of answers costs one wake-up.
#[pyclass(frozen, module = "warden_client_native")]
struct AsyncChannel {
    driven: Driven,
    finished: Arc<Finished>,
    /// The end the event loop watches and drains.
    ready: std::os::unix::net::UnixStream,
    next_call: AtomicU64,
}

/// Calls that ended and have not been collected yet, and the socket that
/// tells the event loop about them.
struct Finished {
    calls: std::sync::Mutex<Vec<(u64, Result<Bytes, Status>)>>,
    wake: std::os::unix::net::UnixStream,
}

impl Finished {
    /// Wakes the loop only when the list was empty: a loop that has not yet
    /// collected the list will find this call in it too. The loop drains
    /// the socket before it takes the list (see `AsyncChannel::finished`),
    /// so no call is left in the list without a byte on the way.
    fn push(&self, call: u64, outcome: Result<Bytes, Status>) {
        let was_empty = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            calls.push((call, outcome));
            calls.len() == 1
        };
        if was_empty {
            // A full socket already holds a wake-up; nothing else can fail
            // on a connected pair whose other end we hold.
            let _ = (&self.wake).write(&[1]);
        }
    }
}

/// One unary call with its deadline, boxed so that a call begun on the
/// loop's thread can be handed to the runtime as it stands.
type Call = std::pin::Pin<Box<dyn Future<Output = Result<Bytes, Status>> + Send>>;

/// How long one turn of a looking call holds the event loop's thread: a
/// few rounds of polling the connection, short against the work of a
/// request, so that other tasks on the loop go on between turns. Holding
/// the loop for the whole budget instead made fifty requests at once wait
/// on one another's checks (230-265 µs each, against 72-84 handed over).
const LOOK_TURN: Duration = Duration::from_micros(50);

/// A lone call that the event loop looks for between its other work (see
/// [`AsyncChannel::try_unary`]); dropped unanswered, the call is cancelled.
#[pyclass(frozen, module = "warden_client_native")]
struct Looking {
    /// `None` once handed over.
    call: std::sync::Mutex<Option<Call>>,
    started: Instant,
    budget: Duration,
}

impl Looking {
    fn take(&self) -> Option<Call> {
        self.call.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn put_back(&self, call: Call) {
        *self.call.lock().unwrap_or_else(|e| e.into_inner()) = Some(call);
    }
}

/// A call's outcome as `try_unary` and `look_again` return it: the
/// serialized answer, or `RpcError`.
fn answer(py: Python<'_>, outcome: Result<Bytes, Status>) -> PyResult<Bound<'_, PyAny>> {
    match outcome {
        Ok(bytes) => Ok(PyBytes::new(py, &bytes).into_any()),
        Err(status) => Err(rpc_error(&status)),
    }
}

#[pymethods]
impl AsyncChannel {
    /// As [`Channel::new`]. `busy_wait_us` bounds how long a lone call
    /// holds the event loop's thread (see [`Self::try_unary`]); 0 hands
    /// every call over at once. Longer by default than a `Channel`'s: a
    /// call not answered in time costs three thread wake-ups here, not one
    /// (`ASYNC_BUSY_WAIT_US` in `warden_client/client.py` says why 500).
    #[new]
    #[pyo3(signature = (target, ca, cert, key, server_name = None, busy_wait_us = 500))]
    fn new(
        target: &str,
        ca: Vec<u8>,
        cert: Vec<u8>,
        key: Vec<u8>,
        server_name: Option<String>,
        busy_wait_us: u64,
    ) -> PyResult<Self> {
        let (ready, wake) = std::os::unix::net::UnixStream::pair().map_err(cannot_start)?;
        ready.set_nonblocking(true).map_err(cannot_start)?;
        wake.set_nonblocking(true).map_err(cannot_start)?;
        let driven = Driven::new(
            target,
            (ca, cert, key),
            server_name,
            busy_wait_us,
            "warden-async-channel",
        )?;
        Ok(Self {
            driven,
            finished: Arc::new(Finished {
                calls: std::sync::Mutex::new(Vec::new()),
                wake,
            }),
            ready,
            next_call: AtomicU64::new(0),
        })
    }

    /// The descriptor the event loop watches: readable when calls have
    /// finished (`loop.add_reader(channel.fileno(), collect)`).
    fn fileno(&self) -> i32 {
        self.ready.as_raw_fd()
    }

    /// Starts one unary call and returns its number at once; its outcome
    /// comes from [`Self::finished`]. `method`, `request` and `timeout` as
    /// for `Channel.unary`.
    fn start_unary(&self, method: &str, request: &[u8], timeout: f64) -> PyResult<u64> {
        let call = self.call(method, request, timeout)?;
        if self.driven.forked() {
            let number = self.next_call.fetch_add(1, Ordering::Relaxed);
            self.finished.push(number, Err(made_in_another_process()));
            return Ok(number);
        }
        Ok(self.hand_over(call))
    }

    /// Begins one unary call made while no other is in flight on this
    /// channel, on this (the event loop's) thread: drives the connection
    /// for one turn ([`LOOK_TURN`]) and returns the serialized answer (or
    /// raises `RpcError`) if the call ended in it. Otherwise returns a
    /// [`Looking`] call, which the loop looks at again between its other
    /// work ([`Self::look_again`]) until the busy wait's budget is spent:
    /// the loop is never held longer than one turn. With no budget
    /// (`busy_wait_us=0`, or looking turned off) the call is handed over at
    /// once and its number returned, as [`Self::start_unary`] does.
    fn try_unary<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        request: &[u8],
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut call = self.call(method, request, timeout)?;
        if self.driven.forked() {
            return Err(rpc_error(&made_in_another_process()));
        }
        let budget = self.driven.busy_wait.budget();
        if budget.is_zero() {
            return Ok(self.hand_over(call).into_pyobject(py)?.into_any());
        }
        let started = Instant::now();
        match self.one_turn(py, &mut call, started, budget) {
            Some(answered) => answered,
            None => Ok(Bound::new(
                py,
                Looking {
                    call: std::sync::Mutex::new(Some(call)),
                    started,
                    budget,
                },
            )?
            .into_any()),
        }
    }

    /// One more turn of a [`Looking`] call: its answer (or `RpcError`) if
    /// it ended in this turn; the same `looking` if not; its number once
    /// handed over, when its budget is spent, or when `others` (calls
    /// handed over on this channel meanwhile: the keeper drives the
    /// connection for them, and turns here would only take it back and
    /// forth).
    fn look_again<'py>(
        &self,
        py: Python<'py>,
        looking: Bound<'py, Looking>,
        others: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let this = looking.get();
        let Some(mut call) = this.take() else {
            return Err(PyValueError::new_err("this call was handed over already"));
        };
        let spent = this.started.elapsed();
        if others || spent >= this.budget {
            if !others {
                self.driven
                    .busy_wait
                    .observe(this.budget, took(this.started, false));
            }
            return Ok(self.hand_over(call).into_pyobject(py)?.into_any());
        }
        match self.one_turn(py, &mut call, this.started, this.budget) {
            Some(answered) => answered,
            None => {
                this.put_back(call);
                Ok(looking.into_any())
            }
        }
    }

    /// The calls that finished since the last collection, as `(number,
    /// answer, code, details)`: the serialized answer and code 0, or no
    /// answer and a gRPC status code (a broken connection as UNAVAILABLE,
    /// as for `Channel`) with its details.
    fn finished<'py>(
        &self,
        py: Python<'py>,
    ) -> Vec<(u64, Option<Bound<'py, PyBytes>>, i32, String)> {
        // Drained first: see `Finished::push`.
        let mut drain = [0u8; 64];
        while matches!((&self.ready).read(&mut drain), Ok(n) if n > 0) {}
        let calls = std::mem::take(
            &mut *self
                .finished
                .calls
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        calls
            .into_iter()
            .map(|(call, outcome)| match outcome {
                Ok(bytes) => (call, Some(PyBytes::new(py, &bytes)), 0, String::new()),
                Err(status) => {
                    let (code, details) = rpc_status(&status);
                    (call, None, code, details)
                }
            })
            .collect()
    }
}

impl AsyncChannel {
    /// One unary call, not begun, with its deadline.
    fn call(&self, method: &str, request: &[u8], timeout: f64) -> PyResult<Call> {
        let path = method_path(method)?;
        let timeout = deadline(timeout)?;
        let message = Bytes::copy_from_slice(request);
        let transport = self.driven.transport.clone();
        Ok(Box::pin(with_deadline(
            timeout,
            unary_call(transport, path, message),
        )))
    }

    /// One turn ([`LOOK_TURN`], or what is left of `budget` since
    /// `started`) looking for `call`'s end on this thread: its answer (or
    /// `RpcError`), counted as answered in time, if it ended; `None` if not.
    fn one_turn<'py>(
        &self,
        py: Python<'py>,
        call: &mut Call,
        started: Instant,
        budget: Duration,
    ) -> Option<PyResult<Bound<'py, PyAny>>> {
        let until = Instant::now() + LOOK_TURN.min(budget.saturating_sub(started.elapsed()));
        let outcome = py.detach(|| self.driven.turn(call.as_mut(), until))?;
        self.driven.busy_wait.observe(budget, took(started, true));
        Some(answer(py, outcome))
    }

    /// Runs `call` as a task that the keeper drives, its outcome put in
    /// [`Finished`] under the number returned.
    fn hand_over(&self, call: Call) -> u64 {
        let number = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (finished, turns) = (self.finished.clone(), self.driven.turns.clone());
        // Counted before the task can end (and count itself off).
        self.driven.turns.hand(self.driven.keeper());
        self.driven.runtime().spawn(async move {
            let outcome = call.await;
            finished.push(number, outcome);
            turns.handed_one_ended();
        });
        number
    }
}

/// A single-threaded runtime and a channel to `target` on it, not yet
/// connected: what both kinds of channel are made of.
fn connection(
    target: &str,
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    server_name: Option<String>,
) -> PyResult<(tokio::runtime::Runtime, tonic::transport::Channel)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(cannot_start)?;
    let mut tls = warden_client::Tls::from_pem(ca, cert, key);
    if let Some(name) = server_name {
        tls = tls.with_server_name(name);
    }
    let transport = {
        let _inside = runtime.enter();
        warden_client::lazy_channel(target, Some(&tls))
            .map_err(|e| PyValueError::new_err(e.to_string()))?
    };
    Ok((runtime, transport))
}

fn cannot_start(e: std::io::Error) -> PyErr {
    PyRuntimeError::new_err(format!("cannot start the transport: {e}"))
}

fn made_in_another_process() -> Status {
    Status::unavailable("this channel was made in another process; make a new one after fork")
}

type Grpc = tonic::client::Grpc<tonic::transport::Channel>;

/// The channel, ready for a call (connected, or connecting failed).
async fn ready(transport: tonic::transport::Channel) -> Result<Grpc, Status> {
    let mut grpc = Grpc::new(transport);
    grpc.ready().await.map_err(|e| {
        Status::unavailable(format!(
            "warden is unreachable: {}",
            warden_client::error_chain(&e)
        ))
    })?;
    Ok(grpc)
}

/// One unary call on `transport`, without a deadline (the caller's).
async fn unary_call(
    transport: tonic::transport::Channel,
    path: PathAndQuery,
    message: Bytes,
) -> Result<Bytes, Status> {
    let mut grpc = ready(transport).await?;
    grpc.unary(Request::new(message), path, Raw)
        .await
        .map(|r| r.into_inner())
}

/// What a call that outlived its deadline ends with.
fn deadline_passed() -> Status {
    Status::deadline_exceeded("deadline exceeded")
}

fn method_path(method: &str) -> PyResult<PathAndQuery> {
    let valid = method.starts_with('/') && method.matches('/').count() == 2;
    valid
        .then(|| PathAndQuery::try_from(method).ok())
        .flatten()
        .ok_or_else(|| {
            PyValueError::new_err("method: must be a gRPC path, /package.Service/Method")
        })
}

fn deadline(seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| PyValueError::new_err("timeout: must be a positive number of seconds"))
}

/// A failed call as Python sees it. A connection that broke under the call
/// gets grpcio's code, UNAVAILABLE, as the Python side treats both
/// transports alike: warden was unreachable (the next node is tried, the
/// breaker counts it, FAILURE_MODE applies), not "warden refused the call".
fn rpc_error(status: &Status) -> PyErr {
    RpcError::new_err(rpc_status(status))
}

/// The code and details Python is given for a failed call.
fn rpc_status(status: &Status) -> (i32, String) {
    let code = match warden_client::connection_broke(status) {
        true => tonic::Code::Unavailable,
        false => status.code(),
    };
    (code as i32, warden_client::status_message(status))
}

/// Messages as bytes, unchanged both ways: Python encodes and decodes them.
#[derive(Clone, Copy, Debug, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[pymodule]
fn warden_client_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Channel>()?;
    m.add_class::<AsyncChannel>()?;
    m.add_class::<Looking>()?;
    m.add("RpcError", m.py().get_type::<RpcError>())?;
    // A debug build (what `tests/run` installs) takes several times as long
    // per call; a benchmark reads this to refuse timing one by mistake.
    m.add(
        "BUILD_PROFILE",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    Ok(())
}
