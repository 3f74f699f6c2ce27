//! Time, injected. The engine never reads the system clock itself, so every
//! time-based behaviour can be tested exactly with [`FakeClock`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::ops::{Add, AddAssign, Div, Mul, Rem, Sub};

pub const NANOS_PER_SEC: u64 = 1_000_000_000;
pub const NANOS_PER_MILLI: u64 = 1_000_000;

/// Nanoseconds: a moment on the wall clock (since the Unix epoch; wall-clock
/// because request timestamps and nonce lifetimes are), or a span between
/// two. One type for both, as governor's `Nanos`: what it keeps apart is
/// time from the counts, tokens and seconds that every limit also handles
/// as plain integers. `Nanos / Nanos` is a plain ratio (`u64`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(u64);

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);
    pub const MAX: Nanos = Nanos(u64::MAX);

    pub const fn new(nanos: u64) -> Self {
        Nanos(nanos)
    }

    pub const fn from_secs(secs: u64) -> Self {
        Nanos(secs.saturating_mul(NANOS_PER_SEC))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Nanos(millis.saturating_mul(NANOS_PER_MILLI))
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The whole seconds, rounded down (a moment's second).
    pub const fn whole_secs(self) -> u64 {
        self.0 / NANOS_PER_SEC
    }

    /// Seconds rounded up, so a client told to wait never retries early.
    pub const fn ceil_secs(self) -> u64 {
        self.0.div_ceil(NANOS_PER_SEC)
    }

    /// Milliseconds rounded up, for the same reason.
    pub const fn ceil_millis(self) -> u64 {
        self.0.div_ceil(NANOS_PER_MILLI)
    }

    pub const fn saturating_add(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(other.0))
    }

    pub const fn saturating_sub(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(other.0))
    }

    pub const fn saturating_mul(self, times: u64) -> Nanos {
        Nanos(self.0.saturating_mul(times))
    }

    /// One `n`-th, rounded up (an interval that never exceeds a rate).
    pub const fn div_ceil(self, n: u64) -> Nanos {
        Nanos(self.0.div_ceil(n))
    }
}

impl From<Duration> for Nanos {
    /// Saturating at `u64::MAX` nanoseconds (584 years).
    fn from(d: Duration) -> Self {
        Nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

impl From<Nanos> for Duration {
    fn from(n: Nanos) -> Self {
        Duration::from_nanos(n.0)
    }
}

impl Add for Nanos {
    type Output = Nanos;
    fn add(self, other: Nanos) -> Nanos {
        Nanos(self.0 + other.0)
    }
}

impl AddAssign for Nanos {
    fn add_assign(&mut self, other: Nanos) {
        self.0 += other.0;
    }
}

impl Sub for Nanos {
    type Output = Nanos;
    fn sub(self, other: Nanos) -> Nanos {
        Nanos(self.0 - other.0)
    }
}

impl Mul<u64> for Nanos {
    type Output = Nanos;
    fn mul(self, times: u64) -> Nanos {
        Nanos(self.0 * times)
    }
}

impl Mul<Nanos> for u64 {
    type Output = Nanos;
    fn mul(self, n: Nanos) -> Nanos {
        Nanos(self * n.0)
    }
}

impl Div<u64> for Nanos {
    type Output = Nanos;
    fn div(self, n: u64) -> Nanos {
        Nanos(self.0 / n)
    }
}

impl Div for Nanos {
    /// How many `other` fit in `self`.
    type Output = u64;
    fn div(self, other: Nanos) -> u64 {
        self.0 / other.0
    }
}

impl Rem for Nanos {
    type Output = Nanos;
    fn rem(self, other: Nanos) -> Nanos {
        Nanos(self.0 % other.0)
    }
}

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Nanos;
}

/// The real clock: the system's wall clock, held from going back
/// ([`ForwardOnly`]). One for the whole process, so that checks, fences
/// and the cluster's membership all read the same time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

static WALL: ForwardOnly<SystemTimeAsIs> = ForwardOnly {
    source: SystemTimeAsIs,
    elapsed: Monotonic,
    latest: AtomicU64::new(0),
    ceiling: AtomicU64::new(u64::MAX),
    capped_at: AtomicU64::new(0),
};

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        WALL.now()
    }
}

impl SystemClock {
    /// How far the system clock is behind the time warden holds (zero
    /// unless it stepped back): for the operator, who must know why
    /// requests signed by correct clocks may be refused meanwhile.
    pub fn held_back() -> Nanos {
        WALL.held_back()
    }

