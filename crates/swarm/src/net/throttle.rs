//! The node's bandwidth caps, applied to blob transfers.
//!
//! Volunteers share their home connection, so a cap must hold whatever the
//! number of concurrent transfers and without bursts that starve the rest of
//! the household. Both directions draw on one token bucket each ([`Traffic`]):
//! uploads answer the blob provider's throttle events (it pauses after every
//! ~16 KiB leaf until the bucket allows more); downloads go through a
//! wrapped receive stream, which back-pressures the sender through QUIC
//! flow control. Both take tokens for the payload and its framing; the
//! wire meter charges whatever else moves. The same
//! provider events count the bytes sent per blob, and
//! end an upload the monthly budget has no room for (downloads take the
//! whole blob from it before they start, in `blobs`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use iroh::endpoint::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use iroh_blobs::{
    get::StreamPair,
    provider::events::{
        AbortReason, ConnectMode, EventMask, EventSender, ProviderMessage, RequestMode,
        RequestUpdate, ThrottleMode,
    },
};

use super::{fair::Fair, served::Served};
use crate::bandwidth::{Grant, Traffic, with_framing};

/// A receive stream that takes download tokens before handing bytes on,
/// and settles its download's share of the monthly budget.
pub(super) struct Throttled<R> {
    inner: R,
    traffic: Traffic,
    grant: Arc<Grant>,
}

/// Count `n` received bytes, settle them against `grant` and wait for
/// download tokens for them and their framing.
async fn pace(traffic: &Traffic, grant: &Grant, n: usize) {
    traffic.total.add_down(n as u64);
    grant.received(n as u64);
    traffic.down.acquire(with_framing(n as u64)).await;
}

impl<R: iroh_blobs::util::RecvStream> iroh_blobs::util::RecvStream for Throttled<R> {
    async fn recv_bytes(&mut self, len: usize) -> std::io::Result<Bytes> {
        let b = self.inner.recv_bytes(len).await?;
        pace(&self.traffic, &self.grant, b.len()).await;
        Ok(b)
    }
    async fn recv_bytes_exact(&mut self, len: usize) -> std::io::Result<Bytes> {
        let b = self.inner.recv_bytes_exact(len).await?;
        pace(&self.traffic, &self.grant, b.len()).await;
        Ok(b)
    }
    async fn recv_exact(&mut self, target: &mut [u8]) -> std::io::Result<()> {
        self.inner.recv_exact(target).await?;
        pace(&self.traffic, &self.grant, target.len()).await;
        Ok(())
    }
    fn stop(&mut self, code: VarInt) -> std::io::Result<()> {
        self.inner.stop(code)
    }
    fn id(&self) -> u64 {
        self.inner.id()
    }
}

/// A blob request stream on `conn` whose receive side takes download
/// tokens and settles `grant`.
pub(super) async fn throttled_pair(
    conn: &Connection,
    traffic: &Traffic,
    grant: &Arc<Grant>,
) -> Result<StreamPair<Throttled<RecvStream>, SendStream>, ConnectionError> {
    let (send, recv) = conn.open_bi().await?;
    Ok(StreamPair::new(
        conn.stable_id() as u64,
        Throttled {
            inner: recv,
            traffic: traffic.clone(),
            grant: grant.clone(),
        },
        send,
    ))
}

/// The most payload one leaf of a blob transfer carries.
const LEAF: u64 = 16 * 1024;

/// The blob provider's event handler: answers its throttle requests from
/// the upload bucket, counts every byte sent against its blob in `served`
/// (the provider names the blob once per request, then counts the
/// request's bytes) and ends a transfer past the peer's fair share
/// (`fair`).
///
/// The provider writes a leaf before it asks to throttle it, so the
/// monthly budget is paid one leaf ahead: the request's first leaf when
/// the request arrives, the next one at each throttle; a refusal ends the
/// request before another leaf goes out, and what was paid ahead and not
/// sent is given back when the request ends.
pub(super) fn provider_events(traffic: Traffic, served: Served, fair: Fair) -> EventSender {
    let mask = EventMask {
        connected: ConnectMode::Notify,
        get: RequestMode::InterceptLog,
        throttle: ThrottleMode::Intercept,
        ..EventMask::DEFAULT
    };
    let (tx, mut rx) = EventSender::channel(256, mask);
    // Per (connection, request): budget paid ahead and not yet sent.
    let ahead: Arc<Mutex<HashMap<(u64, u64), u64>>> = Arc::default();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            match msg {
                ProviderMessage::GetRequestReceived(m) => {
                    let key = (m.inner.connection_id, m.inner.request_id);
                    if !traffic.budget.try_take(LEAF) {
                        // The monthly cap is reached: refuse (the fetcher
                        // asks another provider).
                        m.tx.send(Err(AbortReason::RateLimited)).await.ok();
                        continue;
                    }
                    served.request(key.0, key.1, m.inner.request.hash);
                    paid_ahead(&ahead).insert(key, LEAF);
                    m.tx.send(Ok(())).await.ok();
                    let (ahead, budget, mut updates) =
                        (ahead.clone(), traffic.budget.clone(), m.rx);
                    tokio::spawn(async move {
                        while let Ok(Some(update)) = updates.recv().await {
                            if matches!(
                                update,
                                RequestUpdate::Completed(_) | RequestUpdate::Aborted(_)
                            ) {
                                break;
                            }
                        }
                        if let Some(unsent) = paid_ahead(&ahead).remove(&key) {
                            budget.unused(unsent);
                        }
                    });
                }
                ProviderMessage::ClientConnectedNotify(m) => {
                    fair.connected(m.inner.connection_id, m.inner.endpoint_id);
                }
                ProviderMessage::ConnectionClosed(m) => fair.closed(m.inner.connection_id),
                ProviderMessage::Throttle(m) => {
                    let key = (m.inner.connection_id, m.inner.request_id);
                    let size = m.inner.size;
                    // A peer past its copies of the blob gets no more of it.
                    let fair_share = served
                        .hash_of(key.0, key.1)
                        .is_none_or(|hash| fair.allow(key.0, hash, size));
                    // The leaf just written was paid for; pay for the next.
                    let next = fair_share && traffic.budget.try_take(LEAF);
                    let before = paid_ahead(&ahead).insert(key, if next { LEAF } else { 0 });
                    traffic.budget.moved(before.unwrap_or(0));
                    traffic.total.add_up(size);
                    served.sent(key.0, key.1, size);
                    if !next {
                        m.tx.send(Err(AbortReason::RateLimited)).await.ok();
                        continue;
                    }
                    let wait = traffic.up.reserve(with_framing(size));
                    tokio::spawn(async move {
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        m.tx.send(Ok(())).await.ok();
                    });
                }
                _ => {}
            }
        }
    });
    tx
}

/// The paid-ahead map; every update is one insert or remove, so a panic
/// elsewhere cannot leave it inconsistent.
fn paid_ahead(
    ahead: &Mutex<HashMap<(u64, u64), u64>>,
) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), u64>> {
    ahead.lock().unwrap_or_else(|e| e.into_inner())
}
