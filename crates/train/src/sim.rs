//! Several peers in one process, to measure what DisTrO costs and saves
//! before any network is involved.
//!
//! Every simulated peer trains on its own deterministic batch of the round
//! (slot = peer index), exactly as it would in a swarm. With DisTrO each peer
//! keeps its own momentum and its update goes through the real wire format
//! (encoded, counted, decoded with the same checks a node applies to a
//! stranger's bytes); the updates are merged into one aggregate (capped at
//! `aggregate_topk` per chunk when asked, as a run's host does), which goes
//! through its own wire format and is applied by all peers alike, so one
//! weight replica stands for all of them (the distro crate's tests prove the
//! replicas bit-identical). With `robust` on, the updates first go through
//! the host's screen ([`starling_distro::robust`]), and with an
//! [`Adversary`] the last peers send attacks in place of their updates: how
//! `starling bench robust` measures what the screen keeps out and what
//! gets in costs. With AdamW-DDP the peers' full fp32 gradients are
//! averaged, as an all-reduce would, and one AdamW step follows.

use std::time::Instant;

use serde::Serialize;
use starling_distro::robust::{self, RobustConfig};
use starling_distro::wire::{
    self, DecodeError, DecodeLimits, EncodeError, UpdateHeader,
    aggregate::{self, AggregateHeader},
};
use starling_distro::{CapError, DistroConfig, IncomingUpdate, Residual, StepOptions};

use crate::checkpoint::{Checkpoint, OptimizerSnapshot};
use crate::data::sampling::{Sampler, SamplerError};
use crate::data::shards::TokenStore;
use crate::optim::{AdamW, AdamWConfig, DistroPeer, OptimError};
use crate::trainer::{Batch, Schedule, StepGrads, TrainError, Trainer, clip_global_norm};

mod adversary;

pub use adversary::{Adversary, Attack, Attackers};

/// Which optimizer the simulated peers use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SimOptimizer {
    /// DisTrO/DeMo with these settings.
    Distro(DistroConfig),
    /// AdamW on gradients averaged over all peers (fp32 all-reduce).
    AdamWDdp(AdamWConfig),
}

/// A simulation's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Simulated peers.
    pub peers: usize,
    /// Steps (rounds) to run.
    pub steps: u64,
    /// Sequences each peer trains on per step.
    pub batch: usize,
    /// Sequences per forward/backward (gradient accumulation below `batch`).
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Learning rate over the steps.
    pub schedule: Schedule,
    /// Global-norm clipping threshold (per peer for DisTrO, of the averaged
    /// gradient for AdamW-DDP); 0 turns it off.
    pub clip: f32,
    /// The optimizer.
    pub optimizer: SimOptimizer,
    /// Run seed: picks every batch.
    pub seed: u64,
    /// Fraction of the tokens held out for the evaluation loss.
    pub eval_fraction: f64,
    /// Held-out sequences per evaluation.
    pub eval_sequences: usize,
    /// Evaluate every this many steps (and after the last).
    pub eval_every: u64,
    /// DisTrO only: cap each step's aggregate at this many coefficients per
    /// chunk, carrying the rest to the next step, as a run's host does with
    /// `aggregate_topk` (`None`: the exact aggregate).
    pub aggregate_topk: Option<usize>,
    /// DisTrO only: screen each step's updates as a run's host does before
    /// merging them (`None`: DeMo's plain scatter-mean of every update).
    pub robust: Option<RobustConfig>,
    /// DisTrO only: some peers attack (`None`: all are honest).
    pub adversary: Option<Adversary>,
}

