//! `starling host`, `starling join` and `starling demo`: the swarm's faces.
//!
//! Each command turns its flags into `starling-node` configuration, runs it
//! on a tokio runtime and renders its `NodeEvent` stream (log lines or
//! `--json`). A volunteer, here as in the desktop app, is a
//! `starling_node::Volunteer`: the same checks, rules and ledger.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use starling_node::{
    Caps, Host, HostOptions, Metrics, NodeEvent, Preset, RunFile, Settings, Traffic, Volunteer,
    VolunteerConfig, VolunteerPaths, Window, serve_metrics, watch_caps,
};
use starling_train::{DeviceChoice, select_device};
use tokio::sync::{mpsc, watch};

use crate::idle::TerminalIdle;

/// Flags every node shares.
#[derive(Args, Debug, Clone)]
pub struct NodeOpts {
    /// Where to listen for peers.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// Upload cap in Mbit/s (all blob traffic; default: unlimited).
    #[arg(long)]
    pub up_mbit: Option<f64>,
    /// Download cap in Mbit/s.
    #[arg(long)]
    pub down_mbit: Option<f64>,
    /// auto, cpu, wgpu, wgpu:N or cuda:N (default: auto, or the settings file's).
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Stop after this many rounds.
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Print events as JSON lines instead of log lines.
    #[arg(long)]
    pub json: bool,
    /// Serve OpenMetrics text at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Caps file (`{"up_mbit": 10, "down_mbit": 100}`) re-read whenever it
    /// changes; if it exists at start it wins over --up-mbit/--down-mbit,
    /// otherwise it is written from them.
    #[arg(long)]
    pub caps_file: Option<PathBuf>,
}

impl NodeOpts {
    /// The caps to start with (the caps file's, if there is one) and the
    /// traffic handle they apply to.
    fn traffic(&self) -> Result<(Caps, Traffic)> {
        let flags = Caps {
            up_mbit: self.up_mbit,
            down_mbit: self.down_mbit,
        };
        flags
            .check()
            .context("--up-mbit/--down-mbit are out of range")?;
        let caps = match &self.caps_file {
            Some(path) if path.exists() => Caps::load(path)?,
            Some(path) => {
                flags.save(path)?;
                flags
            }
            None => flags,
        };
        Ok((caps, Traffic::new(caps.up_mbit, caps.down_mbit)))
    }

    /// Report the starting caps and, with a caps file, apply its changes live.
    fn watch_caps(
        &self,
        caps: Caps,
        traffic: &Traffic,
        node: String,
        tx: &mpsc::UnboundedSender<NodeEvent>,
    ) {
        match &self.caps_file {
            Some(path) => {
                tokio::spawn(watch_caps(
                    path.clone(),
                    traffic.clone(),
                    node,
                    tx.clone(),
                    std::time::Duration::from_secs(1),
                ));
            }
            None => {
                let _ = tx.send(NodeEvent::Caps {
                    node,
                    up_mbit: caps.up_mbit,
                    down_mbit: caps.down_mbit,
                });
            }
        }
    }

    /// Start a host's metrics endpoint if asked for, and the event printer.
    async fn renderer(
        &self,
        rx: mpsc::UnboundedReceiver<NodeEvent>,
    ) -> Result<tokio::task::JoinHandle<Result<()>>> {
        let metrics = match self.metrics_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot serve metrics on {addr}"))?;
                eprintln!("metrics: http://{}/metrics", listener.local_addr()?);
                let metrics = Arc::new(Metrics::default());
                tokio::spawn(serve_metrics(listener, metrics.clone()));
                Some(metrics)
            }
            None => None,
        };
        Ok(tokio::spawn(render(rx, self.json, metrics)))
    }

    /// The device choice, `auto` unless given.
    fn device(&self) -> DeviceChoice {
        self.device.unwrap_or(DeviceChoice::Auto)
    }
}

