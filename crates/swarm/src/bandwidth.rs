//! Upload and download caps, and the byte counters the dashboard shows.
//!
//! Volunteers share a home link with their household, so a cap must be smooth:
//! a token bucket whose burst is a few tens of milliseconds of traffic, not a
//! per-second budget spent in one gulp. Callers take tokens *before* moving
//! bytes; a caller that overdraws waits off its debt, so concurrent transfers
//! queue fairly behind one another and the long-run rate is exact. The rate can
//! change at any moment and takes effect on the next acquisition.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// How much traffic may pass in one burst, in seconds of the current rate.
const BURST_SECONDS: f64 = 0.05;
/// Never let the burst drop below one QUIC datagram's worth of payload.
const MIN_BURST_BYTES: f64 = 16.0 * 1024.0;

/// Converts a cap in Mbit/s into bytes per second.
pub fn mbit_to_bytes_per_sec(mbit: f64) -> f64 {
    mbit * 1_000_000.0 / 8.0
}

#[derive(Debug)]
struct Bucket {
    /// Bytes per second; `None` means unlimited.
    rate: Option<f64>,
    /// Available bytes; negative while callers wait off a debt.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn burst(rate: f64) -> f64 {
        (rate * BURST_SECONDS).max(MIN_BURST_BYTES)
    }

    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let dt = now.saturating_duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * rate).min(Self::burst(rate));
        }
        self.last = now;
    }
}

/// One direction's token bucket, shared by every transfer in that direction.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    bucket: Arc<Mutex<Bucket>>,
}

impl RateLimiter {
    /// A limiter at `bytes_per_sec` (`None`: unlimited).
    pub fn new(bytes_per_sec: Option<f64>) -> Self {
        let rate = bytes_per_sec.filter(|r| *r > 0.0 && r.is_finite());
        Self {
            bucket: Arc::new(Mutex::new(Bucket {
                rate,
                tokens: rate.map(Bucket::burst).unwrap_or(0.0),
                last: Instant::now(),
            })),
        }
    }

    /// Change the rate now (`None`: unlimited).
    pub fn set_rate(&self, bytes_per_sec: Option<f64>) {
        let mut b = self.lock();
        b.refill(Instant::now());
        b.rate = bytes_per_sec.filter(|r| *r > 0.0 && r.is_finite());
        if let Some(rate) = b.rate {
            b.tokens = b.tokens.min(Bucket::burst(rate));
        } else {
            b.tokens = 0.0;
        }
    }

    /// The current rate in bytes per second, if capped.
    pub fn rate(&self) -> Option<f64> {
        self.lock().rate
    }

    /// Take `bytes` tokens, returning how long the caller must wait before sending them.
    pub fn reserve(&self, bytes: u64) -> Duration {
        let mut b = self.lock();
        b.refill(Instant::now());
        let Some(rate) = b.rate else {
            return Duration::ZERO;
        };
        b.tokens -= bytes as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate)
        }
    }

    /// Wait until `bytes` may pass.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // A panic while holding this lock cannot leave the bucket inconsistent
        // (every update is a few float assignments), so recover from poisoning.
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Monotonic byte counters for one direction pair.
#[derive(Debug, Default)]
pub struct Counters {
    up: AtomicU64,
    down: AtomicU64,
}

impl Counters {
    /// Count `n` bytes sent.
    pub fn add_up(&self, n: u64) {
        self.up.fetch_add(n, Ordering::Relaxed);
    }
    /// Count `n` bytes received.
    pub fn add_down(&self, n: u64) {
        self.down.fetch_add(n, Ordering::Relaxed);
    }
    /// Bytes sent so far.
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }
    /// Bytes received so far.
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
}

/// The caps and counters of one node, shared by all its transfers.
#[derive(Clone, Debug)]
pub struct Traffic {
    /// Upload bucket.
    pub up: RateLimiter,
    /// Download bucket.
    pub down: RateLimiter,
    /// Blob payload bytes moved since the node started (what the transfers
    /// took tokens for).
    pub total: Arc<Counters>,
    /// Bytes on the wire since the node started: every datagram its socket
    /// sent or received, whatever it carried, with its IP and UDP headers.
    /// What a metered link bills, hence what the ledger counts.
    pub wire: Arc<Counters>,
    /// What may still move this month (the monthly cap's remainder).
    pub budget: Budget,
}

