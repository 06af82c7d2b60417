//! One round of the run, as the sequence of its phases.
//!
//! The order of the phases is what makes a round safe to interrupt: nothing
//! is announced before it is on disk (the aggregate and accepted-list files,
//! then the state file that names the manifest, then the gossip), and the
//! reference replica applies the aggregate only after it was announced, and
//! checked exactly as every member checks it. Each
//! phase is its own method so that order reads at a glance in
//! [`Host::round`], and a change to one phase cannot silently reorder the
//! effects of another. Collecting the updates, the one phase that runs
//! concurrent work, lives in `host/collect.rs`.

use std::{collections::HashMap, time::Duration};

use starling_distro::{Rejection, RobustConfig, robust};
use starling_swarm::{
    AcceptedList, Announce, BlobRef, Body, Bytes, EndpointId, Manifest, ManifestEntry, Member,
    Message, Roster, RoundOpen, WeightReport, unix_ms,
};
use starling_train::atomic::write_atomic;

use super::{
    Host, HostError, aggregate_tag,
    collect::{Accepted, Collected},
    io_err, round_prefix,
};
use crate::{
    events::NodeEvent,
    replica::{self, ReplicaError, lock},
    short,
};

/// Round-open seeds are the run's seed mixed with the round by this odd
/// constant (2^64 / golden ratio), so every round trains on fresh batches.
const SEED_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// How often the host looks for enough members while waiting to open.
const MEMBER_POLL: Duration = Duration::from_millis(100);

