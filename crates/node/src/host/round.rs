//! One round of the run, as the sequence of its phases.
//!
//! The order of the phases is what makes a round safe to interrupt: nothing
//! is announced before it is on disk (update files, then the state file that
//! names the manifest, then the gossip), and the reference replica applies a
//! manifest only after it was announced, exactly as every member does. Each
//! phase is its own method so that order reads at a glance in
//! [`Host::round`], and a change to one phase cannot silently reorder the
//! effects of another. Collecting the updates, the one phase that runs
//! concurrent work, lives in `host/collect.rs`.

use std::{collections::HashMap, time::Duration};

use starling_swarm::{
    Announce, Body, EndpointId, Manifest, ManifestEntry, Member, Message, RoundOpen, WeightReport,
    unix_ms,
};
use starling_train::atomic::write_atomic;

use super::{
    Host, HostError,
    collect::{Accepted, Collected},
    io_err,
};
use crate::{
    events::NodeEvent,
    replica::{self, lock},
    short,
};

/// Round-open seeds are the run's seed mixed with the round by this odd
/// constant (2^64 / golden ratio), so every round trains on fresh batches.
const SEED_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// How often the host looks for enough members while waiting to open.
const MEMBER_POLL: Duration = Duration::from_millis(100);

/// Totals the manifest commits to, for the round's report.
struct Committed {
    /// The signed manifest, as gossiped.
    signed: Vec<u8>,
    /// Mean reported training loss of its updates.
    loss: Option<f32>,
    /// Tokens its updates were trained on.
    tokens: u64,
}

/// What applying the round on the reference replica gave.
struct Applied {
    /// Updates applied.
    updates: usize,
    /// Weight digest after applying.
    digest: u64,
    /// Held-out loss, when this round evaluates.
    eval_loss: Option<f32>,
}

impl Host {
    /// Run round `round` from opening to the applied (and maybe
    /// checkpointed) manifest.
    pub(super) async fn round(&mut self, round: u64) -> Result<(), HostError> {
        let members = self.await_members(round).await;
        let signed_open = self.open(round, &members).await?;
        let traffic = self.net.traffic();
        let (up0, down0) = (traffic.total.up(), traffic.total.down());
        let Collected { seen, accepted } = self.collect(round, &members, &signed_open).await;
        let accepted = self.robust_filter(round, accepted);
        let committed = self.commit(round, &accepted)?;
        self.record(round, &committed.signed, members, &seen)?;
        self.announce(round, committed.signed).await;
        let applied = self.apply(round, accepted).await?;
        self.report_weights(round, applied.digest).await?;
        let allreduce = lock(&self.replica).allreduce_bytes();
        self.emit(NodeEvent::RoundApplied {
            node: self.name.clone(),
            round,
            updates: applied.updates,
            loss: committed.loss,
            eval_loss: applied.eval_loss,
            digest: applied.digest,
            bytes_up: self.net.traffic().total.up() - up0,
            bytes_down: self.net.traffic().total.down() - down0,
            allreduce_bytes: allreduce,
            tokens: committed.tokens,
            run_tokens: self.state.run_tokens,
        });
        if (round + 1).is_multiple_of(self.state.spec.rounds.checkpoint_every) {
            self.checkpoint(round).await?;
        }
        Ok(())
    }

    /// Wait for enough members (members that left ask again on their own),
    /// handling network events meanwhile.
    async fn await_members(&mut self, round: u64) -> Vec<Member> {
        let min = self.state.spec.rounds.min_members.max(1);
        loop {
            let m = self.members();
            if m.len() >= min {
                return m;
            }
            self.drain_events(round);
            tokio::time::sleep(MEMBER_POLL).await;
        }
    }

    /// Sign the round's open, make it what joiners receive, admit its
    /// members and gossip it; returns the signed open (rebroadcast while the
    /// round collects).
    async fn open(&self, round: u64, members: &[Member]) -> Result<Vec<u8>, HostError> {
        let rounds = &self.state.spec.rounds;
        let window = Duration::from_secs_f64(rounds.window_secs);
        let open = RoundOpen {
            members: members.to_vec(),
            seed: self.state.spec.run.seed ^ round.wrapping_mul(SEED_MIX),
            deadline_ms: unix_ms() + window.as_millis() as u64,
            checkpoint: self.state.checkpoint,
            max_update_bytes: rounds.max_update_bytes,
            eval: self.state.last_eval,
        };
        let signed_open = Message::sign(
            self.net.secret_key(),
            self.state.run_id,
            round,
            Body::RoundOpen(open),
        )
        .map_err(|source| HostError::Sign {
            round,
            what: "round open",
            source,
        })?;
        {
            let mut shared = self.shared();
            shared.round_open = Some(signed_open.clone());
            shared.next_round = round;
        }
        // Admit this round's members, and keep admitting the allow list so
        // listed volunteers can still join later.
        let keep: Vec<EndpointId> = self.shared().allow.iter().copied().collect();
        self.net.set_members(members, &keep).await;
        let _ = self.net.broadcast(signed_open.clone()).await;
        self.emit(NodeEvent::RoundOpened {
            node: self.name.clone(),
            round,
            members: members.len(),
        });
        Ok(signed_open)
    }

