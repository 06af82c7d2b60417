//! The coordinator's per-round work against the member count, where the
//! network benchmark cannot go on one machine (1,000 and 10,000 members).
//!
//! A round's cost on the coordinator that grows with the member count is
//! its bookkeeping: verifying each announce, checking each update against
//! the model, the robust filter, merging the accepted updates into the
//! aggregate, and the member and accepted lists. Each phase here calls the
//! function the coordinator's round calls, on synthetic inputs of the run's
//! exact shapes, one phase after another on one thread, so its time against
//! the member count shows the round's complexity. Waiting (the updates'
//! transfers, gossip) is not in it; the network benchmark measures that.

use std::{net::SocketAddr, time::Instant};

use rand::{SeedableRng, rngs::StdRng};
use starling_distro::{
    ModelLayout, Residual,
    wire::{self, UpdateHeader},
};
use starling_swarm::{
    Announce, BlobRef, Body, EndpointId, Member, Message, Roster, RunId, SecretKey,
};
use starling_train::{DeviceChoice, select_device};

use super::{SwarmBenchError, SwarmBenchOptions, run_file, synthetic_update};
use crate::{
    data::Tokens,
    host::{Accepted, accepted_list, robust_config, screen_round},
    replica::Replica,
};

/// The coordinator's bookkeeping for one round at `members` members.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Bookkeeping {
    /// Members, each of which sent one update.
    pub members: usize,
    /// Verifying the signed announces.
    pub verify_secs: f64,
    /// Decoding and checking each update against the model.
    pub check_secs: f64,
    /// The robust filter and the sender order.
    pub filter_secs: f64,
    /// Merging the accepted updates into the aggregate (and the cap, when
    /// the run has one), encoded.
    pub merge_secs: f64,
    /// Encoding and hashing the member list and the accepted list.
    pub lists_secs: f64,
    /// All of the above.
    pub total_secs: f64,
    /// Bytes of the checked updates the coordinator holds until the merge
    /// (their decoded form: positions and values).
    pub held_update_bytes: u64,
    /// Bytes of the aggregate.
    pub aggregate_bytes: u64,
    /// Bytes of the member list.
    pub roster_bytes: u64,
}

/// Addresses each synthetic member lists (an IPv4 and an IPv6 one, a
/// typical home machine).
fn member_addrs(i: usize) -> Vec<SocketAddr> {
    let port = 1024 + (i % 60_000) as u16;
    vec![
        SocketAddr::from(([192, 168, (i >> 8) as u8, i as u8], port)),
        SocketAddr::from((
            [0x2001, 0xdb8, 0, 0, 0, 0, (i >> 16) as u16, i as u16],
            port,
        )),
    ]
}