/// What the manifest commits to, for the round's report and apply.
struct Committed {
    /// The signed manifest, as gossiped.
    signed: Vec<u8>,
    /// Mean reported training loss of its updates.
    loss: Option<f32>,
    /// Tokens its updates were trained on.
    tokens: u64,
    /// The aggregate's bytes and the number of updates it merges.
    aggregate: Option<(Bytes, u32)>,
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
        let Some(signed_open) = self.open(round, &members).await? else {
            // Logged; the round opens again after a pause.
            tokio::time::sleep(MEMBER_POLL * 10).await;
            return Ok(());
        };
        let traffic = self.net.traffic();
        let (up0, down0) = (traffic.wire.up(), traffic.wire.down());
        let Collected { seen, accepted } = self.collect(round, &members, &signed_open).await;
        let accepted = self.robust_filter(round, accepted);
        let accepted = self.spot_check(round, &members, accepted).await;
        let Some(committed) = self.commit(round, accepted).await? else {
            // Logged; nothing was saved or announced, so the round is
            // played again under the same number.
            return Ok(());
        };
        self.record(round, &committed.signed, members, &seen)?;
        self.announce(round, committed.signed).await;
        let applied = self.apply(round, committed.aggregate).await?;
        self.report_weights(round, applied.digest).await;
        let allreduce = lock(&self.replica).allreduce_bytes();
        self.emit(NodeEvent::RoundApplied {
            node: self.name.clone(),
            round,
            updates: applied.updates,
            loss: committed.loss,
            eval_loss: applied.eval_loss,
            digest: applied.digest,
            bytes_up: self.net.traffic().wire.up().saturating_sub(up0),
            bytes_down: self.net.traffic().wire.down().saturating_sub(down0),
            allreduce_bytes: allreduce,
            tokens: committed.tokens,
            run_tokens: self.state.run_tokens,
        });
        if self.state.spec.rounds.checkpoints_after(round) {
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

    /// Publish the round's roster, sign the round's open, make it what
    /// joiners receive, admit its members and gossip it; returns the signed
    /// open (rebroadcast while the round collects), or `None` when it could
    /// not be signed (logged: a message that cannot be built never ends
    /// the run).
    async fn open(&self, round: u64, members: &[Member]) -> Result<Option<Vec<u8>>, HostError> {
        let rounds = &self.state.spec.rounds;
        let window = Duration::from_secs_f64(rounds.window_secs);
        let roster = Roster {
            members: members.to_vec(),
        };
        let tag = format!("{}roster", round_prefix(round));
        let roster_blob = self
            .net
            .publish(&tag, roster.to_bytes())
            .await
            .map_err(|source| HostError::Publish { tag, source })?;
        let open = RoundOpen {
            roster: roster_blob,
            members: members.len() as u32,
            seed: self.state.spec.run.seed ^ round.wrapping_mul(SEED_MIX),
            deadline_ms: unix_ms() + window.as_millis() as u64,
            checkpoint: self.state.checkpoint,
            max_update_bytes: rounds.max_update_bytes,
            eval: self.state.last_eval,
        };
        let signed_open = match Message::sign(
            self.net.secret_key(),
            self.state.run_id,
            round,
            Body::RoundOpen(open),
        ) {
            Ok(signed) => signed,
            Err(e) => {
                self.warn(format!("round {round}: cannot sign the round's open: {e}"));
                return Ok(None);
            }
        };
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
        Ok(Some(signed_open))
    }

    /// The screen ([`starling_distro::robust`]): leave out empty, copied,
    /// oversized and contrary updates (logged, not held against their
    /// senders: they were well-formed) and clip the rest; returns them in
    /// sender order, the manifest's order, ready to merge.
    fn robust_filter(&mut self, round: u64, accepted: Vec<Accepted>) -> Vec<Accepted> {
        let rounds = &self.state.spec.rounds;
        let config = robust_config(rounds.robust_norm_factor, rounds.robust_min_agreement);
        let (keep, left_out, reference) = screen_round(accepted, &config, self.reference);
        self.reference = reference;
        for (sender, why) in left_out {
            self.emit(NodeEvent::Rejected {
                node: self.name.clone(),
                round,
                peer: short(&sender),
                reason: format!("left out of the merge: {why}"),
            });
        }
        keep
    }

    /// Recompute the loss and tokens of a sampled share of the kept updates
    /// (`spot_check_rate`) on the reference replica, whose weights are the
    /// ones every member trained on this round, and leave out, as a fault,
    /// an update whose sender announced other numbers. The loss may differ
    /// by what another device's arithmetic gives (0.2% plus 0.001).
    async fn spot_check(
        &mut self,
        round: u64,
        members: &[Member],
        accepted: Vec<Accepted>,
    ) -> Vec<Accepted> {
        let rate = self.state.spec.rounds.spot_check_rate;
        if rate <= 0.0 || accepted.is_empty() {
            return accepted;
        }
        let sampled: Vec<(usize, u32)> = accepted
            .iter()
            .enumerate()
            .filter(|_| rand::random::<f64>() < rate)
            .filter_map(|(i, a)| {
                let slot = members.binary_search_by(|m| m.id.cmp(&a.sender)).ok()?;
                Some((i, u32::try_from(slot).ok()?))
            })
            .collect();
        if sampled.is_empty() {
            return accepted;
        }
        let jobs: Vec<u32> = sampled.iter().map(|&(_, slot)| slot).collect();
        let started = std::time::Instant::now();
        let results = replica::blocking(&self.replica, move |r| {
            jobs.into_iter()
                .map(|slot| r.recompute_loss(round, slot))
                .collect::<Result<Vec<_>, _>>()
        })
        .await;
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                // Our own failure: nobody is blamed, nothing is checked.
                self.warn(format!("round {round}: spot check failed: {e}"));
                return accepted;
            }
        };
        let liars: Vec<(usize, String)> = sampled
            .iter()
            .zip(results)
            .filter_map(|(&(i, _), (loss, tokens))| {
                spot_check_mismatch(&accepted[i].announce, loss, tokens).map(|why| (i, why))
            })
            .collect();
        self.emit(NodeEvent::SpotChecked {
            node: self.name.clone(),
            round,
            checked: sampled.len(),
            mismatches: liars.len(),
            millis: started.elapsed().as_millis() as u64,
        });
        let mut keep = Vec::with_capacity(accepted.len());
        for (i, a) in accepted.into_iter().enumerate() {
            match liars.iter().find(|(j, _)| *j == i) {
                Some((_, why)) => self.fault(round, a.sender, why.clone()),
                None => keep.push(a),
            }
        }
        keep
    }

    /// Merge the accepted updates into the round's aggregate, write and
    /// publish it and the accepted list, then sign the manifest naming them
    /// (counting their tokens into the run's). `None` when the manifest
    /// could not be signed (logged; nothing is counted).
    async fn commit(
        &mut self,
        round: u64,
        accepted: Vec<Accepted>,
    ) -> Result<Option<Committed>, HostError> {
        let list = accepted_list(&accepted);
        let tokens = list.tokens();
        let loss = list.mean_loss();
        let count = accepted.len() as u32;
        let (aggregate, aggregate_ref, accepted_ref) = if accepted.is_empty() {
            (None, None, None)
        } else {
            let updates: Vec<_> = accepted.into_iter().map(|a| a.update.update).collect();
            let cap = self.state.spec.rounds.aggregate_topk;
            let mut residual = self.residual.take();
            let result = replica::blocking(&self.replica, move |r| {
                let bytes = r.aggregate(round, &updates, residual.as_mut().zip(cap))?;
                Ok((bytes, residual))
            })
            .await;
            let (bytes, residual) = result.map_err(|source| HostError::Replica {
                round,
                source: Box::new(source),
            })?;
            self.residual = residual;
            let bytes = Bytes::from(bytes);
            let aggregate_ref = self.keep(&aggregate_tag(round), &bytes).await?;
            self.save_residual()?;
            let accepted_ref = self
                .keep(
                    &format!("{}accepted", round_prefix(round)),
                    &list.to_bytes(),
                )
                .await?;
            (
                Some((bytes, count)),
                Some(aggregate_ref),
                Some(accepted_ref),
            )
        };
        let run_tokens = self.state.run_tokens.saturating_add(tokens);
        let manifest = Manifest {
            aggregate: aggregate_ref,
            accepted: accepted_ref,
            updates: count,
            tokens,
            loss,
            run_tokens,
        };
        let signed = match Message::sign(
            self.net.secret_key(),
            self.state.run_id,
            round,
            Body::Manifest(manifest),
        ) {
            Ok(signed) => signed,
            Err(e) => {
                self.warn(format!("round {round}: cannot sign the manifest: {e}"));
                return Ok(None);
            }
        };
        self.state.run_tokens = run_tokens;
        Ok(Some(Committed {
            signed,
            loss,
            tokens,
            aggregate,
        }))
    }

    /// Write `bytes` to the state directory (for a restart) and serve them
    /// under `tag`.
    async fn keep(&self, tag: &str, bytes: &[u8]) -> Result<BlobRef, HostError> {
        let blob = BlobRef::of(bytes);
        let path = self.blob_path(&blob);
        write_atomic(&path, bytes).map_err(io_err(&path))?;
        self.net
            .publish(tag, bytes.to_vec())
            .await
            .map_err(|source| HostError::Publish {
                tag: tag.to_owned(),
                source,
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

    /// Apply the round's aggregate on the reference replica, checked as
    /// every member checks it (and evaluate, when due); remember the digest
    /// to check members' reports against.
    async fn apply(
        &mut self,
        round: u64,
        aggregate: Option<(Bytes, u32)>,
    ) -> Result<Applied, HostError> {
        let updates = aggregate.as_ref().map_or(0, |(_, n)| *n as usize);
        let eval = round.is_multiple_of(self.state.spec.rounds.eval_every)
            || self.state.spec.run.total_rounds == round + 1;
        let (digest, eval_loss) = replica::blocking(&self.replica, move |r| {
            if let Some((bytes, n)) = aggregate {
                let update = r
                    .check_aggregate(&bytes, round, n)
                    .map_err(|e| ReplicaError::OwnAggregate(Box::new(e)))?;
                r.apply(round, &[update])?;
            }
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
            updates,
            digest,
            eval_loss,
        })
    }

    /// Gossip the host's weight digest, on the rounds members report theirs.
    async fn report_weights(&self, round: u64, digest: u64) {
        if !round.is_multiple_of(self.state.spec.rounds.report_every) {
            return;
        }
        match Message::sign(
            self.net.secret_key(),
            self.state.run_id,
            round,
            Body::WeightReport(WeightReport { digest }),
        ) {
            Ok(report) => {
                let _ = self.net.broadcast(report).await;
            }
            Err(e) => self.warn(format!("round {round}: cannot sign the weight report: {e}")),
        }
    }
}

/// The screen's settings from the run's `[rounds]` (0 turns a check off).
pub(crate) fn robust_config(norm_factor: f32, min_agreement: f32) -> RobustConfig {
    RobustConfig {
        norm_factor,
        min_agreement: (min_agreement > 0.0).then_some(min_agreement),
    }
}

/// Screen `accepted` (judged in announce order, which decides which of two
/// copies stays): the kept updates, clipped and in sender order (the
/// manifest's order); who was left out and why; the size reference for
/// the next round.
pub(crate) fn screen_round(
    mut accepted: Vec<Accepted>,
    config: &RobustConfig,
    previous: Option<f32>,
) -> (Vec<Accepted>, Vec<(EndpointId, Rejection)>, Option<f32>) {
    accepted.sort_by_key(|a| a.order);
    let updates: Vec<_> = accepted.iter().map(|a| &a.update.update).collect();
    let screening = robust::screen(&updates, config, previous);
    let mut keep = Vec::with_capacity(accepted.len());
    let mut left_out = Vec::new();
    for (mut a, verdict) in accepted.into_iter().zip(screening.verdicts) {
        match verdict.result {
            Ok(scale) => {
                a.update.update = robust::scaled(a.update.update, scale);
                keep.push(a);
            }
            Err(why) => left_out.push((a.sender, why)),
        }
    }
    keep.sort_by_key(|a| a.sender);
    (keep, left_out, screening.reference)
}

/// The list of the round's accepted updates the manifest names.
pub(crate) fn accepted_list(accepted: &[Accepted]) -> AcceptedList {
    AcceptedList {
        entries: accepted
            .iter()
            .map(|a| ManifestEntry {
                sender: a.sender,
                update: a.announce.update,
                tokens: a.announce.tokens,
                loss: a.announce.loss,
            })
            .collect(),
    }
}

/// Why `announce` does not match the `loss` and `tokens` recomputed for its
/// sender's batch, if it does not: tokens must be exact, the loss within
/// what another device's arithmetic gives (0.2% plus 0.001).
pub(crate) fn spot_check_mismatch(announce: &Announce, loss: f32, tokens: u64) -> Option<String> {
    let close = (announce.loss - loss).abs() <= 0.002 * loss.abs() + 0.001;
    (announce.tokens != tokens || !close).then(|| {
        format!(
            "spot check: announced loss {} and {} tokens, recomputed {loss} and {tokens}",
            announce.loss, announce.tokens
        )
    })
}
