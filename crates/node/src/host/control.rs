//! The host's answer to control requests (a volunteer asking to join).
//!
//! Requests are answered on the network's own tasks, concurrently with the
//! round loop, so the answer must never wait on a round: it reads and writes
//! only [`Shared`], a small snapshot the round loop keeps current (the spec,
//! the checkpoint, the manifests since, the open round and who joined). Kept
//! apart from the round phases so that boundary, and the one lock it takes,
//! stay visible.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Mutex,
};

use starling_swarm::{
    Announce, Body, EndpointId, MAX_MEMBER_ADDRS, Member, Message, Refusal, Request, Response,
    RunId, RunState,
};
use tokio::sync::mpsc;

/// What the control handler shares with the round loop.
pub(super) struct Shared {
    pub(super) spec_bytes: Vec<u8>,
    pub(super) checkpoint: Option<(u64, starling_swarm::BlobRef)>,
    /// Signed manifests after the checkpoint, and the checkpointed round's
    /// own until the next checkpoint.
    pub(super) manifests: Vec<(u64, Vec<u8>)>,
    pub(super) round_open: Option<Vec<u8>>,
    pub(super) next_round: u64,
    pub(super) joined: BTreeMap<EndpointId, Member>,
    pub(super) allow: HashSet<EndpointId>,
    pub(super) dropped: HashSet<EndpointId>,
    /// Verified announces sent over the control protocol, for the round
    /// loop (bounded: when it is full, announces are refused as busy).
    pub(super) announces: mpsc::Sender<(EndpointId, u64, Announce)>,
}

/// Answer one control request from `from`: admit it and send the run's state
/// (manifests from the round it asks for), or say why not.
pub(super) fn answer(
    shared: &Mutex<Shared>,
    run_id: RunId,
    from: EndpointId,
    request: Request,
) -> Response {
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    match request {
        Request::Join {
            run_id: asked,
            addrs,
            since,
        } => {
            if asked != run_id {
                return Response::Refused {
                    why: Refusal::OtherRun,
                    reason: "this host coordinates another run".into(),
                };
            }
            if s.dropped.contains(&from) {
                return Response::Refused {
                    why: Refusal::Removed,
                    reason: "removed from this run after repeated invalid updates".into(),
                };
            }
            if !s.allow.is_empty() && !s.allow.contains(&from) {
                return Response::Refused {
                    why: Refusal::NotMember,
                    reason: "not on this run's member list".into(),
                };
            }
            if addrs.len() > MAX_MEMBER_ADDRS {
                return Response::Refused {
                    why: Refusal::BadRequest,
                    reason: format!(
                        "a join may list at most {MAX_MEMBER_ADDRS} addresses; this one lists {}",
                        addrs.len()
                    ),
                };
            }
            s.joined.insert(from, Member { id: from, addrs });
            let since = since.unwrap_or(0);
            Response::State(RunState {
                spec: s.spec_bytes.clone(),
                checkpoint: s.checkpoint,
                manifests: s
                    .manifests
                    .iter()
                    .filter(|(r, _)| *r >= since)
                    .map(|(_, m)| m.clone())
                    .collect(),
                round_open: s.round_open.clone(),
                next_round: s.next_round,
            })
        }
        Request::Announce { signed } => take_announce(&s, run_id, from, &signed),
        _ => Response::Refused {
            why: Refusal::BadRequest,
            reason: "unsupported request".into(),
        },
    }
}

/// Verify an announce sent over the control protocol (signed by the caller,
/// for this run) and queue it for the round loop.
fn take_announce(s: &Shared, run_id: RunId, from: EndpointId, signed: &[u8]) -> Response {
    let refused = |reason: String| Response::Refused {
        why: Refusal::BadRequest,
        reason,
    };
    let message = match Message::verify(signed, run_id) {
        Ok(m) => m,
        Err(e) => return refused(format!("announce: {e}")),
    };
    if message.author != from {
        return refused("announce: signed by another node than the caller".into());
    }
    let Body::Announce(announce) = message.body else {
        return refused("announce: the message is not an announce".into());
    };
    match s.announces.try_send((from, message.round, announce)) {
        Ok(()) => Response::Taken,
        Err(_) => Response::Refused {
            why: Refusal::Other,
            reason: "busy: announce again shortly".into(),
        },
    }
}
