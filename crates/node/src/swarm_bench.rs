//! `starling bench swarm`: a real coordinator and many volunteers in one
//! process, each volunteer with its own iroh endpoint on 127.0.0.1, to
//! measure what a round costs as the member count grows.
//!
//! The volunteers do not train: each sends, every round, a synthetic update
//! of the run's exact shapes, top-k and value encoding (random positions and
//! values), so a 2-core machine can hold hundreds of them. Everything else
//! is the run's real protocol: the join request, the roster and aggregate
//! fetched through the per-blob tree (`volunteer/spread.rs`), the signed
//! announces and manifests, and the coordinator's collection, checks, robust
//! filter, aggregate and reference replica. Traffic is what the blob
//! transfers moved (the counters the caps act on); gossip and control frames
//! are not in it.

mod bookkeeping;

pub use bookkeeping::{Bookkeeping, measure as measure_bookkeeping};

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::index::sample};
use starling_distro::{
    ModelLayout, OutgoingUpdate, SparseTensor,
    wire::{self, UpdateHeader},
};
use starling_swarm::{
    Announce, BlobRef, Body, EndpointId, MAX_MEMBER_ADDRS, MAX_ROSTER_BYTES, Manifest, Member,
    Message, Net, NetConfig, NetEvent, Request, Response, Roster, RoundOpen, RunState, SecretKey,
    Serving, Ticket, Traffic,
};
use starling_train::{DeviceChoice, select_device};
use tokio::{
    sync::{Barrier, mpsc, watch},
    time::Instant,
};

use crate::{
    Host, HostError, HostOptions, NodeEvent, RunFile, RunSpec, SpecError,
    host::{aggregate_tag, round_prefix, update_tag},
    volunteer::spread,
};

/// Every node listens on loopback, on a port of its own.
const LOOPBACK: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// What to measure.
#[derive(Clone, Debug)]
pub struct SwarmBenchOptions {
    /// Volunteers to start.
    pub volunteers: usize,
    /// Rounds to play.
    pub rounds: u64,
    /// Model preset whose shapes the updates have.
    pub model: String,
    /// Coefficients per chunk each update carries.
    pub topk: usize,
    /// Value encoding (`sign`, `bf16`, `f32`).
    pub values: String,
    /// Re-sparsify the aggregate to this many coefficients per chunk.
    pub aggregate_topk: Option<usize>,
    /// Where the coordinator keeps its state (emptied first).
    pub dir: PathBuf,
    /// Join this run instead of starting a coordinator (its rounds, model
    /// and settings apply; the coordinator's side is not measured).
    pub join: Option<Ticket>,
    /// How many of the volunteers corrupt every blob they relay (they
    /// serve their own updates honestly): the adversary the tree must route
    /// around.
    pub corrupt_relays: usize,
    /// How many of the volunteers (the last ones) send empty updates:
    /// throwaway identities flooding the round, which the host's screen
    /// must leave out without holding them against anyone.
    pub empty_updates: usize,
}