/// What happened in one step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRecord {
    /// Step number, from 0.
    pub step: u64,
    /// Learning rate used.
    pub lr: f32,
    /// Mean training loss over the peers' batches.
    pub loss: f32,
    /// Held-out loss after this step, when evaluated.
    pub eval_loss: Option<f32>,
    /// Mean gradient norm over peers, before clipping.
    pub grad_norm: f32,
    /// Bytes each peer sent this step (mean over peers).
    pub bytes_sent_per_peer: u64,
    /// Bytes each peer received this step: the step's aggregate, as a run's
    /// volunteers download it (the gradient all-reduce for AdamW-DDP).
    pub bytes_received_per_peer: u64,
    /// Bytes a fp32 all-reduce sends per peer per step (4 bytes a parameter).
    pub allreduce_bytes_per_peer: u64,
    /// DisTrO: updates merged into the step's aggregate.
    pub updates_merged: usize,
    /// DisTrO with the screen: the lowest sign agreement of an honest
    /// update with the others' (from -1 to 1), when computed.
    pub honest_agreement_min: Option<f32>,
    /// Seconds since the simulation started.
    pub wall_s: f64,
}

/// Why a simulation stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The settings make no sense.
    #[error("invalid simulation settings: {0}")]
    Config(String),
    /// The data cannot be sampled as asked.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// A training step failed.
    #[error("step {step}: {source}")]
    Train {
        /// The step.
        step: u64,
        /// What failed.
        source: TrainError,
    },
    /// An optimizer step failed.
    #[error("step {step}: {source}")]
    Optim {
        /// The step.
        step: u64,
        /// What failed.
        source: OptimError,
    },
    /// An update could not be encoded (a bug: peers here are honest).
    #[error("step {step}: update of peer {peer} failed the wire format: {source}")]
    Encode {
        /// The step.
        step: u64,
        /// The peer.
        peer: usize,
        /// What failed.
        #[source]
        source: EncodeError,
    },
    /// An encoded update did not decode (a bug: peers here are honest).
    #[error("step {step}: update of peer {peer} failed the wire format: {source}")]
    Decode {
        /// The step.
        step: u64,
        /// The peer.
        peer: usize,
        /// What failed.
        #[source]
        source: DecodeError,
    },
    /// The step's aggregate failed its wire format (a bug).
    #[error("step {step}: the aggregate failed the wire format: {reason}")]
    Aggregate {
        /// The step.
        step: u64,
        /// What failed.
        reason: String,
    },
    /// The aggregate could not be capped (a bug).
    #[error("step {step}: {source}")]
    Cap {
        /// The step.
        step: u64,
        /// What failed.
        #[source]
        source: CapError,
    },
    /// An update's header changed between encoding and decoding (a bug).
    #[error("step {step}: update of peer {peer} failed the wire format: header changed on the way")]
    WireHeader {
        /// The step.
        step: u64,
        /// The peer.
        peer: usize,
    },
}

/// The end of a simulation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimSummary {
    /// Held-out loss after the last step.
    pub final_eval_loss: f32,
    /// Mean bytes a peer sent per step.
    pub bytes_per_peer_per_step: f64,
    /// Mean bytes a peer received per step.
    pub bytes_received_per_peer_per_step: f64,
    /// Bytes a fp32 all-reduce sends per peer per step.
    pub allreduce_bytes_per_peer: u64,
    /// Tokens trained on, all peers together.
    pub tokens: u64,
    /// Updates the attackers sent.
    pub bad_updates_sent: u64,
    /// Attackers' updates merged into an aggregate.
    pub bad_updates_accepted: u64,
    /// Honest updates the screen left out.
    pub honest_updates_rejected: u64,
    /// Wall time in seconds.
    pub wall_s: f64,
}

impl SimConfig {
    fn check(&self, trainer: &Trainer) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Config(m.into()));
        if self.peers == 0 || self.peers > u32::MAX as usize {
            return bad("peers must be at least 1");
        }
        if self.batch == 0 || self.micro_batch == 0 || self.eval_sequences == 0 {
            return bad("batch, micro-batch and evaluation sequences must be at least 1");
        }
        if self.seq_len == 0 || self.seq_len > trainer.config().max_seq_len {
            return bad("sequence length must be between 1 and the model's max_seq_len");
        }
        if !(self.schedule.peak.is_finite() && self.schedule.peak > 0.0) {
            return bad("learning rate must be positive");
        }
        if self.aggregate_topk == Some(0) {
            return bad("the aggregate's top-k must be at least 1");
        }
        if let Some(a) = &self.adversary
            && a.attackers >= self.peers
        {
            return bad("at least one peer must be honest (attackers < peers)");
        }
        Ok(())
    }
}

