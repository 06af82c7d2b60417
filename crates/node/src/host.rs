//! The coordinator of a run: admits members, opens rounds with deadlines,
//! accepts checked updates into a signed manifest, keeps the reference
//! replica, writes checkpoints, and survives its own restart.
//!
//! Everything a restart needs is on disk before it is announced: the update
//! files of a round are written, then the state file (atomically) names the
//! manifest, and only then is the manifest gossiped. A host killed at any
//! point resumes from the last state file, reopens the round that was in
//! flight under the same number, and loses nothing that anyone applied.
//!
//! This file holds the host's lifetime (start, restore, the round loop,
//! checkpoints) and the bookkeeping every phase shares (faults, network
//! events, the state file). A round itself is a fixed sequence of phases in
//! `host/round.rs`, whose order is the durability argument above; its one
//! concurrent phase, collecting and checking updates, is in `host/collect.rs`; the
//! answers to join requests, which run beside the rounds on the network's
//! tasks, are in `host/control.rs`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use starling_distro::Residual;
use starling_swarm::{
    Announce, BlobRef, Body, EndpointId, Member, Message, MessageError, Net, NetConfig, NetEvent,
    PublishError, RunId, SecretKey, SpawnError, Ticket, Traffic,
};
use starling_train::{SelectedDevice, atomic::write_atomic, data::shards::TokenStore};
use tokio::sync::mpsc;

use crate::{
    data::{DataError, Tokens},
    events::{NodeEvent, NodeState},
    replica::{Replica, ReplicaError, SharedReplica, UpdateError, lock},
    short,
    spec::{RunSpec, SpecError},
};

mod collect;
mod control;
mod round;

pub(crate) use collect::Accepted;
pub(crate) use round::{accepted_list, robust_config, screen_round};

use control::{Shared, answer};

