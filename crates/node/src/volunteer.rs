//! The one way to be a volunteer, for the desktop app and `starling join`
//! alike: settings, caps, the data-use ledger, the memory budget, the rules
//! (idle, battery, schedule, temperature), metrics, pause/snooze/resume and
//! the event stream live here, so both faces only translate input and render
//! events, and a check added for one is a check the other gets.
//!
//! Pausing stops the protocol engine cleanly (it leaves between steps; the
//! host's deadline covers a round it abandons) and resuming rejoins with the
//! same key and port, which catches up from the host's checkpoint in seconds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use starling_swarm::{SecretKey, Ticket, TicketError, Traffic, unix_ms};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use ts_rs::TS;

use crate::caps::{Caps, CapsWatcher};
use crate::events::{NodeEvent, NodeState};
use crate::machine::{self, GpuMonitor, GpuSample};
use crate::metrics::Metrics;
use crate::settings::{Conditions, FieldError, Hold, Settings, SettingsError};
use crate::usage::MonthlyCap;
use crate::{keyfile, short};

mod engine;
pub(crate) mod spread;

pub use engine::VolunteerError;
pub(crate) use engine::{VolunteerOptions, run_volunteer};

/// How often the rules look at the machine.
const RULES_EVERY: Duration = Duration::from_secs(5);

/// Why an operation on a [`Volunteer`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The ticket does not parse.
    #[error(
        "this is not a Starling ticket ({0}); copy the whole line the host printed, starting with starling1"
    )]
    Ticket(#[source] TicketError),
    /// Nothing to resume.
    #[error("no run to resume: paste a ticket and press Join")]
    NoRun,
    /// The settings are invalid or could not be saved.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The node's key could not be read or created.
    #[error("cannot use the key file {path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The settings name a device that cannot be used.
    #[error("cannot train on {device:?}: {source}")]
    Device {
        /// The device asked for.
        device: String,
        /// Why not.
        #[source]
        source: starling_train::DeviceError,
    },
    /// The device probe's worker thread died.
    #[error("the device probe failed: {0}")]
    Probe(#[source] tokio::task::JoinError),
    /// A caps file could not be read or written.
    #[error(transparent)]
    Caps(#[from] crate::caps::CapsError),
    /// The metrics endpoint could not listen.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// What the app and the CLI branch on: a stable name per kind of failure,
/// so no face ever decides from an error's wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The ticket does not parse.
    InvalidTicket,
    /// Resume with no run joined.
    NoRun,
    /// Settings out of range (see the fields) or unreadable.
    InvalidSettings,
    /// The node's key file cannot be used.
    KeyFile,
    /// The chosen device cannot be used.
    Device,
    /// The run admits listed members only and this node is not listed.
    NotMember,
    /// The host refused this node for another reason.
    Refused,
    /// The run's model needs more memory than this device may use.
    TooSmall,
    /// The data-use ledger cannot be written.
    Ledger,
    /// The network failed.
    Network,
    /// The host's run spec is unusable.
    Spec,
    /// Training failed locally.
    Training,
    /// The host sent a round (its aggregate or member list) that fails
    /// this node's checks.
    InvalidUpdate,
    /// A worker crashed.
    Crashed,
    /// The metrics endpoint could not start.
    Metrics,
    /// Something else (the message says what).
    Other,
}

/// An error as it crosses to a face: a code to branch on, a sentence for
/// the person, and per-field messages for a settings form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, TS)]
pub struct ErrorInfo {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What happened and what to do, in words.
    pub message: String,
    /// Invalid settings fields, if that is what failed.
    pub fields: Vec<FieldError>,
}

impl ErrorInfo {
    /// An error with no fields.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            fields: Vec::new(),
        }
    }
}

impl From<&SessionError> for ErrorInfo {
    fn from(e: &SessionError) -> Self {
        let code = match e {
            SessionError::Ticket(_) => ErrorCode::InvalidTicket,
            SessionError::NoRun => ErrorCode::NoRun,
            SessionError::Settings(_) | SessionError::Caps(_) => ErrorCode::InvalidSettings,
            SessionError::Key { .. } => ErrorCode::KeyFile,
            SessionError::Device { .. } | SessionError::Probe(_) => ErrorCode::Device,
            SessionError::Metrics { .. } => ErrorCode::Metrics,
        };
        let fields = match e {
            SessionError::Settings(SettingsError::Invalid(f)) => f.clone(),
            _ => Vec::new(),
        };
        Self {
            code,
            message: e.to_string(),
            fields,
        }
    }
}