/// A simulation in progress: the optimizer states and the next step. It can
/// be saved as a [`Checkpoint`] and resumed with the same results as a run
/// that never stopped.
pub struct Simulation {
    method: Method,
    next_step: u64,
}

impl Simulation {
    /// A simulation at step 0 with fresh optimizer states for `trainer`'s model.
    pub fn new(trainer: &Trainer, config: &SimConfig) -> Result<Self, SimError> {
        config.check(trainer)?;
        let method = match config.optimizer {
            SimOptimizer::Distro(d) => {
                let peers: Vec<DistroPeer> = (0..config.peers)
                    .map(|_| DistroPeer::new(trainer, d))
                    .collect::<Result<_, _>>()
                    .map_err(|source| SimError::Optim { step: 0, source })?;
                let cap = match (config.aggregate_topk, peers.first()) {
                    (Some(k), Some(p)) => Some((Residual::zeros(p.layout()), k)),
                    _ => None,
                };
                Method::Distro(Box::new(DistroSim {
                    peers,
                    options: d.step_options(),
                    values: d.values,
                    cap,
                    robust: config.robust,
                    reference: None,
                    attackers: config
                        .adversary
                        .as_ref()
                        .map(|a| (a.attackers, Attackers::new(a, config.seed))),
                }))
            }
            SimOptimizer::AdamWDdp(a) => Method::AdamW(AdamW::new(trainer, a)),
        };
        Ok(Self {
            method,
            next_step: 0,
        })
    }

    /// Resumes from `checkpoint`: loads its weights into `trainer` and its
    /// optimizer state into a new simulation. The checkpoint must match the
    /// settings (model, optimizer, number of peers).
    pub fn resume(
        trainer: &mut Trainer,
        config: &SimConfig,
        checkpoint: &Checkpoint,
    ) -> Result<Self, SimError> {
        let mismatch = |what: &str| Err(SimError::Config(format!("checkpoint: {what}")));
        if &checkpoint.model != trainer.config() {
            return mismatch("it is for another model");
        }
        if checkpoint.seed != config.seed {
            return mismatch("it is for another seed (--seed)");
        }
        let mut sim = Self::new(trainer, config)?;
        let state = |source| SimError::Optim {
            step: checkpoint.step,
            source,
        };
        match (&mut sim.method, &checkpoint.optimizer) {
            (Method::Distro(d), OptimizerSnapshot::Distro(momenta)) => {
                if d.peers.len() != momenta.len() {
                    return mismatch("it holds another number of peers");
                }
                for (p, m) in d.peers.iter_mut().zip(momenta) {
                    p.set_momentum(m).map_err(state)?;
                }
            }
            (Method::AdamW(a), OptimizerSnapshot::AdamW(s)) => a.set_state(s).map_err(state)?,
            _ => return mismatch("it was made with the other optimizer"),
        }
        trainer
            .set_params_host(&checkpoint.params)
            .map_err(|source| SimError::Train {
                step: checkpoint.step,
                source,
            })?;
        sim.next_step = checkpoint.step;
        Ok(sim)
    }

    /// The next step to run (steps completed so far).
    pub fn next_step(&self) -> u64 {
        self.next_step
    }

    /// Everything needed to resume after the last completed step.
    pub fn checkpoint(&self, trainer: &Trainer, seed: u64) -> Result<Checkpoint, SimError> {
        let step = self.next_step;
        let optimizer = match &self.method {
            Method::Distro(d) => OptimizerSnapshot::Distro(
                d.peers
                    .iter()
                    .map(DistroPeer::momentum)
                    .collect::<Result<_, _>>()
                    .map_err(|source| SimError::Optim { step, source })?,
            ),
            Method::AdamW(a) => OptimizerSnapshot::AdamW(
                a.state()
                    .map_err(|source| SimError::Optim { step, source })?,
            ),
        };
        Ok(Checkpoint {
            model: trainer.config().clone(),
            step,
            seed,
            params: trainer
                .params_host()
                .map_err(|source| SimError::Train { step, source })?,
            optimizer,
        })
    }