    /// The process's one wall clock, for the [`crate::clock_mark`] that
    /// keeps it from showing a time no later process would know of.
    pub(crate) fn wall() -> &'static ForwardOnly<SystemTimeAsIs> {
        &WALL
    }
}

/// The system's wall clock as it is, steps back and all.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SystemTimeAsIs;

/// Time elapsed since the process first asked, on the monotonic clock: it
/// runs on while the process is stopped or starved, and no one sets it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Monotonic;

impl Clock for Monotonic {
    fn now(&self) -> Nanos {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        Nanos::from(START.get_or_init(std::time::Instant::now).elapsed())
    }
}

/// How long a ceiling holds without being renewed (see [`ForwardOnly`]).
/// Its keeper, the clock mark (`clock_mark`), renews it twice a second, and
/// itself lets the clock go on when a write is two seconds late: a ceiling
/// older than this means the keeper did not run at all.
pub const CEILING_LAPSES_AFTER: Duration = Duration::from_secs(4);

/// What `capped_at` holds for a ceiling that never lapses.
const FOR_GOOD: u64 = u64::MAX;

impl Clock for SystemTimeAsIs {
    fn now(&self) -> Nanos {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(Nanos::from)
            .unwrap_or(Nanos::ZERO)
    }
}

/// A clock that never goes back by more than a millisecond: it holds at
/// the latest moment it has shown until its source passes that again.
///
/// Why: request timestamps and nonce lifetimes are wall-clock, and a nonce
/// is forgotten once its request is too old to be fresh. A system clock
/// stepped back (an NTP correction, a spoofed NTP server, a VM's clock
/// set from its host) would make requests whose nonces are forgotten
/// fresh again, to be replayed, and would put every rate limit's state in
/// the future, refusing its key until the clock caught up. Held, time
/// stands still for the length of the step instead: nothing forgotten
/// comes back, and limits refill again once the clock has caught up.
///
/// It also never shows a time past its ceiling, when it has one: the time
/// up to which the clock mark (`clock_mark`) has promised, on disk, that this
/// process may have shown. So the promise holds across a restart too: the
/// next process starts from the mark, not from a system clock that may
/// have been set back meanwhile.
///
/// Unless the ceiling lapses: one not renewed for [`CEILING_LAPSES_AFTER`]
/// of elapsed time (the monotonic clock, which no one sets) holds no more.
/// Its keeper did not run: the process was stopped, paused or starved of
/// CPU. Held there, the clock would show the time from before the pause to
/// requests signed after it, refusing them as signed in the future, until
/// the keeper got its turn; the keeper itself lets the clock go on when a
/// mark is late, and a lapsed ceiling does no more than that. A system
/// clock stepped forward is not a lapse: elapsed time does not jump with it.
#[derive(Debug)]
pub struct ForwardOnly<C, E = Monotonic> {
    source: C,
    /// Elapsed time, for how old the ceiling is.
    elapsed: E,
    /// The latest moment shown, as recorded: within a millisecond of it.
    latest: AtomicU64,
    /// Never shown past this (`u64::MAX`: no ceiling).
    ceiling: AtomicU64,
    /// When the ceiling was set, in elapsed time ([`FOR_GOOD`]: it never
    /// lapses).
    capped_at: AtomicU64,
}

impl<C: Clock> ForwardOnly<C> {
    pub fn new(source: C) -> Self {
        Self::with_elapsed(source, Monotonic)
    }
}

impl<C: Clock, E: Clock> ForwardOnly<C, E> {
    /// A clock whose ceiling's age is measured on `elapsed`.
    pub fn with_elapsed(source: C, elapsed: E) -> Self {
        Self {
            source,
            elapsed,
            latest: AtomicU64::new(0),
            ceiling: AtomicU64::new(u64::MAX),
            capped_at: AtomicU64::new(0),
        }
    }

    /// Holds the clock at `moment` at least, as if it had shown it: a
    /// previous process may have.
    pub fn hold_from(&self, moment: Nanos) {
        self.latest.fetch_max(moment.get(), Ordering::Relaxed);
    }

    /// Never shows a time past `ceiling` from now on, unless it lapses
    /// (not renewed within [`CEILING_LAPSES_AFTER`]).
    pub fn cap_at(&self, ceiling: Nanos) {
        self.capped_at
            .store(self.elapsed.now().get(), Ordering::SeqCst);
        self.ceiling.store(ceiling.get(), Ordering::SeqCst);
    }