/// Time the coordinator's bookkeeping for a round of `members` members,
/// each sending one update of `opts`'s model, top-k and values.
pub fn measure(opts: &SwarmBenchOptions, members: usize) -> Result<Bookkeeping, SwarmBenchError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| SwarmBenchError::Volunteer {
        index: usize::MAX,
        message: format!("bookkeeping at {members} members: {what}: {e}"),
    };
    let (spec, _) = run_file(opts).resolve(std::path::Path::new("."))?;
    let device =
        select_device(DeviceChoice::Cpu).map_err(|e| SwarmBenchError::Device(e.to_string()))?;
    let run_id = RunId::random();
    let replica = Replica::new(&spec, &device, run_id.0, [0; 32], Tokens::fetched())
        .map_err(|e| failed("the reference replica", &e))?;
    let layout: ModelLayout = replica.layout().clone();
    let round = 0;

    // The inputs: per member a key, an encoded update and its signed announce.
    let mut rng = StdRng::seed_from_u64(members as u64);
    let mut sent = Vec::with_capacity(members);
    let mut roster = Vec::with_capacity(members);
    for i in 0..members {
        let key = SecretKey::generate();
        let id: EndpointId = key.public();
        let update = synthetic_update(&layout, spec.run.topk, &mut rng);
        let header = UpdateHeader {
            run_id: run_id.0,
            round,
            sender: *id.as_bytes(),
        };
        let bytes = wire::encode(&header, &update).map_err(|e| failed("encode", &e))?;
        let announce = Announce {
            update: BlobRef::of(&bytes),
            tokens: 1,
            loss: 1.0,
        };
        let signed = Message::sign(&key, run_id, round, Body::Announce(announce))
            .map_err(|e| failed("sign", &e))?;
        sent.push((id, signed, bytes));
        roster.push(Member {
            id,
            addrs: member_addrs(i),
        });
    }

    let started = Instant::now();
    let mut announces = Vec::with_capacity(members);
    for (_, signed, _) in &sent {
        let message = Message::verify(signed, run_id).map_err(|e| failed("verify", &e))?;
        let Body::Announce(announce) = message.body else {
            return Err(failed("verify", &"not an announce"));
        };
        announces.push((message.author, announce));
    }
    let verified = Instant::now();
    let mut accepted = Vec::with_capacity(members);
    for (order, ((sender, announce), (_, _, bytes))) in announces.into_iter().zip(&sent).enumerate()
    {
        let update = replica
            .check(bytes, round, *sender.as_bytes())
            .map_err(|e| failed("check", &e))?;
        accepted.push(Accepted {
            order,
            sender,
            announce,
            update,
        });
    }
    let checked = Instant::now();
    let config = robust_config(
        spec.rounds.robust_norm_factor,
        spec.rounds.robust_min_agreement,
    );
    let (accepted, _, _) = screen_round(accepted, &config, None);
    let filtered = Instant::now();
    let held_update_bytes = accepted
        .iter()
        .flat_map(|a| &a.update.update.tensors)
        .map(|t| 4 * (t.offsets.len() + t.indices.len() + t.values.len()) as u64)
        .sum();
    let list = accepted_list(&accepted);
    let updates: Vec<_> = accepted.into_iter().map(|a| a.update.update).collect();
    let mut residual = spec.rounds.aggregate_topk.map(|_| Residual::zeros(&layout));
    let merge_started = Instant::now();
    let aggregate = replica
        .aggregate(
            round,
            &updates,
            residual.as_mut().zip(spec.rounds.aggregate_topk),
        )
        .map_err(|e| failed("merge", &e))?;
    let merged = Instant::now();
    let roster_bytes = Roster { members: roster }.to_bytes();
    let roster_ref = BlobRef::of(&roster_bytes);
    let list_ref = BlobRef::of(&list.to_bytes());
    let listed = Instant::now();
    std::hint::black_box((roster_ref, list_ref));
    let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
    let merge_secs = secs(merge_started, merged);
    Ok(Bookkeeping {
        members,
        verify_secs: secs(started, verified),
        check_secs: secs(verified, checked),
        filter_secs: secs(checked, filtered),
        merge_secs,
        lists_secs: secs(merged, listed),
        total_secs: secs(started, filtered) + merge_secs + secs(merged, listed),
        held_update_bytes,
        aggregate_bytes: aggregate.len() as u64,
        roster_bytes: roster_bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> SwarmBenchOptions {
        SwarmBenchOptions {
            volunteers: 2,
            rounds: 1,
            model: "nano".into(),
            topk: 4,
            values: "sign".into(),
            aggregate_topk: Some(8),
            dir: std::env::temp_dir().join("starling-bookkeeping-test"),
            join: None,
            corrupt_relays: 0,
            empty_updates: 0,
        }
    }

    #[test]
    fn what_the_coordinator_holds_grows_with_the_members_and_the_phases_add_up() {
        let two = measure(&opts(), 2).expect("two members");
        let four = measure(&opts(), 4).expect("four members");
        assert_eq!((two.members, four.members), (2, 4));
        // Every update carries k entries in every chunk: the same size each.
        assert!(two.held_update_bytes > 0);
        assert_eq!(four.held_update_bytes, 2 * two.held_update_bytes);
        assert!(four.roster_bytes > two.roster_bytes);
        assert!(two.aggregate_bytes > 0);
        let phases = four.verify_secs
            + four.check_secs
            + four.filter_secs
            + four.merge_secs
            + four.lists_secs;
        assert!((phases - four.total_secs).abs() < 1e-9);
    }
}
