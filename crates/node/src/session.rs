//! The desktop app's volunteer: one run at a time, joined with a ticket,
//! paused, snoozed and resumed by its owner or by the rules in their
//! settings, with limits that apply while it runs.
//!
//! The app is a thin face over this type, so everything a person can do from
//! the tray or the dashboard is testable here without a window. Pausing stops
//! the volunteer cleanly (it leaves between steps; the host's deadline covers
//! a round it abandons) and resuming rejoins with the same key and port, which
//! catches up from the host's checkpoint in seconds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use starling_swarm::{SecretKey, Ticket, Traffic, unix_ms};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

use crate::events::{NodeEvent, NodeState};
use crate::machine;
use crate::settings::{Conditions, Hold, Settings, SettingsError};
use crate::usage::MonthlyCap;
use crate::volunteer::{VolunteerError, VolunteerOptions, run_volunteer};
use crate::{keyfile, short};

/// Why a session operation failed, in words for the person who asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The ticket does not parse.
    #[error(
        "this is not a Starling ticket ({0}); copy the whole line the host printed, starting with starling1"
    )]
    Ticket(String),
    /// Nothing to resume.
    #[error("no run to resume: paste a ticket and press Join")]
    NoRun,
    /// The settings are invalid or could not be saved.
    #[error("{0}")]
    Settings(#[from] SettingsError),
    /// The node's key could not be read or created.
    #[error("cannot use the key file {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The chosen device cannot be opened.
    #[error("{0}")]
    Device(String),
}

/// What the session is doing.
#[derive(Clone, Debug, PartialEq, Serialize)]
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
    /// The volunteer stopped with an error.
    Failed {
        /// What happened and what to do.
        message: String,
    },
}

/// A snapshot for the dashboard.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// What the session is doing.
    pub activity: Activity,
    /// The node's short id (what a host puts on its member list).
    pub node: String,
    /// The node's full endpoint id.
    pub endpoint_id: String,
    /// The run joined, if any.
    pub ticket: Option<String>,
    /// Bytes sent since the app started.
    pub bytes_up: u64,
    /// Bytes received since the app started.
    pub bytes_down: u64,
    /// The settings in force.
    pub settings: Settings,
}

/// Where a session keeps its files.
#[derive(Clone, Debug)]
pub struct SessionPaths {
    /// The settings file.
    pub settings: PathBuf,
    /// Key, data-use ledger and port files live here.
    pub data_dir: PathBuf,
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), VolunteerError>>,
}

struct Inner {
    settings: Settings,
    activity: Activity,
    running: Option<Running>,
    /// Bumped on every pause/resume so a stale snooze timer does nothing.
    epoch: u64,
}

/// The app's volunteer.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Mutex<Inner>>,
    paths: SessionPaths,
    key: SecretKey,
    traffic: Traffic,
    monthly_cap: MonthlyCap,
    out: mpsc::UnboundedSender<NodeEvent>,
    name: String,
}

/// Turn a volunteer's failure into what its owner should do.
pub fn advice(e: &VolunteerError, endpoint_id: &str) -> String {
    match e {
        VolunteerError::Refused(reason) if reason.contains("member list") => format!(
            "This run only admits listed members. Send the host your id ({endpoint_id}) and ask to be added."
        ),
        VolunteerError::Refused(reason) => format!("The host refused: {reason}."),
        VolunteerError::Usage(reason) => {
            format!("Your data-use ledger cannot be written ({reason}): is the disk full?")
        }
        e @ VolunteerError::TooSmall { .. } => format!(
            "This device is too small for this run: {e}. Pick another device or raise the VRAM \
             limit in Settings, or join a run with a smaller model."
        ),
        other => format!("{other}. Press Resume to try again."),
    }
}

