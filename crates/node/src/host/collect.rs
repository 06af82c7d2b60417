//! The round's collection phase: from the open until the deadline, take the
//! members' announces (sent over the control protocol, or gossiped), fetch each announced update from its sender and check
//! it against the reference replica, all while the round stays open.
//!
//! Fetching and checking run as tasks beside the loop, not in it: a slow or
//! stalling member must not delay the others' announces, the open's
//! rebroadcast or the deadline. What a task can fail with is a [`Refusal`],
//! typed so that the host can tell a peer's fault (counted towards dropping
//! it) from an update that merely did not arrive (not held against anyone).

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    sync::Arc,
    time::Duration,
};

use starling_swarm::{Announce, EndpointId, FetchError, Member, Net};
use tokio::{task::JoinSet, time::Instant};

use super::{Host, update_tag};
use crate::{
    events::NodeEvent,
    replica::{self, CheckedUpdate, ReplicaError, SharedReplica, UpdateError},
    short,
};

/// Pause before asking a sender that did not deliver its update again.
const FETCH_RETRY: Duration = Duration::from_secs(1);
/// How long updates still downloading at the deadline may take to finish.
const GRACE: Duration = Duration::from_secs(5);

/// What the collection phase gathered.
pub(super) struct Collected {
    /// Every member's announce that was taken (also those that failed).
    pub(super) seen: HashMap<EndpointId, Announce>,
    /// The updates that arrived and checked.
    pub(super) accepted: Vec<Accepted>,
}

/// An update accepted into the round.
pub(crate) struct Accepted {
    /// Its announce's place among the round's announces (which of two
    /// copies came first).
    pub(crate) order: usize,
    pub(crate) sender: EndpointId,
    pub(crate) announce: Announce,
    pub(crate) update: CheckedUpdate,
}

