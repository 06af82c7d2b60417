//! The protocol engine behind [`super::Volunteer`]: joins a run by ticket, catches up from the checkpoint and
//! the manifests since, then trains its share of every round it is a member
//! of and applies exactly the updates each signed manifest lists.
//!
//! The volunteer trusts nothing but the coordinator's signature (named by the
//! ticket) and BLAKE3: announces, manifests and updates may come from anyone,
//! in any order, twice or never. Missed gossip is recovered by asking the
//! coordinator directly; a replica whose weights disagree with the
//! coordinator's reported digest throws its state away and catches up again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use starling_swarm::{
    Announce, BlobRef, Body, Bytes, EndpointId, MAX_MEMBER_ADDRS, MAX_ROSTER_BYTES, Manifest,
    Member, Message, Net, NetConfig, NetEvent, Refusal, Request, Response, Roster, RoundOpen,
    RunState, SecretKey, Ticket, Traffic, WeightReport, unix_ms,
};
use starling_train::SelectedDevice;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use super::spread;
use crate::{
    data::Tokens,
    events::{NodeEvent, NodeState, PeerView},
    host::{aggregate_tag, round_prefix, update_tag},
    replica::{self, Replica, ReplicaError, SharedReplica, lock},
    short,
    spec::RunSpec,
    usage::{MonthlyCap, Usage},
};

/// Largest checkpoint a volunteer keeps to serve joiners: the blob store
/// holds it in memory (the weights of models up to ~500 M parameters).
const MAX_SERVED_CHECKPOINT_BYTES: u64 = 2 << 30;
/// Blob tag the checkpoint a volunteer serves is kept under.
const CHECKPOINT_TAG: &str = "checkpoint";
/// How long a joiner waits to be listed in a round (members admit it only
/// then) before it fetches the checkpoint from the coordinator instead.
const LISTED_WAIT: Duration = Duration::from_secs(60);
/// How long a volunteer that holds the manifest of its next round keeps
/// applying rounds before it takes the checkpoint instead: a round's
/// aggregate is a small fraction of the weights, and a volunteer one round
/// behind the coordinator's checkpoint is the usual case, not a straggler.
const ROUNDS_FIRST: Duration = Duration::from_secs(60);
/// How long a volunteer past its last round stays once nobody fetches
/// from it (see `Volunteer::linger`).
const LINGER_QUIET: Duration = Duration::from_secs(3);
/// Ask the coordinator directly after this long without news.
const POLL_AFTER: Duration = Duration::from_secs(3);
/// How often the data-use ledger is written between rounds (a round's
/// traffic is written when it is applied, and everything at exit).
const LEDGER_EVERY: Duration = Duration::from_secs(10);

/// Why a volunteer stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolunteerError {
    /// The run admits listed members only, and this node is not listed.
    #[error("the host refused to admit this node: it is not on the run's member list")]
    NotMember,
    /// The coordinator turned us away, for the reason it gave.
    #[error("the host refused to admit this node: {0}")]
    Refused(String),
    /// The endpoint could not start.
    #[error("network: {0}")]
    Spawn(#[source] Box<starling_swarm::SpawnError>),
    /// The coordinator answered something other than the run's state.
    #[error("network: unexpected answer from the host")]
    UnexpectedAnswer,
    /// The endpoint's event stream ended.
    #[error("network: the endpoint stopped")]
    NetworkStopped,
    /// The coordinator declared a checkpoint larger than the run's model can
    /// take: refused before any of it was downloaded.
    #[error(
        "the host declares a checkpoint of {declared} for a model whose weights take at most \
         {most}: refusing it (a broken or hostile host)"
    )]
    CheckpointTooLarge {
        /// The size the coordinator declared.
        declared: String,
        /// The most the model's checkpoint can take.
        most: String,
    },
    /// A download failed.
    #[error("network: {what}: {source}")]
    Fetch {
        /// What was being fetched.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<starling_swarm::FetchError>,
    },
    /// Our update could not be published.
    #[error("network: {0}")]
    Publish(#[source] Box<starling_swarm::PublishError>),
    /// Our announce could not be signed.
    #[error("network: {0}")]
    Sign(#[source] starling_swarm::MessageError),
    /// The run's spec is unusable.
    #[error("the host's run spec is invalid: {0}")]
    Spec(#[source] crate::spec::SpecError),
    /// The local replica failed.
    #[error("training: {0}")]
    Replica(#[from] ReplicaError),
    /// A training worker thread died.
    #[error("training: the worker thread failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
    /// The data-use ledger could not be read or written.
    #[error("data use ledger {path}: {source}")]
    Usage {
        /// The ledger file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The run's model needs more memory than this device may use.
    #[error(
        "this run trains a {params}-parameter model that needs about {need} to train; {device} may use {have}"
    )]
    TooSmall {
        /// The model's parameters.
        params: usize,
        /// Estimated training memory.
        need: String,
        /// What the device may use.
        have: String,
        /// The device.
        device: String,
    },
    /// The coordinator's aggregate for a round fails our checks.
    #[error("round {round}: the host's aggregate fails our checks: {source}")]
    InvalidAggregate {
        /// The round.
        round: u64,
        /// What our check found.
        #[source]
        source: crate::replica::UpdateError,
    },
    /// The coordinator's roster for a round does not decode or does not
    /// match its signed open.
    #[error("round {round}: the host's member list is invalid: {source}")]
    InvalidRoster {
        /// The round.
        round: u64,
        /// What is wrong with it.
        #[source]
        source: starling_swarm::ListError,
    },
}

impl VolunteerError {
    /// Whether the run can go on after it: a peer or the host went away
    /// mid-transfer, so the next tick tries again instead of leaving.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::UnexpectedAnswer | Self::Fetch { .. } | Self::Publish(_)
        )
    }
}

