//! What the node's traffic costs on the wire, for the ledger and the caps.
//!
//! Volunteers on metered links are billed for every packet, not for the
//! blobs we meant to move: QUIC framing, acknowledgements, gossip, control
//! answers and handshakes were a third of a volunteer's traffic when
//! measured in a network namespace (issue 14). So the ledger counts where
//! iroh sends and receives datagrams (its socket metrics: every payload
//! byte, whatever protocol or connection it belongs to) plus the IP and UDP
//! headers of every datagram (counted per connection by QUIC), and the
//! sampler charges the caps' buckets for whatever the blob transfers did
//! not already take tokens for, so the caps hold for the whole wire rate.
//! When the monthly budget is spent it closes the endpoint, since only blob
//! transfers can be refused one by one.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use iroh::{
    Endpoint,
    endpoint::{AfterHandshakeOutcome, Connection, EndpointHooks, WeakConnectionHandle},
};

use crate::bandwidth::{Traffic, with_framing};

/// Download bytes that may sit received and unread without being charged
/// as unpaced: two QUIC stream receive windows (1.25 MB each by default).
/// The throttle on what moves outside blob transfers starts after that
/// much of it; the count in the ledger is exact from the first byte.
const BUFFERED_SLACK: u64 = 2_500_000;

/// How often the socket's counters are read.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// IPv4 (20) and UDP (8) header bytes per datagram.
const HEADERS_V4: u64 = 28;
/// IPv6 (40) and UDP (8) header bytes per datagram.
const HEADERS_V6: u64 = 48;

/// Datagrams sent and received on every connection the endpoint ever
/// completed a handshake on (refused ones too).
#[derive(Debug, Default)]
pub(super) struct Datagrams {
    inner: Mutex<DatagramTally>,
}

#[derive(Debug, Default)]
struct DatagramTally {
    /// Live connections: their handle and last seen (sent, received).
    live: HashMap<usize, (WeakConnectionHandle, u64, u64)>,
    /// Totals of connections that are gone.
    gone: (u64, u64),
}

impl Datagrams {
    fn lock(&self) -> std::sync::MutexGuard<'_, DatagramTally> {
        // Every update is a few integer assignments: a panic cannot leave
        // the tally half-written.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, conn: &Connection) {
        let stats = conn.stats();
        self.lock().live.insert(
            conn.stable_id(),
            (
                conn.weak_handle(),
                stats.udp_tx.datagrams,
                stats.udp_rx.datagrams,
            ),
        );
    }

    /// Datagrams (sent, received) so far.
    fn totals(&self) -> (u64, u64) {
        let mut t = self.lock();
        let mut gone = t.gone;
        let (mut sent, mut received) = (0, 0);
        t.live.retain(|_, (handle, tx, rx)| match handle.upgrade() {
            Some(conn) => {
                let stats = conn.stats();
                (*tx, *rx) = (stats.udp_tx.datagrams, stats.udp_rx.datagrams);
                sent += *tx;
                received += *rx;
                true
            }
            None => {
                gone.0 += *tx;
                gone.1 += *rx;
                false
            }
        });
        t.gone = gone;
        (gone.0 + sent, gone.1 + received)
    }
}

/// The endpoint hook that registers every connection with [`Datagrams`].
/// It never refuses anything; installed before the membership gate, it
/// counts the connections the gate refuses too.
#[derive(Debug)]
pub(super) struct DatagramHook(pub(super) Arc<Datagrams>);

impl EndpointHooks for DatagramHook {
    async fn after_handshake<'a>(&'a self, conn: &'a Connection) -> AfterHandshakeOutcome {
        self.0.register(conn);
        AfterHandshakeOutcome::Accept
    }
}