/// Why an announced update was left out of the round.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum Refusal {
    /// The peer's blob is not what it announced (over the limit, another
    /// size): a fault of the peer.
    #[error("{0}")]
    Fetch(#[source] FetchError),
    /// The update does not check against the model: a fault of the peer.
    #[error("{0}")]
    Invalid(#[source] UpdateError),
    /// No provider delivered it (the peer left, the link broke): not held
    /// against the peer.
    #[error("{0}")]
    Unavailable(#[source] FetchError),
    /// Our own worker failed: not held against the peer.
    #[error("{0}")]
    Worker(#[source] ReplicaError),
}

impl Refusal {
    /// Whether the sender is to blame (counts towards dropping it).
    fn is_fault(&self) -> bool {
        matches!(self, Self::Fetch(_) | Self::Invalid(_))
    }
}

/// What a fetch task reports: the announce, and the checked update or why not.
struct Fetched {
    order: usize,
    sender: EndpointId,
    announce: Announce,
    result: Result<CheckedUpdate, Refusal>,
}

/// The collection's working state.
struct Collection {
    member_ids: HashSet<EndpointId>,
    seen: HashMap<EndpointId, Announce>,
    fetches: JoinSet<Fetched>,
    accepted: Vec<Accepted>,
}

impl Host {
    /// Take announces and fetch their updates until the deadline (or until
    /// every member's update is in, when the run closes rounds early), then
    /// give downloads still running a short grace.
    pub(super) async fn collect(
        &mut self,
        round: u64,
        members: &[Member],
        signed_open: &[u8],
    ) -> Collected {
        let rounds = &self.state.spec.rounds;
        let close_when_complete = rounds.close_when_complete;
        let window = Duration::from_secs_f64(rounds.window_secs);
        let mut c = Collection {
            member_ids: members.iter().map(|m| m.id).collect(),
            seen: HashMap::new(),
            fetches: JoinSet::new(),
            accepted: Vec::new(),
        };
        let deadline = Instant::now() + window;
        let mut rebroadcast = tokio::time::interval(Duration::from_secs(1));
        rebroadcast.tick().await;
        loop {
            let complete =
                close_when_complete && c.seen.len() == c.member_ids.len() && c.fetches.is_empty();
            if complete {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = rebroadcast.tick() => { let _ = self.net.broadcast(signed_open.to_vec()).await; }
                Some(done) = c.fetches.join_next(), if !c.fetches.is_empty() => {
                    self.settle(round, done, &mut c.accepted);
                }
                ev = self.events_rx.recv() => {
                    let Some(ev) = ev else { break };
                    if let Some((sender, ann)) = self.on_event(ev, round) {
                        self.take_announce(round, sender, ann, window, &mut c);
                    }
                }
                Some((sender, r, ann)) = self.announce_rx.recv() => {
                    if r == round {
                        self.take_announce(round, sender, ann, window, &mut c);
                    }
                }
            }
        }
        self.grace(round, &mut c).await;
        Collected {
            seen: c.seen,
            accepted: c.accepted,
        }
    }

    /// Take one announce: refuse a non-member, fault an oversized update,
    /// and start fetching the first announce of each member.
    fn take_announce(
        &mut self,
        round: u64,
        sender: EndpointId,
        ann: Announce,
        window: Duration,
        c: &mut Collection,
    ) {
        let max = self.state.spec.rounds.max_update_bytes;
        if !c.member_ids.contains(&sender) {
            self.emit(NodeEvent::Rejected {
                node: self.name.clone(),
                round,
                peer: short(&sender),
                reason: "not a member of this round".into(),
            });
        } else if ann.update.size > max {
            self.fault(
                round,
                sender,
                format!("announced {} bytes, the limit is {max}", ann.update.size),
            );
            c.seen.insert(sender, ann);
        } else if let Entry::Vacant(v) = c.seen.entry(sender) {
            v.insert(ann.clone());
            let job = FetchJob {
                round,
                order: c.seen.len(),
                sender,
                announce: ann,
                max,
                time_limit: window,
            };
            c.fetches
                .spawn(fetch_and_check(self.net.clone(), self.replica.clone(), job));
        }
    }

    /// Updates still downloading at the deadline get a short grace.
    async fn grace(&mut self, round: u64, c: &mut Collection) {
        let grace = tokio::time::sleep(GRACE);
        tokio::pin!(grace);
        while !c.fetches.is_empty() {
            tokio::select! {
                _ = &mut grace => { c.fetches.abort_all(); break; }
                Some(done) = c.fetches.join_next() => {
                    self.settle(round, done, &mut c.accepted);
                }
            }
        }
    }

    /// Record a finished fetch: accepted, or a fault of its sender.
    fn settle(
        &mut self,
        round: u64,
        done: Result<Fetched, tokio::task::JoinError>,
        accepted: &mut Vec<Accepted>,
    ) {
        match done {
            Ok(Fetched {
                order,
                sender,
                announce,
                result: Ok(update),
            }) => accepted.push(Accepted {
                order,
                sender,
                announce,
                update,
            }),
            Ok(Fetched {
                sender,
                result: Err(refusal),
                ..
            }) => {
                if refusal.is_fault() {
                    self.fault(round, sender, refusal.to_string());
                } else {
                    self.emit(NodeEvent::Rejected {
                        node: self.name.clone(),
                        round,
                        peer: short(&sender),
                        reason: format!("update not received: {refusal}"),
                    });
                }
            }
            Err(e) => self.warn(format!("round {round}: a fetch task failed: {e}")),
        }
    }
}

/// One announced update to fetch.
struct FetchJob {
    round: u64,
    /// The announce's place in the round.
    order: usize,
    sender: EndpointId,
    announce: Announce,
    /// Most bytes accepted.
    max: u64,
    /// How long the fetch may take.
    time_limit: Duration,
}

/// Fetch the job's announced update and check it on a blocking worker.
async fn fetch_and_check(net: Arc<Net>, replica: SharedReplica, job: FetchJob) -> Fetched {
    let FetchJob {
        round,
        order,
        sender,
        announce,
        max,
        time_limit,
    } = job;
    let tag = update_tag(round, &sender);
    let refused = |announce, refusal| Fetched {
        order,
        sender,
        announce,
        result: Err(refusal),
    };
    // A sender that did not deliver (a dial timing out on a busy machine)
    // is asked again until the window ends: its update is worth the wait.
    let started = Instant::now();
    let bytes = loop {
        let left = time_limit.saturating_sub(started.elapsed());
        match net
            .fetch(&announce.update, &[sender], max, &tag, left)
            .await
        {
            Ok(b) => break b,
            Err(e @ FetchError::Unavailable { .. }) => {
                if started.elapsed() + FETCH_RETRY >= time_limit {
                    return refused(announce, Refusal::Unavailable(e));
                }
                tokio::time::sleep(FETCH_RETRY).await;
            }
            Err(e) => return refused(announce, Refusal::Fetch(e)),
        }
    };
    let result = match replica::blocking(&replica, move |r| {
        Ok(r.check(&bytes, round, *sender.as_bytes()))
    })
    .await
    {
        Ok(Ok(update)) => Ok(update),
        Ok(Err(invalid)) => Err(Refusal::Invalid(invalid)),
        Err(worker) => Err(Refusal::Worker(worker)),
    };
    Fetched {
        order,
        sender,
        announce,
        result,
    }
}
