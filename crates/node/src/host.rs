//! The coordinator of a run: admits members, opens rounds with deadlines,
//! accepts checked updates into a signed manifest, keeps the reference
//! replica, writes checkpoints, and survives its own restart.
//!
//! Everything a restart needs is on disk before it is announced: the update
//! files of a round are written, then the state file (atomically) names the
//! manifest, and only then is the manifest gossiped. A host killed at any
//! point resumes from the last state file, reopens the round that was in
//! flight under the same number, and loses nothing that anyone applied.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use starling_swarm::{
    Announce, BlobRef, Body, Bytes, EndpointId, FetchError, Manifest, ManifestEntry, Member,
    Message, Net, NetConfig, NetEvent, Request, Response, RoundOpen, RunId, RunState, SecretKey,
    Ticket, Traffic, WeightReport, unix_ms,
};
use starling_train::{SelectedDevice, atomic::write_atomic, data::shards::TokenStore};
use tokio::{sync::mpsc, task::JoinSet, time::Instant};

use crate::{
    data::{DataError, Tokens},
    events::{NodeEvent, NodeState},
    replica::{self, CheckedUpdate, Replica, SharedReplica, lock},
    short,
    spec::RunSpec,
};

/// Why the host stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// Its state directory could not be read or written.
    #[error("state directory {path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The network could not start.
    #[error("network: {0}")]
    Net(String),
    /// The reference replica failed.
    #[error("replica: {0}")]
    Replica(String),
    /// The run's data is not the data the run was started with.
    #[error("{0}")]
    Data(#[from] DataError),
}