impl From<SessionError> for ErrorInfo {
    fn from(e: SessionError) -> Self {
        Self::from(&e)
    }
}

/// What the volunteer is doing.
#[derive(Clone, Debug, PartialEq, Serialize, TS)]
#[serde(tag = "activity", rename_all = "snake_case")]
pub enum Activity {
    /// No run joined.
    Idle,
    /// Taking part in a run.
    Running,
    /// Paused by the owner; `until_ms` for a snooze.
    Paused {
        /// When a snooze ends (unix ms).
        until_ms: Option<u64>,
    },
    /// Held back by a rule in the settings.
    Held {
        /// Which rule.
        hold: Hold,
    },
    /// The run ended, or the rounds asked for are done.
    Finished,
    /// The volunteer stopped with an error.
    Failed {
        /// What happened and what to do.
        error: ErrorInfo,
    },
}

impl Activity {
    /// A one-word name for charts and the tray.
    pub fn name(&self) -> &'static str {
        match self {
            Activity::Idle => "idle",
            Activity::Running => "running",
            Activity::Paused { until_ms: None } => "paused",
            Activity::Paused { .. } => "snoozed",
            Activity::Held { .. } => "held",
            Activity::Finished => "finished",
            Activity::Failed { .. } => "error",
        }
    }
}

/// A snapshot for the dashboard.
#[derive(Clone, Debug, Serialize, TS)]
pub struct Status {
    /// What the volunteer is doing.
    pub activity: Activity,
    /// The node's short id (what a host puts on its member list).
    pub node: String,
    /// The node's full endpoint id.
    pub endpoint_id: String,
    /// The run joined, if any.
    pub ticket: Option<String>,
    /// Bytes sent on the wire since the volunteer started.
    pub bytes_up: u64,
    /// Bytes received on the wire since the volunteer started.
    pub bytes_down: u64,
    /// The settings in force.
    pub settings: Settings,
}

/// Once a second: traffic and GPU, for charts.
#[derive(Clone, Debug, PartialEq, Serialize, TS)]
pub struct Tick {
    /// When (unix seconds).
    pub t: f64,
    /// Bytes sent since the volunteer started.
    pub bytes_up: u64,
    /// Bytes received since the volunteer started.
    pub bytes_down: u64,
    /// The upload cap in force.
    pub up_cap_mbit: Option<f64>,
    /// The download cap in force.
    pub down_cap_mbit: Option<f64>,
    /// [`Activity::name`].
    pub activity: String,
    /// GPU busy percentage.
    pub gpu_util: Option<u32>,
    /// GPU temperature, °C.
    pub gpu_temp_c: Option<u32>,
    /// GPU memory in use, bytes.
    pub gpu_mem_used: Option<u64>,
    /// GPU memory in all, bytes.
    pub gpu_mem_total: Option<u64>,
}

/// How long the person at this computer has not touched it: the desktop
/// app asks the desktop, the CLI the input devices. Blocking is fine (it is
/// called on a worker thread every few seconds).
pub trait IdleTime: Send + Sync + 'static {
    /// Seconds since the last keyboard or pointer input; `None` where this
    /// machine does not say (then the idle rule holds nothing).
    fn idle_secs(&self) -> Option<u64>;
}

/// No idle reading: the idle rule holds nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoIdleTime;

impl IdleTime for NoIdleTime {
    fn idle_secs(&self) -> Option<u64> {
        None
    }
}

/// Where a volunteer keeps its files.
#[derive(Clone, Debug)]
pub struct VolunteerPaths {
    /// The settings file, saved on every change (`None`: settings live in
    /// memory only, as given to [`Volunteer::open`]).
    pub settings: Option<PathBuf>,
    /// The node's key (created on first use).
    pub key: PathBuf,
    /// The data-use ledger.
    pub usage: PathBuf,
    /// The listening port, so a restart keeps its address.
    pub port: PathBuf,
}

