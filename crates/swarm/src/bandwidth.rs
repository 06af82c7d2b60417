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
        atomic::{AtomicU64, Ordering},
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
    /// Bytes moved since the node started.
    pub total: Arc<Counters>,
}

impl Traffic {
    /// Caps in Mbit/s (`None`: unlimited).
    pub fn new(up_mbit: Option<f64>, down_mbit: Option<f64>) -> Self {
        Self {
            up: RateLimiter::new(up_mbit.map(mbit_to_bytes_per_sec)),
            down: RateLimiter::new(down_mbit.map(mbit_to_bytes_per_sec)),
            total: Arc::new(Counters::default()),
        }
    }

    /// Change both caps while running.
    pub fn set_caps(&self, up_mbit: Option<f64>, down_mbit: Option<f64>) {
        self.up.set_rate(up_mbit.map(mbit_to_bytes_per_sec));
        self.down.set_rate(down_mbit.map(mbit_to_bytes_per_sec));
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