impl Traffic {
    /// Caps in Mbit/s (`None`: unlimited).
    pub fn new(up_mbit: Option<f64>, down_mbit: Option<f64>) -> Self {
        Self {
            up: RateLimiter::new(up_mbit.map(mbit_to_bytes_per_sec)),
            down: RateLimiter::new(down_mbit.map(mbit_to_bytes_per_sec)),
            total: Arc::new(Counters::default()),
            wire: Arc::new(Counters::default()),
            budget: Budget::default(),
        }
    }

    /// Change both caps while running.
    pub fn set_caps(&self, up_mbit: Option<f64>, down_mbit: Option<f64>) {
        self.up.set_rate(up_mbit.map(mbit_to_bytes_per_sec));
        self.down.set_rate(down_mbit.map(mbit_to_bytes_per_sec));
    }
}

/// A limit on the bytes a node may still move, both ways together, as
/// counted on the wire ([`Traffic::wire`]): what keeps a monthly cap from
/// being overshot by the round in flight when it is reached.
///
/// Blob transfers take from it before moving bytes and fail, rather than
/// wait, once it would be exceeded; once it is spent the node's endpoint
/// closes (within the wire meter's 50 ms), so gossip and control traffic
/// stop too, and a capped node leaves the run until the month changes.
/// What counts against the limit is the wire so far plus what transfers
/// were granted and have not moved yet.
#[derive(Clone, Debug, Default)]
pub struct Budget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    /// The most the wire total may reach (`u64::MAX`: no limit); grants
    /// stop [`BUDGET_HEADROOM`] short of it.
    limit: AtomicU64,
    /// The wire total (up plus down) at the wire meter's last reading.
    wire: AtomicU64,
    /// Granted and not known to be on the wire count yet, framing
    /// allowance included.
    pending: AtomicU64,
    /// Of `pending`: moved since the meter's last reading, and moved before
    /// it. Moved bytes leave `pending` only at the second reading after
    /// they moved, when the wire count surely holds them.
    moving: AtomicU64,
    aged: AtomicU64,
    /// Whether a transfer was refused, or the limit was reached.
    spent: AtomicBool,
}

impl Default for BudgetInner {
    fn default() -> Self {
        Self {
            limit: AtomicU64::new(u64::MAX),
            wire: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            moving: AtomicU64::new(0),
            aged: AtomicU64::new(0),
            spent: AtomicBool::new(false),
        }
    }
}

/// Budget kept free of grants for what moves without one while the last
/// granted transfers finish (acknowledgements, gossip, control answers):
/// measured at 4 to 7 kB in a round of nano, so a few times that.
pub const BUDGET_HEADROOM: u64 = 32 * 1024;

/// Payload bytes with a sixteenth more for the framing and headers they
/// travel in (QUIC and IP/UDP over ~1,200-byte datagrams): what blob
/// transfers take from the caps and the budget.
pub(crate) fn with_framing(n: u64) -> u64 {
    n.saturating_add(n / 16)
}

impl Budget {
    /// Let the wire total (up plus down) reach `limit` (`None`: no limit).
    /// A new limit clears a refusal when it leaves room; the same limit
    /// again changes nothing.
    pub fn set_limit(&self, limit: Option<u64>) {
        let limit = limit.unwrap_or(u64::MAX);
        if self.inner.limit.swap(limit, Ordering::SeqCst) != limit {
            self.inner
                .spent
                .store(self.used() >= self.grant_limit(), Ordering::SeqCst);
        }
    }

    /// What grants may bring `used` up to.
    fn grant_limit(&self) -> u64 {
        let limit = self.inner.limit.load(Ordering::SeqCst);
        if limit == u64::MAX {
            limit
        } else {
            limit.saturating_sub(BUDGET_HEADROOM)
        }
    }