impl VolunteerPaths {
    /// Key, ledger and port files in `data_dir`.
    pub fn in_dir(data_dir: &Path, settings: Option<PathBuf>) -> Self {
        Self::beside_key(data_dir.join("node.key"), settings)
    }

    /// Ledger and port files next to the key file `key`.
    pub fn beside_key(key: PathBuf, settings: Option<PathBuf>) -> Self {
        Self {
            settings,
            usage: key.with_file_name("usage.json"),
            port: key.with_file_name("node.port"),
            key,
        }
    }
}

/// How to open a [`Volunteer`].
#[derive(Clone, Debug)]
pub struct VolunteerConfig {
    /// Its files.
    pub paths: VolunteerPaths,
    /// The settings when `paths.settings` is `None` (ignored otherwise: the
    /// file's, or the defaults, apply).
    pub settings: Settings,
    /// Where to listen (port 0: the saved port, else any).
    pub bind: SocketAddr,
    /// Stop after applying this many rounds (tests, benchmarks).
    pub max_rounds: Option<u64>,
    /// Serve OpenMetrics text here.
    pub metrics_addr: Option<SocketAddr>,
    /// Share these traffic counters and caps (a host's own trainer) instead
    /// of keeping the volunteer's own.
    pub traffic: Option<Traffic>,
    /// Send this corruption of every trained update instead of the update
    /// (`None`: honest). Only for tests and benchmarks of the host's screen.
    pub attack: Option<starling_train::sim::Attack>,
}

impl VolunteerConfig {
    /// The app's configuration: settings and files where `paths` say,
    /// listening on any port, no round limit, no metrics.
    pub fn new(paths: VolunteerPaths) -> Self {
        Self {
            paths,
            settings: Settings::default(),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            max_rounds: None,
            metrics_addr: None,
            traffic: None,
            attack: None,
        }
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), VolunteerError>>,
}

struct Inner {
    settings: Settings,
    running: Option<Running>,
    /// The rules' verdict at their last look: a join or resume while a rule
    /// holds waits for the rule instead of starting.
    hold: Option<Hold>,
    /// Bumped on every pause/resume so a stale snooze timer does nothing.
    epoch: u64,
}

struct Shared {
    config: VolunteerConfig,
    key: SecretKey,
    traffic: Traffic,
    monthly_cap: MonthlyCap,
    /// Into the tap that feeds metrics and then the face.
    out: mpsc::UnboundedSender<NodeEvent>,
    name: String,
    activity: watch::Sender<Activity>,
    metrics_addr: Option<SocketAddr>,
    /// Turns true at shutdown: the watchers end and the tap drains and
    /// closes, so the face's event stream ends.
    closing: watch::Sender<bool>,
}

/// A volunteer: one run at a time, joined with a ticket, paused, snoozed and
/// resumed by its owner or by the rules in its settings.
#[derive(Clone)]
pub struct Volunteer {
    inner: Arc<Mutex<Inner>>,
    shared: Arc<Shared>,
}

/// What a volunteer's owner should do about the engine's failure.
fn advice(e: &VolunteerError, endpoint_id: &str) -> ErrorInfo {
    match e {
        VolunteerError::NotMember => ErrorInfo::new(
            ErrorCode::NotMember,
            format!(
                "This run only admits listed members. Send the host your id ({endpoint_id}) and ask to be added."
            ),
        ),
        VolunteerError::Refused(reason) => {
            ErrorInfo::new(ErrorCode::Refused, format!("The host refused: {reason}."))
        }
        VolunteerError::Usage { .. } => ErrorInfo::new(
            ErrorCode::Ledger,
            format!("Your data-use ledger cannot be written ({e}): is the disk full?"),
        ),
        VolunteerError::TooSmall { .. } => ErrorInfo::new(
            ErrorCode::TooSmall,
            format!(
                "This device is too small for this run: {e}. Pick another device or raise the \
                 VRAM limit, or join a run with a smaller model."
            ),
        ),
        VolunteerError::CheckpointTooLarge { .. } => ErrorInfo::new(
            ErrorCode::Spec,
            format!("Nothing was downloaded: {e}. Tell the run's host, or join another run."),
        ),
        other => {
            let code = match other {
                VolunteerError::Spec(_) => ErrorCode::Spec,
                VolunteerError::Replica(_) => ErrorCode::Training,
                VolunteerError::InvalidAggregate { .. } | VolunteerError::InvalidRoster { .. } => {
                    ErrorCode::InvalidUpdate
                }
                _ => ErrorCode::Network,
            };
            ErrorInfo::new(code, format!("{other}. Resume to try again."))
        }
    }
}