    /// Robust aggregation: drop (as faults) updates far above the round's
    /// median norm; returns the rest in sender order, the manifest's order.
    fn robust_filter(&mut self, round: u64, mut accepted: Vec<Accepted>) -> Vec<Accepted> {
        let factor = self.state.spec.rounds.robust_norm_factor;
        let norms: Vec<f32> = accepted.iter().map(|a| a.update.norm).collect();
        if let Some(median) = robust_median(&norms, factor) {
            let (keep, outliers): (Vec<_>, Vec<_>) = accepted
                .into_iter()
                .partition(|a| a.update.norm <= factor * median);
            accepted = keep;
            for a in outliers {
                self.fault(
                    round,
                    a.sender,
                    format!(
                        "update norm {:.3} is over {factor}x the median {median:.3}",
                        a.update.norm
                    ),
                );
            }
        }
        accepted.sort_by_key(|a| a.sender);
        accepted
    }

    /// Write the accepted updates' files, then sign the manifest naming
    /// them (counting their tokens into the run's).
    fn commit(&mut self, round: u64, accepted: &[Accepted]) -> Result<Committed, HostError> {
        let mut entries = Vec::new();
        for a in accepted {
            let path = self.update_path(&a.announce.update);
            write_atomic(&path, &a.bytes).map_err(io_err(&path))?;
            entries.push(ManifestEntry {
                sender: a.sender,
                update: a.announce.update,
                tokens: a.announce.tokens,
                loss: a.announce.loss,
            });
        }
        let tokens: u64 = entries.iter().map(|e| e.tokens).sum();
        self.state.run_tokens += tokens;
        let manifest = Manifest {
            entries,
            run_tokens: self.state.run_tokens,
        };
        let loss = manifest.mean_loss();
        let signed = Message::sign(
            self.net.secret_key(),
            self.state.run_id,
            round,
            Body::Manifest(manifest),
        )
        .map_err(|source| HostError::Sign {
            round,
            what: "manifest",
            source,
        })?;
        Ok(Committed {
            signed,
            loss,
            tokens,
        })
    }

    /// Save the state that names the manifest and the next round, with the
    /// members that sent nothing taken off the member list.
    fn record(
        &mut self,
        round: u64,
        signed: &[u8],
        members: Vec<Member>,
        seen: &HashMap<EndpointId, Announce>,
    ) -> Result<(), HostError> {
        self.state.manifests.push((round, signed.to_vec()));
        self.state.next_round = round + 1;
        // A member that sent nothing (gone, or too slow for the window) leaves
        // the member list until it asks again, so it cannot stall later rounds.
        let missing: Vec<EndpointId> = members
            .iter()
            .map(|m| m.id)
            .filter(|id| !seen.contains_key(id))
            .collect();
        for id in &missing {
            self.shared().joined.remove(id);
            self.warn(format!(
                "{} sent no update for round {round}; it rejoins when it asks again",
                short(id)
            ));
        }
        self.state.members = members
            .into_iter()
            .filter(|m| !missing.contains(&m.id))
            .collect();
        let dropped: Vec<EndpointId> = self.shared().dropped.iter().copied().collect();
        self.state.dropped = dropped;
        self.save()
    }

    /// Make the saved manifest what joiners receive, close the open, and
    /// gossip the manifest.
    async fn announce(&self, round: u64, signed: Vec<u8>) {
        {
            let mut shared = self.shared();
            shared.manifests.push((round, signed.clone()));
            shared.round_open = None;
            shared.next_round = round + 1;
        }
        let _ = self.net.broadcast(signed).await;
    }

    /// Apply the manifest's updates on the reference replica (and evaluate,
    /// when due); remember the digest to check members' reports against.
    async fn apply(&mut self, round: u64, accepted: Vec<Accepted>) -> Result<Applied, HostError> {
        let updates: Vec<_> = accepted.into_iter().map(|a| a.update.update).collect();
        let n = updates.len();
        let eval = round.is_multiple_of(self.state.spec.rounds.eval_every)
            || self.state.spec.run.total_rounds == round + 1;
        let (digest, eval_loss) = replica::blocking(&self.replica, move |r| {
            r.apply(round, &updates)?;
            let eval_loss = if eval { Some(r.eval_loss()?) } else { None };
            Ok((r.digest()?, eval_loss))
        })
        .await
        .map_err(|source| HostError::Replica {
            round,
            source: Box::new(source),
        })?;
        if let Some(l) = eval_loss {
            self.state.last_eval = Some((round, l));
        }
        self.digests.insert(round, digest);
        while self.digests.len() > 64 {
            self.digests.pop_first();
        }
        Ok(Applied {
            updates: n,
            digest,
            eval_loss,
        })
    }

    /// Gossip the host's weight digest, on the rounds members report theirs.
    async fn report_weights(&self, round: u64, digest: u64) -> Result<(), HostError> {
        if round.is_multiple_of(self.state.spec.rounds.report_every) {
            let report = Message::sign(
                self.net.secret_key(),
                self.state.run_id,
                round,
                Body::WeightReport(WeightReport { digest }),
            )
            .map_err(|source| HostError::Sign {
                round,
                what: "weight report",
                source,
            })?;
            let _ = self.net.broadcast(report).await;
        }
        Ok(())
    }
}

/// The median norm to filter against, when robust filtering applies: a
/// positive factor and at least three updates (with fewer, the median says
/// nothing about which one is off). The upper median for an even count.
pub(super) fn robust_median(norms: &[f32], factor: f32) -> Option<f32> {
    if !(factor > 0.0 && norms.len() >= 3) {
        return None;
    }
    let mut norms = norms.to_vec();
    norms.sort_by(f32::total_cmp);
    norms.get(norms.len() / 2).copied()
}
