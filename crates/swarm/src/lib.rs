//! Starling's swarm layer: how a training run travels over iroh.
//!
//! This crate moves and checks bytes; it knows nothing of tensors. Updates
//! arrive as opaque blobs that the node validates through a callback before
//! they are ever accepted. Everything a peer sends is size-checked before it
//! is fetched, and verified (signature, run, round, BLAKE3) before it is used.

pub mod bandwidth;
pub mod control;
pub mod message;
pub mod net;
pub mod ticket;

pub use bandwidth::{Budget, Grant, RateLimiter, Traffic};
pub use bytes::Bytes;
pub use control::{CONTROL_ALPN, Refusal, Request, Response, RunState};
pub use iroh::{EndpointId, SecretKey};
pub use message::{
    AcceptedList, Announce, BlobRef, Body, ListError, MAX_ACCEPTED_BYTES, MAX_MEMBER_ADDRS,
    MAX_ROSTER_BYTES, Manifest, ManifestEntry, Member, Message, MessageError, Roster, RoundOpen,
    RunId, WeightReport, unix_ms,
};
pub use net::{
    BroadcastError, ControlError, ControlHandler, DEFAULT_STALL_TIMEOUT, FetchError, Net,
    NetConfig, NetEvent, PeerStats, ProviderError, ProviderFailure, PublishError, Serving,
    SpawnError,
};
pub use ticket::{Ticket, TicketError};
