//! Publishing and fetching blobs (updates, checkpoints, data shards).
//!
//! A blob comes from peers that may lie or vanish, and may be large, so a
//! fetch proves the blob's size against its hash before downloading it (an
//! announce that lies about its size, or an update bigger than the round
//! allows, costs one chunk, not the download), verifies every chunk as it
//! streams in, and tries the next provider when one fails. The errors keep
//! the difference the caller acts on: a blob nobody delivered is not held
//! against its sender; one that is not what was announced is.

use std::{
    error::Error,
    fmt,
    future::Future,
    ops::Range,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use iroh::{
    Endpoint, EndpointId,
    endpoint::{ConnectError, Connection, ConnectionError},
};
use iroh_blobs::{
    BlobsProtocol, Hash,
    api::{ExportBaoError, RequestError, TempTag, remote::GetProgressItem},
    get::{GetError, request::get_verified_size},
    protocol::{ChunkRanges, ChunkRangesExt, GetRequest},
    store::mem::MemStore,
};
use n0_future::StreamExt;
use tokio::time::timeout;
use tracing::{debug, warn};

use super::{
    CONNECT_TIMEOUT,
    corrupt::{CorruptRelay, Own},
    dialer::Dialer,
    fair::Fair,
    gate::refused_by_gate,
    gc::{GcGate, gated_store},
    peers::{PeerBook, PeerStats},
    served::Served,
    throttle::{provider_events, throttled_pair},
};
use crate::{
    bandwidth::{Grant, Traffic},
    message::{BlobHash, BlobRef},
};

/// How soon a provider must answer on a connection kept from an earlier
/// ask before a new connection is dialled (see [`Blobs::prove_size`]).
const KEPT_ANSWER: Duration = Duration::from_secs(2);

/// How long a provider may send nothing mid-transfer before it is dropped
/// for the next one, unless the node sets another (`Net::set_stall_timeout`).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a blob could not be published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The blob store refused the bytes or the tag.
    #[error("cannot store the {size}-byte blob under tag {tag:?}: {source:#}")]
    Store {
        /// The tag it was to be kept under.
        tag: String,
        /// Its size in bytes.
        size: u64,
        /// What the store reported.
        #[source]
        source: RequestError,
    },
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
    /// No provider delivered the blob.
    #[error("no provider delivered blob {} ({})", short(&.blob.hash), LastAttempt(.last.as_ref()))]
    Unavailable {
        /// The blob.
        blob: BlobRef,
        /// The last provider asked and why it failed (`None`: no provider
        /// other than this node was given).
        #[source]
        last: Option<ProviderError>,
    },
    /// Fetching it would take this node's data use past its monthly cap.
    #[error("fetching {size} bytes would pass this month's data cap")]
    OverBudget {
        /// The bytes the fetch needs.
        size: u64,
    },
    /// The blob store could not protect the blob from garbage collection.
    #[error("blob store: cannot hold blob {} against garbage collection: {source:#}", short(&.blob.hash))]
    Hold {
        /// The blob.
        blob: BlobRef,
        /// What the store reported.
        #[source]
        source: Box<dyn Error + Send + Sync + 'static>,
    },
    /// The blob store could not tag the blob.
    #[error("blob store: cannot tag blob {} as {tag:?}: {source:#}", short(&.blob.hash))]
    Tag {
        /// The blob.
        blob: BlobRef,
        /// The tag.
        tag: String,
        /// What the store reported.
        #[source]
        source: RequestError,
    },
    /// The blob store could not hand back a blob it holds.
    #[error("blob store: cannot read blob {}: {source:#}", short(&.blob.hash))]
    Read {
        /// The blob.
        blob: BlobRef,
        /// What the store reported.
        #[source]
        source: ExportBaoError,
    },
    /// The blob store could not tell which chunks of the blob it holds.
    #[error("blob store: cannot list the chunks held of blob {}: {source:#}", short(&.blob.hash))]
    Inventory {
        /// The blob.
        blob: BlobRef,
        /// What the store reported.
        #[source]
        source: Box<dyn Error + Send + Sync + 'static>,
    },
    /// The blob store could not hand back a byte range it holds.
    #[error("blob store: cannot read bytes {start}..{end} of blob {}: {source:#}", short(&.blob.hash))]
    ReadRange {
        /// The blob.
        blob: BlobRef,
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
        /// What the store reported.
        #[source]
        source: RequestError,
    },
    /// The blob store handed back fewer bytes than the range holds.
    #[error("blob store: bytes {start}..{end} of blob {} came back as {got} bytes", short(&.blob.hash))]
    ShortRange {
        /// The blob.
        blob: BlobRef,
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
        /// How many bytes came back.
        got: u64,
    },
}

