//! One node's presence in a run: an iroh endpoint with the blob store, the
//! run's gossip topic and the control protocol, behind a membership gate and
//! the node's bandwidth caps.
//!
//! [`Net`] is the one thing the node holds; each job behind it has a module
//! of its own, chosen for a reason users of volunteer networks gave:
//! - `gate`: a non-member never reaches the blob store, the gossip topic or
//!   the coordinator (checked once per connection, after the handshake).
//! - `throttle`: the upload and download caps hold whatever the number of
//!   concurrent transfers.
//! - `blobs`: a blob's size is proven against its hash before it is fetched,
//!   so a lying announce costs one chunk, not the download.
//! - `gc`: fetched blobs are dropped once their round's tags go, so memory
//!   stays bounded, without losing blobs created while the collector runs.
//! - `gossip`: nothing a neighbour forwards reaches the node unverified.
//! - `control_rpc`: the coordinator's answer is the reliable channel, and its
//!   failures say whether to stop, retry later or ask again.
//! - `peers`: the app's peer list, from transfers that happened anyway.
//! - `fair`: a member may take only a few copies of a blob from a node per
//!   minute, so nobody can burn a volunteer's upload by asking again.
//! - `wire`: a metered link bills every packet, so the ledger and the caps
//!   count what the socket moves, not the blobs alone.

use std::{
    collections::HashSet,
    net::SocketAddr,
    ops::Range,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use iroh::{
    Endpoint, EndpointAddr, EndpointId, SecretKey, TransportAddr,
    address_lookup::MemoryLookup,
    endpoint::{
        BindError, IdleTimeout, InvalidSocketAddr, PortmapperConfig, QuicTransportConfig, VarInt,
        presets,
    },
    protocol::Router,
};
use iroh_gossip::{
    Gossip,
    api::{ApiError, GossipSender},
};
use rand::seq::IndexedRandom;
use tokio::sync::mpsc;
use tracing::debug;

use crate::{
    bandwidth::Traffic,
    control::{CONTROL_ALPN, Request, Response},
    message::{BlobRef, Member, Message, RunId},
};

mod blobs;
mod control_rpc;
mod corrupt;
mod dialer;
mod fair;
mod gate;
mod gc;
mod gossip;
mod peers;
mod served;
#[cfg(test)]
mod tests;
mod throttle;
mod wire;

use self::{
    blobs::Blobs,
    control_rpc::ControlProtocol,
    gate::{Gate, GateHook},
    wire::{AbortOnDrop, DatagramHook, Datagrams, WireMeter},
};
pub use self::{
    blobs::{DEFAULT_STALL_TIMEOUT, FetchError, ProviderError, ProviderFailure, PublishError},
    control_rpc::{ControlError, ControlHandler},
    gossip::BroadcastError,
    peers::PeerStats,
};

/// Members offered to gossip as neighbours each time the member list
/// changes (see [`Net::set_members`]).
const GOSSIP_JOIN_PEERS: usize = 4;

/// How long dialling a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection silent this long (in milliseconds) is dead (iroh sends
/// keep-alives every 5 s). iroh sends to a remote over the path its open
/// connections use, so a volunteer that crashed and came back on a new port
/// stays unreachable until the old connections time out. Measured in the
/// SIGKILL test: with QUIC's 30 s default the host missed the restarted
/// member's updates for 4 to 6 rounds of 8 s, with 15 s for 3 (one run each).
const IDLE_TIMEOUT_MS: u32 = 15_000;

/// How to start a node's network side.
#[derive(Clone)]
pub struct NetConfig {
    /// The node's identity.
    pub secret_key: SecretKey,
    /// Where to listen (e.g. `127.0.0.1:0`; a coordinator keeps its port across restarts).
    pub bind: SocketAddr,
    /// The run.
    pub run_id: RunId,
    /// Caps and counters.
    pub traffic: Traffic,
    /// Accept connections from anyone (a coordinator of an open run).
    pub open: bool,
    /// Coordinator only: answers control requests.
    pub control: Option<ControlHandler>,
    /// Peers to start gossip from (the coordinator, for a volunteer).
    pub bootstrap: Vec<Member>,
    /// How this node serves blobs to others.
    pub serving: Serving,
}

/// How a node serves blobs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Serving {
    /// As stored: what every real node does.
    #[default]
    Honest,
    /// Its own blobs as stored, every blob it relays as garbage of the
    /// right size: the adversary for tests and benchmarks that check the
    /// swarm routes around bad providers.
    CorruptRelays,
}

