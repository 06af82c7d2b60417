//! Data used this month, kept on disk so a monthly cap survives restarts.
//!
//! Volunteers on metered or capped home links asked for a monthly limit that
//! pauses participation, not just a rate cap: this is the ledger behind it.
//! Months are calendar months in UTC.

use std::{io, path::Path};

use serde::{Deserialize, Serialize};
use starling_swarm::bandwidth::{day_of, month_of};
use starling_train::atomic::write_atomic;

/// Bytes moved this month and in total.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The month the monthly counters are for (`YYYY-MM`).
    pub month: String,
    /// Bytes sent this month.
    pub month_up: u64,
    /// Bytes received this month.
    pub month_down: u64,
    /// Bytes sent since the ledger was created.
    pub total_up: u64,
    /// Bytes received since the ledger was created.
    pub total_down: u64,
    /// The day the daily counters are for (`YYYY-MM-DD`, UTC).
    #[serde(default)]
    pub day: String,
    /// Bytes both ways that day.
    #[serde(default)]
    pub day_bytes: u64,
}

impl Usage {
    /// Read the ledger; a missing file is an empty ledger.
    pub fn load(path: &Path) -> io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Write the ledger atomically.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        write_atomic(path, &bytes)
    }

    /// Start a new month's (and day's) counters if `unix_secs` is in another one.
    pub fn roll(&mut self, unix_secs: u64) {
        let month = month_of(unix_secs);
        if month != self.month {
            self.month = month;
            self.month_up = 0;
            self.month_down = 0;
        }
        let day = day_of(unix_secs);
        if day != self.day {
            self.day = day;
            self.day_bytes = 0;
        }
    }

    /// Count traffic at `unix_secs`.
    pub fn add(&mut self, unix_secs: u64, up: u64, down: u64) {
        self.roll(unix_secs);
        // Saturating: the ledger is a file, and a damaged one must not
        // panic the node.
        self.month_up = self.month_up.saturating_add(up);
        self.month_down = self.month_down.saturating_add(down);
        self.day_bytes = self.day_bytes.saturating_add(up.saturating_add(down));
        self.total_up = self.total_up.saturating_add(up);
        self.total_down = self.total_down.saturating_add(down);
    }

    /// Whether this month's use (at `unix_secs`) has reached `cap`.
    pub fn over(&mut self, unix_secs: u64, cap: Option<u64>) -> bool {
        self.roll(unix_secs);
        cap.is_some_and(|cap| self.month_bytes() >= cap)
    }

    /// Bytes both ways this month.
    pub fn month_bytes(&self) -> u64 {
        self.month_up.saturating_add(self.month_down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_roll_over_and_totals_keep_counting() {
        let dec = 1_796_083_200; // 2026-12-01T00:00:00Z
        let jan = 1_798_761_600; // 2027-01-01T00:00:00Z
        let mut u = Usage::default();
        u.add(dec, 10, 5);
        assert_eq!((u.day.as_str(), u.day_bytes), ("2026-12-01", 15));
        u.add(dec + 86_400, 1, 1);
        assert_eq!((u.day.as_str(), u.day_bytes), ("2026-12-02", 2));
        assert_eq!((u.month.as_str(), u.month_bytes()), ("2026-12", 17));
        u.add(jan, 2, 0);
        assert_eq!((u.month.as_str(), u.month_bytes()), ("2027-01", 2));
        assert_eq!((u.total_up, u.total_down), (13, 6));
        let path = std::env::temp_dir().join(format!("starling-usage-{}.json", std::process::id()));
        u.save(&path).unwrap();
        assert_eq!(Usage::load(&path).unwrap(), u);
        // A ledger written before the daily counters existed still loads.
        std::fs::write(
            &path,
            br#"{"month":"2026-12","month_up":1,"month_down":2,"total_up":3,"total_down":4}"#,
        )
        .unwrap();
        assert_eq!(Usage::load(&path).unwrap().day_bytes, 0);
        std::fs::write(&path, b"{").unwrap();
        assert!(Usage::load(&path).is_err());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(Usage::load(&path).unwrap(), Usage::default());
    }
}

/// A monthly data cap the owner can change while the node runs (the app's
/// settings); clones share the value.
#[derive(Clone, Debug, Default)]
pub struct MonthlyCap(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl MonthlyCap {
    /// A cap of `bytes` (`None`: no cap).
    pub fn new(bytes: Option<u64>) -> Self {
        let cap = Self::default();
        cap.set(bytes);
        cap
    }

    /// Change the cap; a node paused at the old cap resumes within seconds
    /// of a higher one.
    pub fn set(&self, bytes: Option<u64>) {
        self.0
            .store(bytes.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// The cap now.
    pub fn get(&self) -> Option<u64> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}