    /// Never shows a time past `ceiling` again, however long (a lower one
    /// than before too): a clock about to stop shows nothing past its last
    /// mark, and no mark will come after it.
    pub fn cap_for_good_at(&self, ceiling: Nanos) {
        self.capped_at.store(FOR_GOOD, Ordering::SeqCst);
        self.ceiling.store(ceiling.get(), Ordering::SeqCst);
    }

    /// Whether the ceiling is older than [`CEILING_LAPSES_AFTER`].
    fn ceiling_lapsed(&self) -> bool {
        let capped_at = self.capped_at.load(Ordering::SeqCst);
        capped_at != FOR_GOOD
            && self.elapsed.now().get().saturating_sub(capped_at)
                > Nanos::from(CEILING_LAPSES_AFTER).get()
    }

    /// The time it never shows past (`Nanos::MAX` once it has lapsed).
    pub fn ceiling(&self) -> Nanos {
        if self.ceiling_lapsed() {
            return Nanos::MAX;
        }
        Nanos(self.ceiling.load(Ordering::SeqCst))
    }

    /// The time this clock would show without its ceiling, and no earlier
    /// than anything it has shown (the latest moment is recorded a
    /// millisecond at a time, so one is added when the clock holds).
    pub fn uncapped(&self) -> Nanos {
        let source = self.source.now().get();
        let latest = self.latest.load(Ordering::Relaxed);
        if source < latest {
            Nanos(latest.saturating_add(NANOS_PER_MILLI))
        } else {
            Nanos(source)
        }
    }

    /// How far the source is behind the latest moment shown: how long
    /// time will stand still if nothing else moves it.
    pub fn held_back(&self) -> Nanos {
        Nanos(self.latest.load(Ordering::Relaxed)).saturating_sub(self.source.now())
    }
}

impl<C: Clock, E: Clock> Clock for ForwardOnly<C, E> {
    fn now(&self) -> Nanos {
        let source = self.source.now().get();
        let ceiling = self.ceiling.load(Ordering::Relaxed);
        // Past the ceiling is rare (the keeper stays ahead): only then is
        // its age read.
        let now = if source > ceiling && !self.ceiling_lapsed() {
            ceiling
        } else {
            source
        };
        let latest = self.latest.load(Ordering::Relaxed);
        if now < latest {
            return Nanos(latest);
        }
        // Recorded a millisecond at a time, not at every check: a write to
        // one shared cache line per check would be passed between cores.
        if now - latest >= NANOS_PER_MILLI {
            self.latest.fetch_max(now, Ordering::Relaxed);
        }
        Nanos(now)
    }
}

/// A clock that only moves when told to: tests step time instead of sleeping.
#[derive(Debug, Default)]
pub struct FakeClock(AtomicU64);

impl FakeClock {
    pub fn new(start: Nanos) -> Self {
        Self(AtomicU64::new(start.get()))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(duration_nanos(by).get(), Ordering::SeqCst);
    }

