//! What this node uploaded of each blob.
//!
//! The node's traffic counters say how much it uploaded, not of what; a
//! coordinator that must show its upload per round stays bounded by a few
//! copies of the round's aggregate needs the bytes per blob, since the
//! copies of one round's aggregate are still being served when the next
//! round opens. The provider's events name the blob once per request and
//! then count its bytes per request, so this maps one to the other.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use iroh_blobs::Hash;

/// Requests remembered (the oldest are forgotten first).
const REQUESTS_KEPT: usize = 4096;
/// Blobs whose counts are kept.
const BLOBS_KEPT: usize = 1024;

/// Bytes uploaded per blob, shared with the provider's event handler.
#[derive(Clone, Debug, Default)]
pub(super) struct Served(Arc<Mutex<Ledger>>);

#[derive(Debug, Default)]
struct Ledger {
    requests: HashMap<(u64, u64), Hash>,
    request_order: VecDeque<(u64, u64)>,
    bytes: HashMap<Hash, u64>,
    blob_order: VecDeque<Hash>,
}

impl Served {
    /// Request `request` on connection `connection` is for `hash`.
    pub(super) fn request(&self, connection: u64, request: u64, hash: Hash) {
        let mut l = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if l.requests.insert((connection, request), hash).is_none() {
            l.request_order.push_back((connection, request));
        }
        while l.request_order.len() > REQUESTS_KEPT {
            if let Some(old) = l.request_order.pop_front() {
                l.requests.remove(&old);
            }
        }
    }

    /// `size` bytes went out for request `request` on `connection`.
    pub(super) fn sent(&self, connection: u64, request: u64, size: u64) {
        let mut l = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&hash) = l.requests.get(&(connection, request)) else {
            return;
        };
        match l.bytes.get_mut(&hash) {
            Some(n) => *n += size,
            None => {
                l.bytes.insert(hash, size);
                l.blob_order.push_back(hash);
                while l.blob_order.len() > BLOBS_KEPT {
                    if let Some(old) = l.blob_order.pop_front() {
                        l.bytes.remove(&old);
                    }
                }
            }
        }
    }

    /// The blob request `request` on `connection` is for, if remembered.
    pub(super) fn hash_of(&self, connection: u64, request: u64) -> Option<Hash> {
        let l = self.0.lock().unwrap_or_else(|e| e.into_inner());
        l.requests.get(&(connection, request)).copied()
    }

    /// Bytes uploaded of `hash` (0 if none, or if it was forgotten).
    pub(super) fn bytes(&self, hash: &Hash) -> u64 {
        let l = self.0.lock().unwrap_or_else(|e| e.into_inner());
        l.bytes.get(hash).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_counted_per_blob_through_their_requests() {
        let served = Served::default();
        let (a, b) = (Hash::new(b"a"), Hash::new(b"b"));
        served.request(1, 1, a);
        served.request(1, 2, b);
        served.request(2, 1, a);
        served.sent(1, 1, 16_384);
        served.sent(1, 1, 750);
        served.sent(2, 1, 100);
        served.sent(1, 2, 5);
        served.sent(9, 9, 1_000); // a request never seen: not counted
        assert_eq!(served.bytes(&a), 17_234);
        assert_eq!(served.bytes(&b), 5);
        assert_eq!(served.bytes(&Hash::new(b"c")), 0);
    }

    #[test]
    fn memory_stays_bounded() {
        let served = Served::default();
        for i in 0..(REQUESTS_KEPT as u64 * 2) {
            let hash = Hash::new(i.to_le_bytes());
            served.request(i, 0, hash);
            served.sent(i, 0, 1);
        }
        let l = served.0.lock().unwrap();
        assert_eq!(l.requests.len(), REQUESTS_KEPT);
        assert_eq!(l.bytes.len(), BLOBS_KEPT);
        assert_eq!(l.request_order.len(), REQUESTS_KEPT);
        assert_eq!(l.blob_order.len(), BLOBS_KEPT);
    }
}