/// How to start a volunteer.
pub struct VolunteerOptions {
    /// The run to join.
    pub ticket: Ticket,
    /// This node's identity.
    pub key: SecretKey,
    /// Where to listen.
    pub bind: SocketAddr,
    /// Upload and download caps and counters; keep a clone to change the
    /// caps while the node runs (`Traffic::set_caps`).
    pub traffic: Traffic,
    /// Where to train.
    pub device: SelectedDevice,
    /// Stop after applying this many rounds (tests, demos).
    pub max_rounds: Option<u64>,
    /// Where this month's data use is kept (`None`: not kept, no monthly cap).
    pub usage_file: Option<PathBuf>,
    /// Where the listening port is kept so a restart with port 0 binds the
    /// same one again: peers' paths to this node stay valid and they reach
    /// the new process at once instead of after their connections to the old
    /// one time out (`None`: a fresh port each start).
    pub port_file: Option<PathBuf>,
    /// Pause participation once this many bytes moved this month.
    pub monthly_cap: MonthlyCap,
    /// Bytes of device memory training may use (from the device's memory
    /// and the volunteer's limit); a run whose model needs more is refused
    /// before anything is downloaded. `None`: unknown, not checked.
    pub memory_budget: Option<u64>,
    /// Send this corruption of every trained update (tests and benchmarks
    /// of the host's screen; `None`: honest).
    pub attack: Option<starling_train::sim::Attack>,
}

struct Volunteer {
    net: Arc<Net>,
    rx: mpsc::Receiver<NetEvent>,
    host: Member,
    name: String,
    out: mpsc::UnboundedSender<NodeEvent>,
    device: SelectedDevice,
    replica: Option<SharedReplica>,
    next: u64,
    opens: BTreeMap<u64, RoundOpen>,
    /// Rosters of the open round and the one before (the tree the next
    /// roster spreads over), by round.
    rosters: BTreeMap<u64, Roster>,
    /// The round of the last run eval loss reported.
    last_eval: Option<u64>,
    /// Whether this process has finished a training step yet.
    trained_any: bool,
    manifests: BTreeMap<u64, Manifest>,
    host_reports: BTreeMap<u64, u64>,
    my_digests: BTreeMap<u64, u64>,
    trained: BTreeSet<u64>,
    /// This round's signed announce, and whether the host took it.
    announce: Option<(u64, Vec<u8>, bool)>,
    /// The checkpoint to catch up from (its round and blob), and since when
    /// it is wanted.
    pending_checkpoint: Option<(u64, BlobRef, Instant)>,
    applied: u64,
    /// Traffic totals (up, down) when the last round was reported.
    counters: (u64, u64),
    /// Traffic totals (up, down) when the ledger was last written.
    ledgered: (u64, u64),
    /// This month's data use and where it is kept.
    usage: Option<(PathBuf, Usage)>,
    monthly_cap: MonthlyCap,
    memory_budget: Option<u64>,
    attack: Option<starling_train::sim::Attack>,
}

/// How a stretch of taking part ended.
enum Ended {
    /// `max_rounds` were applied, or the node was told to stop.
    Done,
    /// This month's data cap is reached: leave the network until it rolls.
    CapReached,
}

/// Join the run and take part until `stop` turns true or `max_rounds` are
/// applied. At the monthly cap the node leaves the network altogether (so
/// nothing more is counted against the month, not even gossip) and joins
/// again, catching up from a checkpoint, once the month changes or the cap
/// is raised.
pub async fn run_volunteer(
    opts: VolunteerOptions,
    out: mpsc::UnboundedSender<NodeEvent>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), VolunteerError> {
    loop {
        let mut v = Volunteer::start(&opts, out.clone()).await?;
        let result = tokio::select! {
            r = v.run(opts.max_rounds) => r,
            _ = stop.wait_for(|s| *s) => Ok(Ended::Done),
        };
        // At the cap the network closes under the node, so whatever failed
        // then is the cap.
        let result = match result {
            Err(_) if v.over_cap() => {
                v.pause_for_cap();
                Ok(Ended::CapReached)
            }
            r => r,
        };
        // What moved since the last write (a checkpoint cut short by the
        // stop, the goodbyes of the shutdown) is counted before leaving.
        v.net.shutdown().await;
        if let Err(e) = v.write_ledger() {
            v.warn(e.to_string());
        }
        let paused = matches!(result, Ok(Ended::CapReached));
        if !paused {
            v.state(NodeState::Stopped, format!("left before round {}", v.next));
        }
        let usage = v.usage.take();
        if !paused {
            return result.map(|_| ());
        }
        // Sit out, off the network, until the month rolls or the cap rises.
        let Some((_, mut usage)) = usage else {
            return Ok(());
        };
        while usage.over(unix_ms() / 1000, opts.monthly_cap.get()) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }
}

