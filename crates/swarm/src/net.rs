//! One node's presence in a run: an iroh endpoint with the blob store, the
//! run's gossip topic and the control protocol, behind a membership gate and
//! the node's bandwidth caps.
//!
//! Design choices, each for a reason users of volunteer networks gave:
//! - The gate runs after the TLS handshake on every connection, in both
//!   directions and for every protocol, so a non-member never reaches the
//!   blob store, the gossip topic or the coordinator.
//! - Upload caps act on the blob provider's throttle events (it pauses after
//!   every ~16 KiB leaf until the bucket allows more); download caps act on a
//!   wrapped receive stream, which back-pressures the sender through QUIC flow
//!   control. Both share one bucket per direction, so the cap holds whatever
//!   the number of concurrent transfers.
//! - A blob's size is proven against its hash before it is fetched, so an
//!   announce that lies about its size, or an update bigger than the round
//!   allows, costs one chunk, not the download.
//! - Fetched blobs carry a per-round tag and are dropped by the store's
//!   garbage collector once the round's tags go: memory stays bounded.

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    net::SocketAddr,
    ops::Range,
    pin::Pin,
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use iroh::{
    Endpoint, EndpointAddr, EndpointId, SecretKey, TransportAddr,
    address_lookup::MemoryLookup,
    endpoint::{
        AfterHandshakeOutcome, ConnectError, Connection, ConnectionError, EndpointHooks,
        PortmapperConfig, QuicTransportConfig, RecvStream, SendStream, VarInt,
        VarIntBoundsExceeded, presets,
    },
    protocol::{AcceptError, ProtocolHandler, Router},
};
use iroh_blobs::{
    BlobsProtocol, Hash,
    api::{Store, remote::GetProgressItem},
    get::{StreamPair, request::get_verified_size},
    protocol::{ChunkRanges, ChunkRangesExt, GetRequest},
    provider::events::{EventMask, EventSender, ProviderMessage, ThrottleMode},
    store::{
        GcConfig, ProtectCb, ProtectOutcome,
        mem::{MemStore, Options},
    },
};
use iroh_gossip::{
    Gossip, TopicId,
    api::{Event, GossipSender},
};
use n0_future::StreamExt;
use tokio::{sync::mpsc, time::timeout};
use tracing::{debug, warn};

use crate::{
    bandwidth::Traffic,
    control::{CONTROL_ALPN, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Request, Response},
    message::{BlobRef, MAX_MESSAGE_BYTES, Member, Message, MessageError, RunId},
};

/// Gossip frame limit, identical on every node (a larger frame drops the link).
const GOSSIP_MAX_MESSAGE: usize = MAX_MESSAGE_BYTES + 1024;
/// How long dialling a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often unreferenced blobs are collected.
const GC_INTERVAL: Duration = Duration::from_secs(5);
/// A connection silent this long is dead (iroh sends keep-alives every 5 s).
/// iroh sends to a remote over the path its open connections use, so a
/// volunteer that crashed and came back on a new port stays unreachable until
/// the old connections time out. Measured in the SIGKILL test: with QUIC's
/// 30 s default the host missed the restarted member's updates for 4 to 6
/// rounds of 8 s, with 15 s for 3 (one run each).
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Answers control requests (the coordinator's side of [`Request`]).
pub type ControlHandler = Arc<
    dyn Fn(EndpointId, Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync,
>;

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
    /// The listen address is unusable.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// Joining the run's gossip topic failed.
    #[error("cannot join the run's gossip topic: {0}")]
    Gossip(String),
}

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The declared size exceeds what the caller accepts.
    #[error("blob of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Declared size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The provider proved a size other than the one declared.
    #[error("declared {declared} bytes but the blob has {actual}")]
    SizeMismatch {
        /// What the announce said.
        declared: u64,
        /// What the provider proved.
        actual: u64,
    },
    /// A requested byte range does not lie inside the blob.
    #[error("byte range {start}..{end} is outside the {size}-byte blob")]
    OutOfRange {
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
        /// The blob's size.
        size: u64,
    },
    /// No provider could deliver it.
    #[error("no provider delivered the blob (last error: {0})")]
    Unavailable(String),
    /// The local store failed.
    #[error("blob store: {0}")]
    Store(String),
}

/// Why a blob could not be published.
#[derive(Debug, thiserror::Error)]
#[error("cannot store the blob: {0}")]
pub struct PublishError(String);

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator: {0}")]
    Unreachable(String),
    /// The exchange broke off.
    #[error("the coordinator's answer broke off: {0}")]
    Transport(String),
    /// The answer did not decode.
    #[error("the coordinator's answer is malformed: {0}")]
    Malformed(#[from] postcard::Error),
    /// The coordinator's gate refused this node: it is not a member.
    #[error("the coordinator refused the connection: this node is not a member of the run")]
    NotAdmitted,
}

/// Code a gate closes refused connections with.
const REFUSED_CODE: u32 = 403;

fn refused_by_gate(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(REFUSED_CODE))
}