#[derive(Args, Debug)]
pub struct HostArgs {
    /// The run file (TOML). Ignored when --state-dir holds a run to resume.
    pub run: PathBuf,
    /// Where the host keeps its key, state, checkpoints and updates.
    #[arg(long, default_value = "runs/host")]
    pub state_dir: PathBuf,
    /// Also write the join ticket to this file.
    #[arg(long)]
    pub ticket_file: Option<PathBuf>,
    /// Also train on this machine: a volunteer in the host's process (key in
    /// the state directory), sharing the host's bandwidth caps.
    #[arg(long)]
    pub train: bool,
    #[command(flatten)]
    pub node: NodeOpts,
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// The ticket the host printed (or a starling://join/… link).
    pub ticket: String,
    /// This node's key file (created on first use); its data-use ledger
    /// (`usage.json`) is kept next to it.
    #[arg(long, default_value = "runs/volunteer/node.key")]
    pub key_file: PathBuf,
    /// Pause participation once this many GB (10^9 bytes, up + down) moved this calendar month (UTC).
    #[arg(long)]
    pub monthly_cap_gb: Option<f64>,
    /// Start from this settings file (JSON, as the desktop app writes it);
    /// the flags given here override its values. It is read, never written.
    #[arg(long)]
    pub settings: Option<PathBuf>,
    /// Most device memory training may use, in GB; a run whose model needs
    /// more is refused before anything is downloaded.
    #[arg(long)]
    pub vram_limit_gb: Option<f64>,
    /// Train only after this many minutes without input at any terminal
    /// (default 5 when given without a number).
    #[arg(long, num_args = 0..=1, default_missing_value = "5", value_name = "MINUTES")]
    pub idle_only: Option<u32>,
    /// Train only inside this daily window, local time (e.g. 22:00-07:00).
    #[arg(long, value_name = "START-END")]
    pub schedule: Option<String>,
    /// Pause while the GPU is hotter than this (°C), where it can be read.
    #[arg(long, value_name = "CELSIUS")]
    pub max_temp: Option<u32>,
    /// Pause while the machine runs on battery.
    #[arg(long)]
    pub pause_on_battery: bool,
    /// Send a corruption of every update instead of the update (scale:F,
    /// random-signs, negate, empty, stale[:N], copy): a hostile member, for
    /// tests of the host's screen. Never in a real run.
    #[arg(long, hide = true)]
    pub attack: Option<starling_train::sim::Attack>,
    #[command(flatten)]
    pub node: NodeOpts,
}

impl JoinArgs {
    /// The volunteer's settings: the settings file's (or no limits), with
    /// the flags on top; checked by the node like the app's.
    fn settings(&self) -> Result<Settings> {
        let mut s = match &self.settings {
            Some(path) => {
                if !path.exists() {
                    bail!("the settings file {} does not exist", path.display());
                }
                Settings::load(path)?
            }
            None => Settings::preset(Preset::Maximum),
        };
        if let Some(device) = self.node.device {
            s.device = device.to_string();
        }
        if let Some(v) = self.node.up_mbit {
            s.up_mbit = Some(v);
        }
        if let Some(v) = self.node.down_mbit {
            s.down_mbit = Some(v);
        }
        if let Some(v) = self.monthly_cap_gb {
            s.monthly_cap_gb = Some(v);
        }
        if let Some(v) = self.vram_limit_gb {
            s.vram_limit_gb = Some(v);
        }
        if let Some(v) = self.idle_only {
            s.idle_minutes = Some(v);
        }
        if let Some(window) = &self.schedule {
            let Some((start, end)) = window.split_once('-') else {
                bail!("--schedule {window:?}: write it as START-END, e.g. 22:00-07:00");
            };
            s.schedule = Some(Window {
                start: start.trim().into(),
                end: end.trim().into(),
            });
        }
        if let Some(v) = self.max_temp {
            s.max_gpu_temp_c = Some(v);
        }
        if self.pause_on_battery {
            s.pause_on_battery = true;
        }
        s.check().context("the volunteer's settings are invalid")?;
        Ok(s)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Print events until the channel closes.
async fn render(
    mut rx: mpsc::UnboundedReceiver<NodeEvent>,
    json: bool,
    metrics: Option<Arc<Metrics>>,
) -> Result<()> {
    while let Some(e) = rx.recv().await {
        if let Some(m) = &metrics {
            m.observe(&e);
        }
        if json {
            say!("{}", serde_json::to_string(&e)?);
        } else if !too_chatty_for_text(&e) {
            say!("{}", e.line());
        }
    }
    Ok(())
}

/// Events the text log leaves to `--json` and the app: the per-round peer
/// list, and download progress until the download is complete.
fn too_chatty_for_text(e: &NodeEvent) -> bool {
    match e {
        NodeEvent::Peers { .. } => true,
        NodeEvent::Fetching { done, total, .. } => done < total,
        _ => false,
    }
}

/// Turn Ctrl-C into a stop signal.
fn stop_on_ctrl_c() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.send(true);
        }
        // Keep the sender alive so receivers never see a closed channel.
        std::future::pending::<()>().await;
    });
    rx
}