impl Session {
    /// Load the settings (defaults if none) and the node key (created on
    /// first use); nothing runs until [`Session::join`] or [`Session::resume`].
    pub fn open(
        paths: SessionPaths,
        out: mpsc::UnboundedSender<NodeEvent>,
    ) -> Result<Self, SessionError> {
        let settings = Settings::load(&paths.settings)?;
        let key_path = paths.data_dir.join("node.key");
        let key = keyfile::load_or_create(&key_path).map_err(|e| SessionError::Key {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let traffic = Traffic::new(settings.up_mbit, settings.down_mbit);
        let monthly_cap = MonthlyCap::new(settings.monthly_cap_bytes());
        let name = short(&key.public());
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                settings,
                activity: Activity::Idle,
                running: None,
                epoch: 0,
            })),
            paths,
            key,
            traffic,
            monthly_cap,
            out,
            name,
        })
    }

    /// The traffic counters and caps (the dashboard samples rates from them).
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    fn emit(&self, event: NodeEvent) {
        let _ = self.out.send(event);
    }

    fn state(&self, state: NodeState, detail: String) {
        self.emit(NodeEvent::State {
            node: self.name.clone(),
            state,
            detail,
        });
    }

    /// A snapshot for the dashboard.
    pub async fn status(&self) -> Status {
        let inner = self.inner.lock().await;
        Status {
            activity: inner.activity.clone(),
            node: self.name.clone(),
            endpoint_id: self.key.public().to_string(),
            ticket: inner.settings.ticket.clone(),
            bytes_up: self.traffic.total.up(),
            bytes_down: self.traffic.total.down(),
            settings: inner.settings.clone(),
        }
    }

    /// Check, save and apply new settings: caps and the monthly cap at once,
    /// a device change at the next join.
    /// The run joined stays as it is (it changes only by joining).
    pub async fn update_settings(&self, new: Settings) -> Result<(), SessionError> {
        let mut inner = self.inner.lock().await;
        let new = Settings {
            ticket: inner.settings.ticket.clone(),
            ..new
        };
        new.save(&self.paths.settings)?;
        self.traffic.set_caps(new.up_mbit, new.down_mbit);
        self.monthly_cap.set(new.monthly_cap_bytes());
        self.emit(NodeEvent::Caps {
            node: self.name.clone(),
            up_mbit: new.up_mbit,
            down_mbit: new.down_mbit,
        });
        inner.settings = new;
        Ok(())
    }

    /// Join the run `ticket` names (text or a `starling://join/` link) and
    /// remember it for the next start.
    pub async fn join(&self, ticket: &str) -> Result<(), SessionError> {
        let parsed: Ticket = ticket
            .trim()
            .parse()
            .map_err(|e: starling_swarm::TicketError| SessionError::Ticket(e.to_string()))?;
        let mut inner = self.inner.lock().await;
        Self::stop_running(&mut inner).await;
        let mut settings = inner.settings.clone();
        settings.ticket = Some(parsed.to_string());
        settings.save(&self.paths.settings)?;
        inner.settings = settings;
        self.start(&mut inner, parsed).await
    }

    async fn start(&self, inner: &mut Inner, ticket: Ticket) -> Result<(), SessionError> {
        let choice = inner
            .settings
            .device
            .parse::<starling_train::DeviceChoice>()
            .map_err(|e| SessionError::Device(e.to_string()))?;
        let vram_limit = inner.settings.vram_limit_gb;
        let (device, memory_budget) = tokio::task::spawn_blocking(move || {
            let device = starling_train::select_device(choice)?;
            let budget = machine::device_memory_budget(&device.name, vram_limit);
            Ok::<_, starling_train::DeviceError>((device, budget))
        })
        .await
        .map_err(|e| SessionError::Device(e.to_string()))?
        .map_err(|e| SessionError::Device(e.to_string()))?;
        self.state(
            NodeState::Connecting,
            format!("training on {} ({})", device.name, device.reason),
        );
        let (stop, stop_rx) = watch::channel(false);
        let opts = VolunteerOptions {
            ticket,
            key: self.key.clone(),
            bind: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            traffic: self.traffic.clone(),
            device,
            max_rounds: None,
            usage_file: Some(self.paths.data_dir.join("usage.json")),
            port_file: Some(self.paths.data_dir.join("node.port")),
            monthly_cap: self.monthly_cap.clone(),
            memory_budget,
        };
        let task = tokio::spawn(run_volunteer(opts, self.out.clone(), stop_rx));
        inner.running = Some(Running { stop, task });
        inner.activity = Activity::Running;
        inner.epoch += 1;
        self.watch_exit(inner.epoch);
        Ok(())
    }

    /// Report a volunteer that ends on its own (an error, or the run ended).
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
                let message = match r.task.await {
                    Ok(Ok(())) => "the run has ended".to_string(),
                    Ok(Err(e)) => advice(&e, &this.key.public().to_string()),
                    Err(e) => format!("the volunteer crashed: {e}"),
                };
                this.state(NodeState::Stopped, message.clone());
                inner.activity = Activity::Failed { message };
                return;
            }
        });
    }

    async fn stop_running(inner: &mut Inner) {
        inner.epoch += 1;
        if let Some(r) = inner.running.take() {
            let _ = r.stop.send(true);
            // It leaves between steps; a step in progress finishes first.
            let _ = tokio::time::timeout(Duration::from_secs(120), r.task).await;
        }
    }

    /// Stop taking part until [`Session::resume`].
    pub async fn pause(&self) {
        let mut inner = self.inner.lock().await;
        Self::stop_running(&mut inner).await;
        inner.activity = Activity::Paused { until_ms: None };
        self.state(NodeState::Paused, "paused by you".into());
    }

    /// Pause for `duration`, then resume by itself (unless paused or
    /// resumed by hand meanwhile).
    pub async fn snooze(&self, duration: Duration) {
        let mut inner = self.inner.lock().await;
        Self::stop_running(&mut inner).await;
        let until_ms = unix_ms() + duration.as_millis() as u64;
        inner.activity = Activity::Paused {
            until_ms: Some(until_ms),
        };
        let epoch = inner.epoch;
        drop(inner);
        self.state(
            NodeState::Paused,
            format!("snoozed for {} minutes", duration.as_secs() / 60),
        );
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            if this.inner.lock().await.epoch == epoch {
                let _ = this.resume().await;
            }
        });
    }

    /// Rejoin the last run.
    pub async fn resume(&self) -> Result<(), SessionError> {
        let mut inner = self.inner.lock().await;
        Self::stop_running(&mut inner).await;
        let ticket: Ticket = inner
            .settings
            .ticket
            .as_deref()
            .ok_or(SessionError::NoRun)?
            .parse()
            .map_err(|e: starling_swarm::TicketError| SessionError::Ticket(e.to_string()))?;
        self.start(&mut inner, ticket).await
    }

    /// Apply the settings' rules to what the machine reports now: hold a
    /// running volunteer back, or let a held one go again.
    pub async fn apply_rules(&self, now: &Conditions) -> Result<(), SessionError> {
        let mut inner = self.inner.lock().await;
        let hold = inner.settings.hold(now);
        match (&inner.activity, hold) {
            (Activity::Running, Some(hold)) => {
                Self::stop_running(&mut inner).await;
                self.state(NodeState::Paused, hold.to_string());
                inner.activity = Activity::Held { hold };
            }
            (Activity::Held { .. }, None) => {
                drop(inner);
                return self.resume().await;
            }
            (Activity::Held { hold: old }, Some(hold)) if *old != hold => {
                self.state(NodeState::Paused, hold.to_string());
                inner.activity = Activity::Held { hold };
            }
            _ => {}
        }
        Ok(())
    }

    /// Stop cleanly before the app exits.
    pub async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        Self::stop_running(&mut inner).await;
        self.state(NodeState::Stopped, "Starling quit".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{Host, HostOptions};
    use crate::settings::Preset;
    use crate::spec::RunFile;
    use starling_train::{DeviceChoice, select_device};

    const RUN: &str = r#"
[run]
model = "nano"
batch = 2
micro_batch = 2
seq_len = 32
corpus_bytes = 262144
eval_sequences = 4

[rounds]
window_secs = 4.0
eval_every = 100
"#;

    /// Wait for an event from `node` that `pred` accepts.
    async fn until(
        rx: &mut mpsc::UnboundedReceiver<NodeEvent>,
        what: &str,
        pred: impl Fn(&NodeEvent) -> bool,
    ) -> NodeEvent {
        tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                let e = rx.recv().await.expect("event stream open");
                if pred(&e) {
                    return e;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn join_pause_snooze_resume_and_live_settings() {
        let dir = std::env::temp_dir().join(format!("starling-session-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (spec, tokens) = RunFile::parse(RUN)
            .unwrap()
            .resolve(std::path::Path::new("."))
            .unwrap();
        let (host_tx, _host_rx) = mpsc::unbounded_channel();
        let host = Host::start(
            HostOptions {
                state_dir: dir.join("host"),
                spec,
                tokens,
                allow: vec![],
                bind: "127.0.0.1:0".parse().unwrap(),
                traffic: Traffic::new(None, None),
                device: select_device(DeviceChoice::Cpu).unwrap(),
                max_rounds: None,
            },
            host_tx,
        )
        .await
        .unwrap();
        let ticket = host.ticket().to_string();
        let (stop_tx, stop_rx) = watch::channel(false);
        let host_task = tokio::spawn(host.run(stop_rx));

        let paths = SessionPaths {
            settings: dir.join("config").join("settings.json"),
            data_dir: dir.join("data"),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let session = Session::open(paths.clone(), tx).unwrap();
        let mut settings = Settings::preset(Preset::Maximum);
        settings.device = "cpu".into();
        session.update_settings(settings.clone()).await.unwrap();

        assert!(matches!(
            session.join("starling1notaticket").await,
            Err(SessionError::Ticket(_))
        ));
        assert!(matches!(session.resume().await, Err(SessionError::NoRun)));

        session
            .join(&format!("starling://join/{ticket}"))
            .await
            .unwrap();
        until(&mut rx, "a trained round", |e| {
            matches!(e, NodeEvent::Trained { .. })
        })
        .await;
        assert_eq!(session.status().await.activity, Activity::Running);
        // The host's eval after round 0 reaches the volunteer with round 1's open.
        let NodeEvent::Evaluated { eval_loss, .. } = until(&mut rx, "the run's eval loss", |e| {
            matches!(e, NodeEvent::Evaluated { round: 0, .. })
        })
        .await
        else {
            unreachable!()
        };
        assert!(eval_loss > 1.0 && eval_loss < 20.0, "eval loss {eval_loss}");

        // Caps apply to the running node at once.
        let mut capped = settings.clone();
        capped.up_mbit = Some(8.0);
        session.update_settings(capped).await.unwrap();
        assert_eq!(session.traffic().up.rate(), Some(1_000_000.0));
        let saved = Settings::load(&paths.settings).unwrap();
        assert_eq!(saved.up_mbit, Some(8.0));
        assert!(saved.ticket.is_some(), "the run is remembered");

        session.pause().await;
        assert_eq!(
            session.status().await.activity,
            Activity::Paused { until_ms: None }
        );
        // Nothing trains while paused (two windows' worth).
        let quiet = tokio::time::timeout(Duration::from_secs(9), async {
            loop {
                if let Some(NodeEvent::Trained { .. }) = rx.recv().await {
                    return;
                }
            }
        })
        .await;
        assert!(quiet.is_err(), "trained while paused");

        session.snooze(Duration::from_secs(1)).await;
        assert!(matches!(
            session.status().await.activity,
            Activity::Paused { until_ms: Some(_) }
        ));
        // The snooze ends by itself and the node trains again.
        until(&mut rx, "training after the snooze", |e| {
            matches!(e, NodeEvent::Trained { .. })
        })
        .await;
        assert_eq!(session.status().await.activity, Activity::Running);

        // A rule (battery) holds it back and lets it go.
        let mut rules = Settings::preset(Preset::Standard);
        rules.device = "cpu".into();
        session.update_settings(rules).await.unwrap();
        let on_battery = Conditions {
            on_battery: Some(true),
            ..Conditions::default()
        };
        session.apply_rules(&on_battery).await.unwrap();
        assert_eq!(
            session.status().await.activity,
            Activity::Held {
                hold: Hold::OnBattery
            }
        );
        session.apply_rules(&Conditions::default()).await.unwrap();
        assert_eq!(session.status().await.activity, Activity::Running);

        session.shutdown().await;
        let _ = stop_tx.send(true);
        let _ = host_task.await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