    /// Runs steps until `until` (exclusive, at most `config.steps`), calling
    /// `on_step` after each. Returns the summary of the steps run here.
    pub fn run(
        &mut self,
        trainer: &mut Trainer,
        store: &TokenStore,
        config: &SimConfig,
        until: u64,
        mut on_step: impl FnMut(&StepRecord),
    ) -> Result<SimSummary, SimError> {
        config.check(trainer)?;
        let start = Instant::now();
        let vocab = trainer.config().vocab_size;
        let sampler = Sampler::new(
            store.tokens().len() as u64,
            config.seq_len,
            config.eval_fraction,
            config.seed,
        )?;
        let eval_batch = Batch::from_store(
            store,
            &sampler.eval_windows(config.eval_sequences),
            config.seq_len,
            vocab,
        )
        .map_err(|source| SimError::Train { step: 0, source })?;
        let allreduce = 4 * trainer.config().param_count() as u64;
        let until = until.min(config.steps);
        let first = self.next_step;
        let mut sent_total = 0u64;
        let mut received_total = 0u64;
        let (mut bad_sent, mut bad_accepted, mut honest_rejected) = (0, 0, 0);
        let mut eval_loss = None;
        for step in first..until {
            let lr = config.schedule.lr(step);
            let train = |source| SimError::Train { step, source };
            let clip = match self.method {
                Method::Distro(..) => config.clip,
                Method::AdamW(_) => 0.0,
            };
            let grads =
                peer_gradients(trainer, store, &sampler, config, step, clip).map_err(train)?;
            let loss = grads.iter().map(|g| g.loss).sum::<f32>() / config.peers as f32;
            let grad_norm = grads.iter().map(|g| g.norm).sum::<f32>() / config.peers as f32;
            let outcome = self.method.step(trainer, grads, lr, step, config.clip)?;
            self.next_step = step + 1;
            sent_total += outcome.sent;
            received_total += outcome.received;
            bad_sent += outcome.bad_sent;
            bad_accepted += outcome.bad_accepted;
            honest_rejected += outcome.honest_rejected;
            let evaluate = step + 1 == config.steps
                || (config.eval_every > 0 && (step + 1) % config.eval_every == 0);
            let this_eval = if evaluate {
                Some(
                    trainer
                        .eval_loss(&eval_batch, config.micro_batch)
                        .map_err(train)?,
                )
            } else {
                None
            };
            eval_loss = this_eval.or(eval_loss);
            on_step(&StepRecord {
                step,
                lr,
                loss,
                eval_loss: this_eval,
                grad_norm,
                bytes_sent_per_peer: outcome.sent,
                bytes_received_per_peer: outcome.received,
                allreduce_bytes_per_peer: allreduce,
                updates_merged: outcome.merged,
                honest_agreement_min: outcome.honest_agreement_min,
                wall_s: start.elapsed().as_secs_f64(),
            });
        }
        let final_eval_loss = match eval_loss {
            Some(e) => e,
            None => trainer
                .eval_loss(&eval_batch, config.micro_batch)
                .map_err(|source| SimError::Train {
                    step: until,
                    source,
                })?,
        };
        let steps = until.saturating_sub(first);
        Ok(SimSummary {
            final_eval_loss,
            bytes_per_peer_per_step: sent_total as f64 / steps.max(1) as f64,
            bytes_received_per_peer_per_step: received_total as f64 / steps.max(1) as f64,
            allreduce_bytes_per_peer: allreduce,
            tokens: steps * (config.peers * config.batch * config.seq_len) as u64,
            bad_updates_sent: bad_sent,
            bad_updates_accepted: bad_accepted,
            honest_updates_rejected: honest_rejected,
            wall_s: start.elapsed().as_secs_f64(),
        })
    }
}

