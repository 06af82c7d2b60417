//! The node's bandwidth caps, applied to blob transfers.
//!
//! Volunteers share their home connection, so a cap must hold whatever the
//! number of concurrent transfers and without bursts that starve the rest of
//! the household. Both directions draw on one token bucket each ([`Traffic`]):
//! uploads answer the blob provider's throttle events (it pauses after every
//! ~16 KiB leaf until the bucket allows more); downloads go through a
//! wrapped receive stream, which back-pressures the sender through QUIC flow
//! control. The same provider events count the bytes sent per blob.

use bytes::Bytes;
use iroh::endpoint::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use iroh_blobs::{
    get::StreamPair,
    provider::events::{EventMask, EventSender, ProviderMessage, RequestMode, ThrottleMode},
};

use super::served::Served;
use crate::bandwidth::Traffic;

/// A receive stream that takes download tokens before handing bytes on.
pub(super) struct Throttled<R> {
    inner: R,
    traffic: Traffic,
}

/// Count `n` received bytes and wait for as many download tokens.
async fn pace(traffic: &Traffic, n: usize) {
    traffic.total.add_down(n as u64);
    traffic.down.acquire(n as u64).await;
}

impl<R: iroh_blobs::util::RecvStream> iroh_blobs::util::RecvStream for Throttled<R> {
    async fn recv_bytes(&mut self, len: usize) -> std::io::Result<Bytes> {
        let b = self.inner.recv_bytes(len).await?;
        pace(&self.traffic, b.len()).await;
        Ok(b)
    }
    async fn recv_bytes_exact(&mut self, len: usize) -> std::io::Result<Bytes> {
        let b = self.inner.recv_bytes_exact(len).await?;
        pace(&self.traffic, b.len()).await;
        Ok(b)
    }
    async fn recv_exact(&mut self, target: &mut [u8]) -> std::io::Result<()> {
        self.inner.recv_exact(target).await?;
        pace(&self.traffic, target.len()).await;
        Ok(())
    }
    fn stop(&mut self, code: VarInt) -> std::io::Result<()> {
        self.inner.stop(code)
    }
    fn id(&self) -> u64 {
        self.inner.id()
    }
}

/// A blob request stream on `conn` whose receive side takes download tokens.
pub(super) async fn throttled_pair(
    conn: &Connection,
    traffic: &Traffic,
) -> Result<StreamPair<Throttled<RecvStream>, SendStream>, ConnectionError> {
    let (send, recv) = conn.open_bi().await?;
    Ok(StreamPair::new(
        conn.stable_id() as u64,
        Throttled {
            inner: recv,
            traffic: traffic.clone(),
        },
        send,
    ))
}

/// The blob provider's event handler: answers its throttle requests from
/// the upload bucket and counts every byte sent against its blob in
/// `served` (the provider names the blob once per request, then counts the
/// request's bytes).
pub(super) fn provider_events(traffic: Traffic, served: Served) -> EventSender {
    let mask = EventMask {
        get: RequestMode::Notify,
        throttle: ThrottleMode::Intercept,
        ..EventMask::DEFAULT
    };
    let (tx, mut rx) = EventSender::channel(256, mask);
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            match msg {
                ProviderMessage::Throttle(m) => {
                    traffic.total.add_up(m.inner.size);
                    served.sent(m.inner.connection_id, m.inner.request_id, m.inner.size);
                    let wait = traffic.up.reserve(m.inner.size);
                    tokio::spawn(async move {
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        m.tx.send(Ok(())).await.ok();
                    });
                }
                ProviderMessage::GetRequestReceivedNotify(m) => {
                    served.request(
                        m.inner.connection_id,
                        m.inner.request_id,
                        m.inner.request.hash,
                    );
                }
                _ => {}
            }
        }
    });
    tx
}