impl Volunteer {
    /// Load the settings (the file's, or the defaults) and the node key
    /// (created on first use), start the metrics endpoint if asked for, and
    /// pass every event to `out`. Nothing runs until [`Volunteer::join`] or
    /// [`Volunteer::resume`].
    pub async fn open(
        config: VolunteerConfig,
        out: mpsc::UnboundedSender<NodeEvent>,
    ) -> Result<Self, SessionError> {
        let settings = match &config.paths.settings {
            Some(path) => Settings::load(path)?,
            None => {
                config.settings.check()?;
                config.settings.clone()
            }
        };
        let key_path = &config.paths.key;
        let key = keyfile::load_or_create(key_path).map_err(|source| SessionError::Key {
            path: key_path.clone(),
            source,
        })?;
        let metrics = match config.metrics_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| SessionError::Metrics { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| SessionError::Metrics { addr, source })?;
                let metrics = Arc::new(Metrics::default());
                tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
                Some((metrics, bound))
            }
            None => None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (closing, closing_rx) = watch::channel(false);
        tokio::spawn(tap(
            rx,
            metrics.as_ref().map(|(m, _)| m.clone()),
            out,
            closing_rx,
        ));
        let traffic = match &config.traffic {
            Some(shared) => shared.clone(),
            None => Traffic::new(settings.up_mbit, settings.down_mbit),
        };
        let monthly_cap = MonthlyCap::new(settings.monthly_cap_bytes());
        let name = short(&key.public());
        let (activity, _) = watch::channel(Activity::Idle);
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                settings,
                running: None,
                hold: None,
                epoch: 0,
            })),
            shared: Arc::new(Shared {
                config,
                key,
                traffic,
                monthly_cap,
                out: tx,
                name,
                activity,
                metrics_addr: metrics.map(|(_, a)| a),
                closing,
            }),
        })
    }

    /// The traffic counters and caps (the dashboard samples rates from them).
    pub fn traffic(&self) -> &Traffic {
        &self.shared.traffic
    }

    /// Where the metrics endpoint listens, if it was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.shared.metrics_addr
    }

    /// The node's short id.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The node's endpoint id (what a host puts on its member list).
    pub fn id(&self) -> starling_swarm::EndpointId {
        self.shared.key.public()
    }

    /// Resolves once [`Volunteer::shutdown`] has run.
    async fn closed(&self) {
        let mut rx = self.shared.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    fn emit(&self, event: NodeEvent) {
        let _ = self.shared.out.send(event);
    }

    fn state(&self, state: NodeState, detail: String) {
        self.emit(NodeEvent::State {
            node: self.shared.name.clone(),
            state,
            detail,
        });
    }

    fn set_activity(&self, activity: Activity) {
        self.shared.activity.send_replace(activity);
    }

    /// What the volunteer is doing, as it changes.
    pub fn activity(&self) -> watch::Receiver<Activity> {
        self.shared.activity.subscribe()
    }

    /// A snapshot for the dashboard.
    pub async fn status(&self) -> Status {
        let inner = self.inner.lock().await;
        Status {
            activity: self.shared.activity.borrow().clone(),
            node: self.shared.name.clone(),
            endpoint_id: self.shared.key.public().to_string(),
            ticket: inner.settings.ticket.clone(),
            bytes_up: self.shared.traffic.wire.up(),
            bytes_down: self.shared.traffic.wire.down(),
            settings: inner.settings.clone(),
        }
    }

    /// Check, save (where there is a file) and apply new settings: caps and
    /// the monthly cap at once, a device change at the next join. The run
    /// joined stays as it is (it changes only by joining).
    pub async fn update_settings(&self, new: Settings) -> Result<(), SessionError> {
        let mut inner = self.inner.lock().await;
        let new = Settings {
            ticket: inner.settings.ticket.clone(),
            ..new
        };
        self.store(&new)?;
        self.shared.traffic.set_caps(new.up_mbit, new.down_mbit);
        self.shared.monthly_cap.set(new.monthly_cap_bytes());
        self.emit(NodeEvent::Caps {
            node: self.shared.name.clone(),
            up_mbit: new.up_mbit,
            down_mbit: new.down_mbit,
        });
        inner.settings = new;
        Ok(())
    }

    /// Check the settings, and save them where there is a settings file.
    fn store(&self, settings: &Settings) -> Result<(), SessionError> {
        match &self.shared.config.paths.settings {
            Some(path) => settings.save(path)?,
            None => settings.check()?,
        }
        Ok(())
    }

    /// Change only the bandwidth caps (a caps file's edit), with the same
    /// checks as any settings change.
    pub async fn set_caps(&self, caps: Caps) -> Result<(), SessionError> {
        let current = self.inner.lock().await.settings.clone();
        self.update_settings(Settings {
            up_mbit: caps.up_mbit,
            down_mbit: caps.down_mbit,
            ..current
        })
        .await
    }

    /// Apply the caps in `path` now and whenever the file changes (checked
    /// every `every`); a bad edit is reported and the old caps stay. A
    /// missing file is written from the caps in force first.
    pub async fn watch_caps_file(
        &self,
        path: PathBuf,
        every: Duration,
    ) -> Result<(), SessionError> {
        if !path.exists() {
            let settings = self.inner.lock().await.settings.clone();
            Caps {
                up_mbit: settings.up_mbit,
                down_mbit: settings.down_mbit,
            }
            .save(&path)?;
        }
        let this = self.clone();
        let mut watcher = CapsWatcher::new(path, every);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = watcher.next() => next,
                    () = this.closed() => return,
                };
                let result = match next {
                    Ok(caps) => this.set_caps(caps).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(message) = result {
                    this.emit(NodeEvent::Warning {
                        node: this.shared.name.clone(),
                        message: format!("caps not changed: {message}"),
                    });
                }
            }
        });
        Ok(())
    }

    /// Join the run `ticket` names (text or a `starling://join/` link) and
    /// remember it for the next start.
    pub async fn join(&self, ticket: &str) -> Result<(), SessionError> {
        let parsed: Ticket = ticket.trim().parse().map_err(SessionError::Ticket)?;
        let mut inner = self.inner.lock().await;
        self.stop_running(&mut inner).await;
        let settings = Settings {
            ticket: Some(parsed.to_string()),
            ..inner.settings.clone()
        };
        self.store(&settings)?;
        inner.settings = settings;
        self.start(&mut inner, parsed).await
    }

    async fn start(&self, inner: &mut Inner, ticket: Ticket) -> Result<(), SessionError> {
        if let Some(hold) = inner.hold.clone() {
            inner.epoch += 1;
            self.state(NodeState::Paused, hold.to_string());
            self.set_activity(Activity::Held { hold });
            return Ok(());
        }
        let device_name = inner.settings.device.clone();
        let choice = device_name
            .parse::<starling_train::DeviceChoice>()
            .map_err(|source| SessionError::Device {
                device: device_name.clone(),
                source,
            })?;
        let vram_limit = inner.settings.vram_limit_gb;
        let (device, memory_budget) = tokio::task::spawn_blocking(move || {
            let device = starling_train::select_device(choice)?;
            let budget = machine::device_memory_budget(&device.name, vram_limit);
            Ok::<_, starling_train::DeviceError>((device, budget))
        })
        .await
        .map_err(SessionError::Probe)?
        .map_err(|source| SessionError::Device {
            device: device_name,
            source,
        })?;
        self.state(
            NodeState::Connecting,
            format!("training on {} ({})", device.name, device.reason),
        );
        let (stop, stop_rx) = watch::channel(false);
        let paths = &self.shared.config.paths;
        let opts = VolunteerOptions {
            ticket,
            key: self.shared.key.clone(),
            bind: self.shared.config.bind,
            traffic: self.shared.traffic.clone(),
            device,
            max_rounds: self.shared.config.max_rounds,
            usage_file: Some(paths.usage.clone()),
            port_file: Some(paths.port.clone()),
            monthly_cap: self.shared.monthly_cap.clone(),
            memory_budget,
            attack: self.shared.config.attack,
        };
        let task = tokio::spawn(run_volunteer(opts, self.shared.out.clone(), stop_rx));
        inner.running = Some(Running { stop, task });
        self.set_activity(Activity::Running);
        inner.epoch += 1;
        self.watch_exit(inner.epoch);
        Ok(())
    }

    /// Report an engine that ends on its own (an error, or the run ended).
    fn watch_exit(&self, epoch: u64) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let mut inner = this.inner.lock().await;
                if inner.epoch != epoch {
                    return;
                }
                let finished = inner.running.as_ref().is_none_or(|r| r.task.is_finished());
                if !finished {
                    continue;
                }
                let Some(r) = inner.running.take() else {
                    return;
                };
                let activity = match r.task.await {
                    Ok(Ok(())) => Activity::Finished,
                    Ok(Err(e)) => Activity::Failed {
                        error: advice(&e, &this.shared.key.public().to_string()),
                    },
                    Err(e) => Activity::Failed {
                        error: ErrorInfo::new(
                            ErrorCode::Crashed,
                            format!("the volunteer crashed: {e}"),
                        ),
                    },
                };
                let detail = match &activity {
                    Activity::Failed { error } => error.message.clone(),
                    _ => "the run has ended".to_string(),
                };
                this.state(NodeState::Stopped, detail);
                this.set_activity(activity);
                return;
            }
        });
    }

    async fn stop_running(&self, inner: &mut Inner) {
        inner.epoch += 1;
        if let Some(r) = inner.running.take() {
            let _ = r.stop.send(true);
            // It leaves between steps; a step in progress finishes first.
            let _ = tokio::time::timeout(Duration::from_secs(120), r.task).await;
        }
    }

    /// Stop taking part until [`Volunteer::resume`].
    pub async fn pause(&self) {
        let mut inner = self.inner.lock().await;
        self.stop_running(&mut inner).await;
        self.set_activity(Activity::Paused { until_ms: None });
        self.state(NodeState::Paused, "paused by you".into());
    }

    /// Pause for `duration`, then resume by itself (unless paused or
    /// resumed by hand meanwhile).
    pub async fn snooze(&self, duration: Duration) {
        let mut inner = self.inner.lock().await;
        self.stop_running(&mut inner).await;
        let until_ms = unix_ms().saturating_add(duration.as_millis() as u64);
        self.set_activity(Activity::Paused {
            until_ms: Some(until_ms),
        });
        let epoch = inner.epoch;
        drop(inner);
        self.state(
            NodeState::Paused,
            format!("snoozed for {} minutes", duration.as_secs() / 60),
        );
        let this = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(duration) => {}
                () = this.closed() => return,
            }
            if this.inner.lock().await.epoch == epoch {
                let _ = this.resume().await;
            }
        });
    }

    /// Rejoin the last run.
    pub async fn resume(&self) -> Result<(), SessionError> {
        let mut inner = self.inner.lock().await;
        self.stop_running(&mut inner).await;
        let ticket: Ticket = inner
            .settings
            .ticket
            .as_deref()
            .ok_or(SessionError::NoRun)?
            .parse()
            .map_err(SessionError::Ticket)?;
        self.start(&mut inner, ticket).await
    }

    /// Apply the settings' rules to what the machine reports now: hold a
    /// running volunteer back, or let a held one go again.
    pub async fn apply_rules(&self, now: &Conditions) -> Result<(), SessionError> {
        let mut inner = self.inner.lock().await;
        let hold = inner.settings.hold(now);
        inner.hold = hold.clone();
        let activity = self.shared.activity.borrow().clone();
        match (activity, hold) {
            (Activity::Running, Some(hold)) => {
                self.stop_running(&mut inner).await;
                self.state(NodeState::Paused, hold.to_string());
                self.set_activity(Activity::Held { hold });
            }
            (Activity::Held { .. }, None) => {
                drop(inner);
                return self.resume().await;
            }
            (Activity::Held { hold: old }, Some(hold)) if old != hold => {
                self.state(NodeState::Paused, hold.to_string());
                self.set_activity(Activity::Held { hold });
            }
            _ => {}
        }
        Ok(())
    }

    /// Watch the machine: the rules now (so a join that follows already
    /// knows whether a rule holds), then every second a [`Tick`] to
    /// `on_tick` (the dashboard's charts) and every five seconds the rules
    /// again, with the idle time `idle` reads. Ends at [`Volunteer::shutdown`].
    pub async fn watch_machine(
        &self,
        idle: Arc<dyn IdleTime>,
        on_tick: impl Fn(&Tick) + Send + 'static,
    ) -> JoinHandle<()> {
        let gpu = tokio::task::spawn_blocking(GpuMonitor::open).await.ok();
        let sample = gpu.as_ref().map(GpuMonitor::sample).unwrap_or_default();
        self.check_rules(&sample, &idle).await;
        let this = self.clone();
        tokio::spawn(async move {
            let mut last_rules = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = this.closed() => return,
                }
                let sample = gpu.as_ref().map(GpuMonitor::sample).unwrap_or_default();
                let tick = this.tick(&sample).await;
                on_tick(&tick);
                if last_rules.elapsed() >= RULES_EVERY {
                    last_rules = tokio::time::Instant::now();
                    this.check_rules(&sample, &idle).await;
                }
            }
        })
    }

    /// Apply the rules to what the machine reports now.
    async fn check_rules(&self, sample: &GpuSample, idle: &Arc<dyn IdleTime>) {
        let mut now = machine::conditions(sample);
        let idle = idle.clone();
        now.idle_secs = tokio::task::spawn_blocking(move || idle.idle_secs())
            .await
            .ok()
            .flatten();
        if let Err(e) = self.apply_rules(&now).await {
            self.emit(NodeEvent::Warning {
                node: self.shared.name.clone(),
                message: format!("cannot resume after a rule's hold: {e}"),
            });
        }
    }

    async fn tick(&self, sample: &GpuSample) -> Tick {
        let status = self.status().await;
        Tick {
            t: unix_ms() as f64 / 1000.0,
            bytes_up: status.bytes_up,
            bytes_down: status.bytes_down,
            up_cap_mbit: status.settings.up_mbit,
            down_cap_mbit: status.settings.down_mbit,
            activity: status.activity.name().into(),
            gpu_util: sample.util,
            gpu_temp_c: sample.temp_c,
            gpu_mem_used: sample.mem_used,
            gpu_mem_total: sample.mem_total,
        }
    }

    /// Wait until the volunteer has stopped for good: the run ended (or the
    /// rounds asked for are done), or it failed. Pauses and holds are not
    /// the end.
    pub async fn finished(&self) -> Result<(), ErrorInfo> {
        let mut rx = self.activity();
        let end = rx
            .wait_for(|a| matches!(a, Activity::Finished | Activity::Failed { .. }))
            .await
            .map(|a| a.clone());
        match end {
            Ok(Activity::Failed { error }) => Err(error),
            _ => Ok(()),
        }
    }

    /// Stop cleanly before the app or the command exits: the engine leaves
    /// the run, the watchers end, and the event stream closes once its last
    /// events are delivered.
    pub async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        self.stop_running(&mut inner).await;
        self.state(NodeState::Stopped, "Starling quit".into());
        self.shared.closing.send_replace(true);
    }
}

/// Feed every event to the metrics, then to the face, until shutdown (then
/// what is queued) or until the face is gone.
async fn tap(
    mut rx: mpsc::UnboundedReceiver<NodeEvent>,
    metrics: Option<Arc<Metrics>>,
    out: mpsc::UnboundedSender<NodeEvent>,
    mut closing: watch::Receiver<bool>,
) {
    let pass = |event: NodeEvent| {
        if let Some(m) = &metrics {
            m.observe(&event);
        }
        out.send(event).is_ok()
    };
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            () = out.closed() => return,
            _ = closing.wait_for(|c| *c) => {
                while let Ok(event) = rx.try_recv() {
                    if !pass(event) {
                        return;
                    }
                }
                return;
            }
        };
        match event {
            Some(event) => {
                if !pass(event) {
                    return;
                }
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests;