/// How to start a host.
pub struct HostOptions {
    /// Where the host keeps its key, state, checkpoint and updates.
    pub state_dir: PathBuf,
    /// The run (ignored when resuming: the saved spec wins).
    pub spec: RunSpec,
    /// The run's tokens (from `RunFile::resolve`); they must be the data the
    /// spec describes, also when resuming.
    pub tokens: TokenStore,
    /// Members allowed to join (empty: anyone with the ticket).
    pub allow: Vec<EndpointId>,
    /// Where to listen (port 0: any; a resumed host reuses its saved port).
    pub bind: SocketAddr,
    /// Upload and download caps and counters; keep a clone to change the
    /// caps while the node runs (`Traffic::set_caps`).
    pub traffic: Traffic,
    /// The device for the reference replica.
    pub device: SelectedDevice,
    /// Stop after this many rounds in this session (tests, demos).
    pub max_rounds: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SavedState {
    run_id: RunId,
    port: u16,
    spec: RunSpec,
    next_round: u64,
    checkpoint: Option<(u64, BlobRef)>,
    /// Signed manifests after the checkpoint, with their round.
    manifests: Vec<(u64, Vec<u8>)>,
    members: Vec<Member>,
    dropped: Vec<EndpointId>,
    /// The latest held-out loss and its round (sent with each round's open).
    #[serde(default)]
    last_eval: Option<(u64, f32)>,
    /// Tokens the applied rounds were trained on (0 in a state written
    /// before this was kept: the count then starts from the resume).
    #[serde(default)]
    run_tokens: u64,
}

const STATE_FILE: &str = "host.json";
const KEY_FILE: &str = "host.key";
const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const UPDATES_DIR: &str = "updates";
/// Blob tag the run's data is served under for the whole run.
const DATA_TAG: &str = "data";

/// What the control handler shares with the round loop.
struct Shared {
    spec_bytes: Vec<u8>,
    checkpoint: Option<(u64, BlobRef)>,
    manifests: Vec<(u64, Vec<u8>)>,
    round_open: Option<Vec<u8>>,
    next_round: u64,
    joined: BTreeMap<EndpointId, Member>,
    allow: HashSet<EndpointId>,
    dropped: HashSet<EndpointId>,
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> HostError {
    HostError::State {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn load_or_create_key(dir: &Path) -> Result<SecretKey, HostError> {
    let path = dir.join(KEY_FILE);
    crate::keyfile::load_or_create(&path).map_err(|e| state_err(&path, e))
}

/// A running coordinator.
pub struct Host {
    net: Arc<Net>,
    events_rx: mpsc::Receiver<NetEvent>,
    shared: Arc<Mutex<Shared>>,
    state: SavedState,
    dir: PathBuf,
    replica: SharedReplica,
    out: mpsc::UnboundedSender<NodeEvent>,
    name: String,
    faults: HashMap<EndpointId, u32>,
    digests: BTreeMap<u64, u64>,
    max_rounds: Option<u64>,
}

impl Host {
    /// Load or create the run, rebuild the reference replica, and start serving.
    pub async fn start(
        opts: HostOptions,
        out: mpsc::UnboundedSender<NodeEvent>,
    ) -> Result<Self, HostError> {
        let dir = opts.state_dir.clone();
        std::fs::create_dir_all(dir.join(UPDATES_DIR)).map_err(|e| state_err(&dir, e))?;
        let key = load_or_create_key(&dir)?;
        let state_path = dir.join(STATE_FILE);
        let resumed = state_path.exists();
        let mut state = if resumed {
            let bytes = std::fs::read(&state_path).map_err(|e| state_err(&state_path, e))?;
            let s: SavedState =
                serde_json::from_slice(&bytes).map_err(|e| state_err(&state_path, e))?;
            s.spec.check().map_err(|e| state_err(&state_path, e))?;
            s
        } else {
            SavedState {
                run_id: RunId::random(),
                port: opts.bind.port(),
                spec: opts.spec.clone(),
                next_round: 0,
                checkpoint: None,
                manifests: Vec::new(),
                members: Vec::new(),
                dropped: Vec::new(),
                last_eval: None,
                run_tokens: 0,
            }
        };
        let name = short(&key.public());
        let mut bind = opts.bind;
        if resumed {
            bind.set_port(state.port);
        }
        let shared = Arc::new(Mutex::new(Shared {
            spec_bytes: state.spec.to_bytes(),
            checkpoint: state.checkpoint,
            manifests: state.manifests.clone(),
            round_open: None,
            next_round: state.next_round,
            joined: state.members.iter().map(|m| (m.id, m.clone())).collect(),
            allow: opts.allow.iter().copied().collect(),
            dropped: state.dropped.iter().copied().collect(),
        }));
        let handler_shared = shared.clone();
        let run_id = state.run_id;
        let control: starling_swarm::ControlHandler = Arc::new(move |from, request| {
            let shared = handler_shared.clone();
            Box::pin(async move { answer(&shared, run_id, from, request) })
        });
        let (net, events_rx) = Net::spawn(NetConfig {
            secret_key: key.clone(),
            bind,
            run_id,
            traffic: opts.traffic.clone(),
            open: opts.allow.is_empty(),
            control: Some(control),
            bootstrap: Vec::new(),
        })
        .await
        .map_err(|e| HostError::Net(e.to_string()))?;
        let net = Arc::new(net);
        if !opts.allow.is_empty() {
            net.set_members(&[], &opts.allow).await;
        }
        state.port = net.addrs().first().map(|a| a.port()).unwrap_or(0);
        let data_bytes = state.spec.data.matches(&opts.tokens)?;
        let served = net
            .publish(DATA_TAG, data_bytes)
            .await
            .map_err(|e| HostError::Net(e.to_string()))?;
        if served != state.spec.data.blob {
            return Err(HostError::Net(format!(
                "the blob store hashed the data to {}, the spec says {}",
                served.hex(),
                state.spec.data.blob.hex()
            )));
        }
        let replica = Replica::new(
            &state.spec,
            &opts.device,
            run_id.0,
            *key.public().as_bytes(),
            Tokens::All(opts.tokens),
        )
        .map_err(|e| HostError::Replica(e.to_string()))?;
        let mut host = Self {
            net,
            events_rx,
            shared,
            state,
            dir,
            replica: Arc::new(Mutex::new(replica)),
            out,
            name,
            faults: HashMap::new(),
            digests: BTreeMap::new(),
            max_rounds: opts.max_rounds,
        };
        host.restore().await?;
        host.save()?;
        let (params, round) = (host.state.spec.model.param_count(), host.state.next_round);
        host.emit(NodeEvent::Joined {
            node: host.name.clone(),
            run: host.state.spec.run.name.clone(),
            params,
            round,
            total_rounds: host.state.spec.run.total_rounds,
        });
        Ok(host)
    }

    /// The ticket volunteers join with.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            run_id: self.state.run_id,
            host: self.net.id(),
            addrs: self.net.addrs(),
        }
    }

    fn emit(&self, event: NodeEvent) {
        let _ = self.out.send(event);
    }

    fn warn(&self, message: String) {
        self.emit(NodeEvent::Warning {
            node: self.name.clone(),
            message,
        });
    }

    fn save(&self) -> Result<(), HostError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(|e| state_err(&path, e))?;
        write_atomic(&path, &bytes).map_err(|e| state_err(&path, e))
    }