impl Volunteer {
    /// Bind the network and load the ledger: one stretch of taking part.
    async fn start(
        opts: &VolunteerOptions,
        out: mpsc::UnboundedSender<NodeEvent>,
    ) -> Result<Self, VolunteerError> {
        let host = Member {
            id: opts.ticket.host,
            addrs: opts.ticket.addrs.clone(),
        };
        let config = |bind| NetConfig {
            secret_key: opts.key.clone(),
            bind,
            run_id: opts.ticket.run_id,
            traffic: opts.traffic.clone(),
            open: false,
            control: None,
            bootstrap: vec![host.clone()],
            serving: starling_swarm::Serving::Honest,
        };
        // The traffic counters may already hold an earlier stretch's bytes
        // (the app's session keeps them across pause and resume): those are
        // in the ledger already; what binding and joining moves is not.
        let wire = (opts.traffic.wire.up(), opts.traffic.wire.down());
        let saved_port = opts
            .port_file
            .as_deref()
            .filter(|_| opts.bind.port() == 0)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse::<u16>().ok())
            .filter(|&p| p != 0);
        let spawned = match saved_port {
            Some(port) => {
                let mut bind = opts.bind;
                bind.set_port(port);
                match Net::spawn(config(bind)).await {
                    Ok(n) => Ok(n),
                    // Taken by another program meanwhile: any port will do.
                    Err(_) => Net::spawn(config(opts.bind)).await,
                }
            }
            None => Net::spawn(config(opts.bind)).await,
        };
        let (net, rx) = spawned.map_err(|e| VolunteerError::Spawn(Box::new(e)))?;
        if let (Some(path), Some(addr)) = (&opts.port_file, net.addrs().first()) {
            // Best effort: without it a restart only reconnects more slowly.
            let _ = starling_train::atomic::write_atomic(path, addr.port().to_string().as_bytes());
        }
        let mut v = Volunteer {
            net: Arc::new(net),
            rx,
            host,
            name: short(&opts.key.public()),
            out,
            device: opts.device.clone(),
            replica: None,
            next: 0,
            opens: BTreeMap::new(),
            rosters: BTreeMap::new(),
            last_eval: None,
            trained_any: false,
            manifests: BTreeMap::new(),
            host_reports: BTreeMap::new(),
            my_digests: BTreeMap::new(),
            trained: BTreeSet::new(),
            announce: None,
            pending_checkpoint: None,
            applied: 0,
            counters: wire,
            ledgered: wire,
            usage: None,
            monthly_cap: opts.monthly_cap.clone(),
            memory_budget: opts.memory_budget,
            attack: opts.attack,
        };
        if let Some(path) = &opts.usage_file {
            let usage = Usage::load(path).map_err(|source| VolunteerError::Usage {
                path: path.clone(),
                source,
            })?;
            v.usage = Some((path.clone(), usage));
        }
        v.set_budget();
        Ok(v)
    }

    fn emit(&self, e: NodeEvent) {
        let _ = self.out.send(e);
    }

    /// A progress callback for downloading `total` bytes of `what`: emits
    /// [`NodeEvent::Fetching`] at most every 250 ms, and at the end.
    fn progress(&self, what: &str, total: u64) -> impl Fn(u64) + Send + Sync + use<> {
        let (out, node, what) = (self.out.clone(), self.name.clone(), what.to_string());
        let last = std::sync::Mutex::new(None::<Instant>);
        move |done| {
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            if done < total && last.is_some_and(|t| t.elapsed() < Duration::from_millis(250)) {
                return;
            }
            *last = Some(Instant::now());
            let _ = out.send(NodeEvent::Fetching {
                node: node.clone(),
                what: what.clone(),
                done,
                total,
            });
        }
    }

    fn state(&self, state: NodeState, detail: String) {
        self.emit(NodeEvent::State {
            node: self.name.clone(),
            state,
            detail,
        });
    }

    fn warn(&self, message: String) {
        self.emit(NodeEvent::Warning {
            node: self.name.clone(),
            message,
        });
    }

    /// The replica; it exists once `sync` has joined, and every caller
    /// runs after that.
    fn replica(&self) -> Result<SharedReplica, VolunteerError> {
        self.replica.clone().ok_or(VolunteerError::NetworkStopped)
    }

    async fn run(&mut self, max_rounds: Option<u64>) -> Result<Ended, VolunteerError> {
        self.state(
            NodeState::Connecting,
            format!("joining via {}", short(&self.host.id)),
        );
        self.sync().await?;
        let mut last_news = Instant::now();
        let mut last_ledger = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            if max_rounds.is_some_and(|m| self.applied >= m) {
                self.linger().await;
                return Ok(Ended::Done);
            }
            if self.over_cap() {
                self.pause_for_cap();
                return Ok(Ended::CapReached);
            }
            // A peer or the host that went away mid-transfer is a warning:
            // the next tick tries again instead of leaving the run.
            let caught_up = self.catch_up().await;
            if self.retry_later(caught_up)? {
                last_news = Instant::now();
                continue;
            }
            let applied = self.apply_ready().await;
            if self.retry_later(applied)? {
                last_news = Instant::now();
                continue;
            }
            let trained = self.maybe_train().await.map(|()| false);
            self.retry_later(trained)?;
            tokio::select! {
                ev = self.rx.recv() => {
                    let Some(ev) = ev else { return Err(VolunteerError::NetworkStopped) };
                    if self.on_event(ev) {
                        last_news = Instant::now();
                    }
                }
                _ = tick.tick() => {
                    if last_ledger.elapsed() >= LEDGER_EVERY {
                        self.write_ledger()?;
                        last_ledger = Instant::now();
                    }
                    self.deliver_announce().await;
                    if last_news.elapsed() > POLL_AFTER {
                        match self.sync().await {
                            Ok(()) => {}
                            Err(e) if e.is_transient() => self.warn(e.to_string()),
                            Err(e) => return Err(e),
                        }
                        last_news = Instant::now();
                    }
                }
            }
        }
    }

    /// After its last round, keep serving until nobody fetched anything
    /// from this node for [`LINGER_QUIET`], at most one round window: its
    /// children in the last round's tree fetch that round's aggregate from
    /// it, and a parent that left at once would send them all to the
    /// coordinator (as the coordinator itself stays one window).
    async fn linger(&self) {
        let window = self
            .replica
            .as_ref()
            .map(|r| lock(r).spec().rounds.window_secs)
            .unwrap_or(0.0);
        let until = Instant::now() + Duration::from_secs_f64(window);
        let served = || self.net.traffic().total.up();
        let (mut last, mut quiet_since) = (served(), Instant::now());
        while Instant::now() < until && quiet_since.elapsed() < LINGER_QUIET {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if served() != last {
                (last, quiet_since) = (served(), Instant::now());
            }
        }
    }

    /// Whether a step made progress; a transient failure is a warning and
    /// no progress (the next tick tries again), any other ends the run.
    fn retry_later(&self, step: Result<bool, VolunteerError>) -> Result<bool, VolunteerError> {
        match step {
            Err(e) if e.is_transient() => {
                self.warn(e.to_string());
                Ok(false)
            }
            other => other,
        }
    }

    /// Ask the coordinator where the run is; load the spec, checkpoint and
    /// manifests we lack.
    async fn sync(&mut self) -> Result<(), VolunteerError> {
        let state = self.ask_host().await?;
        if self.replica.is_none() {
            self.build_replica(&state).await?;
        }
        if let Some((round, blob)) = state.checkpoint
            && round >= self.next
            && self.pending_checkpoint.is_none_or(|(r, ..)| r < round)
        {
            // A size the model cannot have ends this volunteer at once,
            // before any wait or download.
            let most = lock(&self.replica()?).max_checkpoint_bytes();
            if blob.size > most {
                return Err(VolunteerError::CheckpointTooLarge {
                    declared: crate::machine::human_bytes(blob.size),
                    most: crate::machine::human_bytes(most),
                });
            }
            self.pending_checkpoint = Some((round, blob, Instant::now()));
        }
        for signed in state.manifests.iter().chain(state.round_open.iter()) {
            if let Ok(m) = Message::verify(signed, self.net.run_id()) {
                self.on_message(m);
            }
        }
        Ok(())
    }

    /// The run's state from the coordinator, retrying (with a growing pause)
    /// until it answers; a refusal ends the volunteer.
    async fn ask_host(&mut self) -> Result<RunState, VolunteerError> {
        // A machine with many interfaces (container bridges, VPNs) lists
        // its first few addresses: the host refuses a join listing more.
        let mut addrs = self.net.addrs();
        addrs.truncate(MAX_MEMBER_ADDRS);
        let request = Request::Join {
            run_id: self.net.run_id(),
            addrs,
            since: self.replica.as_ref().map(|_| self.next),
        };
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.net.request(&self.host, &request).await {
                Ok(Response::State(s)) => return Ok(s),
                Ok(Response::Refused {
                    why: Refusal::NotMember,
                    ..
                }) => return Err(VolunteerError::NotMember),
                Ok(Response::Refused { reason, .. }) => {
                    return Err(VolunteerError::Refused(reason));
                }
                Ok(_) => return Err(VolunteerError::UnexpectedAnswer),
                Err(starling_swarm::ControlError::NotAdmitted) => {
                    return Err(VolunteerError::NotMember);
                }
                Err(e) => {
                    self.state(
                        NodeState::Connecting,
                        format!(
                            "cannot reach the host yet ({e}): is it running, and is the ticket \
                             from its current run? Trying again in {} s",
                            backoff.as_secs_f32()
                        ),
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Check the run's spec against this device, then build the replica:
    /// a model that needs more memory than the device may use is refused
    /// here, before anything is downloaded.
    async fn build_replica(&mut self, state: &RunState) -> Result<(), VolunteerError> {
        let spec = RunSpec::from_bytes(&state.spec).map_err(VolunteerError::Spec)?;
        let need =
            crate::machine::training_bytes(&spec.model, spec.run.micro_batch, spec.run.seq_len);
        if let Some(have) = self.memory_budget
            && need > have
        {
            return Err(VolunteerError::TooSmall {
                params: spec.model.param_count(),
                need: crate::machine::human_bytes(need),
                have: crate::machine::human_bytes(have),
                device: self.device.name.clone(),
            });
        }
        self.net
            .set_stall_timeout(Duration::from_secs_f64(spec.rounds.stall_secs));
        let (device, run_id, id) = (
            self.device.clone(),
            self.net.run_id().0,
            *self.net.id().as_bytes(),
        );
        let attack = self.attack;
        let replica = tokio::task::spawn_blocking(move || {
            Replica::new(&spec, &device, run_id, id, Tokens::fetched())
                .map(|r| r.with_attack(attack))
        })
        .await
        .map_err(VolunteerError::Worker)??;
        let params = replica.spec().model.param_count();
        let run = replica.spec().run.name.clone();
        let total_rounds = replica.spec().run.total_rounds;
        self.replica = Some(Arc::new(Mutex::new(replica)));
        self.emit(NodeEvent::Joined {
            node: self.name.clone(),
            run,
            params,
            round: state.next_round,
            total_rounds,
        });
        Ok(())
    }

    /// Load the checkpoint we are behind, once members can serve it: they
    /// admit this node when they hold a roster that lists it, so it waits to
    /// be listed in an open round (the coordinator lists whoever joined
    /// since the last round opened), up to [`LISTED_WAIT`], then fetches it
    /// from a few of that round's members, the coordinator being the last
    /// resort. A volunteer that holds the manifest of its next round applies
    /// rounds instead, for up to [`ROUNDS_FIRST`]. Returns whether it loaded
    /// one.
    async fn catch_up(&mut self) -> Result<bool, VolunteerError> {
        let Some((round, blob, since)) = self.pending_checkpoint else {
            return Ok(false);
        };
        if round < self.next {
            // The rounds up to it arrived another way.
            self.pending_checkpoint = None;
            return Ok(false);
        }
        if self.manifests.contains_key(&self.next) && since.elapsed() < ROUNDS_FIRST {
            return Ok(false);
        }
        let me = self.net.id();
        let newest = self
            .opens
            .iter()
            .next_back()
            .filter(|(r, _)| **r > round)
            .map(|(r, open)| (*r, open.roster, open.members));
        let mut members = None;
        if let Some((open_round, roster, count)) = newest
            && let Some(roster) = self.roster(open_round, roster, count).await?
            && roster.slot(&me).is_some()
        {
            members = Some(
                roster
                    .members
                    .iter()
                    .map(|m| m.id)
                    .filter(|id| *id != me && *id != self.host.id)
                    .collect::<Vec<_>>(),
            );
        }
        if members.is_none() && since.elapsed() < LISTED_WAIT {
            self.state(
                NodeState::CatchingUp,
                format!(
                    "waiting to be listed in a round, to fetch the checkpoint after round \
                     {round} from its members"
                ),
            );
            return Ok(false);
        }
        self.load_checkpoint(round, blob, &members.unwrap_or_default())
            .await?;
        self.pending_checkpoint = None;
        Ok(true)
    }

    /// Download the checkpoint after `round` from `members` (the
    /// coordinator last) and load it; keep it to serve other joiners.
    async fn load_checkpoint(
        &mut self,
        round: u64,
        blob: BlobRef,
        members: &[EndpointId],
    ) -> Result<(), VolunteerError> {
        let most = lock(&self.replica()?).max_checkpoint_bytes();
        self.state(
            NodeState::CatchingUp,
            format!(
                "fetching the checkpoint after round {round} ({} bytes)",
                blob.size
            ),
        );
        let progress = self.progress("checkpoint", blob.size);
        let fetched = spread::fetch_from_members(
            &self.net,
            &blob,
            members,
            self.host.id,
            most,
            CHECKPOINT_TAG,
            &progress,
        )
        .await
        .map_err(|source| VolunteerError::Fetch {
            what: "checkpoint".into(),
            source: Box::new(source),
        })?;
        self.name_liars("the checkpoint", &fetched.corrupt);
        let (bytes, from) = (fetched.bytes, fetched.from);
        replica::blocking(&self.replica()?, move |r| r.load_checkpoint(&bytes, false)).await?;
        if blob.size > MAX_SERVED_CHECKPOINT_BYTES {
            self.net.forget(CHECKPOINT_TAG).await;
        }
        self.next = round.saturating_add(1);
        self.manifests.retain(|r, _| *r > round);
        self.emit(NodeEvent::Checkpoint {
            node: self.name.clone(),
            round,
            bytes: blob.size,
            from: Some(if from == self.host.id {
                "host".into()
            } else {
                short(&from)
            }),
        });
        Ok(())
    }

    /// After applying a round the coordinator checkpoints, keep the
    /// checkpoint's blob (the same bytes as the coordinator's: see
    /// [`Replica::shared_checkpoint_bytes`]) to serve joiners, in place of
    /// the one before. A checkpoint too large to hold in memory is not kept.
    async fn keep_checkpoint(&self, round: u64, replica: &SharedReplica) {
        let params = lock(replica).spec().model.param_count() as u64;
        if params.saturating_mul(4) > MAX_SERVED_CHECKPOINT_BYTES {
            return;
        }
        let kept = match replica::blocking(replica, move |r| r.shared_checkpoint_bytes(round)).await
        {
            Ok(bytes) => self
                .net
                .publish(CHECKPOINT_TAG, bytes)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = kept {
            self.warn(format!(
                "round {round}: the checkpoint is not kept for joiners: {e}"
            ));
        }
    }

    /// Record a message; returns whether it was news from the coordinator.
    fn on_message(&mut self, m: Message) -> bool {
        if m.author != self.host.id {
            return false;
        }
        match m.body {
            Body::RoundOpen(open) if m.round >= self.next && !self.opens.contains_key(&m.round) => {
                self.emit(NodeEvent::RoundOpened {
                    node: self.name.clone(),
                    round: m.round,
                    members: open.members as usize,
                });
                if let Some((round, eval_loss)) = open.eval
                    && eval_loss.is_finite()
                    && self.last_eval.is_none_or(|r| round > r)
                {
                    self.last_eval = Some(round);
                    self.emit(NodeEvent::Evaluated {
                        node: self.name.clone(),
                        round,
                        eval_loss,
                    });
                }
                self.opens.insert(m.round, open);
                true
            }
            Body::Manifest(man) if m.round >= self.next => {
                self.manifests.insert(m.round, man).is_none()
            }
            Body::WeightReport(WeightReport { digest }) => {
                self.host_reports.insert(m.round, digest);
                while self.host_reports.len() > 64 {
                    self.host_reports.pop_first();
                }
                false
            }
            _ => false,
        }
    }

    fn on_event(&mut self, ev: NetEvent) -> bool {
        match ev {
            NetEvent::Message(m) => self.on_message(m),
            NetEvent::Refused(id) => {
                self.warn(format!(
                    "refused a connection from non-member {}",
                    short(&id)
                ));
                false
            }
            NetEvent::BadMessage { via, error } => {
                self.emit(NodeEvent::Rejected {
                    node: self.name.clone(),
                    round: self.next,
                    peer: short(&via),
                    reason: error,
                });
                false
            }
            _ => false,
        }
    }

    /// Train the open round if we are a member and have not yet.
    async fn maybe_train(&mut self) -> Result<(), VolunteerError> {
        let round = self.next;
        let Some(open) = self.opens.get(&round) else {
            return Ok(());
        };
        if self.trained.contains(&round)
            || self.manifests.contains_key(&round)
            || unix_ms() >= open.deadline_ms
        {
            return Ok(());
        }
        let me = self.net.id();
        let (blob, count) = (open.roster, open.members);
        let deadline_ms = open.deadline_ms;
        let Some(roster) = self.roster(round, blob, count).await? else {
            return Ok(());
        };
        let Some(slot) = roster.slot(&me) else {
            // The host admits whoever asked since the last round opened: ask
            // (again), so we are in the next round.
            self.state(
                NodeState::Waiting,
                format!("not a member of round {round}; asking to take part in the next"),
            );
            self.trained.insert(round);
            return self.sync().await;
        };
        let replica = self.replica()?;
        let deadline = Duration::from_millis(deadline_ms.saturating_sub(unix_ms()));
        // On failure the round stays untrained: the next tick tries again
        // until the deadline.
        self.fetch_windows(round, slot as u32, deadline).await?;
        self.trained.insert(round);
        if self.trained_any {
            self.state(NodeState::Training, format!("round {round}"));
        } else {
            self.state(
                NodeState::WarmingUp,
                format!(
                    "round {round}: the first step on {} prepares its kernels and memory \
                     (up to a minute on some GPUs)",
                    self.device.name
                ),
            );
        }
        let topk = lock(&replica).topk_for_cap(self.net.traffic().up.rate());
        let step = Instant::now();
        let trained =
            replica::blocking(&replica, move |r| r.train(round, slot as u32, topk)).await?;
        let secs = step.elapsed().as_secs_f64();
        let size = trained.bytes.len() as u64;
        let blob = self
            .net
            .publish(&update_tag(round, &me), trained.bytes)
            .await
            .map_err(|e| VolunteerError::Publish(Box::new(e)))?;
        let announce = Announce {
            update: blob,
            tokens: trained.tokens,
            loss: trained.loss,
        };
        let signed = Message::sign(
            self.net.secret_key(),
            self.net.run_id(),
            round,
            Body::Announce(announce),
        )
        .map_err(VolunteerError::Sign)?;
        self.announce = Some((round, signed, false));
        self.deliver_announce().await;
        self.trained_any = true;
        self.emit(NodeEvent::Trained {
            node: self.name.clone(),
            round,
            loss: trained.loss,
            tokens: trained.tokens,
            topk: trained.topk,
            bytes: size,
            secs,
        });
        self.state(
            NodeState::Syncing,
            format!("round {round}: waiting for the manifest"),
        );
        Ok(())
    }

    /// The roster of `round`, fetched (through the previous round's tree)
    /// and admitted at the gate the first time it is asked for; `None`
    /// while no provider has delivered it (the next tick asks again).
    async fn roster(
        &mut self,
        round: u64,
        blob: BlobRef,
        count: u32,
    ) -> Result<Option<Roster>, VolunteerError> {
        if let Some(r) = self.rosters.get(&round) {
            return Ok(Some(r.clone()));
        }
        let previous: Vec<EndpointId> = self
            .rosters
            .range(..round)
            .next_back()
            .map(|(_, r)| r.members.iter().map(|m| m.id).collect())
            .unwrap_or_default();
        let tag = format!("{}roster", round_prefix(round));
        let what = format!("round {round}: the member list");
        let bytes = match self
            .fetch_spread(&what, &blob, &previous, MAX_ROSTER_BYTES, &tag)
            .await
        {
            Ok(bytes) => bytes,
            Err(e) => {
                self.warn(format!("round {round}: member list not received: {e}"));
                return Ok(None);
            }
        };
        let roster = Roster::from_bytes(&bytes, count)
            .map_err(|source| VolunteerError::InvalidRoster { round, source })?;
        self.net.set_members(&roster.members, &[self.host.id]).await;
        self.rosters.insert(round, roster.clone());
        while self.rosters.len() > 2 {
            self.rosters.pop_first();
        }
        Ok(Some(roster))
    }

    /// Send this round's announce to the host over the control protocol
    /// until it takes it; while the host cannot be reached, gossip it too
    /// (a neighbour may get it through).
    async fn deliver_announce(&mut self) {
        let Some((round, signed, false)) = &self.announce else {
            return;
        };
        if *round != self.next {
            return;
        }
        let request = Request::Announce {
            signed: signed.clone(),
        };
        match self.net.request(&self.host, &request).await {
            Ok(Response::Taken) => {
                if let Some(a) = &mut self.announce {
                    a.2 = true;
                }
            }
            Ok(_) | Err(_) => {
                let _ = self.net.broadcast(signed.clone()).await;
            }
        }
    }

    /// Fetch the data windows this member trains on in `round` from the
    /// host: only the byte ranges they cover, BLAKE3-verified.
    async fn fetch_windows(
        &mut self,
        round: u64,
        slot: u32,
        time_limit: Duration,
    ) -> Result<(), VolunteerError> {
        let replica = self.replica()?;
        let (missing, data) = {
            let r = lock(&replica);
            (r.missing_windows(round, slot), r.spec().data.blob)
        };
        if missing.is_empty() {
            return Ok(());
        }
        self.state(
            NodeState::Training,
            format!("round {round}: fetching {} data windows", missing.len()),
        );
        let ranges: Vec<_> = missing.iter().map(|(_, r)| r.clone()).collect();
        let fetched = self
            .net
            .fetch_ranges(&data, &ranges, &[self.host.id], time_limit)
            .await
            .map_err(|source| VolunteerError::Fetch {
                what: "training data".into(),
                source: Box::new(source),
            })?;
        let mut r = lock(&replica);
        for ((offset, _), bytes) in missing.iter().zip(&fetched) {
            r.add_window(*offset, bytes)?;
        }
        Ok(())
    }

    /// Apply the manifest of the next round if we have it. Returns whether one was applied.
    async fn apply_ready(&mut self) -> Result<bool, VolunteerError> {
        let round = self.next;
        let Some(manifest) = self.manifests.get(&round).cloned() else {
            return Ok(false);
        };
        let replica = self.replica()?;
        let digest = match manifest.aggregate {
            Some(blob) => {
                let bytes = self.fetch_aggregate(round, &blob, &replica).await?;
                let n = manifest.updates;
                replica::blocking(&replica, move |r| {
                    let update = match r.check_aggregate(&bytes, round, n) {
                        Ok(update) => update,
                        Err(invalid) => return Ok(Err(invalid)),
                    };
                    r.apply(round, &[update])?;
                    r.digest().map(Ok)
                })
                .await?
                .map_err(|source| VolunteerError::InvalidAggregate { round, source })?
            }
            // Nothing was accepted: the weights stay as they are.
            None => replica::blocking(&replica, |r| r.digest()).await?,
        };
        self.report_applied(round, &manifest, digest, &replica)?;
        if lock(&replica).spec().rounds.checkpoints_after(round) {
            self.keep_checkpoint(round, &replica).await;
        }
        let report_every = lock(&replica).spec().rounds.report_every;
        if round.is_multiple_of(report_every)
            && let Ok(signed) = Message::sign(
                self.net.secret_key(),
                self.net.run_id(),
                round,
                Body::WeightReport(WeightReport { digest }),
            )
        {
            let _ = self.net.broadcast(signed).await;
        }
        self.advance(round).await;
        self.check_divergence().await.map(|_| true)
    }

    /// Fetch `round`'s aggregate through the round's tree (from the
    /// coordinator when this node is not a member of the round).
    async fn fetch_aggregate(
        &self,
        round: u64,
        blob: &BlobRef,
        replica: &SharedReplica,
    ) -> Result<Bytes, VolunteerError> {
        let max = lock(replica).max_aggregate_bytes();
        let members: Vec<EndpointId> = self
            .rosters
            .get(&round)
            .map(|r| r.members.iter().map(|m| m.id).collect())
            .unwrap_or_default();
        let what = format!("round {round}: the aggregate");
        self.fetch_spread(&what, blob, &members, max, &aggregate_tag(round))
            .await
            .map_err(|source| VolunteerError::Fetch {
                what,
                source: Box::new(source),
            })
    }

    /// Fetch `what` through the tree (see [`spread::fetch`]), naming every
    /// member that served it with bytes that fail verification.
    async fn fetch_spread(
        &self,
        what: &str,
        blob: &BlobRef,
        members: &[EndpointId],
        max: u64,
        tag: &str,
    ) -> Result<Bytes, starling_swarm::FetchError> {
        let fetched = spread::fetch(&self.net, blob, members, self.host.id, max, tag).await?;
        self.name_liars(what, &fetched.corrupt);
        Ok(fetched.bytes)
    }

    /// Warn about each member that served `what` with bytes that are not it.
    fn name_liars(&self, what: &str, liars: &[EndpointId]) {
        for liar in liars {
            self.warn(format!(
                "{what}: member {} served bytes that fail BLAKE3 verification; \
                 fetched it from another provider",
                short(liar)
            ));
        }
    }

    /// Tell the faces about an applied round (loss, traffic, peers) and
    /// add its traffic to the ledger.
    fn report_applied(
        &mut self,
        round: u64,
        manifest: &Manifest,
        digest: u64,
        replica: &SharedReplica,
    ) -> Result<(), VolunteerError> {
        let wire = &self.net.traffic().wire;
        let (up, down) = (wire.up(), wire.down());
        let allreduce = lock(replica).allreduce_bytes();
        self.emit(NodeEvent::RoundApplied {
            node: self.name.clone(),
            round,
            updates: manifest.updates as usize,
            loss: manifest.loss,
            eval_loss: None,
            digest,
            bytes_up: up.saturating_sub(self.counters.0),
            bytes_down: down.saturating_sub(self.counters.1),
            allreduce_bytes: allreduce,
            tokens: manifest.tokens,
            run_tokens: manifest.run_tokens,
        });
        let peers = self
            .net
            .peer_stats()
            .into_iter()
            .take(32)
            .map(|p| PeerView {
                peer: short(&p.id),
                host: p.id == self.host.id,
                rtt_ms: p.rtt_ms,
                relayed: p.relayed,
                bytes_down: p.bytes_down,
                down_bytes_per_sec: p.down_bytes_per_sec,
            })
            .collect();
        self.emit(NodeEvent::Peers {
            node: self.name.clone(),
            peers,
        });
        self.counters = (up, down);
        self.write_ledger()?;
        self.my_digests.insert(round, digest);
        while self.my_digests.len() > 64 {
            self.my_digests.pop_first();
        }
        Ok(())
    }

    /// Move on past `round`: drop what belonged to it and free the blobs of
    /// two rounds ago.
    async fn advance(&mut self, round: u64) {
        self.next = round.saturating_add(1);
        self.applied += 1;
        self.opens.retain(|r, _| *r >= self.next);
        // The roster of the round just applied stays: the next roster
        // spreads over its tree.
        self.rosters.retain(|r, _| *r >= round);
        self.manifests.retain(|r, _| *r >= self.next);
        self.trained.retain(|r| *r >= self.next);
        if let Some(old) = round.checked_sub(2) {
            self.net.forget(&round_prefix(old)).await;
        }
    }

    /// Add the traffic since the last write to this month's ledger, save
    /// it and report it.
    fn write_ledger(&mut self) -> Result<(), VolunteerError> {
        let wire = &self.net.traffic().wire;
        let (up, down) = (wire.up(), wire.down());
        let Some((path, usage)) = &mut self.usage else {
            return Ok(());
        };
        let (new_up, new_down) = (
            up.saturating_sub(self.ledgered.0),
            down.saturating_sub(self.ledgered.1),
        );
        if new_up == 0 && new_down == 0 {
            return Ok(());
        }
        usage.add(unix_ms() / 1000, new_up, new_down);
        usage.save(path).map_err(|source| VolunteerError::Usage {
            path: path.clone(),
            source,
        })?;
        self.ledgered = (up, down);
        let event = NodeEvent::Usage {
            node: self.name.clone(),
            month: usage.month.clone(),
            up: usage.month_up,
            down: usage.month_down,
            cap: self.monthly_cap.get(),
            today: usage.day_bytes,
        };
        self.emit(event);
        Ok(())
    }

    /// Whether this month's data use has reached the cap, or a transfer
    /// was refused for the little left of it.
    fn over_cap(&mut self) -> bool {
        self.set_budget();
        let cap = self.monthly_cap.get();
        let spent = self.net.traffic().budget.spent();
        match &mut self.usage {
            Some((_, usage)) => spent || usage.over(unix_ms() / 1000, cap),
            None => false,
        }
    }

    /// Let the transfers move what is left of this month's cap (the cap
    /// can change at any moment, and the month roll over).
    fn set_budget(&mut self) {
        let cap = self.monthly_cap.get();
        let limit = match (&mut self.usage, cap) {
            (Some((_, usage)), Some(cap)) => {
                usage.roll(unix_ms() / 1000);
                // The ledger holds every byte up to `ledgered`.
                let counted = self.ledgered.0.saturating_add(self.ledgered.1);
                Some(counted.saturating_add(cap.saturating_sub(usage.month_bytes())))
            }
            _ => None,
        };
        self.net.traffic().budget.set_limit(limit);
    }

    /// Say why the node leaves the network until the month changes.
    fn pause_for_cap(&mut self) {
        self.net.sample_wire();
        if let Err(e) = self.write_ledger() {
            self.warn(e.to_string());
        }
        let (used, month) = match &self.usage {
            Some((_, u)) => (u.month_bytes(), u.month.clone()),
            None => return,
        };
        self.state(
            NodeState::Paused,
            format!(
                "monthly data cap reached: {used} of {} bytes in {month}; resuming next month",
                self.monthly_cap.get().unwrap_or(0)
            ),
        );
    }

    /// Compare our digests with the coordinator's reports; on a mismatch,
    /// start over from the checkpoint.
    async fn check_divergence(&mut self) -> Result<(), VolunteerError> {
        let diverged = self
            .host_reports
            .iter()
            .find(|(r, d)| self.my_digests.get(r).is_some_and(|m| m != *d))
            .map(|(r, _)| *r);
        if let Some(round) = diverged {
            self.emit(NodeEvent::Diverged {
                node: self.name.clone(),
                peer: self.name.clone(),
                round,
            });
            self.replica = None;
            self.next = 0;
            self.my_digests.clear();
            self.host_reports.clear();
            self.manifests.clear();
            self.sync().await?;
        }
        Ok(())
    }
}