    /// Bytes counted against the limit: the wire so far plus what was
    /// granted and has not moved yet.
    pub fn used(&self) -> u64 {
        let i = &self.inner;
        i.wire
            .load(Ordering::SeqCst)
            .saturating_add(i.pending.load(Ordering::SeqCst))
    }

    /// Grant `n` payload bytes (and their framing) if they fit under the
    /// limit; otherwise grant nothing, remember the refusal and return
    /// false. Whoever moves them calls [`Budget::moved`] as they go.
    pub fn try_take(&self, n: u64) -> bool {
        let i = &self.inner;
        let cost = with_framing(n);
        let limit = self.grant_limit();
        let taken = i
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |pending| {
                let after = pending.checked_add(cost)?;
                let used = i.wire.load(Ordering::SeqCst).saturating_add(after);
                (used <= limit).then_some(after)
            })
            .is_ok();
        if !taken {
            i.spent.store(true, Ordering::SeqCst);
        }
        taken
    }

    /// `n` granted payload bytes moved: once the wire count holds them
    /// (two meter readings on), they no longer count as pending.
    pub fn moved(&self, n: u64) {
        self.moved_framed(with_framing(n));
    }

    fn moved_framed(&self, cost: u64) {
        self.inner.moving.fetch_add(cost, Ordering::SeqCst);
    }

    /// `n` granted payload bytes will not move (their transfer ended).
    pub fn unused(&self, n: u64) {
        self.settle(with_framing(n));
    }

    fn settle(&self, cost: u64) {
        let _ = self
            .inner
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                Some(p.saturating_sub(cost))
            });
    }

    /// A grant for one download of `n` payload bytes (see [`Grant`]), or
    /// `None` (refused) when it does not fit.
    pub fn grant(&self, n: u64) -> Option<Grant> {
        self.try_take(n).then(|| Grant {
            budget: self.clone(),
            left: AtomicU64::new(with_framing(n)),
        })
    }

    /// The wire meter's reading of the wire total (up plus down).
    pub fn observe(&self, wire: u64) {
        let i = &self.inner;
        i.wire.fetch_max(wire, Ordering::SeqCst);
        let just = i.moving.swap(0, Ordering::SeqCst);
        self.settle(i.aged.swap(just, Ordering::SeqCst));
        if self.used() >= self.grant_limit() {
            i.spent.store(true, Ordering::SeqCst);
        }
    }

    /// Whether the limit is reached (a transfer was refused for it).
    pub fn spent(&self) -> bool {
        self.inner.spent.load(Ordering::SeqCst)
    }
}

/// One download's share of a [`Budget`]: received bytes settle it (never
/// more than it was granted, whatever the transfer's overhead), and what
/// is left when it is dropped (the download ended, or failed) no longer
/// counts.
#[derive(Debug)]
pub struct Grant {
    budget: Budget,
    /// What is granted and not received yet, framing included.
    left: AtomicU64,
}

impl Grant {
    /// `n` payload bytes arrived.
    pub fn received(&self, n: u64) {
        let cost = with_framing(n);
        if let Ok(before) = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                Some(l.saturating_sub(cost))
            })
        {
            self.budget.moved_framed(before.min(cost));
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.budget.settle(*self.left.get_mut());
    }
}

/// The calendar month (`"YYYY-MM"`, UTC) a unix time falls in, for monthly caps.
pub fn month_of(unix_secs: u64) -> String {
    let (year, month, _) = civil(unix_secs);
    format!("{year:04}-{month:02}")
}

