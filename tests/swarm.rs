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
    let key = dir.join(format!("{name}.key")).display().to_string();
    let mut args = vec!["join", ticket, "--key-file", &key];
    args.extend_from_slice(extra);
    Node::spawn(&args, dir.join(format!("{name}.log")))
}

fn applied(events: &[Value], round: u64) -> Option<&Value> {
    events
        .iter()
        .find(|e| e["event"] == "round_applied" && e["round"] == round)
}

#[test]
fn host_and_three_volunteers_train_twenty_rounds_to_identical_weights() {
    let dir = scratch("twenty");
    let (host, ticket) = start_host(&dir, RUN, &["--rounds", "20"]);
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
fn a_node_off_the_member_list_is_refused_and_told_why() {
    let dir = scratch("allow");
    // The member list names an id no process here owns: the public key of
    // the all-ones secret key.
    let member = starling_node::SecretKey::from_bytes(&[1u8; 32])
        .public()
        .to_string();
    let run = format!("{RUN}\n[members]\nallow = [\"{member}\"]\n");
    let (host, ticket) = start_host(&dir, &run, &[]);
    let mut stranger = join(&dir, &ticket, "stranger", &[]);
    let status = stranger
        .wait(Duration::from_secs(60))
        .expect("stranger gave up");
    assert!(!status.success());
    assert!(
        stranger.stderr().contains("not on the run's member list"),
        "{}",
        stranger.stderr()
    );
    let mut events = Vec::new();
    assert!(host.until(Duration::from_secs(10), &mut events, |e| {
        e.iter().any(|v| {
            v["event"] == "warning" && v["message"].as_str().unwrap_or("").contains("non-member")
        })
    }));
}

#[test]
fn a_late_joiner_catches_up_from_the_checkpoint_to_identical_weights() {
    let dir = scratch("late");
    let (host, ticket) = start_host(&dir, RUN, &["--rounds", "14"]);
    let early: Vec<Node> = (0..2)
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
        "late joiner did not reach round 13: {}",
        late.stderr()
    );
    assert_eq!(
        applied(&late_events, 13).unwrap()["digest"],
        applied(&host_events, 13).unwrap()["digest"]
    );
    // It trained too: the last rounds carry three updates.
    assert_eq!(applied(&host_events, 13).unwrap()["updates"], 3);
    drop(early);
}