/// Runs a whole simulation on `trainer`'s model, calling `on_step` after every step.
pub fn simulate(
    trainer: &mut Trainer,
    store: &TokenStore,
    config: &SimConfig,
    on_step: impl FnMut(&StepRecord),
) -> Result<SimSummary, SimError> {
    Simulation::new(trainer, config)?.run(trainer, store, config, config.steps, on_step)
}

/// Every peer's gradients for `step`, one peer after another. (Burn 0.22's
/// autodiff deadlocks when several threads run backward at once, so peers
/// share the device sequentially; the backend parallelises each pass.)
fn peer_gradients(
    trainer: &Trainer,
    store: &TokenStore,
    sampler: &Sampler,
    config: &SimConfig,
    step: u64,
    clip: f32,
) -> Result<Vec<StepGrads>, TrainError> {
    let vocab = trainer.config().vocab_size;
    (0..config.peers)
        .map(|slot| {
            let offsets = sampler.train_windows(step, slot as u32, config.batch);
            let batch = Batch::from_store(store, &offsets, config.seq_len, vocab)?;
            trainer.gradients(&batch, config.micro_batch, clip)
        })
        .collect()
}

enum Method {
    Distro(Box<DistroSim>),
    AdamW(AdamW),
}

/// The DisTrO peers and what a run's host would keep between rounds.
struct DistroSim {
    peers: Vec<DistroPeer>,
    /// Every step's options (the run's top-k).
    options: StepOptions,
    /// How values travel.
    values: starling_distro::ValueEncoding,
    /// The aggregate's cap with its residual, when capped.
    cap: Option<(Residual, usize)>,
    /// The host's screen, when on.
    robust: Option<RobustConfig>,
    /// The screen's size reference from the last step.
    reference: Option<f32>,
    /// How many of the last peers attack, and their memory.
    attackers: Option<(usize, Attackers)>,
}

/// What one step moved and decided.
#[derive(Default)]
struct StepOutcome {
    /// Mean bytes a peer sent.
    sent: u64,
    /// Bytes a peer received.
    received: u64,
    /// Updates merged.
    merged: usize,
    /// Lowest agreement of an honest update, when screened.
    honest_agreement_min: Option<f32>,
    /// Updates attackers sent, and how many were merged.
    bad_sent: u64,
    bad_accepted: u64,
    /// Honest updates left out.
    honest_rejected: u64,
}

/// A fixed run id for simulated updates.
const SIM_RUN: [u8; 16] = *b"starling-sim-run";

fn peer_id(slot: usize) -> [u8; 32] {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&(slot as u64).to_le_bytes());
    id
}