/// Something the network layer saw that the node should know about.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum NetEvent {
    /// A verified message from the run's gossip topic.
    Message(Message),
    /// A connection from a non-member was refused.
    Refused(EndpointId),
    /// A gossip message failed verification; `via` is the neighbour that forwarded it.
    BadMessage {
        /// The forwarding neighbour (not necessarily the author).
        via: EndpointId,
        /// What was wrong.
        error: String,
    },
}

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The listen address is not one the endpoint can bind.
    #[error("cannot listen on {addr}: {source:#}")]
    Address {
        /// The address.
        addr: SocketAddr,
        /// Why it was refused.
        #[source]
        source: InvalidSocketAddr,
    },
    /// Binding the endpoint failed (the port is taken, the address is not
    /// this machine's, ...).
    #[error("cannot listen on {addr}: {source:#}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: BindError,
    },
    /// Joining the run's gossip topic failed.
    #[error("cannot join the run's gossip topic: {source:#}")]
    Gossip {
        /// What the gossip layer reported.
        #[source]
        source: ApiError,
    },
}

/// A running node's network side.
pub struct Net {
    router: Router,
    blobs: Blobs,
    gossip: Gossip,
    sender: GossipSender,
    lookup: MemoryLookup,
    gate: Arc<Gate>,
    key: SecretKey,
    run_id: RunId,
    traffic: Traffic,
    meter: Arc<Mutex<WireMeter>>,
    _wire_task: AbortOnDrop,
}