/// Why the host stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// A file in the state directory could not be read or written.
    #[error("state directory: {path}: {source}")]
    Io {
        /// The file (or directory).
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The host's key file could not be read or created.
    #[error("key file {path}: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The state file does not parse (or the state does not encode).
    #[error("state file {path}: {source}")]
    StateFile {
        /// The state file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The run spec saved in the state file is no longer valid.
    #[error("state file {path}: the saved run spec: {source}")]
    SavedSpec {
        /// The state file.
        path: PathBuf,
        /// Why the spec is refused.
        #[source]
        source: SpecError,
    },
    /// The checkpoint file is not the checkpoint the state file names.
    #[error("checkpoint {path} does not match the saved state")]
    CheckpointChanged {
        /// The checkpoint file.
        path: PathBuf,
    },
    /// The checkpoint file does not load into the reference replica.
    #[error("checkpoint {path}: {source}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// Why it does not load.
        #[source]
        source: Box<ReplicaError>,
    },
    /// A manifest saved in the state file does not verify.
    #[error("saved manifest of round {round}: {source}")]
    SavedManifest {
        /// Its round.
        round: u64,
        /// Why it does not verify.
        #[source]
        source: MessageError,
    },
    /// A message saved in the state file as a manifest is something else.
    #[error("saved manifest of round {round} is not a manifest")]
    NotAManifest {
        /// Its round.
        round: u64,
    },
    /// A saved manifest was signed by another host or for another round.
    #[error("saved manifest of round {round} is not this host's")]
    ForeignManifest {
        /// The round it is saved under.
        round: u64,
    },
    /// A saved file a manifest names is not the blob it names.
    #[error("saved file {path} of round {round} is not the blob its manifest names")]
    SavedBlobChanged {
        /// Its round.
        round: u64,
        /// The file.
        path: PathBuf,
    },
    /// A saved aggregate no longer checks against the reference replica.
    #[error("saved aggregate {path} of round {round}: {source}")]
    SavedUpdate {
        /// Its round.
        round: u64,
        /// The aggregate file.
        path: PathBuf,
        /// Why it is refused.
        #[source]
        source: UpdateError,
    },
    /// The network could not start.
    #[error("network: {0}")]
    Spawn(#[from] SpawnError),
    /// A blob (the data, a checkpoint, an update) could not be served.
    #[error("cannot serve {tag}: {source}")]
    Publish {
        /// The blob's tag.
        tag: String,
        /// Why the blob store refused it.
        #[source]
        source: PublishError,
    },
    /// The blob store hashed the run's data to another blob than the spec's.
    #[error("the blob store hashed the data to {served}, the spec says {expected}")]
    DataHash {
        /// The hash the blob store computed.
        served: String,
        /// The hash in the spec.
        expected: String,
    },
    /// The reference replica could not be built.
    #[error("reference replica: {0}")]
    ReplicaInit(#[source] Box<ReplicaError>),
    /// The reference replica failed to apply, evaluate or checkpoint a round.
    #[error("reference replica, round {round}: {source}")]
    Replica {
        /// The round.
        round: u64,
        /// What failed.
        #[source]
        source: Box<ReplicaError>,
    },
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
/// The aggregate cap's residual after the last recorded round.
const RESIDUAL_FILE: &str = "residual.bin";
/// Where the aggregates and accepted lists of the manifests since the
/// checkpoint are kept, named by hash, so a restart serves and replays them.
const BLOBS_DIR: &str = "blobs";
/// Announces the control protocol queues for the round loop at most.
const ANNOUNCE_QUEUE: usize = 4096;
/// Blob tag the latest checkpoint is served under.
const CHECKPOINT_TAG: &str = "checkpoint";
/// Blob tag the run's data is served under for the whole run.
const DATA_TAG: &str = "data";

/// Map an I/O error on `path` in the state directory.
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HostError + '_ {
    move |source| HostError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Map a JSON error on the state file `path`.
fn json_err(path: &Path) -> impl FnOnce(serde_json::Error) -> HostError + '_ {
    move |source| HostError::StateFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Record a fault in `round` in a member's recent `faults` (rounds, oldest
/// first), forget those `window` or more rounds old, and count the rest.
fn count_fault(faults: &mut VecDeque<u64>, round: u64, window: u64) -> u32 {
    faults.push_back(round);
    while faults
        .front()
        .is_some_and(|&r| round.saturating_sub(r) >= window)
    {
        faults.pop_front();
    }
    u32::try_from(faults.len()).unwrap_or(u32::MAX)
}

fn load_or_create_key(dir: &Path) -> Result<SecretKey, HostError> {
    let path = dir.join(KEY_FILE);
    crate::keyfile::load_or_create(&path).map_err(|source| HostError::Key { path, source })
}

/// A running coordinator.
pub struct Host {
    net: Arc<Net>,
    events_rx: mpsc::Receiver<NetEvent>,
    /// Announces members sent over the control protocol (verified).
    announce_rx: mpsc::Receiver<(EndpointId, u64, Announce)>,
    shared: Arc<Mutex<Shared>>,
    state: SavedState,
    dir: PathBuf,
    replica: SharedReplica,
    out: mpsc::UnboundedSender<NodeEvent>,
    name: String,
    /// The rounds of each member's recent faults, oldest first.
    faults: HashMap<EndpointId, VecDeque<u64>>,
    /// The screen's size reference from the last round.
    reference: Option<f32>,
    digests: BTreeMap<u64, u64>,
    max_rounds: Option<u64>,
    /// What the aggregate cap carried into the next round (`None`: no cap).
    residual: Option<Residual>,
}

impl Host {
    /// Load or create the run, rebuild the reference replica, and start serving.
    pub async fn start(
        opts: HostOptions,
        out: mpsc::UnboundedSender<NodeEvent>,
    ) -> Result<Self, HostError> {
        let dir = opts.state_dir.clone();
        let blobs_dir = dir.join(BLOBS_DIR);
        std::fs::create_dir_all(&blobs_dir).map_err(io_err(&blobs_dir))?;
        let key = load_or_create_key(&dir)?;
        let state_path = dir.join(STATE_FILE);
        let resumed = state_path.exists();
        let mut state = if resumed {
            let bytes = std::fs::read(&state_path).map_err(io_err(&state_path))?;
            let s: SavedState = serde_json::from_slice(&bytes).map_err(json_err(&state_path))?;
            s.spec.check().map_err(|source| HostError::SavedSpec {
                path: state_path.clone(),
                source,
            })?;
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
        let (announce_tx, announce_rx) = mpsc::channel(ANNOUNCE_QUEUE);
        let shared = Arc::new(Mutex::new(Shared {
            spec_bytes: state.spec.to_bytes(),
            checkpoint: state.checkpoint,
            manifests: state.manifests.clone(),
            round_open: None,
            next_round: state.next_round,
            joined: state.members.iter().map(|m| (m.id, m.clone())).collect(),
            allow: opts.allow.iter().copied().collect(),
            dropped: state.dropped.iter().copied().collect(),
            announces: announce_tx,
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
            serving: starling_swarm::Serving::Honest,
        })
        .await?;
        let net = Arc::new(net);
        if !opts.allow.is_empty() {
            net.set_members(&[], &opts.allow).await;
        }
        state.port = net.addrs().first().map(|a| a.port()).unwrap_or(0);
        let data_bytes = state.spec.data.matches(&opts.tokens)?;
        let served =
            net.publish(DATA_TAG, data_bytes)
                .await
                .map_err(|source| HostError::Publish {
                    tag: DATA_TAG.into(),
                    source,
                })?;
        net.serve_without_limit(&served);
        if served != state.spec.data.blob {
            return Err(HostError::DataHash {
                served: served.hex(),
                expected: state.spec.data.blob.hex(),
            });
        }
        let replica = Replica::new(
            &state.spec,
            &opts.device,
            run_id.0,
            *key.public().as_bytes(),
            Tokens::All(opts.tokens),
        )
        .map_err(|e| HostError::ReplicaInit(Box::new(e)))?;
        let mut host = Self {
            net,
            events_rx,
            announce_rx,
            shared,
            state,
            dir,
            replica: Arc::new(Mutex::new(replica)),
            out,
            name,
            faults: HashMap::new(),
            reference: None,
            digests: BTreeMap::new(),
            max_rounds: opts.max_rounds,
            residual: None,
        };
        host.net
            .set_stall_timeout(Duration::from_secs_f64(host.state.spec.rounds.stall_secs));
        host.restore().await?;
        host.residual = host.load_residual();
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

    /// The coordinator's network side, for measurements (what it served of
    /// each blob, its traffic) taken while it runs.
    pub fn net(&self) -> Arc<Net> {
        self.net.clone()
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
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(json_err(&path))?;
        write_atomic(&path, &bytes).map_err(io_err(&path))
    }

    fn blob_path(&self, blob: &BlobRef) -> PathBuf {
        self.dir.join(BLOBS_DIR).join(format!("{}.bin", blob.hex()))
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuild the reference replica from the checkpoint and the manifests since.
    async fn restore(&mut self) -> Result<(), HostError> {
        if let Some((round, blob)) = self.state.checkpoint {
            let path = self.dir.join(CHECKPOINT_FILE);
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let loaded = {
                let mut replica = lock(&self.replica);
                replica
                    .load_checkpoint(&bytes, true)
                    .and_then(|_| replica.shared_checkpoint_bytes(round))
            };
            let shared = match loaded {
                Ok(shared) => shared,
                Err(source) => {
                    return Err(HostError::Checkpoint {
                        path,
                        source: Box::new(source),
                    });
                }
            };
            let published = self
                .net
                .publish(CHECKPOINT_TAG, shared)
                .await
                .map_err(|source| HostError::Publish {
                    tag: CHECKPOINT_TAG.into(),
                    source,
                })?;
            // Every joiner, and every volunteer resuming, may need it from
            // the coordinator, the last resort.
            self.net.serve_without_limit(&published);
            if published != blob {
                return Err(HostError::CheckpointChanged { path });
            }
        }
        let host_id = self.net.id();
        for (round, signed) in self.state.manifests.clone() {
            let msg = Message::verify(&signed, self.state.run_id)
                .map_err(|source| HostError::SavedManifest { round, source })?;
            let Body::Manifest(manifest) = msg.body else {
                return Err(HostError::NotAManifest { round });
            };
            if msg.author != host_id || msg.round != round {
                return Err(HostError::ForeignManifest { round });
            }
            if let Some(accepted) = manifest.accepted {
                self.serve_saved(round, &accepted, format!("{}accepted", round_prefix(round)))
                    .await?;
            }
            let Some(aggregate) = manifest.aggregate else {
                continue;
            };
            let bytes = self
                .serve_saved(round, &aggregate, aggregate_tag(round))
                .await?;
            let checked = lock(&self.replica).check_aggregate(&bytes, round, manifest.updates);
            let update = checked.map_err(|source| HostError::SavedUpdate {
                round,
                path: self.blob_path(&aggregate),
                source,
            })?;
            lock(&self.replica)
                .apply(round, &[update])
                .map_err(|source| HostError::Replica {
                    round,
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// The aggregate cap's residual to continue with: the saved one when it
    /// follows the last recorded round, else zero (logged: the cap then
    /// forgets what it carried, which costs a little quality, not
    /// correctness). `None` when the run has no cap.
    fn load_residual(&self) -> Option<Residual> {
        self.state.spec.rounds.aggregate_topk?;
        let layout = lock(&self.replica).layout().clone();
        let zeros = Residual::zeros(&layout);
        let last = self.state.next_round.checked_sub(1);
        let path = self.dir.join(RESIDUAL_FILE);
        let saved = match std::fs::read(&path) {
            Ok(bytes) => Residual::from_bytes(&bytes, &layout).map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && last.is_none() => {
                return Some(zeros);
            }
            Err(e) => Err(e.to_string()),
        };
        match saved {
            Ok(r) if r.round == last => Some(r),
            Ok(r) => {
                self.warn(format!(
                    "{}: saved after round {:?}, the run is after round {last:?}; the aggregate \
                     cap starts from zero",
                    path.display(),
                    r.round
                ));
                Some(zeros)
            }
            Err(e) => {
                self.warn(format!(
                    "{}: {e}; the aggregate cap starts from zero",
                    path.display()
                ));
                Some(zeros)
            }
        }
    }

    /// Save the aggregate cap's residual (after the aggregate file, before
    /// the state file names the round).
    fn save_residual(&self) -> Result<(), HostError> {
        let Some(residual) = &self.residual else {
            return Ok(());
        };
        let path = self.dir.join(RESIDUAL_FILE);
        write_atomic(&path, &residual.to_bytes()).map_err(io_err(&path))
    }

    /// Read a blob a saved manifest names from the state directory, check it
    /// is that blob, and serve it again under `tag`.
    async fn serve_saved(
        &self,
        round: u64,
        blob: &BlobRef,
        tag: String,
    ) -> Result<Vec<u8>, HostError> {
        let path = self.blob_path(blob);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        if BlobRef::of(&bytes) != *blob {
            return Err(HostError::SavedBlobChanged { round, path });
        }
        self.net
            .publish(&tag, bytes.clone())
            .await
            .map_err(|source| HostError::Publish { tag, source })?;
        Ok(bytes)
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

    /// Write and publish a checkpoint after `round`; drop what it supersedes.
    ///
    /// The file keeps this replica's momentum too (a restart resumes it);
    /// the blob members fetch is the weights alone, which every member that
    /// applied `round` can also produce and serve.
    async fn checkpoint(&mut self, round: u64) -> Result<(), HostError> {
        let (bytes, shared) = {
            let replica = lock(&self.replica);
            replica
                .checkpoint_bytes(round)
                .and_then(|b| Ok((b, replica.shared_checkpoint_bytes(round)?)))
                .map_err(|source| HostError::Replica {
                    round,
                    source: Box::new(source),
                })?
        };
        let path = self.dir.join(CHECKPOINT_FILE);
        write_atomic(&path, &bytes).map_err(io_err(&path))?;
        let size = shared.len() as u64;
        let blob = self
            .net
            .publish(CHECKPOINT_TAG, shared)
            .await
            .map_err(|source| HostError::Publish {
                tag: CHECKPOINT_TAG.into(),
                source,
            })?;
        self.net.serve_without_limit(&blob);
        let old: Vec<(u64, Vec<u8>)> = std::mem::take(&mut self.state.manifests);
        let previous = self.state.checkpoint.map(|(r, _)| r);
        self.state.checkpoint = Some((round, blob));
        self.save()?;
        {
            let mut shared = self.shared();
            shared.checkpoint = Some((round, blob));
            // The checkpointed round's manifest stays: a volunteer that
            // missed its gossip applies that round from the aggregate
            // (still served, below) instead of downloading the weights.
            shared.manifests.retain(|(r, _)| *r == round);
        }
        // The superseded aggregates: files (a restart replays from the new
        // checkpoint) and blobs, except the blobs of the round just
        // checkpointed: members are fetching its aggregate right now. They
        // go at the next checkpoint.
        for (r, signed) in old {
            if let Ok(Message {
                body: Body::Manifest(m),
                ..
            }) = Message::verify(&signed, self.state.run_id)
            {
                for blob in [m.aggregate, m.accepted].into_iter().flatten() {
                    let _ = std::fs::remove_file(self.blob_path(&blob));
                }
            }
            if r != round {
                self.net.forget(&round_prefix(r)).await;
            }
        }
        if let Some(previous) = previous {
            self.net.forget(&round_prefix(previous)).await;
        }
        self.emit(NodeEvent::Checkpoint {
            node: self.name.clone(),
            round,
            bytes: size,
            from: None,
        });
        Ok(())
    }

    /// Log a fault of `peer` in `round`; drop it from the run once it has
    /// made `max_faults` within the last `fault_window` rounds (older
    /// faults are forgiven: a member whose link once garbled a blob is not
    /// banned for it months later).
    fn fault(&mut self, round: u64, peer: EndpointId, reason: String) {
        self.emit(NodeEvent::Rejected {
            node: self.name.clone(),
            round,
            peer: short(&peer),
            reason,
        });
        let rounds = &self.state.spec.rounds;
        let faults = count_fault(
            self.faults.entry(peer).or_default(),
            round,
            rounds.fault_window,
        );
        if faults >= rounds.max_faults {
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

    /// Handle the network events already queued, without waiting.
    fn drain_events(&mut self, round: u64) {
        while let Ok(ev) = self.events_rx.try_recv() {
            let _ = self.on_event(ev, round);
        }
        // Announces for no open round: nothing to collect them into.
        while self.announce_rx.try_recv().is_ok() {}
    }
}

/// The blob tag a round's aggregate is kept under.
pub(crate) fn aggregate_tag(round: u64) -> String {
    format!("{}aggregate", round_prefix(round))
}

/// The blob tag of an update.
pub(crate) fn update_tag(round: u64, sender: &EndpointId) -> String {
    format!("{}{}", round_prefix(round), sender)
}

/// The tag prefix of every blob kept for a round.
pub(crate) fn round_prefix(round: u64) -> String {
    format!("u/{round:012}/")
}

#[cfg(test)]
mod tests;
