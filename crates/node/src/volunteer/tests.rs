use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::host::{Host, HostOptions};
use crate::settings::Preset;
use crate::spec::RunFile;
use starling_swarm::EndpointId;
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

/// Wait for an event that `pred` accepts.
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

/// Wait until the volunteer's activity satisfies `pred`.
async fn until_activity(v: &Volunteer, what: &str, pred: impl Fn(&Activity) -> bool) -> Activity {
    let mut rx = v.activity();
    tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|a| pred(a)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("volunteer alive")
        .clone()
}

/// A host on loopback for `dir`, admitting `allow` (empty: anyone).
async fn start_host(
    dir: &Path,
    allow: Vec<EndpointId>,
) -> (
    String,
    watch::Sender<bool>,
    JoinHandle<Result<(), crate::HostError>>,
) {
    let (spec, tokens) = RunFile::parse(RUN)
        .unwrap()
        .resolve(Path::new("."))
        .unwrap();
    let (host_tx, mut host_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move { while host_rx.recv().await.is_some() {} });
    let host = Host::start(
        HostOptions {
            state_dir: dir.join("host"),
            spec,
            tokens,
            allow,
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
    (ticket, stop_tx, tokio::spawn(host.run(stop_rx)))
}

fn cpu_settings(preset: Preset) -> Settings {
    Settings {
        device: "cpu".into(),
        ..Settings::preset(preset)
    }
}

/// An idle reading the test sets.
struct FakeIdle(AtomicU64);

impl IdleTime for FakeIdle {
    fn idle_secs(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_pause_snooze_resume_rules_and_live_settings() {
    let dir = std::env::temp_dir().join(format!("starling-session-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ticket, stop_host, host_task) = start_host(&dir, vec![]).await;

    let paths = VolunteerPaths::in_dir(
        &dir.join("data"),
        Some(dir.join("config").join("settings.json")),
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let v = Volunteer::open(VolunteerConfig::new(paths.clone()), tx)
        .await
        .unwrap();
    let settings = cpu_settings(Preset::Maximum);
    v.update_settings(settings.clone()).await.unwrap();

    let e = v.join("starling1notaticket").await.unwrap_err();
    assert_eq!(ErrorInfo::from(&e).code, ErrorCode::InvalidTicket);
    let e = v.resume().await.unwrap_err();
    assert_eq!(ErrorInfo::from(&e).code, ErrorCode::NoRun);
    let mut bad = settings.clone();
    bad.up_mbit = Some(-1.0);
    let info = ErrorInfo::from(v.update_settings(bad).await.unwrap_err());
    assert_eq!(info.code, ErrorCode::InvalidSettings);
    assert_eq!(info.fields[0].field, "up_mbit");

    v.join(&format!("starling://join/{ticket}")).await.unwrap();
    until(&mut rx, "a trained round", |e| {
        matches!(e, NodeEvent::Trained { .. })
    })
    .await;
    assert_eq!(v.status().await.activity, Activity::Running);
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
    v.update_settings(capped).await.unwrap();
    assert_eq!(v.traffic().up.rate(), Some(1_000_000.0));
    let saved = Settings::load(paths.settings.as_deref().unwrap()).unwrap();
    assert_eq!(saved.up_mbit, Some(8.0));
    assert!(saved.ticket.is_some(), "the run is remembered");

    v.pause().await;
    assert_eq!(
        v.status().await.activity,
        Activity::Paused { until_ms: None }
    );
    // The ledger holds what the wire counters saw, once (the session's
    // counters outlive each stretch of taking part).
    let ledger_matches_the_wire = |when: &str| {
        let usage = crate::usage::Usage::load(&paths.usage).unwrap();
        let wire = (v.traffic().wire.up(), v.traffic().wire.down());
        assert!(wire.0 > 0 && wire.1 > 0, "{when}: nothing counted");
        assert_eq!((usage.total_up, usage.total_down), wire, "{when}");
    };
    ledger_matches_the_wire("first pause");
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

    v.snooze(Duration::from_secs(1)).await;
    assert!(matches!(
        v.status().await.activity,
        Activity::Paused { until_ms: Some(_) }
    ));
    // The snooze ends by itself and the node trains again.
    until(&mut rx, "training after the snooze", |e| {
        matches!(e, NodeEvent::Trained { .. })
    })
    .await;
    assert_eq!(v.status().await.activity, Activity::Running);

    // A rule (battery) holds it back and lets it go.
    v.update_settings(cpu_settings(Preset::Standard))
        .await
        .unwrap();
    let on_battery = Conditions {
        on_battery: Some(true),
        ..Conditions::default()
    };
    v.apply_rules(&on_battery).await.unwrap();
    assert_eq!(
        v.status().await.activity,
        Activity::Held {
            hold: Hold::OnBattery
        }
    );
    v.apply_rules(&Conditions::default()).await.unwrap();
    assert_eq!(v.status().await.activity, Activity::Running);

    // The machine watcher applies the idle rule with the face's idle reading.
    let idle = Arc::new(FakeIdle(AtomicU64::new(0)));
    let ticks = Arc::new(AtomicU64::new(0));
    let counted = ticks.clone();
    v.update_settings(Settings {
        idle_minutes: Some(1),
        pause_on_battery: false,
        ..cpu_settings(Preset::Maximum)
    })
    .await
    .unwrap();
    let watcher = v
        .watch_machine(idle.clone(), move |t| {
            assert!(t.t > 0.0);
            counted.fetch_add(1, Ordering::Relaxed);
        })
        .await;
    until_activity(&v, "the idle rule's hold", |a| {
        matches!(
            a,
            Activity::Held {
                hold: Hold::NotIdle { minutes: 1 }
            }
        )
    })
    .await;
    idle.0.store(120, Ordering::Relaxed);
    until_activity(&v, "the release once idle", |a| *a == Activity::Running).await;
    assert!(ticks.load(Ordering::Relaxed) >= 1, "ticks reach the face");
    watcher.abort();

    v.shutdown().await;
    // After a snooze, a hold and three resumes: still every byte once.
    ledger_matches_the_wire("shutdown");

    // A device limit below the model's need is refused before any download,
    // with the sentence both faces show.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let small = Volunteer::open(
        VolunteerConfig {
            settings: Settings {
                vram_limit_gb: Some(0.001),
                ..cpu_settings(Preset::Maximum)
            },
            ..VolunteerConfig::new(VolunteerPaths::in_dir(&dir.join("small"), None))
        },
        tx,
    )
    .await
    .unwrap();
    small.join(&ticket).await.unwrap();
    let error = small.finished().await.unwrap_err();
    assert_eq!(error.code, ErrorCode::TooSmall, "{error:?}");
    assert!(
        error
            .message
            .starts_with("This device is too small for this run"),
        "{}",
        error.message
    );
    while let Ok(e) = rx.try_recv() {
        assert!(
            !matches!(e, NodeEvent::Fetching { .. }),
            "downloaded before refusing: {e:?}"
        );
    }
    assert!(
        !dir.join("small").join("settings.json").exists(),
        "in-memory settings are not written"
    );

    let _ = stop_host.send(true);
    let _ = host_task.await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_off_the_member_list_gets_a_code_not_a_sentence_to_parse() {
    let dir = std::env::temp_dir().join(format!("starling-session-nm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let someone_else = SecretKey::from_bytes(&[7; 32]).public();
    let (ticket, stop_host, host_task) = start_host(&dir, vec![someone_else]).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let v = Volunteer::open(
        VolunteerConfig {
            settings: cpu_settings(Preset::Maximum),
            ..VolunteerConfig::new(VolunteerPaths::in_dir(&dir.join("data"), None))
        },
        tx,
    )
    .await
    .unwrap();
    v.join(&ticket).await.unwrap();
    let error = v.finished().await.unwrap_err();
    assert_eq!(error.code, ErrorCode::NotMember, "{error:?}");
    let id = v.status().await.endpoint_id;
    assert!(error.message.contains(&id), "{}", error.message);
    let _ = stop_host.send(true);
    let _ = host_task.await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn caps_file_edits_go_through_the_settings_checks() {
    let dir = std::env::temp_dir().join(format!("starling-session-caps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let v = Volunteer::open(
        VolunteerConfig {
            settings: Settings {
                up_mbit: Some(10.0),
                ..cpu_settings(Preset::Maximum)
            },
            ..VolunteerConfig::new(VolunteerPaths::in_dir(&dir, None))
        },
        tx,
    )
    .await
    .unwrap();
    let path = dir.join("caps.json");
    v.watch_caps_file(path.clone(), Duration::from_millis(20))
        .await
        .unwrap();
    assert_eq!(
        Caps::load(&path).unwrap().up_mbit,
        Some(10.0),
        "written from the settings"
    );
    until(&mut rx, "the first caps", |e| {
        matches!(e, NodeEvent::Caps { .. })
    })
    .await;
    std::fs::write(&path, r#"{"up_mbit": 2, "down_mbit": 40}"#).unwrap();
    until(
        &mut rx,
        "the edited caps",
        |e| matches!(e, NodeEvent::Caps { up_mbit: Some(u), .. } if *u == 2.0),
    )
    .await;
    assert_eq!(v.traffic().up.rate(), Some(250_000.0));
    assert_eq!(v.status().await.settings.down_mbit, Some(40.0));
    // Below the settings' floor (0.1 Mbit/s): refused, the old caps stay.
    std::fs::write(&path, r#"{"up_mbit": 0.01}"#).unwrap();
    let NodeEvent::Warning { message, .. } = until(&mut rx, "the refusal", |e| {
        matches!(e, NodeEvent::Warning { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert!(message.contains("up_mbit"), "{message}");
    assert_eq!(v.traffic().up.rate(), Some(250_000.0));
    let _ = std::fs::remove_dir_all(&dir);
}