    pub fn set(&self, to: Nanos) {
        self.0.store(to.get(), Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Nanos {
        Nanos::new(self.0.load(Ordering::SeqCst))
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now(&self) -> Nanos {
        (**self).now()
    }
}

/// Whole seconds since the Unix epoch on [`SystemClock`] (0 before it).
pub fn unix_secs() -> u64 {
    SystemClock.now().whole_secs()
}

/// A duration in nanoseconds, saturating at `u64::MAX` (584 years).
pub fn duration_nanos(d: Duration) -> Nanos {
    Nanos::from(d)
}

/// Nanoseconds rounded up to whole milliseconds, so a client that waits
/// `retry_after_ms` never retries a moment too early.
pub fn ceil_millis(nanos: Nanos) -> u64 {
    nanos.ceil_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_clock_stepped_back_holds_until_its_source_passes_it_again() {
        let source = Arc::new(FakeClock::new(Nanos::from_secs(1_000)));
        let clock = ForwardOnly::new(source.clone());
        assert_eq!(clock.now(), Nanos::from_secs(1_000));
        assert_eq!(clock.held_back(), Nanos::ZERO);
        source.set(Nanos::from_secs(700));
        assert_eq!(clock.now(), Nanos::from_secs(1_000));
        assert_eq!(clock.held_back(), Nanos::from_secs(300));
        source.set(Nanos::from_secs(999));
        assert_eq!(clock.now(), Nanos::from_secs(1_000));
        source.set(Nanos::from_secs(1_001));
        assert_eq!(clock.now(), Nanos::from_secs(1_001));
        assert_eq!(clock.held_back(), Nanos::ZERO);
        source.set(Nanos::from_secs(1_000));
        assert_eq!(clock.now(), Nanos::from_secs(1_001));
    }

    #[test]
    fn it_goes_back_by_less_than_a_millisecond_at_most() {
        let source = Arc::new(FakeClock::new(Nanos::from_secs(1_000)));
        let clock = ForwardOnly::new(source.clone());
        let mut shown = clock.now();
        // Forward in steps below the recording interval, then back a lot.
        for _ in 0..10 {
            source.advance(Duration::from_micros(300));
            shown = clock.now();
        }
        source.set(Nanos::from_secs(1));
        let held = clock.now();
        assert!(
            held <= shown && shown - held < Nanos::from_millis(1),
            "{held:?} {shown:?}"
        );
    }

    #[test]
    fn a_capped_clock_never_shows_a_time_past_its_ceiling() {
        let source = Arc::new(FakeClock::new(Nanos::from_secs(1_000)));
        let clock = ForwardOnly::new(source.clone());
        clock.cap_at(Nanos::from_secs(1_002));
        source.set(Nanos::from_secs(1_005));
        assert_eq!(clock.now(), Nanos::from_secs(1_002));
        assert_eq!(clock.uncapped(), Nanos::from_secs(1_005));
        // Raised again, it shows the source again.
        clock.cap_at(Nanos::from_secs(1_010));
        assert_eq!(clock.now(), Nanos::from_secs(1_005));
    }

    type Fake = Arc<FakeClock>;

    /// A clock at 1,000 s whose ceiling's age is told by a fake elapsed
    /// clock, with both fakes to move.
    fn lapsing() -> (Fake, Fake, ForwardOnly<Fake, Fake>) {
        let source = Arc::new(FakeClock::new(Nanos::from_secs(1_000)));
        let elapsed = Arc::new(FakeClock::new(Nanos::from_secs(50)));
        let clock = ForwardOnly::with_elapsed(source.clone(), elapsed.clone());
        (source, elapsed, clock)
    }

    #[test]
    fn a_ceiling_not_renewed_in_time_lapses_and_the_clock_goes_on() {
        let (source, elapsed, clock) = lapsing();
        clock.cap_at(Nanos::from_secs(1_002));
        // The process is stopped for nine seconds: its keeper did not run.
        source.set(Nanos::from_secs(1_009));
        elapsed.advance(CEILING_LAPSES_AFTER);
        assert_eq!(clock.now(), Nanos::from_secs(1_002), "held up to the lapse");
        elapsed.advance(Duration::from_secs(5));
        assert_eq!(clock.now(), Nanos::from_secs(1_009));
        assert_eq!(clock.ceiling(), Nanos::MAX);
        // Renewed, it holds again.
        clock.cap_at(Nanos::from_secs(1_011));
        source.set(Nanos::from_secs(1_015));
        assert_eq!(clock.now(), Nanos::from_secs(1_011));
    }

    #[test]
    fn a_system_clock_stepped_forward_is_no_lapse() {
        let (source, elapsed, clock) = lapsing();
        clock.cap_at(Nanos::from_secs(1_002));
        // A step of an hour, a moment later.
        source.set(Nanos::from_secs(4_600));
        elapsed.advance(Duration::from_millis(100));
        assert_eq!(clock.now(), Nanos::from_secs(1_002));
    }

    #[test]
    fn a_ceiling_for_good_never_lapses() {
        let (source, elapsed, clock) = lapsing();
        clock.cap_for_good_at(Nanos::from_secs(1_001));
        source.set(Nanos::from_secs(2_000));
        elapsed.advance(Duration::from_secs(3_600));
        assert_eq!(clock.now(), Nanos::from_secs(1_001));
        assert_eq!(clock.ceiling(), Nanos::from_secs(1_001));
    }

    #[test]
    fn a_clock_held_from_a_moment_shows_nothing_earlier() {
        let source = Arc::new(FakeClock::new(Nanos::from_secs(1_000)));
        let clock = ForwardOnly::new(source.clone());
        clock.hold_from(Nanos::from_secs(1_020));
        assert_eq!(clock.now(), Nanos::from_secs(1_020));
        assert_eq!(clock.held_back(), Nanos::from_secs(20));
        // What it would show uncapped covers the held moment.
        assert!(clock.uncapped() > Nanos::from_secs(1_020));
        source.set(Nanos::from_secs(1_021));
        assert_eq!(clock.now(), Nanos::from_secs(1_021));
        assert_eq!(clock.uncapped(), Nanos::from_secs(1_021));
    }
}
