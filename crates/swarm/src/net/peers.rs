//! What this node saw of each peer it fetched from.
//!
//! Volunteers ask "who am I connected to, and is it direct?": the app's peer
//! list answers from here. The numbers come from transfers that happened
//! anyway, so keeping them costs no probe traffic.

use std::{collections::BTreeMap, sync::Mutex};

use iroh::{EndpointId, endpoint::Connection};

/// What this node saw of a peer on the transfers it fetched from it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PeerStats {
    /// The peer.
    pub id: EndpointId,
    /// Round-trip time on the path in use, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Whether that path goes through a relay (no direct connection).
    pub relayed: bool,
    /// Payload bytes received from it since this node started.
    pub bytes_down: u64,
    /// Rate of the last transfer of 16 KiB or more, in bytes per second.
    pub down_bytes_per_sec: Option<f64>,
    /// When the last transfer ended (unix milliseconds).
    pub last_unix_ms: u64,
}

/// The last transfers from each peer.
#[derive(Debug, Default)]
pub(super) struct PeerBook(Mutex<BTreeMap<EndpointId, PeerStats>>);

impl PeerBook {
    /// Note a finished transfer of `stats` from `peer` over `conn`.
    pub(super) fn observe(
        &self,
        peer: EndpointId,
        conn: &Connection,
        stats: &iroh_blobs::get::Stats,
    ) {
        let path = conn
            .paths()
            .iter()
            .find(|p| p.is_selected())
            .map(|p| (p.rtt(), p.is_relay()));
        let bytes = stats.payload_bytes_read;
        let secs = stats.elapsed.as_secs_f64();
        let mut peers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = peers.entry(peer).or_insert_with(|| PeerStats {
            id: peer,
            rtt_ms: None,
            relayed: false,
            bytes_down: 0,
            down_bytes_per_sec: None,
            last_unix_ms: 0,
        });
        if let Some((rtt, relayed)) = path {
            entry.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
            entry.relayed = relayed;
        }
        entry.bytes_down += bytes;
        // Tiny transfers say more about latency than throughput.
        if bytes >= 16 * 1024 && secs > 0.0 {
            entry.down_bytes_per_sec = Some(bytes as f64 / secs);
        }
        entry.last_unix_ms = crate::unix_ms();
    }

    /// Every peer seen, most recent first.
    pub(super) fn snapshot(&self) -> Vec<PeerStats> {
        let peers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<PeerStats> = peers.values().cloned().collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.last_unix_ms));
        out
    }
}