/// Reads one endpoint's counters and moves them into a [`Traffic`].
pub(super) struct WireMeter {
    endpoint: Endpoint,
    datagrams: Arc<Datagrams>,
    traffic: Traffic,
    /// This endpoint's wire totals (up, down) at the last reading.
    last: (u64, u64),
    /// Whether the budget ran out and the endpoint was closed.
    dark: bool,
    /// The blob payload counters when this meter started, and the bytes
    /// charged to the buckets since (up, down).
    paced_base: (u64, u64),
    charged: (u64, u64),
}

impl WireMeter {
    pub(super) fn new(endpoint: Endpoint, datagrams: Arc<Datagrams>, traffic: Traffic) -> Self {
        let paced_base = (traffic.total.up(), traffic.total.down());
        Self {
            endpoint,
            datagrams,
            traffic,
            last: (0, 0),
            dark: false,
            paced_base,
            charged: (0, 0),
        }
    }

    /// This endpoint's bytes on the wire (up, down) since it was bound.
    fn read(&self) -> (u64, u64) {
        let s = &self.endpoint.metrics().socket;
        let up_v4 = s.send_ipv4.get();
        let up = up_v4 + s.send_ipv6.get() + s.send_relay.get();
        let down_v4 = s.recv_data_ipv4.get();
        let down =
            down_v4 + s.recv_data_ipv6.get() + s.recv_data_relay.get() + s.recv_data_custom.get();
        // Most datagrams go over one family; charge the headers of the
        // one that carried the most bytes.
        let headers = |v4: u64, all: u64| {
            if 2 * v4 >= all {
                HEADERS_V4
            } else {
                HEADERS_V6
            }
        };
        let (sent, received) = self.datagrams.totals();
        (
            up + sent * headers(up_v4, up),
            down + received * headers(down_v4, down),
        )
    }

    /// Add what moved since the last call to the wire counters, charge the
    /// caps for the part no blob transfer took tokens for, and tell the
    /// monthly budget.
    pub(super) fn sample(&mut self) {
        let (up, down) = self.read();
        // Counters only grow; `max` keeps a reading taken while a
        // connection was being dropped from going backwards.
        let (up, down) = (up.max(self.last.0), down.max(self.last.1));
        self.traffic.wire.add_up(up - self.last.0);
        self.traffic.wire.add_down(down - self.last.1);
        self.last = (up, down);
        let paced_up = self.traffic.total.up().saturating_sub(self.paced_base.0);
        let paced_down = self.traffic.total.down().saturating_sub(self.paced_base.1);
        // Blob transfers take tokens for their payload and its framing;
        // charge the rest (gossip, control, acknowledgements, framing
        // beyond the estimate). The bucket goes into debt, and the next
        // blob transfer waits it off.
        let unpaced_up = up.saturating_sub(with_framing(paced_up));
        if unpaced_up > self.charged.0 {
            let _ = self.traffic.up.reserve(unpaced_up - self.charged.0);
            self.charged.0 = unpaced_up;
        }
        // A download's bytes reach the socket before the transfer reads
        // (and pays for) them: QUIC buffers up to a stream window of them,
        // which must not be charged twice.
        let unpaced_down = down
            .saturating_sub(with_framing(paced_down))
            .saturating_sub(BUFFERED_SLACK);
        if unpaced_down > self.charged.1 {
            let _ = self.traffic.down.reserve(unpaced_down - self.charged.1);
            self.charged.1 = unpaced_down;
        }
        let budget = &self.traffic.budget;
        budget.observe(self.traffic.wire.up() + self.traffic.wire.down());
        if budget.spent() && !self.dark {
            // The monthly cap is reached: nothing more may move, not even
            // gossip or control answers, which take no grants.
            self.dark = true;
            let endpoint = self.endpoint.clone();
            tokio::spawn(async move { endpoint.close().await });
        }
    }
}

/// Aborts a task when dropped: the meter's task holds the endpoint, which
/// must not outlive the node.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sample `meter` every [`SAMPLE_EVERY`] until aborted.
pub(super) fn spawn(meter: Arc<Mutex<WireMeter>>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            meter.lock().unwrap_or_else(|e| e.into_inner()).sample();
        }
    }))
}