impl Net {
    /// Bind the endpoint, start serving blobs, gossip and (for a coordinator)
    /// control requests. Returns the node and its event stream.
    pub async fn spawn(config: NetConfig) -> Result<(Self, mpsc::Receiver<NetEvent>), SpawnError> {
        let (events_tx, events_rx) = mpsc::channel(4096);
        let bootstrap: Vec<EndpointId> = config.bootstrap.iter().map(|m| m.id).collect();
        let gate = Arc::new(Gate::new(
            config.open,
            bootstrap.iter().copied(),
            events_tx.clone(),
        ));
        let lookup = MemoryLookup::new();
        for m in &config.bootstrap {
            lookup.add_endpoint_info(endpoint_addr(m));
        }
        let addr = config.bind;
        let datagrams = Arc::new(Datagrams::default());
        let endpoint = Endpoint::builder(presets::Minimal)
            .secret_key(config.secret_key.clone())
            .clear_ip_transports()
            .bind_addr(addr)
            .map_err(|source| SpawnError::Address { addr, source })?
            .portmapper_config(PortmapperConfig::Disabled)
            .transport_config(
                QuicTransportConfig::builder()
                    .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))))
                    .build(),
            )
            .address_lookup(lookup.clone())
            .hooks(DatagramHook(datagrams.clone()))
            .hooks(GateHook(gate.clone()))
            .bind()
            .await
            .map_err(|source| SpawnError::Bind { addr, source })?;
        let meter = Arc::new(Mutex::new(WireMeter::new(
            endpoint.clone(),
            datagrams,
            config.traffic.clone(),
        )));
        let wire_task = wire::spawn(meter.clone());
        let blobs = Blobs::new(endpoint.clone(), config.traffic.clone());
        let gossip = Gossip::builder()
            .max_message_size(gossip::GOSSIP_MAX_MESSAGE)
            .spawn(endpoint.clone());
        let router = Router::builder(endpoint);
        let mut router = match config.serving {
            Serving::Honest => router.accept(iroh_blobs::ALPN, blobs.protocol()),
            Serving::CorruptRelays => router.accept(iroh_blobs::ALPN, blobs.corrupt_relay()),
        }
        .accept(iroh_gossip::ALPN, gossip.clone());
        if let Some(handler) = config.control.clone() {
            router = router.accept(CONTROL_ALPN, ControlProtocol(handler));
        }
        let router = router.spawn();
        let sender = gossip::join(&gossip, config.run_id, bootstrap, events_tx)
            .await
            .map_err(|source| SpawnError::Gossip { source })?;
        Ok((
            Self {
                router,
                blobs,
                gossip,
                sender,
                lookup,
                gate,
                key: config.secret_key,
                run_id: config.run_id,
                traffic: config.traffic,
                meter,
                _wire_task: wire_task,
            },
            events_rx,
        ))
    }

    /// This node's id.
    pub fn id(&self) -> EndpointId {
        self.router.endpoint().id()
    }

    /// This node's secret key (for signing messages).
    pub fn secret_key(&self) -> &SecretKey {
        &self.key
    }

    /// The run.
    pub fn run_id(&self) -> RunId {
        self.run_id
    }

    /// Addresses peers can dial this node on. A socket bound to the
    /// unspecified address (`0.0.0.0`) is listed as the interface addresses
    /// iroh found plus loopback, never as `0.0.0.0` (which nobody can dial).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let endpoint = self.router.endpoint();
        let mut addrs = Vec::new();
        for bound in endpoint.bound_sockets() {
            if !bound.ip().is_unspecified() {
                addrs.push(bound);
                continue;
            }
            let loopback: std::net::IpAddr = if bound.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            addrs.push(SocketAddr::new(loopback, bound.port()));
            addrs.extend(
                endpoint
                    .addr()
                    .ip_addrs()
                    .filter(|a| a.port() == bound.port() && !a.ip().is_loopback())
                    .copied(),
            );
        }
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// This node as a member entry.
    pub fn member(&self) -> Member {
        Member {
            id: self.id(),
            addrs: self.addrs(),
        }
    }

    /// Caps and counters.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    /// Serve `blob` to every member as often as it asks (the run's data,
    /// read by ranges round after round); other blobs go to each member at
    /// most a few copies a minute.
    pub fn serve_without_limit(&self, blob: &BlobRef) {
        self.blobs.serve_without_limit(blob);
    }

    /// How long a provider may send nothing in the middle of a transfer
    /// (or of its size proof) before it is dropped for the next provider
    /// (default [`DEFAULT_STALL_TIMEOUT`]): a member stalling on purpose
    /// then costs this, not a fetch's whole time limit.
    pub fn set_stall_timeout(&self, after: Duration) {
        self.blobs.set_stall_timeout(after);
    }

    /// Bring [`Traffic::wire`] up to this moment (it is otherwise read
    /// every 50 ms): before the ledger is written for the last time.
    pub fn sample_wire(&self) {
        self.meter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample();
    }

    /// Bytes of `blob` this node has uploaded to peers (0 for a blob it
    /// never served or served long ago: the last 1,024 blobs are kept).
    pub fn served_bytes(&self, blob: &BlobRef) -> u64 {
        self.blobs.served_bytes(blob)
    }

    /// Admit `members` (plus the always-admitted `keep`), learn their
    /// addresses and offer gossip a few of them as neighbours; everyone else
    /// is refused from now on.
    ///
    /// Gossip is handed [`GOSSIP_JOIN_PEERS`] random members, not all of
    /// them: asking every member to be a neighbour would dial every member
    /// (N² connections in a run), while HyParView only keeps a handful of
    /// active neighbours anyway and learns the rest through them.
    pub async fn set_members(&self, members: &[Member], keep: &[EndpointId]) {
        let me = self.id();
        let mut allowed: HashSet<EndpointId> = keep.iter().copied().collect();
        let mut others = Vec::new();
        for m in members.iter().filter(|m| m.id != me) {
            self.lookup.set_endpoint_info(endpoint_addr(m));
            allowed.insert(m.id);
            others.push(m.id);
        }
        self.gate.set_allowed(allowed);
        let sample: Vec<EndpointId> = others
            .choose_multiple(&mut rand::rng(), GOSSIP_JOIN_PEERS)
            .copied()
            .collect();
        if !sample.is_empty()
            && let Err(e) = self.sender.join_peers(sample).await
        {
            debug!("gossip join_peers: {e:#}");
        }
    }

    /// Gossip a signed message (see [`Message::sign`]).
    pub async fn broadcast(&self, signed: Vec<u8>) -> Result<(), BroadcastError> {
        gossip::broadcast(&self.sender, signed).await
    }

    /// Store `bytes` as a blob kept under `tag` until [`Net::forget`] drops it.
    pub async fn publish(&self, tag: &str, bytes: Vec<u8>) -> Result<BlobRef, PublishError> {
        self.blobs.publish(tag, bytes).await
    }

    /// Drop every blob tag starting with `prefix` (the store collects the blobs).
    pub async fn forget(&self, prefix: &str) {
        self.blobs.forget(prefix).await
    }

    /// Fetch a blob from the first of `providers` that delivers it, after
    /// checking its proven size against `blob.size` and `max_bytes`, and keep
    /// it under `tag`. Bytes are BLAKE3-verified as they stream in.
    pub async fn fetch(
        &self,
        blob: &BlobRef,
        providers: &[EndpointId],
        max_bytes: u64,
        tag: &str,
        time_limit: Duration,
    ) -> Result<Bytes, FetchError> {
        self.fetch_observed(blob, providers, max_bytes, tag, time_limit, &|_| {})
            .await
    }

    /// [`Net::fetch`], telling `progress` the verified payload bytes received
    /// so far from the current provider as they arrive (for progress bars on
    /// large blobs such as checkpoints).
    pub async fn fetch_observed(
        &self,
        blob: &BlobRef,
        providers: &[EndpointId],
        max_bytes: u64,
        tag: &str,
        time_limit: Duration,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Bytes, FetchError> {
        self.blobs
            .fetch(blob, providers, max_bytes, tag, time_limit, progress)
            .await
    }

    /// Fetch the byte `ranges` of a blob (and only the BLAKE3 chunks that
    /// cover them) from the first of `providers` that delivers them. Chunks
    /// are verified against the hash as they stream in; a range past the end
    /// of the blob is an error. Nothing stays tagged: the store drops the
    /// partial blob once the bytes are handed back.
    pub async fn fetch_ranges(
        &self,
        blob: &BlobRef,
        ranges: &[Range<u64>],
        providers: &[EndpointId],
        time_limit: Duration,
    ) -> Result<Vec<Bytes>, FetchError> {
        self.blobs
            .fetch_ranges(blob, ranges, providers, time_limit)
            .await
    }

    /// Peers this node fetched from, most recent first.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.blobs.peer_stats()
    }

    /// Send a control request to the coordinator and wait for its answer.
    pub async fn request(&self, to: &Member, request: &Request) -> Result<Response, ControlError> {
        self.lookup.add_endpoint_info(endpoint_addr(to));
        control_rpc::call(self.router.endpoint(), to.id, request).await
    }

    /// Leave the topic, close every connection and stop serving; the wire
    /// counters then hold everything this node sent, goodbyes included.
    pub async fn shutdown(&self) {
        let _ = self.gossip.shutdown().await;
        if let Err(e) = self.router.shutdown().await {
            debug!("router shutdown: {e}");
        }
        self.sample_wire();
    }
}

/// Where to dial `member`.
fn endpoint_addr(member: &Member) -> EndpointAddr {
    EndpointAddr::from_parts(
        member.id,
        member.addrs.iter().copied().map(TransportAddr::Ip),
    )
}
