//! A run with a hostile member, in one process: a malformed update, a
//! blown-up (scaled) update and forged announces must be rejected and logged,
//! the member dropped after repeated faults, and the honest replicas must end
//! identical. Also the cheap checks of single phases: join answers, the
//! robust filter's median, and the start's typed errors.

use std::time::Duration;

use starling_distro::{OutgoingUpdate, wire};
use starling_swarm::{
    Announce, Body, EndpointId, Member, Message, Net, NetConfig, NetEvent, Request, Response,
    RunId, SecretKey, Traffic,
};
use starling_train::{DeviceChoice, select_device};
use tokio::sync::{mpsc, watch};

use super::{
    Accepted, Host, HostError, HostOptions,
    control::{Shared, answer},
};
use crate::{
    MonthlyCap, NodeEvent, RunFile, VolunteerOptions, data::Tokens, replica::Replica,
    run_volunteer, short,
};

const RUN: &str = r#"
[run]
model = "nano"
batch = 2
micro_batch = 2
seq_len = 32
corpus_bytes = 262144
eval_sequences = 4
values = "f32"

[rounds]
window_secs = 6.0
eval_every = 100
max_faults = 2
robust_norm_factor = 5.0
"#;

fn run_spec() -> (crate::RunSpec, starling_train::data::shards::TokenStore) {
    RunFile::parse(RUN)
        .unwrap()
        .resolve(std::path::Path::new("."))
        .unwrap()
}

/// A CPU host for [`RUN`] on loopback, its state in `dir` (emptied first).
async fn start_host(
    dir: &std::path::Path,
    max_rounds: Option<u64>,
    tx: mpsc::UnboundedSender<NodeEvent>,
) -> Host {
    let _ = std::fs::remove_dir_all(dir);
    let (spec, tokens) = run_spec();
    Host::start(
        HostOptions {
            state_dir: dir.to_path_buf(),
            spec,
            tokens,
            allow: vec![],
            bind: "127.0.0.1:0".parse().unwrap(),
            traffic: Traffic::new(None, None),
            device: select_device(DeviceChoice::Cpu).unwrap(),
            max_rounds,
        },
        tx,
    )
    .await
    .unwrap()
}