    fn update_path(&self, blob: &BlobRef) -> PathBuf {
        self.dir
            .join(UPDATES_DIR)
            .join(format!("{}.bin", blob.hex()))
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuild the reference replica from the checkpoint and the manifests since.
    async fn restore(&mut self) -> Result<(), HostError> {
        if let Some((_, blob)) = self.state.checkpoint {
            let path = self.dir.join(CHECKPOINT_FILE);
            let bytes = std::fs::read(&path).map_err(|e| state_err(&path, e))?;
            lock(&self.replica)
                .load_checkpoint(&bytes, true)
                .map_err(|e| HostError::Replica(e.to_string()))?;
            let published = self
                .net
                .publish("checkpoint", bytes)
                .await
                .map_err(|e| HostError::Net(e.to_string()))?;
            if published != blob {
                return Err(state_err(
                    &path,
                    "checkpoint file does not match the saved state",
                ));
            }
        }
        let host_id = self.net.id();
        for (round, signed) in self.state.manifests.clone() {
            let msg = Message::verify(&signed, self.state.run_id)
                .map_err(|e| HostError::Replica(e.to_string()))?;
            let Body::Manifest(manifest) = msg.body else {
                return Err(HostError::Replica(
                    "saved manifest is not a manifest".into(),
                ));
            };
            if msg.author != host_id || msg.round != round {
                return Err(HostError::Replica(
                    "saved manifest is not this host's".into(),
                ));
            }
            let mut updates = Vec::new();
            for e in &manifest.entries {
                let path = self.update_path(&e.update);
                let bytes = std::fs::read(&path).map_err(|err| state_err(&path, err))?;
                self.net
                    .publish(&update_tag(round, &e.sender), bytes.clone())
                    .await
                    .map_err(|err| HostError::Net(err.to_string()))?;
                let checked = lock(&self.replica)
                    .check(&bytes, round, *e.sender.as_bytes())
                    .map_err(|err| HostError::Replica(err.to_string()))?;
                updates.push(checked.update);
            }
            lock(&self.replica)
                .apply(round, &updates)
                .map_err(|e| HostError::Replica(e.to_string()))?;
        }
        Ok(())
    }

    /// Coordinate rounds until `stop` turns true (or `max_rounds` have run).
    pub async fn run(
        mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), HostError> {
        let first = self.state.next_round;
        self.emit(NodeEvent::State {
            node: self.name.clone(),
            state: NodeState::Coordinating,
            detail: format!("from round {first}"),
        });
        loop {
            let round = self.state.next_round;
            let total = self.state.spec.run.total_rounds;
            if (total > 0 && round >= total)
                || self.max_rounds.is_some_and(|m| round >= first + m)
                || *stop.borrow()
            {
                break;
            }
            tokio::select! {
                r = self.round(round) => r?,
                _ = stop.changed() => break,
            }
        }
        self.emit(NodeEvent::State {
            node: self.name.clone(),
            state: NodeState::Stopped,
            detail: format!("stopped before round {}", self.state.next_round),
        });
        // Serve the last manifest's updates for one more round window, so
        // members still applying it can fetch from the coordinator.
        if !*stop.borrow() {
            let window = Duration::from_secs_f64(self.state.spec.rounds.window_secs);
            tokio::select! {
                _ = tokio::time::sleep(window) => {}
                _ = stop.changed() => {}
            }
        }
        if let Ok(net) = Arc::try_unwrap(self.net) {
            net.shutdown().await;
        }
        Ok(())
    }

    fn members(&self) -> Vec<Member> {
        let shared = self.shared();
        shared
            .joined
            .values()
            .filter(|m| !shared.dropped.contains(&m.id))
            .cloned()
            .collect()
    }

    async fn round(&mut self, round: u64) -> Result<(), HostError> {
        // Wait for enough members (members that left ask again on their own).
        let min = self.state.spec.rounds.min_members.max(1);
        let members = loop {
            let m = self.members();
            if m.len() >= min {
                break m;
            }
            self.drain_events(round);
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let rounds = self.state.spec.rounds.clone();
        let window = Duration::from_secs_f64(rounds.window_secs);
        let open = RoundOpen {
            members: members.clone(),
            seed: self.state.spec.run.seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            deadline_ms: unix_ms() + window.as_millis() as u64,
            checkpoint: self.state.checkpoint,
            max_update_bytes: rounds.max_update_bytes,
            eval: self.state.last_eval,
        };
        let signed_open = Message::sign(
            self.net.secret_key(),
            self.state.run_id,
            round,
            Body::RoundOpen(open),
        )
        .map_err(|e| HostError::Net(e.to_string()))?;
        {
            let mut shared = self.shared();
            shared.round_open = Some(signed_open.clone());
            shared.next_round = round;
        }
        // Admit this round's members, and keep admitting the allow list so
        // listed volunteers can still join later.
        let keep: Vec<EndpointId> = self.shared().allow.iter().copied().collect();
        self.net.set_members(&members, &keep).await;
        let _ = self.net.broadcast(signed_open.clone()).await;
        self.emit(NodeEvent::RoundOpened {
            node: self.name.clone(),
            round,
            members: members.len(),
        });
        let (up0, down0) = (
            self.net.traffic().total.up(),
            self.net.traffic().total.down(),
        );

        let member_ids: HashSet<EndpointId> = members.iter().map(|m| m.id).collect();
        let deadline = Instant::now() + window;
        let mut seen: HashMap<EndpointId, Announce> = HashMap::new();
        let mut fetches: JoinSet<Fetched> = JoinSet::new();
        let mut checked: Vec<Accepted> = Vec::new();
        let mut rebroadcast = tokio::time::interval(Duration::from_secs(1));
        rebroadcast.tick().await;
        loop {
            let complete =
                rounds.close_when_complete && seen.len() == member_ids.len() && fetches.is_empty();
            if complete {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = rebroadcast.tick() => { let _ = self.net.broadcast(signed_open.clone()).await; }
                Some(done) = fetches.join_next(), if !fetches.is_empty() => {
                    self.settle(round, done, &mut checked);
                }
                ev = self.events_rx.recv() => {
                    let Some(ev) = ev else { break };
                    if let Some((sender, ann)) = self.on_event(ev, round) {
                        if !member_ids.contains(&sender) {
                            self.emit(NodeEvent::Rejected { node: self.name.clone(), round, peer: short(&sender), reason: "not a member of this round".into() });
                        } else if ann.update.size > rounds.max_update_bytes {
                            self.fault(round, sender, format!("announced {} bytes, the limit is {}", ann.update.size, rounds.max_update_bytes));
                            seen.insert(sender, ann);
                        } else if let std::collections::hash_map::Entry::Vacant(v) = seen.entry(sender) {
                            v.insert(ann.clone());
                            fetches.spawn(fetch_and_check(self.net.clone(), self.replica.clone(), round, sender, ann, rounds.max_update_bytes, window));
                        }
                    }
                }
            }
        }
        // Updates still downloading at the deadline get a short grace.
        let grace = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(grace);
        while !fetches.is_empty() {
            tokio::select! {
                _ = &mut grace => { fetches.abort_all(); break; }
                Some(done) = fetches.join_next() => {
                    self.settle(round, done, &mut checked);
                }
            }
        }

        // Robust aggregation: drop updates far above the round's median norm.
        let factor = rounds.robust_norm_factor;
        if factor > 0.0 && checked.len() >= 3 {
            let mut norms: Vec<f32> = checked.iter().map(|a| a.update.norm).collect();
            norms.sort_by(f32::total_cmp);
            let median = norms[norms.len() / 2];
            let (keep, outliers): (Vec<_>, Vec<_>) = checked
                .into_iter()
                .partition(|a| a.update.norm <= factor * median);
            checked = keep;
            for a in outliers {
                self.fault(
                    round,
                    a.sender,
                    format!(
                        "update norm {:.3} is over {factor}x the median {median:.3}",
                        a.update.norm
                    ),
                );
            }
        }
        checked.sort_by_key(|a| a.sender);

        // Persist the updates, then the state naming the manifest, then announce it.
        let mut entries = Vec::new();
        for a in &checked {
            let path = self.update_path(&a.announce.update);
            write_atomic(&path, &a.bytes).map_err(|e| state_err(&path, e))?;
            entries.push(ManifestEntry {
                sender: a.sender,
                update: a.announce.update,
                tokens: a.announce.tokens,
                loss: a.announce.loss,
            });
        }
        let tokens: u64 = entries.iter().map(|e| e.tokens).sum();
        self.state.run_tokens += tokens;
        let manifest = Manifest {
            entries,
            run_tokens: self.state.run_tokens,
        };
        let loss = manifest.mean_loss();
        let signed = Message::sign(
            self.net.secret_key(),
            self.state.run_id,
            round,
            Body::Manifest(manifest),
        )
        .map_err(|e| HostError::Net(e.to_string()))?;
        self.state.manifests.push((round, signed.clone()));
        self.state.next_round = round + 1;
        // A member that sent nothing (gone, or too slow for the window) leaves
        // the member list until it asks again, so it cannot stall later rounds.
        let missing: Vec<EndpointId> = member_ids
            .iter()
            .filter(|id| !seen.contains_key(*id))
            .copied()
            .collect();
        for id in &missing {
            self.shared().joined.remove(id);
            self.warn(format!(
                "{} sent no update for round {round}; it rejoins when it asks again",
                short(id)
            ));
        }
        self.state.members = members
            .into_iter()
            .filter(|m| !missing.contains(&m.id))
            .collect();
        let dropped: Vec<EndpointId> = self.shared().dropped.iter().copied().collect();
        self.state.dropped = dropped;
        self.save()?;
        {
            let mut shared = self.shared();
            shared.manifests.push((round, signed.clone()));
            shared.round_open = None;
            shared.next_round = round + 1;
        }
        let _ = self.net.broadcast(signed).await;

        // Apply on the reference replica.
        let updates: Vec<_> = checked.into_iter().map(|a| a.update.update).collect();
        let n = updates.len();
        let eval = round.is_multiple_of(rounds.eval_every)
            || self.state.spec.run.total_rounds == round + 1;
        let (digest, eval_loss) = replica::blocking(&self.replica, move |r| {
            r.apply(round, &updates)?;
            let eval_loss = if eval { Some(r.eval_loss()?) } else { None };
            Ok((r.digest()?, eval_loss))
        })
        .await
        .map_err(|e| HostError::Replica(e.to_string()))?;
        if let Some(l) = eval_loss {
            self.state.last_eval = Some((round, l));
        }
        self.digests.insert(round, digest);
        while self.digests.len() > 64 {
            self.digests.pop_first();
        }
        if round.is_multiple_of(rounds.report_every) {
            let report = Message::sign(
                self.net.secret_key(),
                self.state.run_id,
                round,
                Body::WeightReport(WeightReport { digest }),
            )
            .map_err(|e| HostError::Net(e.to_string()))?;
            let _ = self.net.broadcast(report).await;
        }
        let allreduce = lock(&self.replica).allreduce_bytes();
        self.emit(NodeEvent::RoundApplied {
            node: self.name.clone(),
            round,
            updates: n,
            loss,
            eval_loss,
            digest,
            bytes_up: self.net.traffic().total.up() - up0,
            bytes_down: self.net.traffic().total.down() - down0,
            allreduce_bytes: allreduce,
            tokens,
            run_tokens: self.state.run_tokens,
        });
        if (round + 1).is_multiple_of(rounds.checkpoint_every) {
            self.checkpoint(round).await?;
        }
        Ok(())
    }

    /// Write and publish a checkpoint after `round`; drop what it supersedes.
    async fn checkpoint(&mut self, round: u64) -> Result<(), HostError> {
        let bytes = lock(&self.replica)
            .checkpoint_bytes(round)
            .map_err(|e| HostError::Replica(e.to_string()))?;
        let path = self.dir.join(CHECKPOINT_FILE);
        write_atomic(&path, &bytes).map_err(|e| state_err(&path, e))?;
        let size = bytes.len() as u64;
        let blob = self
            .net
            .publish("checkpoint", bytes)
            .await
            .map_err(|e| HostError::Net(e.to_string()))?;
        let old: Vec<(u64, Vec<u8>)> = std::mem::take(&mut self.state.manifests);
        self.state.checkpoint = Some((round, blob));
        self.save()?;
        {
            let mut shared = self.shared();
            shared.checkpoint = Some((round, blob));
            shared.manifests.clear();
        }
        // The superseded updates: files and blobs.
        for (r, signed) in old {
            if let Ok(Message {
                body: Body::Manifest(m),
                ..
            }) = Message::verify(&signed, self.state.run_id)
            {
                for e in m.entries {
                    let _ = std::fs::remove_file(self.update_path(&e.update));
                }
            }
            self.net.forget(&round_prefix(r)).await;
        }
        self.emit(NodeEvent::Checkpoint {
            node: self.name.clone(),
            round,
            bytes: size,
        });
        Ok(())
    }

    /// Record a finished fetch: accepted, or a fault of its sender.
    fn settle(
        &mut self,
        round: u64,
        done: Result<Fetched, tokio::task::JoinError>,
        accepted: &mut Vec<Accepted>,
    ) {
        match done {
            Ok((sender, announce, Ok((bytes, update)))) => accepted.push(Accepted {
                sender,
                announce,
                bytes,
                update,
            }),
            Ok((sender, _, Err(Refusal::Fault(reason)))) => self.fault(round, sender, reason),
            Ok((sender, _, Err(Refusal::Missing(reason)))) => self.emit(NodeEvent::Rejected {
                node: self.name.clone(),
                round,
                peer: short(&sender),
                reason: format!("update not received: {reason}"),
            }),
            Err(e) => self.warn(format!("round {round}: a fetch task failed: {e}")),
        }
    }

    fn fault(&mut self, round: u64, peer: EndpointId, reason: String) {
        self.emit(NodeEvent::Rejected {
            node: self.name.clone(),
            round,
            peer: short(&peer),
            reason,
        });
        let faults = self.faults.entry(peer).or_insert(0);
        *faults += 1;
        let faults = *faults;
        if faults >= self.state.spec.rounds.max_faults {
            let mut shared = self.shared();
            if shared.dropped.insert(peer) {
                drop(shared);
                self.emit(NodeEvent::Dropped {
                    node: self.name.clone(),
                    peer: short(&peer),
                    faults,
                });
            }
        }
    }

    /// Handle one network event; returns an announce for `round`.
    fn on_event(&mut self, ev: NetEvent, round: u64) -> Option<(EndpointId, Announce)> {
        match ev {
            NetEvent::Message(m) => match m.body {
                Body::Announce(a) if m.round == round => Some((m.author, a)),
                Body::WeightReport(r) if m.author != self.net.id() => {
                    if let Some(&mine) = self.digests.get(&m.round)
                        && mine != r.digest
                    {
                        self.emit(NodeEvent::Diverged {
                            node: self.name.clone(),
                            peer: short(&m.author),
                            round: m.round,
                        });
                    }
                    None
                }
                _ => None,
            },
            NetEvent::Refused(id) => {
                self.warn(format!(
                    "refused a connection from non-member {}",
                    short(&id)
                ));
                None
            }
            NetEvent::BadMessage { via, error } => {
                self.emit(NodeEvent::Rejected {
                    node: self.name.clone(),
                    round,
                    peer: short(&via),
                    reason: error,
                });
                None
            }
            _ => None,
        }
    }

    fn drain_events(&mut self, round: u64) {
        while let Ok(ev) = self.events_rx.try_recv() {
            let _ = self.on_event(ev, round);
        }
    }
}

/// The blob tag of an update.
pub(crate) fn update_tag(round: u64, sender: &EndpointId) -> String {
    format!("{}{}", round_prefix(round), sender)
}

/// The tag prefix of every blob kept for a round.
pub(crate) fn round_prefix(round: u64) -> String {
    format!("u/{round:012}/")
}

/// What a fetch task reports: the announce, and the checked update or why not.
type Fetched = (
    EndpointId,
    Announce,
    Result<(Bytes, CheckedUpdate), Refusal>,
);

/// Why an announced update was left out of the round.
enum Refusal {
    /// The peer sent something wrong (size lie, invalid update): counts as a fault.
    Fault(String),
    /// The update could not be had (the peer left, the link broke, our own
    /// worker failed): not held against the peer.
    Missing(String),
}

/// An update accepted into the round, with its bytes for the update file.
struct Accepted {
    sender: EndpointId,
    announce: Announce,
    bytes: Bytes,
    update: CheckedUpdate,
}

async fn fetch_and_check(
    net: Arc<Net>,
    replica: SharedReplica,
    round: u64,
    sender: EndpointId,
    ann: Announce,
    max: u64,
    time_limit: Duration,
) -> Fetched {
    let tag = update_tag(round, &sender);
    let bytes = match net
        .fetch(&ann.update, &[sender], max, &tag, time_limit)
        .await
    {
        Ok(b) => b,
        Err(e @ FetchError::Unavailable(_)) => {
            return (sender, ann, Err(Refusal::Missing(e.to_string())));
        }
        Err(e) => return (sender, ann, Err(Refusal::Fault(e.to_string()))),
    };
    let checked = bytes.clone();
    let result = match replica::blocking(&replica, move |r| {
        Ok(r.check(&checked, round, *sender.as_bytes()))
    })
    .await
    {
        Ok(Ok(update)) => Ok((bytes, update)),
        Ok(Err(invalid)) => Err(Refusal::Fault(invalid.to_string())),
        Err(worker) => Err(Refusal::Missing(worker.to_string())),
    };
    (sender, ann, result)
}

fn answer(shared: &Mutex<Shared>, run_id: RunId, from: EndpointId, request: Request) -> Response {
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    match request {
        Request::Join {
            run_id: asked,
            addrs,
            since,
        } => {
            if asked != run_id {
                return Response::Refused {
                    reason: "this host coordinates another run".into(),
                };
            }
            if s.dropped.contains(&from) {
                return Response::Refused {
                    reason: "removed from this run after repeated invalid updates".into(),
                };
            }
            if !s.allow.is_empty() && !s.allow.contains(&from) {
                return Response::Refused {
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
            reason: "unsupported request".into(),
        },
    }
}

#[cfg(test)]
mod tests;