/// Why one provider did not deliver a blob.
#[derive(Debug, thiserror::Error)]
#[error("{}: {failure}", .provider.fmt_short())]
#[non_exhaustive]
pub struct ProviderError {
    /// The provider.
    pub provider: EndpointId,
    /// What went wrong.
    #[source]
    pub failure: ProviderFailure,
}

/// What went wrong with one provider.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderFailure {
    /// Dialling it took too long.
    #[error("no connection within {after:?}")]
    ConnectTimeout {
        /// How long the dial was given.
        after: Duration,
    },
    /// Dialling it failed.
    #[error("cannot connect: {source:#}")]
    Connect {
        /// Why the connection failed.
        #[source]
        source: ConnectError,
    },
    /// Its gate refused this node (it does not count this node as a member).
    #[error("it does not admit this node")]
    NotAdmitted,
    /// The connection broke before a request stream opened.
    #[error("cannot open a stream: {source}")]
    Stream {
        /// Why the stream did not open.
        #[source]
        source: ConnectionError,
    },
    /// It could not prove the blob's size (it does not have the blob, or the
    /// connection broke).
    #[error("cannot prove the blob's size: {source:#}")]
    Size {
        /// What the request reported.
        #[source]
        source: GetError,
    },
    /// It proved the empty blob: it does not hold this one (yet; a node
    /// whose own fetch has begun serves the empty entry it keeps until the
    /// first bytes arrive).
    #[error("it does not hold the blob yet")]
    NotHeld,
    /// The transfer failed (the provider lacks the data, sent data that does
    /// not verify, or the connection broke).
    #[error("transfer failed: {source:#}")]
    Transfer {
        /// What the transfer reported.
        #[source]
        source: GetError,
    },
    /// The transfer ended without saying whether it completed.
    #[error("the transfer ended without a result")]
    Ended,
    /// The provider did not deliver within the caller's time limit.
    #[error("no complete transfer within {after:?}")]
    TimedOut {
        /// The caller's time limit.
        after: Duration,
    },
    /// The provider sent nothing for this long in the middle of a
    /// transfer (or of its size proof): the next provider is asked.
    #[error("it stalled: nothing for {after:?}")]
    Stalled {
        /// The stall timeout.
        after: Duration,
    },
}

impl ProviderFailure {
    /// Whether the provider answered, over a working connection, that it
    /// does not hold the blob (yet).
    fn lacks_blob(&self) -> bool {
        matches!(
            self,
            Self::NotHeld | Self::Size { .. } | Self::Transfer { .. }
        ) && !self.is_corrupt()
    }

    /// Whether the provider sent bytes that are not the blob (they fail
    /// BLAKE3 verification): a provider that lies, not one that merely
    /// lacks the blob or went away.
    pub fn is_corrupt(&self) -> bool {
        match self {
            Self::Size { source } | Self::Transfer { source } => hash_mismatch(source),
            _ => false,
        }
    }
}

/// Whether a transfer failed because a chunk did not verify.
/// Whether a size proof failed because the provider proved the empty blob
/// where a larger one was asked for: what a node serves from the empty
/// entry its own fetch of the blob leaves until the first bytes arrive (a
/// parent in a round's tree, asked by its children meanwhile). It lacks the
/// blob; it does not lie. A provider that lies about a larger blob fails on
/// its last chunk, not on chunk 0.
fn proved_empty(e: &GetError, declared: u64) -> bool {
    use iroh_blobs::get::fsm::DecodeError;
    declared > 1024
        && matches!(
            e,
            GetError::Decode {
                source: DecodeError::LeafHashMismatch { num, .. },
                ..
            } if num.0 == 0
        )
}