/// Why a gossip broadcast failed.
#[derive(Debug, thiserror::Error)]
#[error("gossip broadcast failed: {0}")]
pub struct BroadcastError(String);

#[derive(Debug)]
struct Gate {
    open: AtomicBool,
    allowed: RwLock<HashSet<EndpointId>>,
    events: mpsc::Sender<NetEvent>,
}

impl Gate {
    fn allows(&self, id: &EndpointId) -> bool {
        self.open.load(Ordering::Relaxed)
            || self
                .allowed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(id)
    }
}

#[derive(Debug)]
struct GateHook(Arc<Gate>);

impl EndpointHooks for GateHook {
    async fn after_handshake<'a>(&'a self, conn: &'a Connection) -> AfterHandshakeOutcome {
        let remote = conn.remote_id();
        if self.0.allows(&remote) {
            AfterHandshakeOutcome::Accept
        } else {
            let _ = self.0.events.try_send(NetEvent::Refused(remote));
            AfterHandshakeOutcome::Reject {
                error_code: REFUSED_CODE.into(),
                reason: b"not a member of this run".to_vec(),
            }
        }
    }
}

#[derive(Clone)]
struct ControlProtocol(ControlHandler);

impl std::fmt::Debug for ControlProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlProtocol")
    }
}

impl ProtocolHandler for ControlProtocol {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let from = connection.remote_id();
        let (mut send, mut recv) = connection.accept_bi().await?;
        let bytes = recv
            .read_to_end(MAX_REQUEST_BYTES)
            .await
            .map_err(AcceptError::from_err)?;
        let response = match postcard::from_bytes::<Request>(&bytes) {
            Ok(request) => (self.0)(from, request).await,
            Err(e) => Response::Refused {
                reason: format!("malformed request: {e}"),
            },
        };
        let out = postcard::to_stdvec(&response).map_err(AcceptError::from_err)?;
        send.write_all(&out).await.map_err(AcceptError::from_err)?;
        send.finish()?;
        // Let the client read everything before the connection drops.
        let _ = timeout(Duration::from_secs(30), connection.closed()).await;
        Ok(())
    }
}

/// Keeps blob creation out of the store's garbage-collection window.
///
/// iroh-blobs' GC marks the blobs its tags reach, then lists the store and
/// deletes the rest; `MemStore` does not protect blobs created in between, so
/// an update published (or a download started) during that window was
/// deleted while tagged, and its fetchers got "stream reset" (seen in the
/// demo). Every operation that creates a blob or its first tag holds a read
/// guard for those few milliseconds; each GC run takes the write guard in
/// its protect callback (before marking) and holds it until an untagged
/// canary blob added there is gone, i.e. until the sweep has taken its list.
#[derive(Clone, Default)]
struct GcGate(Arc<tokio::sync::RwLock<()>>);

/// Longest a GC run may hold back blob creation (a canary that outlived its
/// sweep only costs this once).
const GC_HOLD_LIMIT: Duration = Duration::from_secs(2);

impl GcGate {
    /// Wait out a GC run in progress and keep the next one from starting.
    async fn creating(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.0.read().await
    }

    /// The store's protect callback: take the write guard for this run.
    fn protect(&self, store: Arc<OnceLock<Store>>) -> ProtectCb {
        let gate = self.0.clone();
        Arc::new(move |_live| {
            let (gate, store) = (gate.clone(), store.clone());
            // The callback's future must be `Sync`; the store's futures are
            // not, so the work runs in a task and the callback awaits it.
            let task = tokio::spawn(async move {
                let Some(store) = store.get().cloned() else {
                    return ProtectOutcome::Abort;
                };
                let guard = gate.write_owned().await;
                let canary: [u8; 16] = rand_bytes();
                let hash = match store.add_slice(canary).temp_tag().await {
                    // Dropping the temp tag leaves the canary unreferenced.
                    Ok(tt) => tt.hash(),
                    Err(_) => return ProtectOutcome::Abort,
                };
                tokio::spawn(async move {
                    let end = tokio::time::Instant::now() + GC_HOLD_LIMIT;
                    while tokio::time::Instant::now() < end
                        && store.has(hash).await.unwrap_or(false)
                    {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    drop(guard);
                });
                ProtectOutcome::Continue
            });
            Box::pin(async move { task.await.unwrap_or(ProtectOutcome::Abort) })
        })
    }
}

/// 16 random bytes (a canary unique to one GC run).
fn rand_bytes() -> [u8; 16] {
    let key = SecretKey::generate();
    let mut out = [0u8; 16];
    out.copy_from_slice(&key.to_bytes()[..16]);
    out
}

/// A receive stream that takes download tokens before handing bytes on.
struct Throttled<R> {
    inner: R,
    traffic: Traffic,
}

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
    fn stop(&mut self, code: iroh::endpoint::VarInt) -> std::io::Result<()> {
        self.inner.stop(code)
    }
    fn id(&self) -> u64 {
        self.inner.id()
    }
}

