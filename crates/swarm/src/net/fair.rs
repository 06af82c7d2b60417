//! Per-peer serving limits.
//!
//! A volunteer's upload is its household's, and any member of an open run
//! could pull the same blob from it again and again to burn it. An honest
//! member fetches a blob once (twice if a transfer broke), so each peer may
//! receive at most [`MAX_COPIES`] copies' worth of a blob's bytes from this
//! node within [`WINDOW`]; past that its transfer is ended and it fetches
//! elsewhere. Only blobs of [`MIN_LIMITED`] or more count. Blobs whose size this node does not know (it neither
//! published nor fetched them) are not limited, nor are blobs published to
//! be read by ranges many times over (the run's data, served by its host:
//! [`Fair::exempt`]).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use iroh::EndpointId;
use iroh_blobs::Hash;

/// Copies of a blob one peer may receive from this node per [`WINDOW`].
pub(super) const MAX_COPIES: u64 = 3;
/// Blobs smaller than this are not limited: asking costs an abuser about
/// what serving costs, and blobs are content-addressed, so a small one
/// (the roster of a run whose members do not change) recurs round after
/// round under the same hash.
pub(super) const MIN_LIMITED: u64 = 1 << 20;
/// The window copies are counted over (a few rounds).
pub(super) const WINDOW: Duration = Duration::from_secs(60);
/// Blob sizes remembered (the oldest are forgotten first).
const SIZES_KEPT: usize = 1024;
/// (peer, blob) tallies kept before old ones are dropped.
const TALLIES_KEPT: usize = 4096;

/// Who is connected, how large blobs are, and what each peer received.
#[derive(Clone, Debug, Default)]
pub(super) struct Fair(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    peers: HashMap<u64, EndpointId>,
    sizes: HashMap<Hash, u64>,
    exempt: HashSet<Hash>,
    size_order: VecDeque<Hash>,
    /// Per (peer, blob): when its window began and the bytes sent in it.
    tallies: HashMap<(EndpointId, Hash), (Instant, u64)>,
}

impl Fair {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a few map operations: a panic cannot leave the
        // state half-written.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connection `conn` is from `peer` (unknown for an unauthenticated one).
    pub(super) fn connected(&self, conn: u64, peer: Option<EndpointId>) {
        if let Some(peer) = peer {
            self.lock().peers.insert(conn, peer);
        }
    }

    /// Connection `conn` closed.
    pub(super) fn closed(&self, conn: u64) {
        self.lock().peers.remove(&conn);
    }

    /// Never limit `hash` (a few blobs a run: its data).
    pub(super) fn exempt(&self, hash: Hash) {
        let mut s = self.lock();
        s.sizes.remove(&hash);
        s.exempt.insert(hash);
    }

    /// `hash` is `size` bytes long.
    pub(super) fn size(&self, hash: Hash, size: u64) {
        let mut s = self.lock();
        if s.exempt.contains(&hash) {
            return;
        }
        if s.sizes.insert(hash, size).is_none() {
            s.size_order.push_back(hash);
            while s.size_order.len() > SIZES_KEPT {
                if let Some(old) = s.size_order.pop_front() {
                    s.sizes.remove(&old);
                }
            }
        }
    }

    /// Whether `n` more bytes of `hash` may go to the peer on `conn` now;
    /// counts them when they may.
    pub(super) fn allow(&self, conn: u64, hash: Hash, n: u64) -> bool {
        self.allow_at(conn, hash, n, Instant::now())
    }

    fn allow_at(&self, conn: u64, hash: Hash, n: u64, now: Instant) -> bool {
        let mut s = self.lock();
        let (Some(&peer), Some(&size)) = (s.peers.get(&conn), s.sizes.get(&hash)) else {
            return true;
        };
        if size < MIN_LIMITED {
            return true;
        }
        if s.tallies.len() >= TALLIES_KEPT {
            s.tallies
                .retain(|_, (since, _)| now.duration_since(*since) < WINDOW);
        }
        let tally = s.tallies.entry((peer, hash)).or_insert((now, 0));
        if now.duration_since(tally.0) >= WINDOW {
            *tally = (now, 0);
        }
        let after = tally.1.saturating_add(n);
        if after > size.saturating_mul(MAX_COPIES) {
            return false;
        }
        tally.1 = after;
        true
    }
}

#[cfg(test)]
mod tests {
    use iroh::SecretKey;

    use super::*;

    #[test]
    fn a_peer_gets_a_few_copies_per_window_and_others_are_not_held_back() {
        let fair = Fair::default();
        let (a, b) = (
            SecretKey::from_bytes(&[1; 32]).public(),
            SecretKey::from_bytes(&[2; 32]).public(),
        );
        let (blob, unknown) = (Hash::new(b"agg"), Hash::new(b"shard"));
        const MB: u64 = MIN_LIMITED;
        let small = Hash::new(b"roster");
        fair.size(blob, 2 * MB);
        fair.size(small, 1_000);
        fair.connected(1, Some(a));
        fair.connected(2, Some(b));
        // A second connection of the same peer shares its tally.
        fair.connected(3, Some(a));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(fair.allow_at(1, blob, MB, t0));
            assert!(fair.allow_at(3, blob, MB, t0));
        }
        assert!(!fair.allow_at(1, blob, 1, t0), "a fourth copy");
        assert!(!fair.allow_at(3, blob, 1, t0), "nor on another connection");
        assert!(
            fair.allow_at(2, blob, 2 * MB, t0),
            "another peer is not held back"
        );
        for _ in 0..100 {
            assert!(fair.allow_at(1, small, 1_000, t0), "small blobs are free");
        }
        assert!(
            fair.allow_at(1, unknown, u64::MAX / 2, t0),
            "a blob of unknown size is not limited"
        );
        // The next window starts afresh.
        assert!(fair.allow_at(1, blob, 2 * MB, t0 + WINDOW));
        // Unknown connections (closed, or never named) are not limited.
        fair.closed(1);
        assert!(fair.allow_at(1, blob, u64::MAX / 2, t0));
        // Nor is an exempt blob (the run's data), even once its size is told.
        fair.exempt(blob);
        fair.size(blob, 2 * MB);
        assert!(fair.allow_at(3, blob, u64::MAX / 2, t0));
    }
}
