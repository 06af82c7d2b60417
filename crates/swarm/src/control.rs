//! The control protocol: a volunteer asks the coordinator for the run.
//!
//! Gossip is fast but lossy; a node that just started, restarted or missed a
//! manifest needs one reliable answer to "where is the run now?". That answer
//! comes over a direct QUIC stream to the coordinator: the run's spec, the
//! latest checkpoint, the signed manifests since it and the round now open.
//! Everything in it is either signed by the coordinator or content-addressed,
//! so the reply can be cached and forwarded later without being trusted.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::message::{BlobRef, RunId};

/// ALPN of the control protocol.
pub const CONTROL_ALPN: &[u8] = b"starling/control/3";

/// Largest control request accepted.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Largest control response accepted.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// A request to the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Join the run (or refresh): the caller's addresses, and the first round
    /// whose manifest it lacks (`None`: send everything since the checkpoint).
    Join {
        /// The run the caller means to join.
        run_id: RunId,
        /// Where the caller can be dialled (at most
        /// [`crate::message::MAX_MEMBER_ADDRS`]; a join listing more is refused).
        addrs: Vec<SocketAddr>,
        /// First round the caller needs a manifest for.
        since: Option<u64>,
    },
    /// A member's signed announce (the bytes of a `Message` whose body is
    /// an `Announce`, signed by the caller), sent straight to the
    /// coordinator: only the coordinator needs it, and gossip would carry
    /// every member's announce to every member.
    Announce {
        /// The signed message.
        signed: Vec<u8>,
    },
}

/// The coordinator's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// The run as it stands.
    State(RunState),
    /// The coordinator took the announce (whether the update is accepted
    /// shows in the round's manifest).
    Taken,
    /// Not admitted, and why: a code the volunteer decides on and a
    /// sentence it shows.
    Refused {
        /// What kind of refusal.
        why: Refusal,
        /// Human-readable reason.
        reason: String,
    },
}

/// Why a coordinator refused a request: what a volunteer branches on (never
/// the reason's wording).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Refusal {
    /// The request names another run.
    OtherRun,
    /// The caller was removed from the run.
    Removed,
    /// The run admits listed members only, and the caller is not listed.
    NotMember,
    /// The request could not be read or is not supported.
    BadRequest,
    /// Any other reason (the text says which).
    Other,
}

/// Where a run stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The run's spec (opaque here; the node parses and checks it).
    pub spec: Vec<u8>,
    /// The latest checkpoint: the last round it includes, and the blob.
    pub checkpoint: Option<(u64, BlobRef)>,
    /// Signed manifests (`Message` bytes) after the checkpoint, in round
    /// order; the checkpointed round's own may come first (a member one
    /// round behind applies it instead of loading the checkpoint).
    pub manifests: Vec<Vec<u8>>,
    /// The signed `RoundOpen` of the round in progress, if any.
    pub round_open: Option<Vec<u8>>,
    /// The round the run will open next when none is open.
    pub next_round: u64,
}