/// Answers the blob provider's throttle requests from the upload bucket.
fn upload_throttle(traffic: Traffic) -> EventSender {
    let mask = EventMask {
        throttle: ThrottleMode::Intercept,
        ..EventMask::DEFAULT
    };
    let (tx, mut rx) = EventSender::channel(256, mask);
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if let ProviderMessage::Throttle(m) = msg {
                traffic.total.add_up(m.size);
                let wait = traffic.up.reserve(m.size);
                tokio::spawn(async move {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    m.tx.send(Ok(())).await.ok();
                });
            }
        }
    });
    tx
}

/// The gossip topic of a run.
fn topic_of(run_id: RunId) -> TopicId {
    let mut seed = b"starling/topic/".to_vec();
    seed.extend_from_slice(&run_id.0);
    TopicId::from_bytes(*Hash::new(seed).as_bytes())
}

fn endpoint_addr(member: &Member) -> EndpointAddr {
    EndpointAddr::from_parts(
        member.id,
        member.addrs.iter().copied().map(TransportAddr::Ip),
    )
}

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

/// A running node's network side.
pub struct Net {
    /// What the last transfers from each peer looked like (for the app's peer list).
    peers: Arc<std::sync::Mutex<BTreeMap<EndpointId, PeerStats>>>,
    router: Router,
    store: MemStore,
    gc_gate: GcGate,
    gossip: Gossip,
    sender: GossipSender,
    lookup: MemoryLookup,
    gate: Arc<Gate>,
    key: SecretKey,
    run_id: RunId,
    traffic: Traffic,
}

