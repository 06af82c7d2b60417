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

use starling_swarm::{EndpointId, Member, Refusal, Request, Response, RunId, RunState};

/// What the control handler shares with the round loop.
pub(super) struct Shared {
    pub(super) spec_bytes: Vec<u8>,
    pub(super) checkpoint: Option<(u64, starling_swarm::BlobRef)>,
    pub(super) manifests: Vec<(u64, Vec<u8>)>,
    pub(super) round_open: Option<Vec<u8>>,
    pub(super) next_round: u64,
    pub(super) joined: BTreeMap<EndpointId, Member>,
    pub(super) allow: HashSet<EndpointId>,
    pub(super) dropped: HashSet<EndpointId>,
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
        _ => Response::Refused {
            why: Refusal::BadRequest,
            reason: "unsupported request".into(),
        },
    }
}