impl DistroSim {
    /// One round as a run plays it: every peer's update through the wire
    /// format and the host's checks, the screen (when on), one aggregate
    /// (capped when asked) through its own wire format, applied once.
    fn step(
        &mut self,
        trainer: &mut Trainer,
        grads: &[StepGrads],
        lr: f32,
        step: u64,
    ) -> Result<StepOutcome, SimError> {
        let optim = |source| SimError::Optim { step, source };
        let honest_peers = self.peers.len() - self.attackers.as_ref().map_or(0, |(a, _)| *a);
        let mut outcome = StepOutcome::default();
        let mut incoming: Vec<IncomingUpdate> = Vec::with_capacity(self.peers.len());
        let mut is_bad: Vec<bool> = Vec::with_capacity(self.peers.len());
        let mut first_honest = None;
        let mut bytes = 0u64;
        for (slot, (peer, g)) in self.peers.iter_mut().zip(grads).enumerate() {
            let mut update = peer.step(g, lr, self.options).map_err(optim)?;
            let bad = slot >= honest_peers;
            if slot == 0 {
                first_honest = Some(update.clone());
            }
            if bad && let Some((_, attackers)) = &mut self.attackers {
                update = attackers.corrupt(slot - honest_peers, update, first_honest.as_ref());
                outcome.bad_sent += 1;
            }
            let header = UpdateHeader {
                run_id: SIM_RUN,
                round: step,
                sender: peer_id(slot),
            };
            let encoded = wire::encode(&header, &update).map_err(|source| SimError::Encode {
                step,
                peer: slot,
                source,
            })?;
            bytes += encoded.len() as u64;
            let decoded = wire::decode(&encoded, &DecodeLimits::default()).map_err(|source| {
                SimError::Decode {
                    step,
                    peer: slot,
                    source,
                }
            })?;
            if decoded.header != header {
                return Err(SimError::WireHeader { step, peer: slot });
            }
            // The host's check of what a member of the run can send; an
            // honest update always passes it.
            if let Err(e) = decoded.check_run(self.values, self.options.topk) {
                if bad {
                    continue;
                }
                return Err(SimError::Aggregate {
                    step,
                    reason: format!("peer {slot}'s own update does not fit the run: {e}"),
                });
            }
            incoming.push(decoded.into_incoming());
            is_bad.push(bad);
        }
        let first = self
            .peers
            .first()
            .ok_or_else(|| SimError::Config("no peers".into()))?;
        // The screen, in arrival order (honest peers first: a copy comes
        // after what it copies).
        if let Some(config) = &self.robust {
            let refs: Vec<&IncomingUpdate> = incoming.iter().collect();
            let screening = robust::screen(&refs, config, self.reference);
            self.reference = screening.reference;
            let mut kept = Vec::with_capacity(incoming.len());
            let mut kept_bad = Vec::with_capacity(incoming.len());
            for ((u, bad), v) in incoming.into_iter().zip(is_bad).zip(&screening.verdicts) {
                if !bad && let Some(a) = v.agreement {
                    outcome.honest_agreement_min =
                        Some(outcome.honest_agreement_min.map_or(a, |m: f32| m.min(a)));
                }
                match v.result {
                    Ok(scale) => {
                        kept.push(robust::scaled(u, scale));
                        kept_bad.push(bad);
                    }
                    Err(_) if !bad => outcome.honest_rejected += 1,
                    Err(_) => {}
                }
            }
            incoming = kept;
            is_bad = kept_bad;
        }
        outcome.bad_accepted = is_bad.iter().filter(|b| **b).count() as u64;
        outcome.merged = incoming.len();
        outcome.sent = bytes / self.peers.len() as u64;
        if incoming.is_empty() {
            // Nothing to apply: the weights stay as they are this round.
            return Ok(outcome);
        }
        // As in a run: one aggregate of the accepted updates (capped when
        // asked), through its wire format, applied as one update.
        let mut merged = first
            .layout()
            .merge(&incoming, lr)
            .map_err(|e| optim(e.into()))?;
        if let Some((residual, k)) = &mut self.cap {
            merged = residual
                .cap(step, &merged, *k)
                .map_err(|source| SimError::Cap { step, source })?;
        }
        let header = AggregateHeader {
            run_id: SIM_RUN,
            round: step,
            updates: incoming.len() as u32,
        };
        let failed = |reason: String| SimError::Aggregate { step, reason };
        let encoded = aggregate::encode(&header, &merged).map_err(|e| failed(e.to_string()))?;
        let decoded = aggregate::decode(&encoded, &DecodeLimits::default())
            .map_err(|e| failed(e.to_string()))?;
        let one = IncomingUpdate {
            sender: [0; 32],
            tensors: decoded.tensors,
        };
        first.apply(trainer, &[one], lr).map_err(optim)?;
        outcome.received = encoded.len() as u64;
        Ok(outcome)
    }
}