impl Net {
    /// Bind the endpoint, start serving blobs, gossip and (for a coordinator)
    /// control requests. Returns the node and its event stream.
    pub async fn spawn(config: NetConfig) -> Result<(Self, mpsc::Receiver<NetEvent>), SpawnError> {
        let (events_tx, events_rx) = mpsc::channel(4096);
        let gate = Arc::new(Gate {
            open: AtomicBool::new(config.open),
            allowed: RwLock::new(config.bootstrap.iter().map(|m| m.id).collect()),
            events: events_tx.clone(),
        });
        let lookup = MemoryLookup::new();
        for m in &config.bootstrap {
            lookup.add_endpoint_info(endpoint_addr(m));
        }
        let bind_err = |reason: String| SpawnError::Bind {
            addr: config.bind,
            reason,
        };
        let endpoint = Endpoint::builder(presets::Minimal)
            .secret_key(config.secret_key.clone())
            .clear_ip_transports()
            .bind_addr(config.bind)
            .map_err(|e| bind_err(e.to_string()))?
            .portmapper_config(PortmapperConfig::Disabled)
            .transport_config(
                QuicTransportConfig::builder()
                    .max_idle_timeout(Some(
                        IDLE_TIMEOUT
                            .try_into()
                            .map_err(|e: VarIntBoundsExceeded| bind_err(e.to_string()))?,
                    ))
                    .build(),
            )
            .address_lookup(lookup.clone())
            .hooks(GateHook(gate.clone()))
            .bind()
            .await
            .map_err(|e| bind_err(e.to_string()))?;
        let gc_gate = GcGate::default();
        let store_slot = Arc::new(OnceLock::new());
        let store = MemStore::new_with_opts(Options {
            gc_config: Some(GcConfig {
                interval: GC_INTERVAL,
                add_protected: Some(gc_gate.protect(store_slot.clone())),
            }),
        });
        let _ = store_slot.set(Store::clone(&store));
        let blobs = BlobsProtocol::new(&store, Some(upload_throttle(config.traffic.clone())));
        let gossip = Gossip::builder()
            .max_message_size(GOSSIP_MAX_MESSAGE)
            .spawn(endpoint.clone());
        let mut router = Router::builder(endpoint)
            .accept(iroh_blobs::ALPN, blobs)
            .accept(iroh_gossip::ALPN, gossip.clone());
        if let Some(handler) = config.control.clone() {
            router = router.accept(CONTROL_ALPN, ControlProtocol(handler));
        }
        let router = router.spawn();
        let bootstrap: Vec<EndpointId> = config.bootstrap.iter().map(|m| m.id).collect();
        let topic = gossip
            .subscribe(topic_of(config.run_id), bootstrap)
            .await
            .map_err(|e| SpawnError::Gossip(e.to_string()))?;
        let (sender, mut receiver) = topic.split();
        let run_id = config.run_id;
        tokio::spawn(async move {
            while let Some(event) = receiver.next().await {
                let event = match event {
                    Ok(Event::Received(msg)) => match Message::verify(&msg.content, run_id) {
                        Ok(m) => NetEvent::Message(m),
                        Err(MessageError::WrongRun { .. }) => continue,
                        Err(e) => NetEvent::BadMessage {
                            via: msg.delivered_from,
                            error: e.to_string(),
                        },
                    },
                    Ok(Event::Lagged) => {
                        warn!("gossip receiver lagged; messages were dropped");
                        continue;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        debug!("gossip receiver ended: {e}");
                        break;
                    }
                };
                // Never block the receive loop: gossip is best effort and
                // everything that matters is re-sent or fetched again.
                if events_tx.try_send(event).is_err() {
                    warn!("event queue full; dropped a gossip message");
                }
            }
        });
        Ok((
            Self {
                router,
                store,
                gc_gate,
                gossip,
                sender,
                lookup,
                gate,
                key: config.secret_key,
                run_id: config.run_id,
                traffic: config.traffic,
                peers: Arc::default(),
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

    /// Admit `members` (plus the always-admitted `keep`), learn their
    /// addresses and gossip with them; everyone else is refused from now on.
    pub async fn set_members(&self, members: &[Member], keep: &[EndpointId]) {
        let me = self.id();
        let mut allowed: HashSet<EndpointId> = keep.iter().copied().collect();
        let mut new = Vec::new();
        for m in members.iter().filter(|m| m.id != me) {
            self.lookup.set_endpoint_info(endpoint_addr(m));
            allowed.insert(m.id);
            new.push(m.id);
        }
        *self.gate.allowed.write().unwrap_or_else(|e| e.into_inner()) = allowed;
        if !new.is_empty()
            && let Err(e) = self.sender.join_peers(new).await
        {
            debug!("gossip join_peers: {e}");
        }
    }

    /// Gossip a signed message (see [`Message::sign`]).
    pub async fn broadcast(&self, signed: Vec<u8>) -> Result<(), BroadcastError> {
        self.sender
            .broadcast(Bytes::from(signed))
            .await
            .map_err(|e| BroadcastError(e.to_string()))
    }

    /// Store `bytes` as a blob kept under `tag` until [`Net::forget`] drops it.
    pub async fn publish(&self, tag: &str, bytes: Vec<u8>) -> Result<BlobRef, PublishError> {
        let size = bytes.len() as u64;
        let _creating = self.gc_gate.creating().await;
        let hf = self
            .store
            .add_bytes(bytes)
            .with_named_tag(tag)
            .await
            .map_err(|e| PublishError(e.to_string()))?;
        Ok(BlobRef {
            hash: *hf.hash.as_bytes(),
            size,
        })
    }

    /// Drop every blob tag starting with `prefix` (the store collects the blobs).
    pub async fn forget(&self, prefix: &str) {
        if let Err(e) = self.store.tags().delete_prefix(prefix).await {
            warn!("cannot delete tags {prefix}: {e}");
        }
    }

    /// A temporary tag that keeps `hash` (and whatever arrives for it) from
    /// the garbage collector until dropped.
    async fn hold(&self, hash: Hash) -> Result<iroh_blobs::api::TempTag, FetchError> {
        let _creating = self.gc_gate.creating().await;
        self.store
            .tags()
            .temp_tag(hash)
            .await
            .map_err(|e| FetchError::Store(e.to_string()))
    }

    /// Bytes of a blob this node holds completely, if it does.
    async fn local(&self, blob: &BlobRef) -> Option<Bytes> {
        let hash = Hash::from_bytes(blob.hash);
        match self.store.has(hash).await {
            Ok(true) => self.store.get_bytes(hash).await.ok(),
            _ => None,
        }
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
        if blob.size > max_bytes {
            return Err(FetchError::TooLarge {
                size: blob.size,
                max: max_bytes,
            });
        }
        let hash = Hash::from_bytes(blob.hash);
        let store_err = |e: &dyn std::fmt::Display| FetchError::Store(e.to_string());
        // Hold the data against garbage collection until it is tagged.
        let _guard = self.hold(hash).await?;
        if let Some(bytes) = self.local(blob).await {
            self.store
                .tags()
                .set(tag, hash)
                .await
                .map_err(|e| store_err(&e))?;
            return Ok(bytes);
        }
        let me = self.id();
        let mut last = String::from("no provider");
        for &provider in providers.iter().filter(|p| **p != me) {
            let fetch = self.fetch_from(provider, hash, blob.size, progress);
            match timeout(time_limit, fetch).await {
                Ok(Ok(())) => {
                    self.store
                        .tags()
                        .set(tag, hash)
                        .await
                        .map_err(|e| store_err(&e))?;
                    return self.store.get_bytes(hash).await.map_err(|e| store_err(&e));
                }
                Ok(Err(e @ FetchError::SizeMismatch { .. })) => return Err(e),
                Ok(Err(e)) => last = format!("{}: {e}", provider.fmt_short()),
                Err(_) => last = format!("{}: timed out", provider.fmt_short()),
            }
        }
        Err(FetchError::Unavailable(last))
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
        if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > blob.size) {
            return Err(FetchError::OutOfRange {
                start: r.start,
                end: r.end,
                size: blob.size,
            });
        }
        let hash = Hash::from_bytes(blob.hash);
        let store_err = |e: &dyn std::fmt::Display| FetchError::Store(e.to_string());
        let mut wanted = ChunkRanges::empty();
        for r in ranges {
            wanted |= ChunkRanges::bytes(r.clone());
        }
        let _guard = self.hold(hash).await?;
        let local = self
            .store
            .remote()
            .local_for_request(GetRequest::blob_ranges(hash, wanted))
            .await
            .map_err(|e| store_err(&e))?;
        if !local.is_complete() {
            let request = local.missing();
            let me = self.id();
            let mut last = String::from("no provider");
            let mut done = false;
            for &provider in providers.iter().filter(|p| **p != me) {
                let get = async {
                    let conn = self.blob_connection(provider).await?;
                    let pair = self.throttled_pair(&conn).await?;
                    let stats = self
                        .store
                        .remote()
                        .execute_get(pair, request.clone())
                        .await
                        .map_err(|e| FetchError::Unavailable(e.to_string()))?;
                    self.observe(provider, &conn, &stats);
                    Ok::<_, FetchError>(())
                };
                match timeout(time_limit, get).await {
                    Ok(Ok(_)) => {
                        done = true;
                        break;
                    }
                    Ok(Err(e)) => last = format!("{}: {e}", provider.fmt_short()),
                    Err(_) => last = format!("{}: timed out", provider.fmt_short()),
                }
            }
            if !done {
                return Err(FetchError::Unavailable(last));
            }
        }
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let bytes = self
                .store
                .export_ranges(hash, r.clone())
                .concatenate()
                .await
                .map_err(|e| store_err(&e))?;
            if bytes.len() as u64 != r.end - r.start {
                return Err(FetchError::Store(format!(
                    "range {}..{} came back with {} bytes",
                    r.start,
                    r.end,
                    bytes.len()
                )));
            }
            out.push(Bytes::from(bytes));
        }
        Ok(out)
    }

    /// Peers this node fetched from, most recent first.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<PeerStats> = peers.values().cloned().collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.last_unix_ms));
        out
    }

    /// Note a finished transfer of `stats` from `peer` over `conn`.
    fn observe(&self, peer: EndpointId, conn: &Connection, stats: &iroh_blobs::get::Stats) {
        let path = conn
            .paths()
            .iter()
            .find(|p| p.is_selected())
            .map(|p| (p.rtt(), p.is_relay()));
        let bytes = stats.payload_bytes_read;
        let secs = stats.elapsed.as_secs_f64();
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
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

    /// A blob-protocol connection to `provider`.
    async fn blob_connection(&self, provider: EndpointId) -> Result<Connection, FetchError> {
        let unavailable = |e: &dyn std::fmt::Display| FetchError::Unavailable(e.to_string());
        timeout(
            CONNECT_TIMEOUT,
            self.router.endpoint().connect(provider, iroh_blobs::ALPN),
        )
        .await
        .map_err(|e| unavailable(&e))?
        .map_err(|e| unavailable(&e))
    }

    /// A request stream on `conn` whose receive side takes download tokens.
    async fn throttled_pair(
        &self,
        conn: &Connection,
    ) -> Result<StreamPair<Throttled<RecvStream>, SendStream>, FetchError> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| FetchError::Unavailable(e.to_string()))?;
        Ok(StreamPair::new(
            conn.stable_id() as u64,
            Throttled {
                inner: recv,
                traffic: self.traffic.clone(),
            },
            send,
        ))
    }