fn hash_mismatch(e: &GetError) -> bool {
    use iroh_blobs::get::fsm::DecodeError;
    matches!(
        e,
        GetError::Decode {
            source: DecodeError::ParentHashMismatch { .. } | DecodeError::LeafHashMismatch { .. },
            ..
        }
    )
}

/// The short form of a blob hash (as iroh shows endpoint ids).
fn short(hash: &BlobHash) -> impl fmt::Display + use<> {
    Hash::from_bytes(*hash).fmt_short()
}

/// The parenthesised tail of [`FetchError::Unavailable`]'s message.
struct LastAttempt<'a>(Option<&'a ProviderError>);

impl fmt::Display for LastAttempt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(e) => write!(f, "last error: {e}"),
            None => f.write_str("no other node was asked"),
        }
    }
}

/// How one provider's attempt ended, short of success.
enum Attempt {
    /// The provider failed; the next one may do better.
    Provider(ProviderFailure),
    /// The blob is not what was declared: no provider can fix that.
    Fatal(FetchError),
}

impl From<ProviderFailure> for Attempt {
    fn from(failure: ProviderFailure) -> Self {
        Self::Provider(failure)
    }
}

impl Attempt {
    /// Report a provider failure on a connection its gate closed as
    /// [`ProviderFailure::NotAdmitted`]: the gate may close the connection
    /// only after the handshake completed on this side.
    fn or_refused(self, conn: &Connection) -> Self {
        match self {
            Self::Provider(_) if conn.close_reason().is_some_and(|r| refused_by_gate(&r)) => {
                Self::Provider(ProviderFailure::NotAdmitted)
            }
            other => other,
        }
    }
}

/// The node's blob store and the means to fill it from peers.
pub(super) struct Blobs {
    pub(super) store: MemStore,
    gc: GcGate,
    endpoint: Endpoint,
    traffic: Traffic,
    peers: PeerBook,
    own: Own,
    pub(super) dialer: Dialer,
    served: Served,
    fair: Fair,
    /// The stall timeout, in milliseconds.
    stall_ms: AtomicU64,
}

impl Blobs {
    /// An empty store whose transfers run over `endpoint` under `traffic`'s caps.
    pub(super) fn new(endpoint: Endpoint, traffic: Traffic) -> Self {
        let (store, gc) = gated_store();
        Self {
            store,
            gc,
            endpoint,
            traffic,
            peers: PeerBook::default(),
            own: Own::default(),
            dialer: Dialer::default(),
            served: Served::default(),
            fair: Fair::default(),
            stall_ms: AtomicU64::new(DEFAULT_STALL_TIMEOUT.as_millis() as u64),
        }
    }