/// One round as measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RoundReport {
    /// The round.
    pub round: u64,
    /// Members of the round.
    pub members: usize,
    /// Updates the coordinator accepted (and merged).
    pub accepted: usize,
    /// Bytes of the round's aggregate.
    pub aggregate_bytes: u64,
    /// Bytes of the round's roster.
    pub roster_bytes: u64,
    /// Median over volunteers of the bytes each downloaded for the round.
    pub download_median_bytes: u64,
    /// Most any volunteer downloaded for the round.
    pub download_max_bytes: u64,
    /// Most any volunteer uploaded for the round (its update, and what it
    /// served to the volunteers below it in the tree).
    pub upload_max_bytes: u64,
    /// Bytes the coordinator uploaded from this round's opening to the
    /// next's (copies of a round's aggregate may still go out after the
    /// next round opens: the per-blob counts below are exact).
    pub host_upload_bytes: u64,
    /// Bytes of this round's aggregate the coordinator uploaded.
    pub host_aggregate_upload_bytes: u64,
    /// Bytes of this round's member list the coordinator uploaded (in the
    /// first round, to every newcomer: no member admits it yet; later, the
    /// list is the same blob as before while the members stay).
    pub host_roster_upload_bytes: u64,
    /// Volunteers that got the aggregate from the coordinator: its direct
    /// children in the tree plus the fallbacks.
    pub aggregates_from_host: usize,
    /// Seconds from the round's opening to the coordinator's apply.
    pub round_secs: f64,
    /// Resident memory of the whole process (coordinator and volunteers).
    pub process_rss_bytes: Option<u64>,
    /// What each volunteer downloaded for the round.
    #[serde(skip)]
    pub downloads: Vec<u64>,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwarmBenchError {
    /// The settings do not make a valid run.
    #[error("run settings: {0}")]
    Spec(#[from] SpecError),
    /// The coordinator failed.
    #[error("coordinator: {0}")]
    Host(#[from] HostError),
    /// A volunteer failed.
    #[error("volunteer {index}: {message}")]
    Volunteer {
        /// Which volunteer.
        index: usize,
        /// What failed.
        message: String,
    },
    /// No CPU device (cannot happen on a working machine).
    #[error("device: {0}")]
    Device(String),
    /// The run did not finish in time.
    #[error("the run did not finish within {0:?}")]
    Timeout(Duration),
}

/// Per-round measurements the volunteers share.
#[derive(Default)]
struct Shared {
    /// Per round: each volunteer's (down, up) bytes for the round.
    traffic: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Per round: (aggregate bytes, roster bytes, accepted updates).
    sizes: BTreeMap<u64, (u64, u64, usize)>,
    /// Per round: (aggregate, roster) blobs.
    blobs: BTreeMap<u64, (Option<BlobRef>, BlobRef)>,
    /// Per round: volunteers the coordinator itself served the aggregate.
    from_host: BTreeMap<u64, usize>,
}

/// Run the benchmark, calling `on_round` as each round's figures are in.
pub async fn run(
    opts: &SwarmBenchOptions,
    mut on_round: impl FnMut(&RoundReport),
) -> Result<Vec<RoundReport>, SwarmBenchError> {
    if let Some(ticket) = &opts.join {
        return run_joined(opts, ticket.clone(), on_round).await;
    }
    let (spec, tokens) = run_file(opts).resolve(std::path::Path::new("."))?;
    let device =
        select_device(DeviceChoice::Cpu).map_err(|e| SwarmBenchError::Device(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&opts.dir);
    let (tx, mut events) = mpsc::unbounded_channel();
    let host_traffic = Traffic::new(None, None);
    let host = Host::start(
        HostOptions {
            state_dir: opts.dir.clone(),
            spec,
            tokens,
            allow: vec![],
            bind: LOOPBACK,
            traffic: host_traffic.clone(),
            device,
            max_rounds: Some(opts.rounds),
        },
        tx,
    )
    .await?;
    let host_node = crate::short(&host.ticket().host);
    let ticket = host.ticket();
    let mut seen = HostSeen {
        net: host.net(),
        opened: BTreeMap::new(),
        applied: BTreeMap::new(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let host_task = tokio::spawn(host.run(stop_rx));
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut tasks = spawn_volunteers(opts, &ticket, &shared);

    // The coordinator's side of each round, from its events.
    let mut reports = Vec::new();
    let limit = Duration::from_secs(600 + opts.rounds * opts.volunteers as u64);
    let deadline = Instant::now() + limit;
    let mut volunteers_done = 0;
    // Until every volunteer is done and the coordinator applied the last
    // round (its apply may come after the last volunteer's).
    let last = opts.rounds.saturating_sub(1);
    while volunteers_done < opts.volunteers || !seen.applied.contains_key(&last) {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Err(SwarmBenchError::Timeout(limit)),
            Some(done) = tasks.join_next() => {
                match done {
                    Ok(Ok(())) => volunteers_done += 1,
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(SwarmBenchError::Volunteer { index: usize::MAX, message: e.to_string() }),
                }
            }
            Some(ev) = events.recv() => match ev {
                NodeEvent::RoundOpened { node, round, members } if node == host_node => {
                    seen.opened.insert(round, (Instant::now(), host_traffic.total.up(), members));
                }
                NodeEvent::RoundApplied { node, round, .. } if node == host_node => {
                    if let Some((t, _, _)) = seen.opened.get(&round) {
                        seen.applied.insert(round, t.elapsed().as_secs_f64());
                    }
                }
                _ => {}
            },
        }
        // Report every round whose figures are complete: all volunteers
        // applied it and the next round opened (or the run ended).
        while let Some(report) = ready_report(
            reports.len() as u64,
            opts,
            &shared,
            &seen,
            volunteers_done == opts.volunteers,
        ) {
            on_round(&report);
            reports.push(report);
        }
    }
    let _ = stop_tx.send(true);
    match host_task.await {
        Ok(result) => result?,
        Err(e) => {
            return Err(SwarmBenchError::Volunteer {
                index: usize::MAX,
                message: format!("the coordinator's task failed: {e}"),
            });
        }
    }
    while let Some(report) = ready_report(reports.len() as u64, opts, &shared, &seen, true) {
        on_round(&report);
        reports.push(report);
    }
    let _ = std::fs::remove_dir_all(&opts.dir);
    Ok(reports)
}

/// The benchmark's run: the model, top-k, values and cap asked for, every
/// volunteer a member of every round, no checkpoints or evals on the way.
fn run_file(opts: &SwarmBenchOptions) -> RunFile {
    let mut file = RunFile::default();
    file.run.name = format!("swarm bench, {} volunteers", opts.volunteers);
    file.run.model = opts.model.clone();
    file.run.topk = opts.topk;
    file.run.values = opts.values.clone();
    file.run.corpus_bytes = 64 * 1024;
    file.run.total_rounds = opts.rounds;
    file.rounds.min_members = opts.volunteers;
    file.rounds.close_when_complete = true;
    // Long enough for every synthetic update to arrive on two cores.
    file.rounds.window_secs = 60.0 + opts.volunteers as f64 * 0.5;
    file.rounds.checkpoint_every = opts.rounds + 1;
    file.rounds.eval_every = opts.rounds + 1;
    file.rounds.report_every = opts.rounds + 1;
    file.rounds.aggregate_topk = opts.aggregate_topk;
    // Synthetic members announce no real loss: recomputing it would fault
    // them all.
    file.rounds.spot_check_rate = 0.0;
    file
}

/// How long a volunteer that has the last round waits for the others.
const LAST_ROUND_WAIT: Duration = Duration::from_secs(300);

/// Start `opts.volunteers` synthetic volunteers on `ticket`'s run.
fn spawn_volunteers(
    opts: &SwarmBenchOptions,
    ticket: &Ticket,
    shared: &Arc<Mutex<Shared>>,
) -> tokio::task::JoinSet<Result<(), SwarmBenchError>> {
    let mut tasks = tokio::task::JoinSet::new();
    let all_done = Arc::new(Barrier::new(opts.volunteers));
    for index in 0..opts.volunteers {
        let (ticket, shared, all_done) = (ticket.clone(), shared.clone(), all_done.clone());
        let rounds = opts.rounds;
        let serving = if index < opts.corrupt_relays {
            Serving::CorruptRelays
        } else {
            Serving::Honest
        };
        let empty = index >= opts.volunteers.saturating_sub(opts.empty_updates);
        tasks.spawn(async move {
            synthetic_volunteer(index, ticket, rounds, serving, empty, shared, all_done)
                .await
                .map_err(|message| SwarmBenchError::Volunteer { index, message })
        });
    }
    tasks
}

/// Join an existing run with the synthetic volunteers; report each round
/// they all saw once they are done (no coordinator figures).
async fn run_joined(
    opts: &SwarmBenchOptions,
    ticket: Ticket,
    mut on_round: impl FnMut(&RoundReport),
) -> Result<Vec<RoundReport>, SwarmBenchError> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut tasks = spawn_volunteers(opts, &ticket, &shared);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(SwarmBenchError::Volunteer {
                    index: usize::MAX,
                    message: e.to_string(),
                });
            }
        }
    }
    let s = shared.lock().unwrap_or_else(|e| e.into_inner());
    let mut reports = Vec::new();
    for (&round, traffic) in &s.traffic {
        let sizes = s.sizes.get(&round).copied().unwrap_or_default();
        let mut report = RoundReport::of(round, traffic, sizes);
        report.aggregates_from_host = s.from_host.get(&round).copied().unwrap_or(0);
        on_round(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// What the benchmark saw of the coordinator.
struct HostSeen {
    /// Its network side (what it served of each blob).
    net: Arc<Net>,
    /// Per round: when it opened, the coordinator's upload then, members.
    opened: BTreeMap<u64, (Instant, u64, usize)>,
    /// Per round: seconds from its opening to the coordinator's apply.
    applied: BTreeMap<u64, f64>,
}

/// Round `round`'s report, once every volunteer and the coordinator
/// applied it and the coordinator's upload for it is known.
fn ready_report(
    round: u64,
    opts: &SwarmBenchOptions,
    shared: &Mutex<Shared>,
    host: &HostSeen,
    finished: bool,
) -> Option<RoundReport> {
    if round >= opts.rounds {
        return None;
    }
    let s = shared.lock().unwrap_or_else(|e| e.into_inner());
    let traffic = s.traffic.get(&round)?;
    if traffic.len() < opts.volunteers {
        return None;
    }
    let &(_, up_at_open, members) = host.opened.get(&round)?;
    let &secs = host.applied.get(&round)?;
    let up_at_next = match host.opened.get(&(round + 1)) {
        Some(&(_, up, _)) => up,
        None if finished => host.net.traffic().total.up(),
        None => return None,
    };
    let sizes = s.sizes.get(&round).copied()?;
    let mut report = RoundReport::of(round, traffic, sizes);
    report.aggregates_from_host = s.from_host.get(&round).copied().unwrap_or(0);
    report.members = members;
    report.host_upload_bytes = up_at_next.saturating_sub(up_at_open);
    if let Some(&(aggregate, roster)) = s.blobs.get(&round) {
        report.host_aggregate_upload_bytes = aggregate.map_or(0, |b| host.net.served_bytes(&b));
        report.host_roster_upload_bytes = host.net.served_bytes(&roster);
    }
    report.round_secs = secs;
    Some(report)
}

impl RoundReport {
    /// The volunteers' side of `round`: each one's (down, up) bytes and the
    /// round's (aggregate, roster, accepted); no coordinator figures yet.
    fn of(round: u64, traffic: &[(u64, u64)], sizes: (u64, u64, usize)) -> Self {
        let (aggregate_bytes, roster_bytes, accepted) = sizes;
        let mut down: Vec<u64> = traffic.iter().map(|t| t.0).collect();
        down.sort_unstable();
        Self {
            round,
            members: traffic.len(),
            accepted,
            aggregate_bytes,
            roster_bytes,
            download_median_bytes: down.get(down.len() / 2).copied().unwrap_or(0),
            download_max_bytes: down.last().copied().unwrap_or(0),
            upload_max_bytes: traffic.iter().map(|t| t.1).max().unwrap_or(0),
            host_upload_bytes: 0,
            host_aggregate_upload_bytes: 0,
            host_roster_upload_bytes: 0,
            aggregates_from_host: 0,
            round_secs: f64::NAN,
            process_rss_bytes: process_rss(),
            downloads: down,
        }
    }
}

/// Resident memory of this process (Linux), in bytes.
pub fn process_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A random update of the layout's shapes with `topk` entries per chunk,
/// values as `values` sends them. Positions and sizes are random; each
/// coefficient's sign is the same in every synthetic update, so that they
/// agree where they overlap as honest members' updates do, and pass the
/// host's screen as theirs would.
fn synthetic_update(layout: &ModelLayout, topk: usize, rng: &mut StdRng) -> OutgoingUpdate {
    let values = layout.config().values;
    let tensors = layout
        .tensors()
        .iter()
        .enumerate()
        .map(|(tensor, t)| {
            let elems = t.grid.chunk_elems();
            let k = topk.clamp(1, elems);
            let mut offsets = vec![0u32];
            let mut indices = Vec::new();
            let mut vals = Vec::new();
            for chunk in 0..t.grid.num_chunks() {
                let mut chosen: Vec<u32> = sample(rng, elems, k)
                    .into_iter()
                    .map(|i| i as u32)
                    .collect();
                chosen.sort_unstable();
                for i in chosen {
                    let size: f32 = rng.random_range(0.05..1.0);
                    let v = if shared_sign(tensor, chunk, i) {
                        size
                    } else {
                        -size
                    };
                    if let Some(q) = values.quantize(v) {
                        indices.push(i);
                        vals.push(q);
                    }
                }
                offsets.push(indices.len() as u32);
            }
            SparseTensor {
                shape: t.shape.clone(),
                grid: t.grid,
                k,
                offsets,
                indices,
                values: vals,
            }
        })
        .collect();
    OutgoingUpdate { values, tensors }
}

/// The sign every synthetic update gives coefficient `index` of `chunk` of
/// `tensor` (a hash of the three: positive or negative half the time).
fn shared_sign(tensor: usize, chunk: usize, index: u32) -> bool {
    let key = ((tensor as u64) << 44) ^ ((chunk as u64) << 16) ^ u64::from(index);
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 1 == 0
}

/// One volunteer that plays the protocol with synthetic updates until it
/// has seen `rounds` manifests.
async fn synthetic_volunteer(
    index: usize,
    ticket: Ticket,
    rounds: u64,
    serving: Serving,
    empty: bool,
    shared: Arc<Mutex<Shared>>,
    all_done: Arc<Barrier>,
) -> Result<(), String> {
    let key = SecretKey::generate();
    let host = Member {
        id: ticket.host,
        addrs: ticket.addrs.clone(),
    };
    let traffic = Traffic::new(None, None);
    let (net, mut rx) = Net::spawn(NetConfig {
        secret_key: key,
        bind: LOOPBACK,
        run_id: ticket.run_id,
        traffic: traffic.clone(),
        open: false,
        control: None,
        bootstrap: vec![host.clone()],
        serving,
    })
    .await
    .map_err(|e| e.to_string())?;
    let me = net.id();
    let state = join(&net, &host).await?;
    let spec = RunSpec::from_bytes(&state.spec).map_err(|e| e.to_string())?;
    let shapes: Vec<Vec<usize>> = spec
        .model
        .stored_shapes()
        .into_iter()
        .map(|(_, shape)| shape)
        .collect();
    let layout = ModelLayout::new(&shapes, spec.distro().map_err(|e| e.to_string())?);
    let mut rng = StdRng::seed_from_u64(index as u64);
    let mut template = synthetic_update(&layout, spec.run.topk, &mut rng);
    if empty {
        for t in &mut template.tensors {
            t.offsets.iter_mut().for_each(|o| *o = 0);
            t.indices.clear();
            t.values.clear();
        }
    }
    let mut opens: BTreeMap<u64, RoundOpen> = BTreeMap::new();
    let mut manifests: BTreeMap<u64, Manifest> = BTreeMap::new();
    let mut rosters: BTreeMap<u64, Roster> = BTreeMap::new();
    let mut announced: Option<(u64, Vec<u8>)> = None;
    let mut next: Option<u64> = None;
    let mut counted = (0u64, 0u64);
    let mut seen = 0;
    let mut last_news = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    take_state(&net, &host, &state, &mut opens, &mut manifests);
    next.get_or_insert(state.next_round);
    while seen < rounds {
        let round = next.unwrap_or(0);
        // Announce this round's update once the roster says we are a member.
        if announced.as_ref().is_none_or(|(r, _)| *r != round)
            && let Some(open) = opens.get(&round).cloned()
            && !manifests.contains_key(&round)
        {
            let roster = match rosters.get(&round) {
                Some(r) => Some(r.clone()),
                None => {
                    let previous: Vec<EndpointId> = rosters
                        .values()
                        .next_back()
                        .map(|r| r.members.iter().map(|m| m.id).collect())
                        .unwrap_or_default();
                    let tag = format!("{}roster", round_prefix(round));
                    match spread::fetch(
                        &net,
                        &open.roster,
                        &previous,
                        host.id,
                        MAX_ROSTER_BYTES,
                        &tag,
                    )
                    .await
                    {
                        Ok(fetched) => {
                            let roster = Roster::from_bytes(&fetched.bytes, open.members)
                                .map_err(|e| format!("round {round}: roster: {e}"))?;
                            net.set_members(&roster.members, &[host.id]).await;
                            rosters.insert(round, roster.clone());
                            while rosters.len() > 2 {
                                rosters.pop_first();
                            }
                            Some(roster)
                        }
                        Err(_) => None,
                    }
                }
            };
            if let Some(roster) = roster {
                if roster.slot(&me).is_some() {
                    let signed = announce(&net, &template, round).await?;
                    let taken = deliver(&net, &host, &signed).await;
                    announced = Some((round, if taken { Vec::new() } else { signed }));
                } else {
                    // Not in this round: ask to be in the next.
                    let state = join(&net, &host).await?;
                    take_state(&net, &host, &state, &mut opens, &mut manifests);
                    announced = Some((round, Vec::new()));
                }
            }
        }
        // Apply (fetch and check) the round's aggregate once its manifest is in.
        if let Some(manifest) = manifests.get(&round).cloned() {
            if let Some(blob) = manifest.aggregate {
                match fetch_aggregate(&net, &layout, &rosters, round, &blob, host.id).await {
                    Ok(from) if from == host.id => {
                        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                        *s.from_host.entry(round).or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // As a volunteer does: a provider failed, ask again shortly.
                        eprintln!("volunteer {index}: {e}; asking again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let (down, up) = (traffic.total.down(), traffic.total.up());
            let roster = opens.get(&round).map(|o| o.roster);
            let roster_bytes = roster.map_or(0, |r| r.size);
            {
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(roster) = roster {
                    s.blobs.entry(round).or_insert((manifest.aggregate, roster));
                }
                s.traffic
                    .entry(round)
                    .or_default()
                    .push((down - counted.0, up - counted.1));
                s.sizes.entry(round).or_insert((
                    manifest.aggregate.map_or(0, |b| b.size),
                    roster_bytes,
                    manifest.updates as usize,
                ));
            }
            counted = (down, up);
            seen += 1;
            next = Some(round + 1);
            opens.retain(|r, _| *r > round);
            manifests.retain(|r, _| *r > round);
            if let Some(old) = round.checked_sub(2) {
                net.forget(&round_prefix(old)).await;
            }
            last_news = Instant::now();
            continue;
        }
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return Err("the endpoint stopped".into()) };
                if let NetEvent::Message(m) = ev
                    && m.author == host.id
                {
                    match m.body {
                        Body::RoundOpen(open) => { opens.insert(m.round, open); last_news = Instant::now(); }
                        Body::Manifest(man) => { manifests.insert(m.round, man); last_news = Instant::now(); }
                        _ => {}
                    }
                }
            }
            _ = tick.tick() => {
                if let Some((r, signed)) = &mut announced
                    && *r == round
                    && !signed.is_empty()
                    && deliver(&net, &host, signed).await
                {
                    signed.clear();
                }
                if last_news.elapsed() > Duration::from_secs(3) {
                    let state = join(&net, &host).await?;
                    take_state(&net, &host, &state, &mut opens, &mut manifests);
                    last_news = Instant::now();
                }
            }
        }
    }
    // Stay up until every volunteer has the last round: those below us in
    // its tree fetch from us, and one that finds us gone asks the
    // coordinator instead (a live run's members stay for the next round).
    let _ = tokio::time::timeout(LAST_ROUND_WAIT, all_done.wait()).await;
    net.shutdown().await;
    Ok(())
}

/// Ask the coordinator for the run's state (retrying while it is busy).
async fn join(net: &Net, host: &Member) -> Result<RunState, String> {
    let mut addrs = net.addrs();
    addrs.truncate(MAX_MEMBER_ADDRS);
    let request = Request::Join {
        run_id: net.run_id(),
        addrs,
        since: None,
    };
    let mut last = String::new();
    for _ in 0..20 {
        match net.request(host, &request).await {
            Ok(Response::State(s)) => return Ok(s),
            Ok(other) => return Err(format!("join refused: {other:?}")),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("cannot join: {last}"))
}

/// Record the opens and manifests a join answer carries.
fn take_state(
    net: &Net,
    host: &Member,
    state: &RunState,
    opens: &mut BTreeMap<u64, RoundOpen>,
    manifests: &mut BTreeMap<u64, Manifest>,
) {
    for signed in state.manifests.iter().chain(state.round_open.iter()) {
        let Ok(m) = Message::verify(signed, net.run_id()) else {
            continue;
        };
        if m.author != host.id {
            continue;
        }
        match m.body {
            Body::RoundOpen(open) => {
                opens.insert(m.round, open);
            }
            Body::Manifest(man) => {
                manifests.insert(m.round, man);
            }
            _ => {}
        }
    }
}

/// Send a signed announce to the coordinator as a volunteer does (gossip
/// while the coordinator cannot be reached); whether it took it.
async fn deliver(net: &Net, host: &Member, signed: &[u8]) -> bool {
    let request = Request::Announce {
        signed: signed.to_vec(),
    };
    match net.request(host, &request).await {
        Ok(Response::Taken) => true,
        _ => {
            let _ = net.broadcast(signed.to_vec()).await;
            false
        }
    }
}

/// Publish this round's copy of the synthetic update and sign its announce.
async fn announce(net: &Net, template: &OutgoingUpdate, round: u64) -> Result<Vec<u8>, String> {
    let header = UpdateHeader {
        run_id: net.run_id().0,
        round,
        sender: *net.id().as_bytes(),
    };
    let bytes = wire::encode(&header, template).map_err(|e| e.to_string())?;
    let tokens = 1;
    let update = net
        .publish(&update_tag(round, &net.id()), bytes)
        .await
        .map_err(|e| e.to_string())?;
    Message::sign(
        net.secret_key(),
        net.run_id(),
        round,
        Body::Announce(Announce {
            update,
            tokens,
            loss: 1.0,
        }),
    )
    .map_err(|e| e.to_string())
}

/// Fetch a round's aggregate through its tree and check that it decodes
/// and fits the model (the replicas' check, without the apply); returns who
/// served it.
async fn fetch_aggregate(
    net: &Net,
    layout: &ModelLayout,
    rosters: &BTreeMap<u64, Roster>,
    round: u64,
    blob: &BlobRef,
    host: EndpointId,
) -> Result<EndpointId, String> {
    let max = wire::aggregate::max_len(
        layout
            .tensors()
            .iter()
            .map(|t| (t.shape.as_slice(), t.grid)),
    );
    let members: Vec<EndpointId> = rosters
        .get(&round)
        .map(|r| r.members.iter().map(|m| m.id).collect())
        .unwrap_or_default();
    let fetched = spread::fetch(net, blob, &members, host, max, &aggregate_tag(round))
        .await
        .map_err(|e| format!("round {round}: aggregate: {e}"))?;
    let bytes = fetched.bytes;
    let limits = wire::DecodeLimits {
        max_bytes: usize::try_from(max).unwrap_or(usize::MAX),
        ..wire::DecodeLimits::default()
    };
    let decoded =
        wire::aggregate::decode(&bytes, &limits).map_err(|e| format!("round {round}: {e}"))?;
    let update = starling_distro::IncomingUpdate {
        sender: [0; 32],
        tensors: decoded.tensors,
    };
    layout
        .merge(std::slice::from_ref(&update), 0.0)
        .map_err(|e| format!("round {round}: aggregate does not fit the model: {e}"))?;
    Ok(fetched.from)
}