    async fn fetch_from(
        &self,
        provider: EndpointId,
        hash: Hash,
        declared: u64,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), FetchError> {
        let unavailable = |e: &dyn std::fmt::Display| FetchError::Unavailable(e.to_string());
        let conn = self.blob_connection(provider).await?;
        let (actual, _) = get_verified_size(&conn, &hash)
            .await
            .map_err(|e| unavailable(&e))?;
        if actual != declared {
            return Err(FetchError::SizeMismatch { declared, actual });
        }
        let pair = self.throttled_pair(&conn).await?;
        let mut items = std::pin::pin!(self.store.remote().fetch(pair, hash).stream());
        while let Some(item) = items.next().await {
            match item {
                GetProgressItem::Progress(bytes) => progress(bytes),
                GetProgressItem::Done(stats) => {
                    self.observe(provider, &conn, &stats);
                    return Ok(());
                }
                GetProgressItem::Error(e) => return Err(unavailable(&e)),
            }
        }
        Err(unavailable(&"the transfer ended without a result"))
    }

    /// Send a control request to the coordinator and wait for its answer.
    pub async fn request(&self, to: &Member, request: &Request) -> Result<Response, ControlError> {
        self.lookup.add_endpoint_info(endpoint_addr(to));
        let unreachable = |e: &dyn std::fmt::Display| ControlError::Unreachable(e.to_string());
        let transport = |e: &dyn std::fmt::Display| ControlError::Transport(e.to_string());
        let connect = self.router.endpoint().connect(to.id, CONTROL_ALPN);
        let conn = match timeout(CONNECT_TIMEOUT, connect).await {
            Err(e) => return Err(unreachable(&e)),
            Ok(Err(ConnectError::Connection { source, .. })) if refused_by_gate(&source) => {
                return Err(ControlError::NotAdmitted);
            }
            Ok(Err(e)) => return Err(unreachable(&e)),
            Ok(Ok(conn)) => conn,
        };
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(&e))?;
            let bytes = postcard::to_stdvec(request)?;
            send.write_all(&bytes).await.map_err(|e| transport(&e))?;
            send.finish().map_err(|e| transport(&e))?;
            timeout(
                Duration::from_secs(120),
                recv.read_to_end(MAX_RESPONSE_BYTES),
            )
            .await
            .map_err(|e| transport(&e))?
            .map_err(|e| transport(&e))
        };
        let answer = match exchange.await {
            Ok(a) => a,
            Err(e) => {
                return Err(match conn.close_reason() {
                    Some(reason) if refused_by_gate(&reason) => ControlError::NotAdmitted,
                    _ => e,
                });
            }
        };
        conn.close(0u32.into(), b"done");
        Ok(postcard::from_bytes(&answer)?)
    }

    /// Leave the topic, close every connection and stop serving.
    pub async fn shutdown(self) {
        let _ = self.gossip.shutdown().await;
        if let Err(e) = self.router.shutdown().await {
            debug!("router shutdown: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Body, WeightReport};

    fn config(seed: u8, run_id: RunId, open: bool, bootstrap: Vec<Member>) -> NetConfig {
        NetConfig {
            secret_key: SecretKey::from_bytes(&[seed; 32]),
            bind: "127.0.0.1:0".parse().unwrap(),
            run_id,
            traffic: Traffic::new(None, None),
            open,
            control: None,
            bootstrap,
        }
    }

    async fn next_message(rx: &mut mpsc::Receiver<NetEvent>) -> Message {
        loop {
            match timeout(Duration::from_secs(20), rx.recv()).await {
                Ok(Some(NetEvent::Message(m))) => return m,
                Ok(Some(_)) => continue,
                other => panic!("no message: {other:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_gossip_fetch_and_control_while_outsiders_are_refused() {
        let run = RunId([5; 16]);
        let mut host_cfg = config(1, run, false, vec![]);
        host_cfg.control = Some(Arc::new(|_, _| {
            Box::pin(async {
                Response::Refused {
                    reason: "full".into(),
                }
            })
        }));
        let (host, mut host_rx) = Net::spawn(host_cfg).await.unwrap();
        let peer_key = SecretKey::from_bytes(&[2; 32]);
        let peer_entry = Member {
            id: peer_key.public(),
            addrs: vec![],
        };
        host.set_members(std::slice::from_ref(&peer_entry), &[])
            .await;
        let (peer, _peer_rx) = Net::spawn(config(2, run, false, vec![host.member()]))
            .await
            .unwrap();

        // Control request over a direct stream.
        let answer = peer
            .request(
                &host.member(),
                &Request::Join {
                    run_id: run,
                    addrs: peer.addrs(),
                    since: None,
                },
            )
            .await
            .unwrap();
        assert!(matches!(answer, Response::Refused { .. }));

        // Blob: published by the peer, fetched by the host; size checks first.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let blob = peer.publish("r1/update", data.clone()).await.unwrap();
        host.set_members(&[peer.member()], &[]).await;
        let got = host
            .fetch(
                &blob,
                &[peer.id()],
                1 << 20,
                "r1/x",
                Duration::from_secs(20),
            )
            .await
            .unwrap();
        assert_eq!(&got[..], &data[..]);
        assert!(peer.traffic().total.up() >= data.len() as u64);
        let lying = BlobRef { size: 1000, ..blob };
        let (third, _) = Net::spawn(config(3, run, true, vec![peer.member()]))
            .await
            .unwrap();
        let err = third
            .fetch(
                &lying,
                &[peer.id()],
                1 << 20,
                "r1/z",
                Duration::from_secs(20),
            )
            .await;
        // The peer does not admit node 3: refused at the handshake.
        assert!(matches!(err, Err(FetchError::Unavailable(_))), "{err:?}");
        let too_big = third
            .fetch(&blob, &[peer.id()], 1000, "r1/z", Duration::from_secs(20))
            .await;
        assert!(matches!(too_big, Err(FetchError::TooLarge { .. })));

        // Gossip: a signed message reaches the host, verified.
        let msg = Message::sign(
            peer.secret_key(),
            run,
            3,
            Body::WeightReport(WeightReport { digest: 42 }),
        )
        .unwrap();
        let mut received = None;
        for _ in 0..20 {
            peer.broadcast(msg.clone()).await.unwrap();
            if let Ok(m) = timeout(Duration::from_millis(500), next_message(&mut host_rx)).await {
                received = Some(m);
                break;
            }
        }
        let received = received.expect("gossip message arrived");
        assert_eq!(received.author, peer.id());
        assert_eq!(received.round, 3);

        third.shutdown().await;
        peer.shutdown().await;
        host.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lying_size_is_caught_before_download() {
        let run = RunId([6; 16]);
        let (a, _) = Net::spawn(config(1, run, true, vec![])).await.unwrap();
        let (b, _) = Net::spawn(config(2, run, true, vec![a.member()]))
            .await
            .unwrap();
        let blob = a.publish("r1/u", vec![7u8; 50_000]).await.unwrap();
        let lying = BlobRef { size: 1000, ..blob };
        let err = b
            .fetch(&lying, &[a.id()], 1 << 20, "r1/u", Duration::from_secs(20))
            .await;
        assert!(
            matches!(err, Err(FetchError::SizeMismatch { actual: 50_000, .. })),
            "{err:?}"
        );
        assert!(
            b.traffic().total.down() < 20_000,
            "downloaded {}",
            b.traffic().total.down()
        );
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_reports_progress_up_to_the_size() {
        let run = RunId([10; 16]);
        let (a, _) = Net::spawn(config(1, run, true, vec![])).await.unwrap();
        let (b, _) = Net::spawn(config(2, run, true, vec![a.member()]))
            .await
            .unwrap();
        let size = 3 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let blob = a.publish("ckpt", data.clone()).await.unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let got = b
            .fetch_observed(
                &blob,
                &[a.id()],
                1 << 30,
                "ckpt",
                Duration::from_secs(30),
                &|n| seen.lock().unwrap().push(n),
            )
            .await
            .unwrap();
        assert_eq!(&got[..], &data[..]);
        let seen = seen.into_inner().unwrap();
        assert!(seen.len() > 10, "only {} progress reports", seen.len());
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "not monotonic");
        assert_eq!(*seen.last().unwrap(), size as u64);
        // The peer list: who it came from, over which path, how fast.
        let peers = b.peer_stats();
        assert_eq!(peers.len(), 1);
        let p = &peers[0];
        assert_eq!(
            (p.id, p.bytes_down, p.relayed),
            (a.id(), size as u64, false)
        );
        assert!(p.rtt_ms.is_some_and(|ms| ms < 1000.0), "{p:?}");
        assert!(p.down_bytes_per_sec.is_some_and(|r| r > 0.0), "{p:?}");
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::single_range_in_vec_init)]
    async fn byte_ranges_fetch_only_their_chunks_verified() {
        let run = RunId([7; 16]);
        let (a, _) = Net::spawn(config(1, run, true, vec![])).await.unwrap();
        let (b, _) = Net::spawn(config(2, run, true, vec![a.member()]))
            .await
            .unwrap();
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let blob = a.publish("data", data.clone()).await.unwrap();
        assert_eq!(blob, BlobRef::of(&data));
        let ranges = [100..230, 2_000_001..2_000_131, 3_999_900..4_000_000];
        let got = b
            .fetch_ranges(&blob, &ranges, &[a.id()], Duration::from_secs(20))
            .await
            .unwrap();
        for (r, bytes) in ranges.iter().zip(&got) {
            assert_eq!(&bytes[..], &data[r.start as usize..r.end as usize]);
        }
        let down = b.traffic().total.down();
        eprintln!("three ranges of 100-130 bytes in a 4 MB blob: {down} bytes down");
        assert!(down < 200_000, "three small ranges cost {down} bytes");
        // Already held ranges are not fetched again (the guard keeps them
        // until the call returns, so ask for them in one call twice over).
        let again = b
            .fetch_ranges(
                &blob,
                &[100..230, 100..230],
                &[a.id()],
                Duration::from_secs(20),
            )
            .await
            .unwrap();
        assert_eq!(again[0], again[1]);
        assert!(matches!(
            b.fetch_ranges(
                &blob,
                &[3_999_990..4_000_001],
                &[a.id()],
                Duration::from_secs(5)
            )
            .await,
            Err(FetchError::OutOfRange { .. })
        ));
        // Another blob's hash with this size: nothing verifies, nothing returned.
        let forged = BlobRef {
            hash: BlobRef::of(b"something else").hash,
            ..blob
        };
        assert!(matches!(
            b.fetch_ranges(&forged, &[0..10], &[a.id()], Duration::from_secs(5))
                .await,
            Err(FetchError::Unavailable(_))
        ));
        a.shutdown().await;
        b.shutdown().await;
    }

    /// Blobs published while the store collects garbage stay: before the GC
    /// gate, one published in the window between the GC's mark and its sweep
    /// was deleted although tagged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blobs_published_during_garbage_collection_survive_it() {
        let (a, _) = Net::spawn(config(9, RunId([9; 16]), true, vec![]))
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        let mut kept = Vec::new();
        let mut i = 0u32;
        // Two GC runs (every 5 s), each with garbage to sweep.
        while start.elapsed() < GC_INTERVAL * 2 + Duration::from_millis(500) {
            let blob = a
                .publish(&format!("keep/{i}"), i.to_le_bytes().repeat(8))
                .await
                .unwrap();
            a.publish(&format!("junk/{i}"), ((i + 1) << 20).to_le_bytes().to_vec())
                .await
                .unwrap();
            if i.is_multiple_of(50) {
                a.forget("junk/").await;
            }
            kept.push(blob);
            i += 1;
        }
        let mut lost = 0;
        for blob in &kept {
            if a.local(blob).await.is_none() {
                lost += 1;
            }
        }
        eprintln!(
            "published {} kept blobs during 2 GC runs, lost {lost}",
            kept.len()
        );
        assert_eq!(lost, 0);
        a.shutdown().await;
    }

    /// Fetch `size` bytes from `from` to `to` while sampling `counter` every
    /// 250 ms; returns (bytes, seconds) samples from first to last byte.
    async fn paced_transfer(from: &Net, to: &Net, size: usize, tag: &str) -> Vec<(u64, f64)> {
        let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let blob = from.publish(tag, data).await.unwrap();
        let start = tokio::time::Instant::now();
        let counter = to.traffic().total.clone();
        let base = counter.down();
        let sampler = tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                samples.push((counter.down() - base, start.elapsed().as_secs_f64()));
                if counter.down() - base >= size as u64 {
                    return samples;
                }
            }
        });
        to.fetch(&blob, &[from.id()], 1 << 30, tag, Duration::from_secs(60))
            .await
            .unwrap();
        sampler.await.unwrap()
    }

    fn check_rate(samples: &[(u64, f64)], cap_bytes_per_sec: f64, what: &str) {
        // Over the whole transfer (about 10 s): within 5% of the cap.
        let first = samples.iter().find(|(b, _)| *b > 0).copied().unwrap();
        let last = *samples.last().unwrap();
        let rate = (last.0 - first.0) as f64 / (last.1 - first.1);
        let worst = samples
            .windows(5)
            .map(|w| (w[4].0 - w[0].0) as f64 / (w[4].1 - w[0].1))
            .fold(0.0, f64::max);
        eprintln!(
            "{what}: {rate:.0} B/s over {:.1} s against {cap_bytes_per_sec:.0} B/s ({:+.2}%), busiest second {:+.2}%",
            last.1 - first.1,
            (rate / cap_bytes_per_sec - 1.0) * 100.0,
            (worst / cap_bytes_per_sec - 1.0) * 100.0
        );
        assert!(
            (rate / cap_bytes_per_sec - 1.0).abs() < 0.05,
            "{what}: {rate:.0} B/s against a cap of {cap_bytes_per_sec:.0} B/s"
        );
        // Smooth: no one-second window more than 15% over the cap.
        for w in samples.windows(5) {
            let r = (w[4].0 - w[0].0) as f64 / (w[4].1 - w[0].1);
            assert!(
                r < cap_bytes_per_sec * 1.15,
                "{what}: a burst of {r:.0} B/s"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_and_download_caps_hold_within_five_percent() {
        let run = RunId([7; 16]);
        let mbit = 8.0;
        let cap = crate::bandwidth::mbit_to_bytes_per_sec(mbit);
        let size = (cap * 10.0) as usize;
        // Upload: a capped provider, an unlimited receiver.
        let mut up_cfg = config(1, run, true, vec![]);
        up_cfg.traffic = Traffic::new(Some(mbit), None);
        let (a, _) = Net::spawn(up_cfg).await.unwrap();
        let (b, _) = Net::spawn(config(2, run, true, vec![a.member()]))
            .await
            .unwrap();
        // Download: an unlimited provider, a capped receiver.
        let (c, _) = Net::spawn(config(3, run, true, vec![])).await.unwrap();
        let mut down_cfg = config(4, run, true, vec![c.member()]);
        down_cfg.traffic = Traffic::new(None, Some(mbit));
        let (d, _) = Net::spawn(down_cfg).await.unwrap();
        let (up, down) = tokio::join!(
            paced_transfer(&a, &b, size, "cap/up"),
            paced_transfer(&c, &d, size, "cap/down")
        );
        check_rate(&up, cap, "upload cap");
        check_rate(&down, cap, "download cap");
        for n in [a, b, c, d] {
            n.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wildcard_bind_advertises_dialable_addresses() {
        let mut cfg = config(1, RunId([8; 16]), true, vec![]);
        cfg.bind = "0.0.0.0:0".parse().unwrap();
        let (n, _) = Net::spawn(cfg).await.unwrap();
        let addrs = n.addrs();
        assert!(addrs.iter().all(|a| !a.ip().is_unspecified()), "{addrs:?}");
        assert!(addrs.iter().any(|a| a.ip().is_loopback()), "{addrs:?}");
        // A peer on this machine reaches it through what it advertises.
        let (m, _) = Net::spawn(config(2, RunId([8; 16]), true, vec![n.member()]))
            .await
            .unwrap();
        let blob = n.publish("t", vec![1u8; 1000]).await.unwrap();
        m.fetch(&blob, &[n.id()], 1 << 20, "t", Duration::from_secs(20))
            .await
            .unwrap();
        n.shutdown().await;
        m.shutdown().await;
    }
}
