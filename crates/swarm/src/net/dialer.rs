//! Blob connections kept open between fetches.
//!
//! A member asks its parent in the tree again and again while the parent
//! lacks a round's blob, and asks the same few peers every round. Dialling
//! for each ask costs a QUIC handshake on both sides; with a few hundred
//! members on one machine those handshakes were most of the CPU, and dials
//! timed out ("no connection within 5s") until members fell back to the
//! coordinator. One open connection per provider, reused while the asks
//! follow each other closely, costs a handshake per pair and round instead
//! of per ask.
//!
//! Only closely, and only while it answers: a peer that restarted on the
//! same key and port leaves our connection to its old process open but
//! dead (nothing tells us until the 15 s idle timeout), and an ask on it
//! would wait out its whole time limit (seen in the host-restart test, where
//! a volunteer lost a round that way). So a kept connection is reused only
//! within [`REUSE_WITHIN`] of its last use, and the blob fetch gives it two
//! seconds to answer before it dials afresh.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use iroh::{EndpointId, endpoint::Connection};
use tokio::time::Instant;

/// Connections kept, at most; the least recently used goes first.
const KEPT: usize = 64;
/// A kept connection is reused only this soon after its last use (a
/// parent's polling pauses at most 2 s between asks).
const REUSE_WITHIN: Duration = Duration::from_secs(3);

/// Open blob connections by provider.
#[derive(Debug, Default)]
pub(super) struct Dialer(Mutex<HashMap<EndpointId, (Connection, Instant)>>);

impl Dialer {
    /// A live connection to `provider`, if one is kept.
    pub(super) fn get(&self, provider: &EndpointId) -> Option<Connection> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match kept.get_mut(provider) {
            Some((conn, used))
                if conn.close_reason().is_none() && used.elapsed() <= REUSE_WITHIN =>
            {
                *used = Instant::now();
                Some(conn.clone())
            }
            Some(_) => {
                kept.remove(provider);
                None
            }
            None => None,
        }
    }

    /// Keep `conn` to `provider` for the next fetch.
    pub(super) fn keep(&self, provider: EndpointId, conn: &Connection) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|_, (c, used)| c.close_reason().is_none() && used.elapsed() <= REUSE_WITHIN);
        if kept.len() >= KEPT
            && !kept.contains_key(&provider)
            && let Some(oldest) = kept
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id)
        {
            kept.remove(&oldest);
        }
        kept.insert(provider, (conn.clone(), Instant::now()));
    }

    /// Forget the connection to `provider` (it failed us).
    pub(super) fn forget(&self, provider: &EndpointId) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(provider);
    }

    /// How many connections are kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
