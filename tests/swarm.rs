#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Cross-process tests of the swarm: real `starling host` and `starling join`
//! processes on loopback (no relay, no discovery), observed through their
//! `--json` event streams.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_starling");

/// A run small enough for two CPU cores: nano, 4 x 32 tokens per member.
const RUN: &str = r#"
[run]
name = "cross-process test"
model = "nano"
batch = 4
micro_batch = 4
seq_len = 32
lr = 3e-3
warmup = 3
corpus_bytes = 262144
eval_sequences = 8

[rounds]
window_secs = 8.0
checkpoint_every = 5
report_every = 5
eval_every = 19
"#;

struct Node {
    child: Child,
    events: mpsc::Receiver<Value>,
    log: PathBuf,
}

impl Node {
    fn spawn(args: &[&str], log: PathBuf) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--json", "--device", "cpu", "--listen", "127.0.0.1:0"])
            // Schedules are local time: pin it so tests can place a window.
            .env("TZ", "UTC")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start starling");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Self { child, events, log }
    }

    /// Collect events until `done` says so or `limit` passes.
    fn until(
        &self,
        limit: Duration,
        seen: &mut Vec<Value>,
        done: impl Fn(&[Value]) -> bool,
    ) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(v) = self.events.recv_timeout(Duration::from_millis(200)) {
                seen.push(v);
            }
            if done(seen) {
                return true;
            }
        }
        false
    }

    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("starling-swarm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn start_host(dir: &Path, run: &str, extra: &[&str]) -> (Node, String) {
    let run_file = dir.join("run.toml");
    std::fs::write(&run_file, run).expect("run file");
    let ticket_file = dir.join("ticket");
    let _ = std::fs::remove_file(&ticket_file);
    let mut args = vec![
        "host".to_string(),
        run_file.display().to_string(),
        "--state-dir".into(),
        dir.join("host").display().to_string(),
        "--ticket-file".into(),
        ticket_file.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let host = Node::spawn(&args, dir.join("host.log"));
    let end = Instant::now() + Duration::from_secs(120);
    while !ticket_file.exists() {
        assert!(
            Instant::now() < end,
            "host printed no ticket: {}",
            host.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let ticket = std::fs::read_to_string(&ticket_file).expect("ticket");
    (host, ticket)
}

fn join(dir: &Path, ticket: &str, name: &str, extra: &[&str]) -> Node {
    let key = dir.join(name).join("node.key").display().to_string();
    let mut args = vec!["join", ticket, "--key-file", &key];
    args.extend_from_slice(extra);
    Node::spawn(&args, dir.join(format!("{name}.log")))
}

/// Start `starling bench swarm --join TICKET ARGS`: synthetic volunteers
/// (in one process, `--json`, state under `dir/bench`) joining the run.
/// Returns the process and its log (`dir/NAME.log`).
fn synthetic_volunteers(dir: &Path, ticket: &str, name: &str, args: &[&str]) -> (Child, PathBuf) {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(BIN)
        .args(["bench", "swarm", "--join", ticket.trim(), "--json", "--dir"])
        .arg(dir.join("bench"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the synthetic volunteers");
    (child, log)
}

fn applied(events: &[Value], round: u64) -> Option<&Value> {
    events
        .iter()
        .find(|e| e["event"] == "round_applied" && e["round"] == round)
}

/// A node's events without the frequent ones, for a failure message.
fn story(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| {
            !["trained", "progress", "peers", "usage", "fetching"]
                .iter()
                .any(|noise| e["event"] == *noise)
        })
        .map(|e| format!("{e}\n"))
        .collect()
}

#[test]
fn host_and_three_volunteers_train_twenty_rounds_to_identical_weights() {
    let dir = scratch("twenty");
    // Round 0 waits for all three (RUN ends in its [rounds] section), so a
    // volunteer slow to start on a busy machine cannot miss it.
    let run = format!("{RUN}min_members = 3\n");
    let (host, ticket) = start_host(&dir, &run, &["--rounds", "20"]);
    let volunteers: Vec<Node> = (0..3)
        .map(|i| join(&dir, &ticket, &format!("v{i}"), &["--rounds", "20"]))
        .collect();
    let limit = Duration::from_secs(600);
    let mut host_events = Vec::new();
    assert!(
        host.until(limit, &mut host_events, |e| applied(e, 19).is_some()),
        "host did not finish 20 rounds: {}",
        host.stderr()
    );
    let mut digests = vec![applied(&host_events, 19).unwrap()["digest"].clone()];
    for v in &volunteers {
        let mut events = Vec::new();
        assert!(
            v.until(limit, &mut events, |e| applied(e, 19).is_some()),
            "volunteer did not apply round 19: {}",
            v.stderr()
        );
        digests.push(applied(&events, 19).unwrap()["digest"].clone());
    }
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "replicas differ: {digests:?}"
    );
    let first = applied(&host_events, 0).unwrap()["eval_loss"]
        .as_f64()
        .unwrap();
    let last = applied(&host_events, 19).unwrap()["eval_loss"]
        .as_f64()
        .unwrap();
    assert!(
        last < first - 0.3,
        "eval loss did not fall: {first} -> {last}"
    );
    // Every round carried all three members' updates.
    for r in 0..20 {
        assert_eq!(applied(&host_events, r).unwrap()["updates"], 3, "round {r}");
    }
}

#[test]
fn only_listed_members_join_even_after_the_run_has_started() {
    let dir = scratch("allow");
    // Two listed members with keys written here; a stranger with a fresh key.
    let keys: Vec<String> = (1u8..=2)
        .map(|i| {
            let hex: String = [i; 32].iter().map(|b| format!("{b:02x}")).collect();
            std::fs::create_dir_all(dir.join(format!("m{i}"))).unwrap();
            std::fs::write(dir.join(format!("m{i}")).join("node.key"), hex).unwrap();
            starling_node::SecretKey::from_bytes(&[i; 32])
                .public()
                .to_string()
        })
        .collect();
    let run = format!(
        "{RUN}\n[members]\nallow = [\"{}\", \"{}\"]\n",
        keys[0], keys[1]
    );
    let (host, ticket) = start_host(&dir, &run, &["--rounds", "6"]);
    let first = join(&dir, &ticket, "m1", &["--rounds", "6"]);
    let limit = Duration::from_secs(300);
    let mut host_events = Vec::new();
    assert!(host.until(limit, &mut host_events, |e| applied(e, 1).is_some()));

    let mut stranger = join(&dir, &ticket, "stranger", &[]);
    let status = stranger
        .wait(Duration::from_secs(60))
        .expect("stranger gave up");
    assert!(!status.success());
    // The sentence the app shows too, with the id to send the host.
    assert!(
        stranger
            .stderr()
            .contains("This run only admits listed members. Send the host your id ("),
        "{}",
        stranger.stderr()
    );
    // The second listed member is still admitted after rounds have run.
    let second = join(&dir, &ticket, "m2", &[]);
    assert!(host.until(limit, &mut host_events, |e| applied(e, 5).is_some()));
    assert!(
        host_events.iter().any(|v| v["event"] == "warning"
            && v["message"].as_str().unwrap_or("").contains("non-member"))
    );
    assert_eq!(
        applied(&host_events, 5).unwrap()["updates"],
        2,
        "both members trained"
    );
    let mut second_events = Vec::new();
    assert!(
        second.until(limit, &mut second_events, |e| applied(e, 5).is_some()),
        "listed member did not catch up: {}",
        second.stderr()
    );
    assert_eq!(
        applied(&second_events, 5).unwrap()["digest"],
        applied(&host_events, 5).unwrap()["digest"]
    );
    drop(first);
}

#[test]
fn a_late_joiner_catches_up_from_the_checkpoint_to_identical_weights() {
    let dir = scratch("late");
    // The host trains too (--train), so one volunteer starts with it.
    let (host, ticket) = start_host(&dir, RUN, &["--rounds", "14", "--train"]);
    let early: Vec<Node> = (0..1)
        .map(|i| join(&dir, &ticket, &format!("v{i}"), &["--rounds", "14"]))
        .collect();
    let limit = Duration::from_secs(600);
    let mut host_events = Vec::new();
    // Wait until a checkpoint exists (after round 4) and round 6 is done.
    assert!(
        host.until(limit, &mut host_events, |e| applied(e, 6).is_some()),
        "host stalled: {}",
        host.stderr()
    );
    let late = join(&dir, &ticket, "late", &[]);
    assert!(host.until(limit, &mut host_events, |e| applied(e, 13).is_some()));
    let mut late_events = Vec::new();
    assert!(
        late.until(limit, &mut late_events, |e| applied(e, 13).is_some()),
        "late joiner did not reach round 13: {}\n{}",
        late.stderr(),
        story(&late_events)
    );
    assert_eq!(
        applied(&late_events, 13).unwrap()["digest"],
        applied(&host_events, 13).unwrap()["digest"]
    );
    // It trained too: the last rounds carry the host's, the early and the late updates.
    assert_eq!(applied(&host_events, 13).unwrap()["updates"], 3);
    // The run's token count includes the rounds before it joined.
    let host_total: u64 = (0..=13)
        .map(|r| {
            applied(&host_events, r).unwrap()["tokens"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(applied(&late_events, 13).unwrap()["run_tokens"], host_total);
    assert_eq!(applied(&host_events, 13).unwrap()["run_tokens"], host_total);
    // What the app's progress bar and status line show: the checkpoint's
    // download up to its full size, then the first step's warm-up.
    let fetched: Vec<_> = late_events
        .iter()
        .filter(|e| e["event"] == "fetching" && e["what"] == "checkpoint")
        .collect();
    let last = fetched.last().expect("checkpoint progress reported");
    assert_eq!(last["done"], last["total"]);
    assert!(last["total"].as_u64().unwrap() > 1_000_000);
    assert!(
        late_events
            .iter()
            .any(|e| e["event"] == "state" && e["state"] == "warming_up")
    );
    // The checkpoint came from the early volunteer, which kept the one it
    // computed itself (the same bytes as the host's), not from the host.
    let loaded = late_events
        .iter()
        .find(|e| e["event"] == "checkpoint")
        .expect("the checkpoint's source reported");
    assert_ne!(loaded["from"], "host", "{loaded}");
    assert_eq!(loaded["bytes"], last["total"]);
    // The peer list: the host (it served the member list) with a latency,
    // and the member that served the checkpoint.
    let peers = late_events
        .iter()
        .rfind(|e| e["event"] == "peers")
        .expect("peer lists reported");
    let peers = peers["peers"].as_array().unwrap();
    let host_view = peers
        .iter()
        .find(|p| p["host"] == true)
        .expect("the host is among the peers");
    assert!(host_view["rtt_ms"].as_f64().is_some(), "{host_view}");
    let server = peers
        .iter()
        .find(|p| p["peer"] == loaded["from"])
        .expect("the checkpoint's server is among the peers");
    assert!(
        server["bytes_down"].as_u64().unwrap() > 1_000_000,
        "{server}"
    );
    drop(early);
}

/// Rounds a node applied, in the order it applied them.
fn applied_rounds(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["event"] == "round_applied")
        .filter_map(|e| e["round"].as_u64())
        .collect()
}

#[test]
fn a_volunteer_killed_mid_round_rejoins_and_catches_up() {
    let dir = scratch("sigkill");
    let (host, ticket) = start_host(&dir, RUN, &["--rounds", "16"]);
    let mut victim = join(&dir, &ticket, "victim", &[]);
    let others: Vec<Node> = (0..2)
        .map(|i| join(&dir, &ticket, &format!("v{i}"), &["--rounds", "16"]))
        .collect();
    let limit = Duration::from_secs(600);
    let mut host_events = Vec::new();
    let mut victim_events = Vec::new();
    assert!(host.until(limit, &mut host_events, |e| applied(e, 2).is_some()));
    // Kill it while it trains or waits inside a round.
    assert!(
        victim.until(limit, &mut victim_events, |e| e
            .iter()
            .any(|v| v["event"] == "trained" && v["round"].as_u64() >= Some(3)))
    );
    victim.child.kill().expect("SIGKILL");
    let _ = victim.child.wait();
    // The run goes on without it.
    let killed_at = host_events.len();
    assert!(host.until(limit, &mut host_events, |e| {
        e[killed_at..]
            .iter()
            .any(|v| v["event"] == "round_applied" && v["updates"] == 2)
    }));
    // Same key, new process: it rejoins and ends on the host's weights.
    let back = join(&dir, &ticket, "victim", &[]);
    let restarted_at = host_events.len();
    assert!(host.until(limit, &mut host_events, |e| applied(e, 15).is_some()));
    // It binds its old port again, so the host reaches it at once: at most
    // the round in progress while it restarted and the next one go without it.
    let without: Vec<u64> = host_events[restarted_at..]
        .iter()
        .filter(|v| v["event"] == "round_applied")
        .take_while(|v| v["updates"] != 3)
        .filter_map(|v| v["round"].as_u64())
        .collect();
    eprintln!("rounds applied without the restarted volunteer: {without:?}");
    assert!(without.len() <= 2, "missed rounds {without:?}");
    let mut back_events = Vec::new();
    let caught_up = back.until(limit, &mut back_events, |e| applied(e, 15).is_some());
    let _ = host.until(Duration::from_secs(1), &mut host_events, |_| false);
    let refusals: Vec<&Value> = host_events
        .iter()
        .filter(|v| v["event"] == "rejected" || v["event"] == "dropped")
        .collect();
    eprintln!("host refusals: {refusals:?}");
    assert!(
        caught_up,
        "restarted volunteer did not catch up: {}\nhost refusals: {refusals:?}",
        back.stderr()
    );
    assert_eq!(
        applied(&back_events, 15).unwrap()["digest"],
        applied(&host_events, 15).unwrap()["digest"]
    );
    assert_eq!(
        applied(&host_events, 15).unwrap()["updates"],
        3,
        "it trains again"
    );
    drop(others);
}

#[test]
fn a_host_killed_mid_run_resumes_without_losing_a_round() {
    let dir = scratch("host-restart");
    let (mut host, ticket) = start_host(&dir, RUN, &[]);
    let volunteers: Vec<Node> = (0..2)
        .map(|i| join(&dir, &ticket, &format!("v{i}"), &["--rounds", "12"]))
        .collect();
    let limit = Duration::from_secs(600);
    let mut before = Vec::new();
    assert!(host.until(limit, &mut before, |e| applied(e, 6).is_some()));
    host.child.kill().expect("SIGKILL");
    let _ = host.child.wait();
    // Same state directory: same key, port, run and rounds.
    let (host, ticket_again) = start_host(&dir, RUN, &[]);
    assert_eq!(ticket_again, ticket, "the ticket stays valid");
    let mut after = Vec::new();
    assert!(
        host.until(limit, &mut after, |e| applied(e, 11).is_some()),
        "resumed host stalled: {}",
        host.stderr()
    );
    let resumed_at = applied_rounds(&after)[0];
    assert!(
        (7..=8).contains(&resumed_at),
        "resumed at round {resumed_at}"
    );
    for v in &volunteers {
        let mut events = Vec::new();
        assert!(
            v.until(limit, &mut events, |e| applied(e, 11).is_some()),
            "{}",
            v.stderr()
        );
        // Every round applied exactly once, none skipped.
        assert_eq!(
            applied_rounds(&events),
            (0..12).collect::<Vec<_>>(),
            "{}",
            story(&events)
        );
        // The run's token count survived the restart.
        let total: u64 = (0..12)
            .map(|r| applied(&events, r).unwrap()["tokens"].as_u64().unwrap())
            .sum();
        assert_eq!(applied(&events, 11).unwrap()["run_tokens"], total);
        assert_eq!(applied(&after, 11).unwrap()["run_tokens"], total);
        assert_eq!(
            applied(&events, 11).unwrap()["digest"],
            applied(&after, 11).unwrap()["digest"]
        );
    }
}

#[test]
fn a_volunteer_pauses_at_its_monthly_cap_and_keeps_the_ledger() {
    let dir = scratch("monthly");
    let (host, ticket) = start_host(&dir, RUN, &[]);
    let _steady = join(&dir, &ticket, "steady", &[]);
    // 150 kB a month: one round of nano at top-32 f32 (~50 kB up, more down) is near it.
    let capped = join(&dir, &ticket, "capped", &["--monthly-cap-gb", "0.00015"]);
    let limit = Duration::from_secs(300);
    let mut events = Vec::new();
    assert!(
        capped.until(limit, &mut events, |e| e
            .iter()
            .any(|v| v["event"] == "state" && v["state"] == "paused")),
        "never paused: {}",
        capped.stderr()
    );
    let usage: Value =
        serde_json::from_slice(&std::fs::read(dir.join("capped").join("usage.json")).unwrap())
            .unwrap();
    let used = usage["month_up"].as_u64().unwrap() + usage["month_down"].as_u64().unwrap();
    // Held within 1% of the cap: a download or upload that would pass it
    // is refused before it starts, so the node stops short of it, not after.
    let cap = 150_000;
    assert!(
        used <= cap + cap / 100,
        "paused at {used} bytes, over the {cap}-byte cap"
    );
    assert!(used >= cap / 2, "paused at {used} bytes, far below the cap");
    // Paused means no more training.
    let trained_before = events.iter().filter(|v| v["event"] == "trained").count();
    let mut host_events = Vec::new();
    let now = host_events.len();
    assert!(host.until(limit, &mut host_events, |e| {
        e[now..]
            .iter()
            .filter(|v| v["event"] == "round_applied")
            .count()
            >= 3
    }));
    let _ = capped.until(Duration::from_millis(500), &mut events, |_| false);
    assert_eq!(
        events.iter().filter(|v| v["event"] == "trained").count(),
        trained_before
    );
}

#[test]
fn volunteers_train_on_shards_fetched_by_range_and_take_new_caps_live() {
    let dir = scratch("shards");
    let text: String = (0..6000)
        .map(|i| format!("line {i}: volunteers fetch only the windows they train on.\n"))
        .collect();
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    let shards = dir.join("shards");
    let prepared = Command::new(BIN)
        .args(["data", "prepare", "--input"])
        .arg(dir.join("corpus.txt"))
        .arg("--output")
        .arg(&shards)
        .args(["--shard-tokens", "100000"])
        .output()
        .unwrap();
    assert!(prepared.status.success(), "{prepared:?}");
    // Both volunteers in every round, round 0 included: it opens only once
    // both have joined.
    let run = format!(
        "{}min_members = 2\n",
        RUN.replace("corpus_bytes = 262144", "data = \"shards\"")
    );
    let (mut host, ticket) = start_host(&dir, &run, &["--rounds", "4"]);
    // v0 also takes its caps from a file, changed while it runs.
    let caps = dir.join("v0-caps.json").display().to_string();
    let volunteers: Vec<Node> = (0..2)
        .map(|i| {
            let mut extra = vec!["--rounds", "4"];
            if i == 0 {
                extra.extend(["--caps-file", &caps, "--up-mbit", "50"]);
            }
            join(&dir, &ticket, &format!("v{i}"), &extra)
        })
        .collect();
    let limit = Duration::from_secs(300);
    let mut host_events = Vec::new();
    assert!(host.until(limit, &mut host_events, |e| applied(e, 0).is_some()));
    let mut v0_events = Vec::new();
    let caps_event = |e: &Value, up: f64| e["event"] == "caps" && e["up_mbit"] == up;
    assert!(volunteers[0].until(limit, &mut v0_events, |e| {
        e.iter().any(|e| caps_event(e, 50.0))
    }));
    std::fs::write(&caps, r#"{"up_mbit": 20, "down_mbit": null}"#).unwrap();
    assert!(
        volunteers[0].until(Duration::from_secs(20), &mut v0_events, |e| e
            .iter()
            .any(|e| caps_event(e, 20.0))),
        "the new caps were not applied: {}",
        volunteers[0].stderr()
    );
    assert!(
        host.until(limit, &mut host_events, |e| applied(e, 3).is_some()),
        "{}",
        host.stderr()
    );
    for r in 0..4 {
        assert_eq!(applied(&host_events, r).unwrap()["updates"], 2, "round {r}");
    }
    for (i, v) in volunteers.iter().enumerate() {
        let mut events = if i == 0 {
            v0_events.clone()
        } else {
            Vec::new()
        };
        assert!(
            v.until(limit, &mut events, |e| applied(e, 3).is_some()),
            "{}",
            v.stderr()
        );
        assert_eq!(
            applied(&events, 3).unwrap()["digest"],
            applied(&host_events, 3).unwrap()["digest"]
        );
    }
    assert!(host.wait(Duration::from_secs(60)).is_some());
    // The run is bound to its data: a changed shard stops a restart.
    let shard = shards.join("shard-00001.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let run_file = dir.join("run.toml");
    let out = Command::new(BIN)
        .arg("host")
        .arg(&run_file)
        .arg("--state-dir")
        .arg(dir.join("host"))
        .args(["--listen", "127.0.0.1:0", "--device", "cpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not the data this run started with"), "{err}");
}

#[test]
fn join_applies_the_apps_memory_check_and_schedule_rule() {
    let dir = scratch("checks");
    let (host, ticket) = start_host(&dir, RUN, &[]);
    let limit = Duration::from_secs(120);

    // A memory limit below nano's need: refused before any download, with
    // the sentence the app shows.
    let mut small = join(&dir, &ticket, "small", &["--vram-limit-gb", "0.001"]);
    let status = small.wait(limit).expect("join did not give up");
    assert!(!status.success());
    let err = small.stderr();
    assert!(
        err.contains("This device is too small for this run: this run trains a"),
        "{err}"
    );
    let mut events = Vec::new();
    small.until(Duration::from_millis(500), &mut events, |_| false);
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "fetching" || e["event"] == "joined"),
        "downloaded before refusing: {events:?}"
    );

    // A schedule that excludes now: held from the start, never trains.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let minute = (now / 60 + 12 * 60) % (24 * 60);
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        minute / 60,
        minute % 60,
        (minute + 1) % (24 * 60) / 60,
        (minute + 1) % 60
    );
    let held = join(&dir, &ticket, "held", &["--schedule", &window]);
    let mut events = Vec::new();
    assert!(
        held.until(limit, &mut events, |e| e.iter().any(|v| v["event"]
            == "state"
            && v["state"] == "paused"
            && v["detail"]
                .as_str()
                .unwrap_or("")
                .contains("outside the schedule"))),
        "not held: {events:?} {}",
        held.stderr()
    );
    // Past two looks of the rules: still held, never joined.
    held.until(Duration::from_secs(12), &mut events, |_| false);
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "joined" || e["event"] == "trained"),
        "ran outside its schedule: {events:?}"
    );
    drop(host);
}

/// 310 synthetic volunteers (one `starling bench swarm --join` process) and
/// two real ones in one run: a manifest names 300 or more accepted updates,
/// merged into one aggregate that every real replica applies to the host's
/// digest; meanwhile a join listing 1,000 addresses is refused with its
/// reason and the run goes on.
#[test]
fn a_round_of_three_hundred_members_and_a_crowded_join() {
    let dir = scratch("crowd");
    // Synthetic updates agree with each other, not with real training: the
    // screen's agreement check would leave the two real members out; and
    // their announced losses are made up, which spot checks would catch.
    let run = format!(
        "{}min_members = 312\nrobust_min_agreement = 0.0\nspot_check_rate = 0.0\n",
        RUN.replace("window_secs = 8.0", "window_secs = 240.0")
            .replace(
                "eval_sequences = 8",
                "eval_sequences = 8\ntopk = 4\nvalues = \"sign\""
            )
    );
    let (host, ticket) = start_host(&dir, &run, &["--rounds", "2"]);
    let real: Vec<Node> = (0..2)
        .map(|i| join(&dir, &ticket, &format!("v{i}"), &["--rounds", "2"]))
        .collect();
    let (mut crowd, crowd_log) = synthetic_volunteers(
        &dir,
        &ticket,
        "crowd",
        &["--volunteers", "310", "--rounds", "2"],
    );

    // A join carrying 1,000 addresses, from a node of its own.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let parsed: starling_swarm::Ticket = ticket.trim().parse().unwrap();
    let refusal = runtime.block_on(async {
        let host = starling_swarm::Member {
            id: parsed.host,
            addrs: parsed.addrs.clone(),
        };
        let (net, _rx) = starling_swarm::Net::spawn(starling_swarm::NetConfig {
            secret_key: starling_swarm::SecretKey::generate(),
            bind: "127.0.0.1:0".parse().unwrap(),
            run_id: parsed.run_id,
            traffic: starling_swarm::Traffic::new(None, None),
            open: false,
            control: None,
            bootstrap: vec![host.clone()],
            serving: starling_swarm::Serving::Honest,
        })
        .await
        .unwrap();
        let addrs = (0..1000u16)
            .map(|p| std::net::SocketAddr::from(([10, 1, (p >> 8) as u8, p as u8], 9000 + p)))
            .collect();
        let request = starling_swarm::Request::Join {
            run_id: parsed.run_id,
            addrs,
            since: None,
        };
        let answer = net.request(&host, &request).await;
        net.shutdown().await;
        answer
    });
    match refusal {
        Ok(starling_swarm::Response::Refused { reason, .. }) => {
            assert!(reason.contains("at most 8 addresses"), "{reason}");
        }
        other => panic!("a join with 1,000 addresses was not refused: {other:?}"),
    }

    let limit = Duration::from_secs(900);
    let mut host_events = Vec::new();
    assert!(
        host.until(limit, &mut host_events, |e| applied(e, 1).is_some()),
        "host did not finish 2 rounds: {}\ncrowd: {}",
        host.stderr(),
        std::fs::read_to_string(&crowd_log).unwrap_or_default()
    );
    // On two busy cores a few of the 312 members' dials time out in a
    // round; what must hold is a manifest of 300 or more entries.
    let updates: Vec<u64> = (0..2)
        .map(|r| {
            applied(&host_events, r).unwrap()["updates"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        updates.iter().any(|&n| n >= 300) && updates.iter().all(|&n| n >= 250),
        "updates per round: {updates:?}"
    );
    let digest = applied(&host_events, 1).unwrap()["digest"].clone();
    for v in &real {
        let mut events = Vec::new();
        assert!(
            v.until(limit, &mut events, |e| applied(e, 1).is_some()),
            "volunteer did not apply round 1: {}",
            v.stderr()
        );
        assert_eq!(applied(&events, 1).unwrap()["digest"], digest);
    }
    let end = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Ok(Some(status)) = crowd.try_wait() {
            break Some(status);
        }
        if Instant::now() > end {
            let _ = crowd.kill();
            break None;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "the crowd failed: {}",
        std::fs::read_to_string(&crowd_log).unwrap_or_default()
    );
}

/// Twenty members that relay every blob corrupted (their own updates are
/// honest, so they stay in the run) sit in the aggregate's tree with two
/// real volunteers: wherever a real volunteer's parent is one of them, it
/// names the liar and fetches the aggregate elsewhere, and every replica
/// ends on the host's weights.
#[test]
fn a_member_relaying_corrupted_blobs_is_bypassed() {
    let dir = scratch("liars");
    // Synthetic updates agree with each other, not with real training: the
    // screen's agreement check would leave the two real members out; and
    // their announced losses are made up, which spot checks would catch.
    let run = format!(
        "{}min_members = 22\nrobust_min_agreement = 0.0\nspot_check_rate = 0.0\n",
        RUN.replace("window_secs = 8.0", "window_secs = 120.0")
    );
    let (host, ticket) = start_host(&dir, &run, &["--rounds", "3"]);
    let real: Vec<Node> = (0..2)
        .map(|i| join(&dir, &ticket, &format!("v{i}"), &["--rounds", "3"]))
        .collect();
    let (mut liars, liars_log) = synthetic_volunteers(
        &dir,
        &ticket,
        "liars",
        &[
            "--volunteers",
            "20",
            "--corrupt-relays",
            "20",
            "--rounds",
            "3",
        ],
    );

    let limit = Duration::from_secs(600);
    let mut host_events = Vec::new();
    assert!(
        host.until(limit, &mut host_events, |e| applied(e, 2).is_some()),
        "host did not finish 3 rounds: {}\nliars: {}",
        host.stderr(),
        std::fs::read_to_string(&liars_log).unwrap_or_default()
    );
    for r in 0..3 {
        assert_eq!(
            applied(&host_events, r).unwrap()["updates"],
            22,
            "round {r}: every member's update, the liars' included"
        );
    }
    let digest = applied(&host_events, 2).unwrap()["digest"].clone();
    let mut named = Vec::new();
    for v in &real {
        let mut events = Vec::new();
        assert!(
            v.until(limit, &mut events, |e| applied(e, 2).is_some()),
            "volunteer did not apply round 2: {}",
            v.stderr()
        );
        assert_eq!(applied(&events, 2).unwrap()["digest"], digest);
        named.extend(
            events
                .iter()
                .filter(|e| e["event"] == "warning")
                .filter_map(|e| e["message"].as_str().map(str::to_owned))
                .filter(|m| m.contains("fail BLAKE3 verification")),
        );
    }
    // A real volunteer's parent is a liar unless it is one of the host's
    // two children or the other's child: over 2 volunteers x 3 rounds the
    // chance that none ever met one is below 1e-5.
    assert!(
        !named.is_empty(),
        "no volunteer met a corrupting parent in 3 rounds"
    );
    let _ = liars.wait();
}

#[test]
fn a_flood_of_empty_updates_is_left_out_and_bans_nobody() {
    let dir = scratch("flood");
    let run = format!(
        "{}min_members = 22\n",
        RUN.replace("window_secs = 8.0", "window_secs = 120.0")
    );
    let (host, ticket) = start_host(&dir, &run, &["--rounds", "3"]);
    let real: Vec<Node> = (0..2)
        .map(|i| join(&dir, &ticket, &format!("v{i}"), &["--rounds", "3"]))
        .collect();
    let (mut flood, flood_log) = synthetic_volunteers(
        &dir,
        &ticket,
        "flood",
        &[
            "--volunteers",
            "20",
            "--empty-updates",
            "20",
            "--rounds",
            "3",
        ],
    );

    let limit = Duration::from_secs(600);
    let mut host_events = Vec::new();
    assert!(
        host.until(limit, &mut host_events, |e| applied(e, 2).is_some()),
        "host did not finish 3 rounds: {}\nflood: {}",
        host.stderr(),
        std::fs::read_to_string(&flood_log).unwrap_or_default()
    );
    for r in 0..3 {
        assert_eq!(
            applied(&host_events, r).unwrap()["updates"],
            2,
            "round {r}: the two real updates and no empty one: {}",
            story(&host_events)
        );
        let empties = host_events
            .iter()
            .filter(|e| e["event"] == "rejected" && e["round"] == r)
            .filter(|e| {
                e["reason"]
                    .as_str()
                    .is_some_and(|m| m.contains("the update is empty"))
            })
            .count();
        assert_eq!(empties, 20, "round {r}: {}", story(&host_events));
    }
    assert!(
        !host_events.iter().any(|e| e["event"] == "dropped"),
        "an empty update is no fault: {}",
        story(&host_events)
    );
    let digest = applied(&host_events, 2).unwrap()["digest"].clone();
    for v in &real {
        let mut events = Vec::new();
        assert!(
            v.until(limit, &mut events, |e| applied(e, 2).is_some()),
            "volunteer did not apply round 2: {}",
            v.stderr()
        );
        assert_eq!(applied(&events, 2).unwrap()["digest"], digest);
    }
    let _ = flood.wait();
}

/// A hostile coordinator (a real network node in this process answering
/// joins with the real run's spec) declares a 10 GiB checkpoint for nano,
/// whose weights take 4.5 MB: the `starling join` process refuses it before
/// downloading anything, says why, and exits with an error.
#[test]
fn a_host_declaring_a_ten_gib_checkpoint_is_refused_before_any_download() {
    use starling_swarm::{
        BlobRef, ControlHandler, Net, NetConfig, Response, RunId, RunState, SecretKey, Serving,
        Ticket, Traffic,
    };
    let dir = scratch("hostile-checkpoint");
    let (spec, _) = starling_node::RunFile::parse(RUN)
        .expect("run file")
        .resolve(&dir)
        .expect("spec");
    let state = RunState {
        spec: spec.to_bytes(),
        checkpoint: Some((
            4,
            BlobRef {
                hash: [7; 32],
                size: 10 << 30,
            },
        )),
        manifests: Vec::new(),
        round_open: None,
        next_round: 5,
    };
    let control: ControlHandler = std::sync::Arc::new(move |_, _| {
        let state = state.clone();
        Box::pin(async move { Response::State(state) })
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let run_id = RunId::random();
    let (host, _events) = rt
        .block_on(Net::spawn(NetConfig {
            secret_key: SecretKey::generate(),
            bind: "127.0.0.1:0".parse().expect("address"),
            run_id,
            traffic: Traffic::new(None, None),
            open: true,
            control: Some(control),
            bootstrap: Vec::new(),
            serving: Serving::Honest,
        }))
        .expect("hostile host");
    let ticket = Ticket {
        run_id,
        host: host.id(),
        addrs: host.addrs(),
    }
    .to_string();
    let mut victim = join(&dir, &ticket, "victim", &[]);
    let status = victim
        .wait(Duration::from_secs(120))
        .expect("the volunteer did not stop");
    assert!(!status.success(), "it should stop with an error");
    let log = victim.stderr();
    assert!(
        log.contains("10.7 GB") && log.contains("checkpoint"),
        "no clear reason: {log}"
    );
    let mut events = Vec::new();
    let _ = victim.until(Duration::from_millis(500), &mut events, |_| false);
    assert!(
        !events.iter().any(|e| e["event"] == "fetching"),
        "it downloaded: {}",
        story(&events)
    );
    // Joining cost a few kilobytes on the wire, not the checkpoint.
    let usage: Value = serde_json::from_slice(
        &std::fs::read(dir.join("victim").join("usage.json")).expect("ledger"),
    )
    .expect("ledger json");
    let down = usage["month_down"].as_u64().expect("month_down");
    assert!(down < 64 * 1024, "received {down} bytes");
    rt.block_on(host.shutdown());
}

/// Eight volunteers, two of them sending their updates negated (`--attack
/// negate`, a hidden flag for exactly this): the host's screen leaves every
/// attacker's update out of every round (no round merges more than the six
/// honest updates), drops nobody (being left out is not a fault), finds no
/// mismatch when it recomputes honest members' announced losses, and the
/// run's training loss falls.
#[test]
fn two_attackers_of_eight_are_left_out_and_the_run_still_learns() {
    let dir = scratch("attackers");
    let run = RUN.replace("[rounds]\n", "[rounds]\nmin_members = 8\n");
    let (host, ticket) = start_host(&dir, &run, &[]);
    let honest: Vec<Node> = (0..6)
        .map(|i| join(&dir, &ticket, &format!("honest{i}"), &[]))
        .collect();
    let attackers: Vec<Node> = (0..2)
        .map(|i| {
            join(
                &dir,
                &ticket,
                &format!("attacker{i}"),
                &["--attack", "negate"],
            )
        })
        .collect();
    let name = |n: &Node| {
        let mut seen = Vec::new();
        n.until(Duration::from_secs(120), &mut seen, |e| {
            e.iter().any(|v| v["node"].is_string())
        });
        seen.iter()
            .find_map(|v| v["node"].as_str().map(String::from))
            .expect("the attacker says who it is")
    };
    let bad: Vec<String> = attackers.iter().map(name).collect();
    let rounds = 8;
    let mut events = Vec::new();
    assert!(
        host.until(Duration::from_secs(600), &mut events, |e| applied(
            e,
            rounds - 1
        )
        .is_some()),
        "the run stalled: {}",
        story(&events)
    );
    for round in 0..rounds {
        let merged = applied(&events, round).expect("applied")["updates"]
            .as_u64()
            .expect("updates");
        assert!(
            (5..=6).contains(&merged),
            "round {round} merged {merged} updates: {}",
            story(&events)
        );
    }
    let left_out = events
        .iter()
        .filter(|e| {
            e["event"] == "rejected"
                && bad.iter().any(|b| e["peer"] == b.as_str())
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("left out of the merge"))
        })
        .count();
    // Every attacker update of every round (a slow machine may make one or
    // two miss a deadline, and they are then not judged at all).
    eprintln!("{left_out} of {} attacker updates left out", 2 * rounds);
    assert!(
        left_out as u64 >= 2 * rounds - 2,
        "only {left_out} attacker updates were left out: {}",
        story(&events)
    );
    assert!(
        !events.iter().any(|e| e["event"] == "dropped"),
        "{}",
        story(&events)
    );
    let loss = |r: u64| {
        applied(&events, r).expect("applied")["loss"]
            .as_f64()
            .expect("loss")
    };
    let (first, last) = (
        (loss(0) + loss(1)) / 2.0,
        (loss(rounds - 2) + loss(rounds - 1)) / 2.0,
    );
    // The host recomputed the loss of some honest updates (a quarter by
    // default): every one matched what its sender announced.
    let spot = |key: &str| -> u64 {
        events
            .iter()
            .filter(|e| e["event"] == "spot_checked")
            .filter_map(|e| e[key].as_u64())
            .sum()
    };
    eprintln!(
        "spot checks: {} updates, {} mismatches, {} ms",
        spot("checked"),
        spot("mismatches"),
        spot("millis")
    );
    assert!(spot("checked") > 0, "no spot check ran");
    assert_eq!(spot("mismatches"), 0, "{}", story(&events));
    eprintln!("training loss {first:.3} (rounds 0-1) -> {last:.3} (rounds 6-7)");
    assert!(last < first - 0.1, "loss {first:.3} -> {last:.3}");
    drop(honest);
}