/// The calendar day (`"YYYY-MM-DD"`, UTC) a unix time falls in.
pub fn day_of(unix_secs: u64) -> String {
    let (year, month, day) = civil(unix_secs);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Year, month and day (UTC) of a unix time.
fn civil(unix_secs: u64) -> (i64, i64, i64) {
    // Howard Hinnant's days-to-civil algorithm.
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(951_782_400), "2000-02"); // 2000-02-29T00:00:00Z
        assert_eq!(month_of(1_798_761_599), "2026-12"); // 2026-12-31T23:59:59Z
        assert_eq!(month_of(1_798_761_600), "2027-01");
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400), "2000-02-29");
        assert_eq!(day_of(1_798_761_599), "2026-12-31");
        assert_eq!(day_of(1_798_761_600), "2027-01-01");
    }

    #[test]
    fn the_budget_counts_the_wire_plus_what_is_granted_and_not_moved() {
        let b = Budget::default();
        assert!(b.try_take(u64::MAX / 2), "no limit: anything goes");
        let h = BUDGET_HEADROOM;
        let b = Budget::default();
        b.set_limit(Some(h + 1_700));
        // 800 payload bytes cost 850 with their framing; grants stop the
        // headroom short of the limit.
        assert!(b.try_take(800));
        assert!(!b.spent());
        // 850 + 850 fits exactly; one more byte does not: refused whole.
        assert!(!b.try_take(801));
        assert!(b.spent());
        // The same limit again keeps the refusal; a higher one clears it.
        b.set_limit(Some(h + 1_700));
        assert!(b.spent());
        b.set_limit(Some(h + 3_000));
        assert!(!b.spent());
        assert_eq!(b.used(), 850);
        // The grant moved (850 on the wire), and 400 moved that nobody was
        // granted (gossip, acknowledgements): both count, once, from the
        // second reading on (the first may not hold the moved bytes yet).
        b.moved(800);
        b.observe(1_250);
        assert_eq!(b.used(), 1_250 + 850);
        b.observe(1_250);
        assert_eq!(b.used(), 1_250);
        // A download settles its grant as bytes arrive, never beyond it
        // (its overhead is on the wire count), and gives back the rest
        // when it ends.
        let grant = b.grant(1_600).unwrap();
        assert_eq!(b.used(), 1_250 + 1_700);
        grant.received(800);
        b.observe(1_250);
        b.observe(1_250);
        assert_eq!(b.used(), 1_250 + 850);
        grant.received(5_000);
        b.observe(1_250);
        b.observe(1_250);
        assert_eq!(b.used(), 1_250);
        let grant = b.grant(1_000).unwrap();
        drop(grant);
        assert_eq!(b.used(), 1_250);
        // The wire alone reaching the headroom spends it.
        b.observe(3_000);
        assert!(b.spent());
        assert!(!b.try_take(1));
    }

    #[tokio::test(start_paused = true)]
    async fn long_run_rate_is_exact_and_smooth() {
        let rate = 1_250_000.0; // 10 Mbit/s
        let limiter = RateLimiter::new(Some(rate));
        let start = Instant::now();
        let chunk = 16 * 1024;
        let mut sent = 0u64;
        let mut worst_gap = Duration::ZERO;
        let mut last = start;
        while start.elapsed() < Duration::from_secs(10) {
            limiter.acquire(chunk).await;
            sent += chunk;
            worst_gap = worst_gap.max(last.elapsed());
            last = Instant::now();
        }
        let achieved = sent as f64 / start.elapsed().as_secs_f64();
        assert!((achieved / rate - 1.0).abs() < 0.01, "achieved {achieved}");
        // One chunk at a time: never a gap of more than a chunk's time (+ slack).
        assert!(worst_gap < Duration::from_millis(20), "{worst_gap:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_senders_share_the_cap_and_rate_changes_live() {
        let limiter = RateLimiter::new(Some(100_000.0));
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (limiter, sent) = (limiter.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    limiter.acquire(4096).await;
                    sent.fetch_add(4096, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let at_five = sent.load(Ordering::Relaxed) as f64;
        limiter.set_rate(Some(200_000.0));
        for t in tasks {
            t.await.unwrap();
        }
        let total = sent.load(Ordering::Relaxed) as f64;
        assert!(
            (at_five / 500_000.0 - 1.0).abs() < 0.05,
            "first half {at_five}"
        );
        let second = total - at_five;
        assert!(
            (second / 1_000_000.0 - 1.0).abs() < 0.05,
            "second half {second}"
        );
    }

    #[test]
    fn unlimited_never_waits() {
        let limiter = RateLimiter::new(None);
        assert_eq!(limiter.reserve(u64::MAX), Duration::ZERO);
        limiter.set_rate(Some(0.0));
        assert_eq!(limiter.rate(), None);
    }
}