pub fn run_host(args: &HostArgs) -> Result<()> {
    let file = RunFile::load(&args.run)?;
    let base = args.run.parent().unwrap_or(Path::new("."));
    let (spec, tokens) = file
        .resolve(base)
        .with_context(|| format!("{} is not a usable run", args.run.display()))?;
    let allow = file
        .members
        .allow
        .iter()
        .map(|s| {
            s.parse()
                .with_context(|| format!("members.allow: {s:?} is not an endpoint id"))
        })
        .collect::<Result<Vec<_>>>()?;
    let device = select_device(args.node.device())?;
    eprintln!("device: {} ({})", device.name, device.reason);
    let (caps, traffic) = args.node.traffic()?;
    runtime()?.block_on(async {
        let (tx, rx) = mpsc::unbounded_channel();
        // The host's own trainer: a volunteer in this process sharing the
        // host's caps, its files in the state directory.
        let trainer = if args.train {
            let mut bind = args.node.listen;
            bind.set_port(0);
            let dir = &args.state_dir;
            let config = VolunteerConfig {
                settings: Settings {
                    device: args.node.device().to_string(),
                    ..Settings::preset(Preset::Maximum)
                },
                bind,
                max_rounds: args.node.rounds,
                traffic: Some(traffic.clone()),
                ..VolunteerConfig::new(VolunteerPaths {
                    settings: None,
                    key: dir.join("trainer.key"),
                    usage: dir.join("trainer-usage.json"),
                    port: dir.join("trainer.port"),
                })
            };
            Some(
                Volunteer::open(config, tx.clone())
                    .await
                    .context("cannot start the host's own trainer")?,
            )
        } else {
            None
        };
        let mut allow = allow;
        if let Some(v) = &trainer
            && !allow.is_empty()
        {
            allow.push(v.id());
        }
        let host = Host::start(
            HostOptions {
                state_dir: args.state_dir.clone(),
                spec,
                tokens,
                allow,
                bind: args.node.listen,
                traffic: traffic.clone(),
                device: device.clone(),
                max_rounds: args.node.rounds,
            },
            tx.clone(),
        )
        .await?;
        args.node.watch_caps(
            caps,
            &traffic,
            starling_node::short(&host.ticket().host),
            &tx,
        );
        let ticket = host.ticket().to_string();
        if let Some(path) = &args.ticket_file {
            starling_train::atomic::write_atomic(path, ticket.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        eprintln!("join ticket: {ticket}");
        let printer = args.node.renderer(rx).await?;
        let stop = stop_on_ctrl_c();
        if let Some(v) = &trainer {
            v.join(&ticket).await?;
        }
        drop(tx);
        let result = host.run(stop).await;
        if let Some(v) = trainer {
            let failed = match *v.activity().borrow() {
                starling_node::Activity::Failed { ref error } => Some(error.message.clone()),
                _ => None,
            };
            v.shutdown().await;
            drop(v);
            if let Some(message) = failed {
                bail!("the host's own trainer failed: {message}");
            }
        }
        printer.await??;
        Ok(result?)
    })
}

pub fn run_join(args: &JoinArgs) -> Result<()> {
    let settings = args.settings()?;
    runtime()?.block_on(async {
        let (tx, rx) = mpsc::unbounded_channel();
        let config = VolunteerConfig {
            settings,
            bind: args.node.listen,
            max_rounds: args.node.rounds,
            metrics_addr: args.node.metrics_addr,
            attack: args.attack,
            ..VolunteerConfig::new(VolunteerPaths::beside_key(args.key_file.clone(), None))
        };
        let volunteer = Volunteer::open(config, tx).await?;
        if let Some(addr) = volunteer.metrics_addr() {
            eprintln!("metrics: http://{addr}/metrics");
        }
        let printer = tokio::spawn(render(rx, args.node.json, None));
        if let Some(path) = &args.node.caps_file {
            volunteer
                .watch_caps_file(path.clone(), std::time::Duration::from_secs(1))
                .await?;
        }
        // The rules' first look comes before the join: a volunteer outside
        // its schedule never starts a round.
        let machine = volunteer
            .watch_machine(Arc::new(TerminalIdle::default()), |_| {})
            .await;
        volunteer.join(&args.ticket).await?;
        let mut stop = stop_on_ctrl_c();
        let result = tokio::select! {
            r = volunteer.finished() => r,
            _ = stop.wait_for(|s| *s) => Ok(()),
        };
        volunteer.shutdown().await;
        machine.abort();
        drop(volunteer);
        printer.await??;
        result.map_err(|e| anyhow::anyhow!(e.message))
    })
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Volunteers besides the host.
    #[arg(long, default_value_t = 3)]
    pub volunteers: usize,
    /// Rounds to train.
    #[arg(long, default_value_t = 30)]
    pub rounds: u64,
    /// Upload cap per node in Mbit/s.
    #[arg(long)]
    pub up_mbit: Option<f64>,
    /// Download cap per node in Mbit/s.
    #[arg(long)]
    pub down_mbit: Option<f64>,
    /// Where the host keeps its state (wiped first).
    #[arg(long, default_value = "runs/demo")]
    pub dir: PathBuf,
    /// Print every node event too.
    #[arg(long)]
    pub verbose: bool,
}

/// The demo's run: nano on the embedded corpus, sized so a round takes
/// seconds on two CPU cores.
const DEMO_RUN: &str = r#"
[run]
name = "starling demo (nano, embedded corpus)"
model = "nano"
batch = 4
micro_batch = 4
seq_len = 64
lr = 3e-3
warmup = 5
topk = 32
values = "f32"

[rounds]
window_secs = 20.0
checkpoint_every = 10
report_every = 5
eval_every = 5
"#;

pub fn run_demo(args: &DemoArgs) -> Result<()> {
    if args.volunteers == 0 {
        bail!("--volunteers must be at least 1");
    }
    let mut file = RunFile::parse(DEMO_RUN)?;
    file.run.total_rounds = args.rounds;
    // Start training once every volunteer is in.
    file.rounds.min_members = args.volunteers;
    // Every replica trains and applies on this machine's cores, one step at
    // a time: give each volunteer half a second of the window beyond the
    // base (rounds still close as soon as every update is in).
    file.rounds.window_secs += 0.5 * args.volunteers as f64;
    let (spec, tokens) = file.resolve(Path::new("."))?;
    let device = select_device(DeviceChoice::Cpu)?;
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("cannot clear {}", args.dir.display()))?;
    }
    say!(
        "starling demo: a host and {} volunteers on loopback train {} ({} parameters) for {} rounds",
        args.volunteers,
        spec.model.name,
        spec.model.param_count(),
        args.rounds
    );
    let nodes = args.volunteers + 1;
    runtime()?.block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let host = Host::start(
            HostOptions {
                state_dir: args.dir.join("host"),
                spec,
                tokens,
                allow: vec![],
                bind: "127.0.0.1:0".parse()?,
                traffic: Traffic::new(args.up_mbit, args.down_mbit),
                device: device.clone(),
                max_rounds: Some(args.rounds),
            },
            tx.clone(),
        )
        .await?;
        let ticket = host.ticket();
        let host_task = tokio::spawn(host.run(stop_rx.clone()));
        let mut volunteers = Vec::new();
        for i in 0..args.volunteers {
            let config = VolunteerConfig {
                settings: Settings {
                    device: DeviceChoice::Cpu.to_string(),
                    up_mbit: args.up_mbit,
                    down_mbit: args.down_mbit,
                    ..Settings::preset(Preset::Maximum)
                },
                bind: "127.0.0.1:0".parse()?,
                max_rounds: Some(args.rounds),
                ..VolunteerConfig::new(VolunteerPaths::beside_key(
                    args.dir.join(format!("volunteer-{i}")).join("node.key"),
                    None,
                ))
            };
            let v = Volunteer::open(config, tx.clone()).await?;
            v.join(&ticket.to_string()).await?;
            volunteers.push(v);
        }
        drop(tx);
        // The host would serve the last round for one more window; it is
        // stopped once every node has applied the last round (below).
        let volunteers = tokio::spawn(async move {
            let mut results = Vec::new();
            for v in volunteers {
                results.push(v.finished().await);
                v.shutdown().await;
            }
            results
        });
        say!(
            "{:>5}  {:>8}  {:>8}  {:>7}  {:>24}  {:>12}",
            "round",
            "loss",
            "eval",
            "updates",
            "sent/recv per node (KB)",
            "all-reduce"
        );
        // Per round: every node's RoundApplied.
        let mut rounds: BTreeMap<u64, Vec<(String, u64, u64, u64)>> = BTreeMap::new();
        let mut meta: BTreeMap<u64, (Option<f32>, Option<f32>, usize, u64)> = BTreeMap::new();
        let mut last_digests: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut failures = Vec::new();
        let mut fewest = usize::MAX;
        while let Some(e) = rx.recv().await {
            if args.verbose {
                say!("  {}", e.line());
            }
            match e {
                NodeEvent::RoundApplied {
                    node,
                    round,
                    updates,
                    loss,
                    eval_loss,
                    digest,
                    bytes_up,
                    bytes_down,
                    allreduce_bytes,
                    ..
                } => {
                    let m = meta
                        .entry(round)
                        .or_insert((loss, None, updates, allreduce_bytes));
                    if eval_loss.is_some() {
                        m.1 = eval_loss;
                    }
                    last_digests.insert(node.clone(), (round, digest));
                    let row = rounds.entry(round).or_default();
                    row.push((node, bytes_up, bytes_down, digest));
                    if row.len() == nodes && round + 1 == args.rounds {
                        let _ = stop_tx.send(true);
                    }
                    if row.len() == nodes {
                        let (loss, eval, updates, allreduce) = meta[&round];
                        let traffic: Vec<String> = if row.len() <= 4 {
                            row.iter()
                                .map(|(_, u, d, _)| format!("{}/{}", u / 1000, d / 1000))
                                .collect()
                        } else {
                            // Many nodes: the volunteers' median and most, then the host.
                            let mut ups: Vec<u64> = row.iter().map(|r| r.1).collect();
                            let mut downs: Vec<u64> = row.iter().map(|r| r.2).collect();
                            ups.sort_unstable();
                            downs.sort_unstable();
                            let mid = row.len() / 2;
                            vec![
                                format!("median {}/{}", ups[mid] / 1000, downs[mid] / 1000),
                                format!(
                                    "max {}/{}",
                                    ups[row.len() - 1] / 1000,
                                    downs[row.len() - 1] / 1000
                                ),
                            ]
                        };
                        fewest = fewest.min(updates);
                        let fmt = |v: Option<f32>| {
                            v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
                        };
                        say!(
                            "{round:>5}  {:>8}  {:>8}  {updates:>7}  {:>24}  {:>10} KB",
                            fmt(loss),
                            fmt(eval),
                            traffic.join(" "),
                            allreduce / 1000
                        );
                    }
                }
                NodeEvent::Rejected { .. }
                | NodeEvent::Diverged { .. }
                | NodeEvent::Dropped { .. }
                    if !args.verbose =>
                {
                    say!("  {}", e.line());
                }
                _ => {}
            }
        }
        match host_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("host: {e}")),
            Err(e) => failures.push(format!("host task: {e}")),
        }
        for (i, v) in volunteers.await?.into_iter().enumerate() {
            if let Err(e) = v {
                failures.push(format!("volunteer {i}: {}", e.message));
            }
        }
        if !failures.is_empty() {
            bail!("the demo failed:\n  {}", failures.join("\n  "));
        }
        let finals: Vec<&(u64, u64)> = last_digests.values().collect();
        let identical = finals.windows(2).all(|w| w[0] == w[1]);
        if finals.len() != nodes || !identical {
            bail!("replicas disagree at the end: {last_digests:?}");
        }
        say!(
            "all {nodes} replicas hold identical weights after round {} (digest {:016x})",
            finals[0].0,
            finals[0].1
        );
        if fewest == 0 {
            bail!("a round applied no update: the volunteers trained nothing in it");
        }
        say!(
            "every round applied updates from at least {fewest} of the {} volunteers",
            args.volunteers
        );
        Ok(())
    })
}