impl Method {
    /// Applies one step.
    fn step(
        &mut self,
        trainer: &mut Trainer,
        grads: Vec<StepGrads>,
        lr: f32,
        step: u64,
        clip: f32,
    ) -> Result<StepOutcome, SimError> {
        let optim = |source| SimError::Optim { step, source };
        match self {
            Method::Distro(d) => d.step(trainer, &grads, lr, step),
            Method::AdamW(adamw) => {
                let n = grads.len() as f32;
                let mut sum: Option<Vec<burn::tensor::Tensor<2>>> = None;
                for g in grads {
                    sum = Some(match sum {
                        None => g.tensors,
                        Some(acc) => acc.into_iter().zip(g.tensors).map(|(a, b)| a + b).collect(),
                    });
                }
                let mean: Vec<_> = sum
                    .ok_or_else(|| SimError::Config("no peers".into()))?
                    .into_iter()
                    .map(|t| t.div_scalar(n))
                    .collect();
                let (mean, _) = clip_global_norm(mean, clip)
                    .map_err(|source| SimError::Train { step, source })?;
                adamw.step(trainer, &mean, lr).map_err(optim)?;
                let all_reduce = 4 * trainer.config().param_count() as u64;
                Ok(StepOutcome {
                    sent: all_reduce,
                    received: all_reduce,
                    merged: n as usize,
                    ..StepOutcome::default()
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::tests::{store, tiny};
    use burn::tensor::Device;
    use starling_distro::ValueEncoding;

    #[allow(deprecated)]
    fn cpu() -> Device {
        Device::ndarray()
    }

    fn config(optimizer: SimOptimizer, lr: f32) -> SimConfig {
        SimConfig {
            peers: 3,
            steps: 12,
            batch: 2,
            micro_batch: 2,
            seq_len: 12,
            schedule: Schedule {
                peak: lr,
                warmup: 2,
                total: 12,
                final_fraction: 0.1,
            },
            clip: 1.0,
            optimizer,
            seed: 5,
            eval_fraction: 0.1,
            eval_sequences: 4,
            aggregate_topk: None,
            robust: None,
            adversary: None,
            eval_every: 4,
        }
    }

    fn run(optimizer: SimOptimizer, lr: f32) -> (Vec<StepRecord>, SimSummary, blake3::Hash) {
        let c = tiny();
        let mut t = Trainer::new(&c, &cpu(), 1).unwrap();
        let mut records = Vec::new();
        let s = simulate(&mut t, &store(), &config(optimizer, lr), |r| {
            records.push(r.clone())
        })
        .unwrap();
        (records, s, t.digest().unwrap())
    }

    #[test]
    fn distro_and_adamw_both_learn_and_distro_sends_far_less() {
        let distro = SimOptimizer::Distro(DistroConfig {
            topk: 4,
            values: ValueEncoding::Sign,
            ..DistroConfig::default()
        });
        let adamw = SimOptimizer::AdamWDdp(AdamWConfig::default());
        let (rd, sd, _) = run(distro, 1e-2);
        let (ra, sa, _) = run(adamw, 1e-2);
        for (r, s) in [(&rd, &sd), (&ra, &sa)] {
            assert_eq!(r.len(), 12);
            let evals: Vec<f32> = r.iter().filter_map(|x| x.eval_loss).collect();
            assert_eq!(evals.len(), 3, "steps 4, 8 and 12");
            assert!(
                s.final_eval_loss < 32f32.ln() - 0.3,
                "{}",
                s.final_eval_loss
            );
        }
        assert_eq!(
            sa.bytes_per_peer_per_step,
            sa.allreduce_bytes_per_peer as f64
        );
        assert!(sd.bytes_per_peer_per_step * 20.0 < sa.bytes_per_peer_per_step);
        assert!(rd.iter().all(|r| r.bytes_sent_per_peer > 0));
    }

    /// A DisTrO simulation of 4 peers (f32 values), the last `attackers`
    /// sending `attack`, screened or not.
    fn attacked(attack: Option<Attack>, robust: bool) -> SimSummary {
        let mut config = config(
            SimOptimizer::Distro(DistroConfig {
                topk: 4,
                values: ValueEncoding::F32,
                ..DistroConfig::default()
            }),
            1e-2,
        );
        config.peers = 4;
        config.robust = robust.then(RobustConfig::default);
        config.adversary = attack.map(|attack| Adversary {
            attackers: 1,
            attack,
        });
        let mut t = Trainer::new(&tiny(), &cpu(), 1).unwrap();
        simulate(&mut t, &store(), &config, |_| {}).unwrap()
    }

    #[test]
    fn the_screen_keeps_scaled_and_empty_updates_out_and_every_honest_one_in() {
        let clean = attacked(None, true);
        assert_eq!(
            (clean.bad_updates_sent, clean.honest_updates_rejected),
            (0, 0)
        );
        for attack in [Attack::Scale(1000.0), Attack::Empty, Attack::Copy] {
            let s = attacked(Some(attack), true);
            assert_eq!(s.bad_updates_sent, 12, "{attack}");
            assert_eq!(s.bad_updates_accepted, 0, "{attack}");
            assert_eq!(s.honest_updates_rejected, 0, "{attack}");
        }
        // Unscreened, every one of them is merged.
        let s = attacked(Some(Attack::Scale(1000.0)), false);
        assert_eq!(s.bad_updates_accepted, 12);
    }

    #[test]
    fn attackers_must_leave_an_honest_peer() {
        let mut c = config(SimOptimizer::Distro(DistroConfig::default()), 1e-2);
        c.adversary = Some(Adversary {
            attackers: c.peers,
            attack: Attack::Negate,
        });
        let t = Trainer::new(&tiny(), &cpu(), 1).unwrap();
        assert!(matches!(
            Simulation::new(&t, &c),
            Err(SimError::Config(m)) if m.contains("honest")
        ));
    }

    #[test]
    fn a_simulation_replays_exactly() {
        let distro = SimOptimizer::Distro(DistroConfig::default());
        let (a, _, da) = run(distro, 5e-3);
        let (b, _, db) = run(distro, 5e-3);
        assert_eq!(da, db);
        let losses = |r: &[StepRecord]| r.iter().map(|x| x.loss).collect::<Vec<_>>();
        assert_eq!(losses(&a), losses(&b));
    }

    #[test]
    fn a_resumed_simulation_matches_one_that_never_stopped() {
        let distro = SimOptimizer::Distro(DistroConfig {
            topk: 4,
            ..DistroConfig::default()
        });
        let adamw = SimOptimizer::AdamWDdp(AdamWConfig::default());
        for optimizer in [distro, adamw] {
            let cfg = config(optimizer, 1e-2);
            let (straight, _, digest) = run(optimizer, 1e-2);
            let c = tiny();
            let data = store();
            let mut t = Trainer::new(&c, &cpu(), 1).unwrap();
            let mut sim = Simulation::new(&t, &cfg).unwrap();
            let mut records = Vec::new();
            sim.run(&mut t, &data, &cfg, 5, |r| records.push(r.clone()))
                .unwrap();
            let dir =
                std::env::temp_dir().join(format!("starling-sim-resume-{}", std::process::id()));
            sim.checkpoint(&t, cfg.seed).unwrap().save(&dir).unwrap();
            drop((sim, t));
            let ck = Checkpoint::load(&dir).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            assert_eq!(ck.step, 5);
            // A fresh process: new model (other initial weights), then resume.
            let mut t = Trainer::new(&c, &cpu(), 99).unwrap();
            let mut sim = Simulation::resume(&mut t, &cfg, &ck).unwrap();
            sim.run(&mut t, &data, &cfg, cfg.steps, |r| records.push(r.clone()))
                .unwrap();
            assert_eq!(t.digest().unwrap(), digest, "{optimizer:?}");
            let losses = |r: &[StepRecord]| r.iter().map(|x| x.loss).collect::<Vec<_>>();
            assert_eq!(losses(&records), losses(&straight));
            // The checkpoint refuses settings it was not made with.
            let mut other = cfg.clone();
            other.optimizer = if optimizer == distro { adamw } else { distro };
            assert!(Simulation::resume(&mut t, &other, &ck).is_err());
            if optimizer == distro {
                let mut fewer = cfg.clone();
                fewer.peers = 2;
                assert!(Simulation::resume(&mut t, &fewer, &ck).is_err());
            }
        }
    }

    #[test]
    fn nonsense_settings_are_refused() {
        let c = tiny();
        let mut t = Trainer::new(&c, &cpu(), 1).unwrap();
        let mut cfg = config(SimOptimizer::AdamWDdp(AdamWConfig::default()), 1e-3);
        cfg.seq_len = 1000;
        assert!(matches!(
            simulate(&mut t, &store(), &cfg, |_| {}),
            Err(SimError::Config(_))
        ));
    }
}