    /// See [`super::Net::set_stall_timeout`].
    pub(super) fn set_stall_timeout(&self, after: Duration) {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1);
        self.stall_ms.store(ms, Ordering::Relaxed);
    }

    fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.stall_ms.load(Ordering::Relaxed))
    }

    /// The protocol that serves this store's complete blobs to peers, under
    /// the upload cap.
    pub(super) fn protocol(&self) -> BlobsProtocol {
        BlobsProtocol::new(
            &self.store,
            Some(provider_events(
                self.traffic.clone(),
                self.served.clone(),
                self.fair.clone(),
            )),
        )
    }

    /// A protocol that serves this node's own blobs and corrupts every
    /// other (see [`CorruptRelay`]).
    pub(super) fn corrupt_relay(&self) -> CorruptRelay {
        CorruptRelay {
            store: (*self.store).clone(),
            events: provider_events(self.traffic.clone(), self.served.clone(), self.fair.clone()),
            own: self.own.clone(),
        }
    }

    /// See [`super::Net::served_bytes`].
    pub(super) fn served_bytes(&self, blob: &BlobRef) -> u64 {
        self.served.bytes(&Hash::from_bytes(blob.hash))
    }

    /// Peers fetched from, most recent first.
    pub(super) fn peer_stats(&self) -> Vec<PeerStats> {
        self.peers.snapshot()
    }

    /// See [`super::Net::publish`].
    pub(super) async fn publish(&self, tag: &str, bytes: Vec<u8>) -> Result<BlobRef, PublishError> {
        let size = bytes.len() as u64;
        let _creating = self.gc.creating().await;
        let hf = self
            .store
            .add_bytes(bytes)
            .with_named_tag(tag)
            .await
            .map_err(|source| PublishError::Store {
                tag: tag.to_owned(),
                size,
                source,
            })?;
        self.own.add(hf.hash);
        self.fair.size(hf.hash, size);
        Ok(BlobRef {
            hash: *hf.hash.as_bytes(),
            size,
        })
    }

    /// See [`super::Net::serve_without_limit`].
    pub(super) fn serve_without_limit(&self, blob: &BlobRef) {
        self.fair.exempt(Hash::from_bytes(blob.hash));
    }

    /// See [`super::Net::forget`].
    pub(super) async fn forget(&self, prefix: &str) {
        if let Err(e) = self.store.tags().delete_prefix(prefix).await {
            warn!("cannot delete tags {prefix}: {e:#}");
        }
    }

    /// A temporary tag that keeps `blob` (and whatever arrives for it) from
    /// the garbage collector until dropped.
    async fn hold(&self, blob: &BlobRef) -> Result<TempTag, FetchError> {
        let _creating = self.gc.creating().await;
        self.store
            .tags()
            .temp_tag(Hash::from_bytes(blob.hash))
            .await
            .map_err(|e| FetchError::Hold {
                blob: *blob,
                source: Box::new(e),
            })
    }

    /// Keep `blob` under `tag`.
    async fn tag(&self, blob: &BlobRef, tag: &str) -> Result<(), FetchError> {
        self.store
            .tags()
            .set(tag, Hash::from_bytes(blob.hash))
            .await
            .map_err(|source| FetchError::Tag {
                blob: *blob,
                tag: tag.to_owned(),
                source,
            })
    }

    /// Bytes of a blob this node holds completely, if it does.
    pub(super) async fn local(&self, blob: &BlobRef) -> Option<Bytes> {
        let hash = Hash::from_bytes(blob.hash);
        match self.store.has(hash).await {
            Ok(true) => self.store.get_bytes(hash).await.ok(),
            _ => None,
        }
    }

    /// See [`super::Net::fetch_observed`].
    pub(super) async fn fetch(
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
        // Hold the data against garbage collection until it is tagged.
        let _guard = self.hold(blob).await?;
        if let Some(bytes) = self.local(blob).await {
            self.tag(blob, tag).await?;
            return Ok(bytes);
        }
        let grant = self
            .take_budget(blob.size)
            .ok_or(FetchError::OverBudget { size: blob.size })?;
        self.first_provider(blob, providers, time_limit, |provider| {
            self.fetch_from(provider, blob, progress, &grant)
        })
        .await?;
        self.tag(blob, tag).await?;
        self.fair.size(Hash::from_bytes(blob.hash), blob.size);
        self.store
            .get_bytes(Hash::from_bytes(blob.hash))
            .await
            .map_err(|source| FetchError::Read {
                blob: *blob,
                source,
            })
    }

    /// See [`super::Net::fetch_ranges`].
    pub(super) async fn fetch_ranges(
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
        let mut wanted = ChunkRanges::empty();
        for r in ranges {
            wanted |= ChunkRanges::bytes(r.clone());
        }
        let _guard = self.hold(blob).await?;
        let local = self
            .store
            .remote()
            .local_for_request(GetRequest::blob_ranges(hash, wanted))
            .await
            .map_err(|e| FetchError::Inventory {
                blob: *blob,
                source: e.into(),
            })?;
        if !local.is_complete() {
            let size = ranges
                .iter()
                .fold(0u64, |n, r| n.saturating_add(r.end - r.start));
            let grant = self
                .take_budget(size)
                .ok_or(FetchError::OverBudget { size })?;
            let request = local.missing();
            self.first_provider(blob, providers, time_limit, |provider| {
                self.get_from(provider, request.clone(), &grant)
            })
            .await?;
        }
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let bytes = self
                .store
                .export_ranges(hash, r.clone())
                .concatenate()
                .await
                .map_err(|source| FetchError::ReadRange {
                    blob: *blob,
                    start: r.start,
                    end: r.end,
                    source,
                })?;
            if bytes.len() as u64 != r.end - r.start {
                return Err(FetchError::ShortRange {
                    blob: *blob,
                    start: r.start,
                    end: r.end,
                    got: bytes.len() as u64,
                });
            }
            out.push(Bytes::from(bytes));
        }
        Ok(out)
    }

    /// Take `size` bytes from the monthly budget before a download starts:
    /// refusing before the first byte is what keeps the cap from being
    /// overshot by a transfer already under way.
    fn take_budget(&self, size: u64) -> Option<Arc<Grant>> {
        self.traffic.budget.grant(size).map(Arc::new)
    }

    /// Run `attempt` against each of `providers` but this node in turn, each
    /// within `time_limit`, until one succeeds or fails fatally.
    async fn first_provider<F, Fut>(
        &self,
        blob: &BlobRef,
        providers: &[EndpointId],
        time_limit: Duration,
        attempt: F,
    ) -> Result<(), FetchError>
    where
        F: Fn(EndpointId) -> Fut,
        Fut: Future<Output = Result<(), Attempt>>,
    {
        let me = self.endpoint.id();
        let mut last = None;
        for &provider in providers.iter().filter(|p| **p != me) {
            let failure = match timeout(time_limit, attempt(provider)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(Attempt::Fatal(e))) => return Err(e),
                Ok(Err(Attempt::Provider(failure))) => failure,
                Err(_) => ProviderFailure::TimedOut { after: time_limit },
            };
            // A provider that merely lacks the blob keeps its connection for
            // the next ask; after anything else the next ask dials afresh.
            if !failure.lacks_blob() {
                self.dialer.forget(&provider);
            }
            let error = ProviderError { provider, failure };
            debug!("blob {}: {error}", short(&blob.hash));
            last = Some(error);
        }
        Err(FetchError::Unavailable { blob: *blob, last })
    }

    /// A new blob-protocol connection to `provider`, kept for the next ask.
    async fn dial(&self, provider: EndpointId) -> Result<Connection, ProviderFailure> {
        let conn = match timeout(
            CONNECT_TIMEOUT,
            self.endpoint.connect(provider, iroh_blobs::ALPN),
        )
        .await
        {
            Err(_) => Err(ProviderFailure::ConnectTimeout {
                after: CONNECT_TIMEOUT,
            }),
            Ok(Err(ConnectError::Connection { source, .. })) if refused_by_gate(&source) => {
                Err(ProviderFailure::NotAdmitted)
            }
            Ok(Err(source)) => Err(ProviderFailure::Connect { source }),
            Ok(Ok(conn)) => Ok(conn),
        }?;
        self.dialer.keep(provider, &conn);
        Ok(conn)
    }

    /// Have `provider` prove `hash`'s size, on the connection kept from an
    /// earlier ask if it answers within [`KEPT_ANSWER`], else on a new one:
    /// a peer that restarted on the same key and port leaves the kept
    /// connection silently dead, and asking on it would cost the attempt's
    /// whole time limit. Returns the connection that answered.
    async fn prove_size(
        &self,
        provider: EndpointId,
        blob: &BlobRef,
    ) -> Result<(Connection, u64), Attempt> {
        let hash = Hash::from_bytes(blob.hash);
        let failed = |source: GetError, conn: &Connection| {
            let failure = if proved_empty(&source, blob.size) {
                ProviderFailure::NotHeld
            } else {
                ProviderFailure::Size { source }
            };
            Attempt::from(failure).or_refused(conn)
        };
        if let Some(conn) = self.dialer.get(&provider) {
            match timeout(KEPT_ANSWER, get_verified_size(&conn, &hash)).await {
                Ok(Ok((size, _))) => return Ok((conn, size)),
                Ok(Err(source)) if conn.close_reason().is_none() => {
                    return Err(failed(source, &conn));
                }
                // Silent, or the connection ended: ask on a new one.
                _ => self.dialer.forget(&provider),
            }
        }
        let conn = self.dial(provider).await?;
        let stall = self.stall_timeout();
        match timeout(stall, get_verified_size(&conn, &hash)).await {
            Ok(Ok((size, _))) => Ok((conn, size)),
            Ok(Err(source)) => Err(failed(source, &conn)),
            Err(_) => Err(ProviderFailure::Stalled { after: stall }.into()),
        }
    }

    /// Fetch all of `blob` from `provider`, after it proved the declared size.
    async fn fetch_from(
        &self,
        provider: EndpointId,
        blob: &BlobRef,
        progress: &(dyn Fn(u64) + Send + Sync),
        grant: &Arc<Grant>,
    ) -> Result<(), Attempt> {
        let hash = Hash::from_bytes(blob.hash);
        let (conn, actual) = self.prove_size(provider, blob).await?;
        if actual != blob.size {
            return Err(Attempt::Fatal(FetchError::SizeMismatch {
                declared: blob.size,
                actual,
            }));
        }
        let result = async {
            let pair = throttled_pair(&conn, &self.traffic, grant)
                .await
                .map_err(|source| ProviderFailure::Stream { source })?;
            let mut items = std::pin::pin!(self.store.remote().fetch(pair, hash).stream());
            let stall = self.stall_timeout();
            loop {
                let Ok(item) = timeout(stall, items.next()).await else {
                    return Err(ProviderFailure::Stalled { after: stall });
                };
                let Some(item) = item else { break };
                match item {
                    GetProgressItem::Progress(bytes) => progress(bytes),
                    GetProgressItem::Done(stats) => {
                        self.peers.observe(provider, &conn, &stats);
                        return Ok(());
                    }
                    GetProgressItem::Error(source) => {
                        return Err(ProviderFailure::Transfer { source });
                    }
                }
            }
            Err(ProviderFailure::Ended)
        }
        .await;
        result.map_err(|e| Attempt::from(e).or_refused(&conn))
    }

    /// Run `request` (the chunks this node lacks) against `provider`.
    async fn get_from(
        &self,
        provider: EndpointId,
        request: GetRequest,
        grant: &Arc<Grant>,
    ) -> Result<(), Attempt> {
        let conn = self.dial(provider).await?;
        let result = async {
            let pair = throttled_pair(&conn, &self.traffic, grant)
                .await
                .map_err(|source| ProviderFailure::Stream { source })?;
            let stats = self
                .store
                .remote()
                .execute_get(pair, request)
                .await
                .map_err(|source| ProviderFailure::Transfer { source })?;
            self.peers.observe(provider, &conn, &stats);
            Ok::<(), ProviderFailure>(())
        }
        .await;
        result.map_err(|e| Attempt::from(e).or_refused(&conn))
    }
}

#[cfg(test)]
mod tests {
    use iroh::SecretKey;

    use super::*;

    #[test]
    fn unavailable_names_the_blob_and_the_last_provider() {
        let blob = BlobRef::of(b"an update");
        let hash = &blob.hex()[..10];
        let none = FetchError::Unavailable { blob, last: None };
        assert_eq!(
            none.to_string(),
            format!("no provider delivered blob {hash} (no other node was asked)")
        );
        assert!(none.source().is_none());
        let provider = SecretKey::from_bytes(&[1; 32]).public();
        let timed_out = FetchError::Unavailable {
            blob,
            last: Some(ProviderError {
                provider,
                failure: ProviderFailure::TimedOut {
                    after: Duration::from_secs(20),
                },
            }),
        };
        assert_eq!(
            timed_out.to_string(),
            format!(
                "no provider delivered blob {hash} (last error: {}: no complete transfer within 20s)",
                provider.fmt_short()
            )
        );
        let source = timed_out.source().map(|s| s.to_string());
        assert_eq!(
            source.as_deref(),
            Some(format!("{}: no complete transfer within 20s", provider.fmt_short()).as_str())
        );
    }
}
