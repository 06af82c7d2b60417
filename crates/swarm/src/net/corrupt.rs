//! A provider that corrupts what it relays: the adversary of the tests and
//! benchmarks that check a swarm routes around bad providers
//! (`starling bench swarm --corrupt-relays`).
//!
//! It serves the blobs it published itself (its own updates) honestly, so it
//! stays a member in good standing, and answers every other request with the
//! blob's size and garbage: the attacker a tree of relays must survive,
//! since its children have no other way to tell it apart from an honest
//! parent than the bytes failing BLAKE3.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use iroh::{endpoint::Connection, protocol::AcceptError, protocol::ProtocolHandler};
use iroh_blobs::{
    Hash,
    api::Store,
    protocol::Request,
    provider::{StreamPair, events::EventSender, handle_get},
};
use tokio::time::timeout;

/// Own blobs remembered (a few rounds of updates).
const OWN_KEPT: usize = 64;
/// Garbage bytes sent in place of a relayed blob.
const GARBAGE: usize = 4096;

/// Hashes this node published itself, most recent last.
#[derive(Clone, Debug, Default)]
pub(super) struct Own(Arc<Mutex<VecDeque<Hash>>>);

impl Own {
    /// Remember `hash` as published here.
    pub(super) fn add(&self, hash: Hash) {
        let mut own = self.0.lock().unwrap_or_else(|e| e.into_inner());
        own.push_back(hash);
        while own.len() > OWN_KEPT {
            own.pop_front();
        }
    }

    fn contains(&self, hash: &Hash) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(hash)
    }
}

/// The corrupting provider (see the module docs).
#[derive(Clone, Debug)]
pub(super) struct CorruptRelay {
    pub(super) store: Store,
    pub(super) events: EventSender,
    pub(super) own: Own,
}

impl ProtocolHandler for CorruptRelay {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let Ok((request, _)) = Request::read_async(&mut recv).await else {
                break;
            };
            match request {
                Request::Get(get) if self.own.contains(&get.hash) => {
                    let pair =
                        StreamPair::new(conn.stable_id() as u64, recv, send, self.events.clone());
                    let _ = handle_get(pair, self.store.clone(), get).await;
                }
                Request::Get(get) => {
                    let size = self
                        .store
                        .get_bytes(get.hash)
                        .await
                        .map(|b| b.len() as u64)
                        .unwrap_or(GARBAGE as u64);
                    let mut out = size.to_le_bytes().to_vec();
                    out.extend(std::iter::repeat_n(0xab, GARBAGE));
                    let _ = send.write_all(&out).await;
                    let _ = send.finish();
                }
                _ => break,
            }
        }
        let _ = timeout(Duration::from_secs(5), conn.closed()).await;
        Ok(())
    }
}