/// Plays a member that misbehaves: its first round it sends garbage, its
/// second a valid update scaled 1000x; every round it also gossips an
/// announce with a broken signature.
async fn attacker(net: Net, host: Member, replica: Replica, mut rx: mpsc::Receiver<NetEvent>) {
    let mut replica = replica;
    let me = net.id();
    let run = net.run_id();
    let mut acted = 0;
    while let Some(ev) = rx.recv().await {
        let NetEvent::Message(m) = ev else { continue };
        let Body::RoundOpen(open) = m.body else {
            continue;
        };
        if m.author != host.id {
            continue;
        }
        // A forged announce: valid shape, broken signature.
        let fake = Announce {
            update: starling_swarm::BlobRef {
                hash: [9; 32],
                size: 100,
            },
            tokens: 1,
            loss: m.round as f32,
        };
        if let Ok(mut forged) = Message::sign(net.secret_key(), run, m.round, Body::Announce(fake))
        {
            if let Some(last) = forged.last_mut() {
                *last ^= 0xff;
            }
            let _ = net.broadcast(forged).await;
        }
        let roster = net
            .fetch(
                &open.roster,
                &[host.id],
                starling_swarm::MAX_ROSTER_BYTES,
                "roster",
                Duration::from_secs(5),
            )
            .await
            .ok()
            .and_then(|b| starling_swarm::Roster::from_bytes(&b, open.members).ok());
        let Some(slot) = roster.and_then(|r| r.slot(&me)) else {
            // Ask to be in the next round.
            let _ = net
                .request(
                    &host,
                    &Request::Join {
                        run_id: run,
                        addrs: net.addrs(),
                        since: None,
                    },
                )
                .await;
            continue;
        };
        // Malformed bytes (a fault), then an oversized update (left out, no
        // fault), then malformed bytes again: the second fault drops it.
        let bytes = if acted % 2 == 0 {
            (0..5000u32)
                .map(|i| (i * 7919 % 251) as u8)
                .collect::<Vec<u8>>()
        } else {
            let Ok(t) = replica.train(m.round, slot as u32, 32) else {
                return;
            };
            let Ok(d) = wire::decode(&t.bytes, &wire::DecodeLimits::default()) else {
                return;
            };
            let scaled = OutgoingUpdate {
                values: d.values,
                tensors: d
                    .tensors
                    .into_iter()
                    .map(|mut s| {
                        s.values.iter_mut().for_each(|v| *v *= 1000.0);
                        s
                    })
                    .collect(),
            };
            let Ok(b) = wire::encode(&d.header, &scaled) else {
                return;
            };
            b
        };
        acted += 1;
        let Ok(blob) = net.publish(&format!("attack/{}", m.round), bytes).await else {
            return;
        };
        let announce = Announce {
            update: blob,
            tokens: 64,
            loss: 1.0,
        };
        if let Ok(signed) = Message::sign(net.secret_key(), run, m.round, Body::Announce(announce))
        {
            for _ in 0..3 {
                let _ = net.broadcast(signed.clone()).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_member_is_rejected_logged_and_dropped_while_the_run_goes_on() {
    let dir = std::env::temp_dir().join(format!("starling-hostile-{}", std::process::id()));
    let (spec, tokens) = run_spec();
    let device = select_device(DeviceChoice::Cpu).unwrap();
    let rounds = 6;
    let (tx, mut events) = mpsc::unbounded_channel();
    let host = start_host(&dir, Some(rounds), tx.clone()).await;
    let ticket = host.ticket();
    let host_member = Member {
        id: ticket.host,
        addrs: ticket.addrs.clone(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let host_task = tokio::spawn(host.run(stop_rx.clone()));
    let mut honest = Vec::new();
    for _ in 0..2 {
        honest.push(tokio::spawn(run_volunteer(
            VolunteerOptions {
                ticket: ticket.clone(),
                key: SecretKey::generate(),
                bind: "127.0.0.1:0".parse().unwrap(),
                traffic: Traffic::new(None, None),
                device: device.clone(),
                max_rounds: Some(rounds),
                usage_file: None,
                port_file: None,
                monthly_cap: MonthlyCap::default(),
                memory_budget: None,
                attack: None,
            },
            tx.clone(),
            stop_rx.clone(),
        )));
    }
    drop(tx);

    let key = SecretKey::generate();
    let bad_id = key.public();
    let (net, rx) = Net::spawn(NetConfig {
        secret_key: key,
        bind: "127.0.0.1:0".parse().unwrap(),
        run_id: ticket.run_id,
        traffic: Traffic::new(None, None),
        open: false,
        control: None,
        bootstrap: vec![host_member.clone()],
        serving: starling_swarm::Serving::Honest,
    })
    .await
    .unwrap();
    let joined = net
        .request(
            &host_member,
            &Request::Join {
                run_id: ticket.run_id,
                addrs: net.addrs(),
                since: None,
            },
        )
        .await
        .unwrap();
    assert!(matches!(joined, Response::State(_)));
    let replica = Replica::new(
        &spec,
        &device,
        ticket.run_id.0,
        *bad_id.as_bytes(),
        Tokens::All(tokens),
    )
    .unwrap();
    let attack = tokio::spawn(attacker(net, host_member, replica, rx));

    let mut seen = Vec::new();
    let collect = async {
        while let Some(e) = events.recv().await {
            seen.push(e);
        }
    };
    tokio::time::timeout(Duration::from_secs(300), async {
        tokio::join!(collect, async {
            for h in honest {
                h.await.unwrap().unwrap();
            }
            let _ = stop_tx.send(true);
        });
    })
    .await
    .expect("run finished");
    host_task.await.unwrap().unwrap();
    attack.abort();

    let bad = short(&bad_id);
    let rejected = |needle: &str| {
        seen.iter().any(|e| matches!(e, NodeEvent::Rejected { peer, reason, .. } if *peer == bad && reason.contains(needle)))
    };
    assert!(rejected("malformed update"), "{seen:#?}");
    assert!(rejected("typical size"), "{seen:#?}");
    assert!(
        seen.iter().any(
            |e| matches!(e, NodeEvent::Rejected { reason, .. } if reason.contains("bad signature"))
        ),
        "{seen:#?}"
    );
    // Dropped after its second malformed update: the oversized one between
    // them was left out without counting as a fault.
    let dropped_at = seen
        .iter()
        .position(|e| matches!(e, NodeEvent::Dropped { peer, faults: 2, .. } if *peer == bad))
        .expect("the attacker is dropped");
    let malformed_before = seen[..dropped_at]
        .iter()
        .filter(|e| matches!(e, NodeEvent::Rejected { peer, reason, .. } if *peer == bad && reason.contains("malformed update")))
        .count();
    assert_eq!(malformed_before, 2, "{seen:#?}");
    // No round ever applied the attacker's update, and all replicas agree.
    let last: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            NodeEvent::RoundApplied { round, digest, .. } if *round == rounds - 1 => Some(*digest),
            _ => None,
        })
        .collect();
    assert_eq!(
        last.len(),
        3,
        "host and both volunteers applied the last round"
    );
    assert!(last.windows(2).all(|w| w[0] == w[1]), "{last:?}");
    assert!(
        seen.iter()
            .all(|e| !matches!(e, NodeEvent::RoundApplied { updates, .. } if *updates > 2))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_too_small_for_the_model_is_refused_before_any_download() {
    let dir = std::env::temp_dir().join(format!("starling-small-{}", std::process::id()));
    let device = select_device(DeviceChoice::Cpu).unwrap();
    let (tx, _events) = mpsc::unbounded_channel();
    let host = start_host(&dir, None, tx.clone()).await;
    let ticket = host.ticket();
    let (stop_tx, stop_rx) = watch::channel(false);
    let host_task = tokio::spawn(host.run(stop_rx.clone()));
    let traffic = Traffic::new(None, None);
    let result = run_volunteer(
        VolunteerOptions {
            ticket,
            key: SecretKey::generate(),
            bind: "127.0.0.1:0".parse().unwrap(),
            traffic: traffic.clone(),
            device,
            max_rounds: None,
            usage_file: None,
            port_file: None,
            monthly_cap: MonthlyCap::default(),
            // nano needs tens of MB to train; 1 MB is far too little.
            memory_budget: Some(1 << 20),
            attack: None,
        },
        tx,
        stop_rx,
    )
    .await;
    let Err(e @ crate::VolunteerError::TooSmall { .. }) = result else {
        panic!("expected TooSmall, got {result:?}");
    };
    assert!(e.to_string().contains("1 MB"), "{e}");
    // Only the control exchange: no checkpoint, no data.
    assert!(traffic.total.down() < 64 * 1024, "{}", traffic.total.down());
    let _ = stop_tx.send(true);
    let _ = host_task.await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_larger_than_the_model_is_refused_before_any_download() {
    // A hostile coordinator: the real run's spec, and a 10 GiB checkpoint
    // for nano (whose weights take 4.5 MB).
    let (spec, _) = run_spec();
    let run_id = RunId::random();
    let state = starling_swarm::RunState {
        spec: spec.to_bytes(),
        checkpoint: Some((
            4,
            starling_swarm::BlobRef {
                hash: [7; 32],
                size: 10 << 30,
            },
        )),
        manifests: Vec::new(),
        round_open: None,
        next_round: 5,
    };
    let control: starling_swarm::ControlHandler = std::sync::Arc::new(move |_, _| {
        let state = state.clone();
        Box::pin(async move { Response::State(state) })
    });
    let (host, _host_rx) = Net::spawn(NetConfig {
        secret_key: SecretKey::generate(),
        bind: "127.0.0.1:0".parse().unwrap(),
        run_id,
        traffic: Traffic::new(None, None),
        open: true,
        control: Some(control),
        bootstrap: Vec::new(),
        serving: starling_swarm::Serving::Honest,
    })
    .await
    .unwrap();
    let ticket = starling_swarm::Ticket {
        run_id,
        host: host.id(),
        addrs: host.addrs(),
    };
    let (tx, _events) = mpsc::unbounded_channel();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let traffic = Traffic::new(None, None);
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        run_volunteer(
            VolunteerOptions {
                ticket,
                key: SecretKey::generate(),
                bind: "127.0.0.1:0".parse().unwrap(),
                traffic: traffic.clone(),
                device: select_device(DeviceChoice::Cpu).unwrap(),
                max_rounds: None,
                usage_file: None,
                port_file: None,
                monthly_cap: MonthlyCap::default(),
                memory_budget: None,
                attack: None,
            },
            tx,
            stop_rx,
        ),
    )
    .await
    .expect("refused at once, not after a wait");
    let Err(e @ crate::VolunteerError::CheckpointTooLarge { .. }) = result else {
        panic!("expected CheckpointTooLarge, got {result:?}");
    };
    assert!(e.to_string().contains("10.7 GB"), "{e}");
    assert!(traffic.total.down() < 64 * 1024, "{}", traffic.total.down());
    host.shutdown().await;
}

type Queued = mpsc::Receiver<(EndpointId, u64, Announce)>;

fn shared_for(allow: &[EndpointId], dropped: &[EndpointId]) -> (std::sync::Mutex<Shared>, Queued) {
    let (announces, queued) = mpsc::channel(4);
    let shared = std::sync::Mutex::new(Shared {
        spec_bytes: b"spec".to_vec(),
        checkpoint: None,
        manifests: vec![(3, b"m3".to_vec()), (4, b"m4".to_vec())],
        round_open: Some(b"open".to_vec()),
        next_round: 5,
        joined: Default::default(),
        allow: allow.iter().copied().collect(),
        dropped: dropped.iter().copied().collect(),
        announces,
    });
    (shared, queued)
}

fn join(run_id: RunId, since: Option<u64>) -> Request {
    Request::Join {
        run_id,
        addrs: vec![],
        since,
    }
}

#[test]
fn join_requests_are_answered_from_the_shared_state() {
    let run = RunId::random();
    let (listed, unlisted, dropped) = (
        SecretKey::generate().public(),
        SecretKey::generate().public(),
        SecretKey::generate().public(),
    );
    let (shared, _queued) = shared_for(&[listed, dropped], &[dropped]);
    let refused = |r: Response| match r {
        Response::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let other_run = refused(answer(&shared, RunId::random(), listed, join(run, None)));
    assert!(other_run.contains("another run"), "{other_run}");
    let removed = refused(answer(&shared, run, dropped, join(run, None)));
    assert!(removed.contains("removed"), "{removed}");
    // The volunteer recognises this refusal by its code, not its wording.
    let unlisted_answer = answer(&shared, run, unlisted, join(run, None));
    assert!(
        matches!(
            unlisted_answer,
            Response::Refused {
                why: starling_swarm::Refusal::NotMember,
                ..
            }
        ),
        "{unlisted_answer:?}"
    );
    // A join carrying more addresses than a member may list is refused
    // with its reason, and admits nobody.
    let crowded = Request::Join {
        run_id: run,
        addrs: (0..1000u16)
            .map(|p| std::net::SocketAddr::from(([10, 0, (p >> 8) as u8, p as u8], p)))
            .collect(),
        since: None,
    };
    let too_many = refused(answer(&shared, run, listed, crowded));
    assert!(too_many.contains("at most 8 addresses"), "{too_many}");
    assert!(too_many.contains("1000"), "{too_many}");
    assert!(shared.lock().unwrap().joined.is_empty());

    let Response::State(state) = answer(&shared, run, listed, join(run, Some(4))) else {
        panic!("a listed member is admitted");
    };
    assert_eq!(state.spec, b"spec");
    assert_eq!(
        state.manifests,
        vec![b"m4".to_vec()],
        "manifests from `since`"
    );
    assert_eq!(state.round_open.as_deref(), Some(&b"open"[..]));
    assert_eq!(state.next_round, 5);
    assert!(shared.lock().unwrap().joined.contains_key(&listed));
}

#[test]
fn announces_over_control_are_verified_then_queued_for_the_round() {
    let run = RunId::random();
    let (shared, mut queued) = shared_for(&[], &[]);
    let member = SecretKey::generate();
    let announce = Announce {
        update: starling_swarm::BlobRef {
            hash: [3; 32],
            size: 1000,
        },
        tokens: 64,
        loss: 2.5,
    };
    let signed = |key: &SecretKey, run, body| Message::sign(key, run, 7, body).unwrap();
    let send = |from, signed| answer(&shared, run, from, Request::Announce { signed });
    // Signed by the caller, for this run: queued with its round.
    let good = signed(&member, run, Body::Announce(announce.clone()));
    assert!(matches!(
        send(member.public(), good.clone()),
        Response::Taken
    ));
    assert_eq!(
        queued.try_recv().unwrap(),
        (member.public(), 7, announce.clone())
    );
    // Relayed by someone else, for another run, or not an announce: refused.
    let other = SecretKey::generate().public();
    assert!(matches!(send(other, good), Response::Refused { .. }));
    let foreign = signed(&member, RunId::random(), Body::Announce(announce.clone()));
    assert!(matches!(
        send(member.public(), foreign),
        Response::Refused { .. }
    ));
    let report = signed(
        &member,
        run,
        Body::WeightReport(starling_swarm::WeightReport { digest: 1 }),
    );
    assert!(matches!(
        send(member.public(), report),
        Response::Refused { .. }
    ));
    assert!(matches!(
        send(member.public(), b"junk".to_vec()),
        Response::Refused { .. }
    ));
    assert!(queued.try_recv().is_err(), "nothing else was queued");
}

#[test]
fn faults_older_than_the_window_are_forgiven() {
    let mut faults = std::collections::VecDeque::new();
    assert_eq!(super::count_fault(&mut faults, 10, 50), 1);
    assert_eq!(super::count_fault(&mut faults, 40, 50), 2);
    // Round 10's fault is 50 rounds old at round 60: forgiven.
    assert_eq!(super::count_fault(&mut faults, 60, 50), 2);
    assert_eq!(super::count_fault(&mut faults, 200, 50), 1);
    assert_eq!(super::count_fault(&mut faults, u64::MAX, u64::MAX), 2);
}

#[test]
fn the_screen_keeps_the_first_of_two_copies_clips_and_returns_sender_order() {
    let grid = starling_distro::ChunkGrid::for_shape(&[64, 64], 64);
    // One 64x64 tensor with the same four coefficients, all positive: the
    // senders agree, and differ only in size.
    let update = |order: usize, sender: EndpointId, size: f32| Accepted {
        order,
        sender,
        announce: Announce {
            update: starling_swarm::BlobRef::of(sender.as_bytes()),
            tokens: 1,
            loss: 1.0,
        },
        update: crate::replica::CheckedUpdate {
            update: starling_distro::IncomingUpdate {
                sender: *sender.as_bytes(),
                tensors: vec![starling_distro::SparseTensor {
                    shape: vec![64, 64],
                    grid,
                    k: 4,
                    offsets: vec![0, 4],
                    indices: vec![0, 1, 2, 3],
                    values: vec![size; 4],
                }],
            },
        },
    };
    let mut keys: Vec<EndpointId> = (0..6).map(|_| SecretKey::generate().public()).collect();
    keys.sort();
    let round = vec![
        update(0, keys[1], 1.0),
        update(1, keys[2], 2.0),
        update(2, keys[3], 3.0),
        update(3, keys[4], 4.0),
        update(4, keys[5], 100.0),
        // A copy of the first, announced last, under the name that sorts first.
        update(5, keys[0], 1.0),
    ];
    let config = super::round::robust_config(5.0, 4.0);
    let (keep, left_out, reference) = super::round::screen_round(round, &config, None);
    let reasons: Vec<(EndpointId, String)> = left_out
        .iter()
        .map(|(who, why)| (*who, why.to_string()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons.contains(&(
        keys[0],
        "the update is a copy of one taken before it".into()
    )));
    assert!(
        reasons
            .iter()
            .any(|(who, why)| *who == keys[5] && why.contains("typical size")),
        "{reasons:?}"
    );
    let senders: Vec<EndpointId> = keep.iter().map(|a| a.sender).collect();
    assert_eq!(
        senders,
        keys[1..5],
        "the original kept, all in sender order"
    );
    // The median of 1, 2, 3, 4 and 100 is 3: the 4 is clipped to it.
    assert_eq!(reference, Some(3.0));
    let sizes: Vec<f32> = keep
        .iter()
        .map(|a| a.update.update.tensors[0].values[0])
        .collect();
    assert_eq!(sizes, [1.0, 2.0, 3.0, 3.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_is_an_error_naming_the_file_with_its_source() {
    let dir = std::env::temp_dir().join(format!("starling-corrupt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("host.json"), b"{ not json").unwrap();
    let (spec, tokens) = run_spec();
    let (tx, _events) = mpsc::unbounded_channel();
    let result = Host::start(
        HostOptions {
            state_dir: dir.clone(),
            spec,
            tokens,
            allow: vec![],
            bind: "127.0.0.1:0".parse().unwrap(),
            traffic: Traffic::new(None, None),
            device: select_device(DeviceChoice::Cpu).unwrap(),
            max_rounds: None,
        },
        tx,
    )
    .await;
    let Err(e @ HostError::StateFile { .. }) = result else {
        panic!("expected a state file error");
    };
    assert!(e.to_string().contains("host.json"), "{e}");
    let source = std::error::Error::source(&e).expect("the JSON error is its source");
    assert!(source.is::<serde_json::Error>(), "{source}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_spot_check_flags_a_false_loss_or_token_count_and_tolerates_rounding() {
    use super::round::spot_check_mismatch;
    let announce = |loss: f32, tokens: u64| Announce {
        update: starling_swarm::BlobRef {
            hash: [1; 32],
            size: 100,
        },
        tokens,
        loss,
    };
    assert_eq!(
        spot_check_mismatch(&announce(5.4321, 256), 5.4321, 256),
        None
    );
    // Another device's rounding passes.
    assert_eq!(
        spot_check_mismatch(&announce(5.4330, 256), 5.4321, 256),
        None
    );
    // A flattering loss, or tokens never trained on, do not.
    let why = spot_check_mismatch(&announce(3.0, 256), 5.4321, 256).expect("a lie");
    assert!(why.contains("announced loss 3"), "{why}");
    assert!(spot_check_mismatch(&announce(5.4321, 1 << 20), 5.4321, 256).is_some());
}
