//! One copy of the model as a run member holds it: weights, its own DisTrO
//! momentum, the run's data, and the checks an update must pass before it may
//! touch the weights.
//!
//! Every replica of a run applies the same manifests in the same order from
//! the same starting weights, so their weights stay bit-identical; the digest
//! proves it. The training step (CPU/GPU heavy, blocking) runs on a blocking
//! thread; Burn 0.22's autodiff deadlocked when two threads ran backward at
//! once, so a process-wide lock serialises the steps of replicas that share a
//! process (the demo runs four).

use std::sync::{Arc, Mutex, MutexGuard};

use starling_distro::wire::{
    self, DecodeError, DecodeLimits, EncodeError, RunMismatch, UpdateHeader,
    aggregate::{self, AggregateHeader},
};
use starling_distro::{
    ApplyError, CapError, IncomingUpdate, Residual, StepOptions, TensorBudget, budget_topk,
    update_wire_bytes,
};
use starling_train::{
    Batch, Checkpoint, CheckpointError, DistroPeer, OptimError, OptimizerSnapshot, Sampler,
    SamplerError, SelectedDevice, TrainError, Trainer,
    sim::{Adversary, Attack, Attackers},
};

use crate::data::{DataError, Tokens};
use crate::spec::{RunSpec, SpecError};

static TRAIN_LOCK: Mutex<()> = Mutex::new(());

/// A replica shared between a node's async loop and its blocking workers.
pub type SharedReplica = Arc<Mutex<Replica>>;

/// Lock a shared replica. A panic in a worker cannot leave it half-updated
/// (apply writes the weights in one `set_params`), so poisoning is ignored.
pub fn lock(replica: &SharedReplica) -> MutexGuard<'_, Replica> {
    replica.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `f` on the replica on a blocking thread: training, checking and
/// applying take seconds and must not stall the network loop.
pub async fn blocking<T: Send + 'static>(
    replica: &SharedReplica,
    f: impl FnOnce(&mut Replica) -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, ReplicaError> {
    let replica = replica.clone();
    tokio::task::spawn_blocking(move || f(&mut lock(&replica)))
        .await
        .map_err(ReplicaError::Worker)?
}

/// Share of the round window a member may spend uploading its update.
const UPLOAD_SHARE: f64 = 0.5;
/// Fraction of the corpus held out for evaluation.
const EVAL_FRACTION: f64 = 0.05;

/// Why a replica operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The run's data cannot be sampled as the spec asks.
    #[error("data: {0}")]
    Sampler(#[source] SamplerError),
    /// A fetched data window is not what the spec promises.
    #[error("data: {0}")]
    Window(#[source] DataError),
    /// A data window the step needs has not been fetched.
    #[error("training: the data window at token {0} has not been fetched")]
    MissingWindow(u64),
    /// The spec's DisTrO settings are unusable.
    #[error("training: {0}")]
    Spec(#[source] SpecError),
    /// The model failed: creating it, a training step, an evaluation, a read.
    #[error("training: {0}")]
    Train(#[source] TrainError),
    /// The optimizer failed: creating it, a step, an apply.
    #[error("training: {0}")]
    Optim(#[source] OptimError),
    /// The update could not be encoded.
    #[error("training: {0}")]
    Encode(#[source] EncodeError),
    /// The blocking thread running the work failed (it panicked or was cancelled).
    #[error("training: worker thread failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
    /// There is no replica yet (the node has not joined a run).
    #[error("training: no replica yet")]
    NoReplica,
    /// A checkpoint could not be made or does not load.
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] CheckpointError),
    /// The weights could not be read into or restored from a checkpoint.
    #[error("checkpoint: {0}")]
    CheckpointWeights(#[source] TrainError),
    /// The momentum could not be read into or restored from a checkpoint.
    #[error("checkpoint: {0}")]
    CheckpointMomentum(#[source] OptimError),
    /// The checkpoint is for another model or run.
    #[error("checkpoint: it belongs to another model or run")]
    ForeignCheckpoint,
    /// The round's accepted updates could not be merged.
    #[error("aggregate: {0}")]
    Merge(#[source] ApplyError),
    /// The aggregate could not be capped.
    #[error("aggregate: {0}")]
    Cap(#[source] CapError),
    /// The coordinator's own aggregate failed the checks members run on it.
    #[error("aggregate: the coordinator's own aggregate does not check: {0}")]
    OwnAggregate(#[source] Box<UpdateError>),
}

/// Why an update was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// The bytes do not decode.
    #[error("malformed update: {0}")]
    Wire(#[source] DecodeError),
    /// The header names another run, round or sender.
    #[error("update header does not match its announce ({0})")]
    Header(&'static str),
    /// Shapes, indices or values do not fit the model.
    #[error("update does not fit the model: {0}")]
    Model(#[source] ApplyError),
    /// Its encoding or top-k is not one the run's members send.
    #[error("update does not fit the run: {0}")]
    Run(#[source] RunMismatch),
    /// An aggregate says it merges another number of updates than its manifest.
    #[error("the aggregate merges {got} updates, its manifest says {expected}")]
    UpdateCount {
        /// What the manifest says.
        expected: u32,
        /// What the aggregate says.
        got: u32,
    },
}

/// An update that checked against the run and the model.
#[derive(Clone, Debug)]
pub struct CheckedUpdate {
    /// The update, ready to screen and merge.
    pub update: IncomingUpdate,
}

/// What one training step produced.
#[derive(Clone, Debug)]
pub struct TrainedUpdate {
    /// Wire bytes of the update.
    pub bytes: Vec<u8>,
    /// Mean training loss.
    pub loss: f32,
    /// Tokens trained on.
    pub tokens: u64,
    /// Top-k used.
    pub topk: usize,
}

/// A member's copy of the model.
pub struct Replica {
    spec: RunSpec,
    run_id: [u8; 16],
    id: [u8; 32],
    trainer: Trainer,
    peer: DistroPeer,
    tokens: Tokens,
    sampler: Sampler,
    budgets: Vec<TensorBudget>,
    limits: DecodeLimits,
    /// Corrupts every trained update (tests and benchmarks of the screen).
    attacker: Option<Attackers>,
}

impl Replica {
    /// A replica at the run's initial weights with zero momentum, reading
    /// `tokens` (all of them, or windows fetched before each round; a whole
    /// store must be the spec's data: the caller checks with `DataRef::matches`).
    pub fn new(
        spec: &RunSpec,
        device: &SelectedDevice,
        run_id: [u8; 16],
        id: [u8; 32],
        tokens: Tokens,
    ) -> Result<Self, ReplicaError> {
        let sampler = Sampler::new(
            spec.data.tokens,
            spec.run.seq_len,
            EVAL_FRACTION,
            spec.run.seed,
        )
        .map_err(ReplicaError::Sampler)?;
        let trainer = Trainer::new(&spec.model, &device.device, spec.run.seed)
            .map_err(ReplicaError::Train)?;
        let distro = spec.distro().map_err(ReplicaError::Spec)?;
        let peer = DistroPeer::new(&trainer, distro).map_err(ReplicaError::Optim)?;
        let budgets: Vec<TensorBudget> = trainer
            .shapes()
            .iter()
            .map(|s| TensorBudget::for_shape(s, distro.chunk))
            .collect();
        // No update a member of this run can send is larger than a full
        // top-k update of this model, whatever the spec allows.
        let implied = update_wire_bytes(&budgets, spec.run.topk, distro.values);
        let limits = DecodeLimits {
            max_bytes: usize::try_from(spec.rounds.max_update_bytes.min(implied))
                .unwrap_or(usize::MAX),
            ..DecodeLimits::default()
        };
        Ok(Self {
            spec: spec.clone(),
            run_id,
            id,
            trainer,
            peer,
            tokens,
            sampler,
            budgets,
            limits,
            attacker: None,
        })
    }

    /// The same replica, sending `attack`'s corruption of every update it
    /// trains instead of the update (`None`: honest). Its own momentum
    /// still follows the honest update, as an attacker's would.
    pub fn with_attack(mut self, attack: Option<Attack>) -> Self {
        self.attacker = attack.map(|attack| {
            Attackers::new(
                &Adversary {
                    attackers: 1,
                    attack,
                },
                u64::from_le_bytes([
                    self.id[0], self.id[1], self.id[2], self.id[3], self.id[4], self.id[5],
                    self.id[6], self.id[7],
                ]),
            )
        });
        self
    }

    /// The run spec.
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// Bytes a fp32 all-reduce would move per member per round.
    pub fn allreduce_bytes(&self) -> u64 {
        4 * self.spec.model.param_count() as u64
    }

    /// The top-k that fits `upload_bytes_per_sec` within the round window
    /// (capped by the run's top-k); `None` for an unlimited link.
    pub fn topk_for_cap(&self, upload_bytes_per_sec: Option<f64>) -> usize {
        let ceiling = self.spec.run.topk;
        let Some(rate) = upload_bytes_per_sec else {
            return ceiling;
        };
        let budget = (rate * self.spec.rounds.window_secs * UPLOAD_SHARE) as u64;
        let values = self.peer.layout().config().values;
        budget_topk(&self.budgets, budget, values)
            .unwrap_or(1)
            .min(ceiling)
    }

    /// The windows (start offset, bytes in the data blob) this member needs
    /// for its share of `round` and does not hold yet.
    pub fn missing_windows(&self, round: u64, slot: u32) -> Vec<(u64, std::ops::Range<u64>)> {
        let len = self.sampler.window();
        self.sampler
            .train_windows(round, slot, self.spec.run.batch)
            .into_iter()
            .filter(|&o| self.tokens.window(o, len).is_none())
            .map(|o| (o, self.spec.data.byte_range(o, len)))
            .collect()
    }

    /// Keep a window fetched for the coming round, after checking its length
    /// and ids against the spec.
    pub fn add_window(&mut self, offset: u64, bytes: &[u8]) -> Result<(), ReplicaError> {
        let len = self.sampler.window();
        let tokens = self
            .spec
            .data
            .decode_window(offset, len, bytes)
            .map_err(ReplicaError::Window)?;
        match &mut self.tokens {
            Tokens::Fetched(windows) => {
                windows.insert(offset, tokens);
                Ok(())
            }
            Tokens::All(_) => Ok(()),
        }
    }

    fn batch(&self, offsets: &[u64]) -> Result<Batch, ReplicaError> {
        let len = self.sampler.window();
        let windows = offsets
            .iter()
            .map(|&o| {
                self.tokens
                    .window(o, len)
                    .ok_or(ReplicaError::MissingWindow(o))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Batch::from_windows(&windows, self.spec.run.seq_len, self.spec.model.vocab_size)
            .map_err(ReplicaError::Train)
    }

    /// Train this member's share of `round` (slot `slot` of the members) and
    /// encode the update, sending at most `topk` components per chunk.
    pub fn train(
        &mut self,
        round: u64,
        slot: u32,
        topk: usize,
    ) -> Result<TrainedUpdate, ReplicaError> {
        let _guard = TRAIN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let r = &self.spec.run;
        let offsets = self.sampler.train_windows(round, slot, r.batch);
        let batch = self.batch(&offsets)?;
        if let Tokens::Fetched(windows) = &mut self.tokens {
            // Each window is trained on once: keep memory to one round's worth.
            windows.clear();
        }
        let grads = self
            .trainer
            .gradients(&batch, r.micro_batch, r.clip)
            .map_err(ReplicaError::Train)?;
        let lr = self.spec.schedule().lr(round);
        let options = StepOptions { topk: topk.max(1) };
        let update = self
            .peer
            .step(&grads, lr, options)
            .map_err(ReplicaError::Optim)?;
        let update = match &mut self.attacker {
            Some(attacker) => attacker.corrupt(0, update, None),
            None => update,
        };
        let header = UpdateHeader {
            run_id: self.run_id,
            round,
            sender: self.id,
        };
        let bytes = wire::encode(&header, &update).map_err(ReplicaError::Encode)?;
        Ok(TrainedUpdate {
            bytes,
            loss: grads.loss,
            tokens: grads.tokens,
            topk,
        })
    }

    /// The loss and tokens of the batch that slot `slot` trains on in
    /// `round`, at the current weights: what its sender must have
    /// announced (a forward pass; the batch is a pure function of the run's
    /// seed, the round and the slot).
    pub fn recompute_loss(&self, round: u64, slot: u32) -> Result<(f32, u64), ReplicaError> {
        let _guard = TRAIN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let r = &self.spec.run;
        let offsets = self.sampler.train_windows(round, slot, r.batch);
        let batch = self.batch(&offsets)?;
        let loss = self
            .trainer
            .eval_loss(&batch, r.micro_batch)
            .map_err(ReplicaError::Train)?;
        let tokens = (offsets.len() as u64).saturating_mul(r.seq_len as u64);
        Ok((loss, tokens))
    }

    /// Fully check an update received for `round` from `sender`: wire format,
    /// header, the run's encoding and top-k, shapes, index ranges and finite
    /// values.
    pub fn check(
        &self,
        bytes: &[u8],
        round: u64,
        sender: [u8; 32],
    ) -> Result<CheckedUpdate, UpdateError> {
        let decoded = wire::decode(bytes, &self.limits).map_err(UpdateError::Wire)?;
        let h = &decoded.header;
        if h.run_id != self.run_id {
            return Err(UpdateError::Header("run"));
        }
        if h.round != round {
            return Err(UpdateError::Header("round"));
        }
        if h.sender != sender {
            return Err(UpdateError::Header("sender"));
        }
        decoded
            .check_run(self.peer.layout().config().values, self.spec.run.topk)
            .map_err(UpdateError::Run)?;
        let update = decoded.into_incoming();
        self.peer
            .layout()
            .merge(std::slice::from_ref(&update), 0.0)
            .map_err(UpdateError::Model)?;
        Ok(CheckedUpdate { update })
    }

    /// Most bytes the shared checkpoint (the weights alone) of this model
    /// can take: its parameters as f32 plus the safetensors header (tensor
    /// names, shapes, offsets and the run's metadata), allowed 1 MiB plus
    /// 1 KiB a tensor. A coordinator declaring more is refused before
    /// anything is downloaded.
    pub fn max_checkpoint_bytes(&self) -> u64 {
        let model = &self.spec.model;
        4 * model.param_count() as u64 + (1 << 20) + 1024 * model.stored_shapes().len() as u64
    }

    /// Most bytes the aggregate of any round of this model can take.
    pub fn max_aggregate_bytes(&self) -> u64 {
        aggregate::max_len(
            self.peer
                .layout()
                .tensors()
                .iter()
                .map(|t| (t.shape.as_slice(), t.grid)),
        )
    }

    /// The model as DisTrO chunks it.
    pub fn layout(&self) -> &starling_distro::ModelLayout {
        self.peer.layout()
    }

    /// Merge `round`'s accepted updates (checked, any order) into the
    /// aggregate's bytes: what every replica applies for the round. With a
    /// `cap`, only the top-K coefficients of each chunk of the merge plus
    /// the residual are kept, and the rest stays in the residual.
    pub fn aggregate(
        &self,
        round: u64,
        updates: &[IncomingUpdate],
        cap: Option<(&mut Residual, usize)>,
    ) -> Result<Vec<u8>, ReplicaError> {
        let mut merged = self
            .peer
            .layout()
            .merge(updates, 0.0)
            .map_err(ReplicaError::Merge)?;
        if let Some((residual, k)) = cap {
            merged = residual.cap(round, &merged, k).map_err(ReplicaError::Cap)?;
        }
        let header = AggregateHeader {
            run_id: self.run_id,
            round,
            updates: u32::try_from(updates.len()).unwrap_or(u32::MAX),
        };
        aggregate::encode(&header, &merged).map_err(ReplicaError::Encode)
    }

    /// Fully check `round`'s aggregate, said to merge `updates` updates:
    /// format, run, round, count, and shapes, indices and values against
    /// the model. Returns it as the one update to apply.
    pub fn check_aggregate(
        &self,
        bytes: &[u8],
        round: u64,
        updates: u32,
    ) -> Result<IncomingUpdate, UpdateError> {
        let limits = DecodeLimits {
            max_bytes: usize::try_from(self.max_aggregate_bytes()).unwrap_or(usize::MAX),
            ..DecodeLimits::default()
        };
        let decoded = aggregate::decode(bytes, &limits).map_err(UpdateError::Wire)?;
        let h = &decoded.header;
        if h.run_id != self.run_id {
            return Err(UpdateError::Header("run"));
        }
        if h.round != round {
            return Err(UpdateError::Header("round"));
        }
        if h.updates != updates {
            return Err(UpdateError::UpdateCount {
                expected: updates,
                got: h.updates,
            });
        }
        // Merging one update divides each value by one: exact, so the
        // aggregate applies as the updates it was made from would.
        let update = IncomingUpdate {
            sender: [0; 32],
            tensors: decoded.tensors,
        };
        self.peer
            .layout()
            .merge(std::slice::from_ref(&update), 0.0)
            .map_err(UpdateError::Model)?;
        Ok(update)
    }

    /// Apply `round`'s accepted updates (in any order; the optimizer sorts by sender).
    pub fn apply(&mut self, round: u64, updates: &[IncomingUpdate]) -> Result<(), ReplicaError> {
        if updates.is_empty() {
            return Ok(());
        }
        let _guard = TRAIN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let lr = self.spec.schedule().lr(round);
        self.peer
            .apply(&mut self.trainer, updates, lr)
            .map_err(ReplicaError::Optim)?;
        Ok(())
    }

    /// The first 8 bytes of the BLAKE3 digest of the weights.
    pub fn digest(&self) -> Result<u64, ReplicaError> {
        let h = self.trainer.digest().map_err(ReplicaError::Train)?;
        let mut first = [0u8; 8];
        first.copy_from_slice(&h.as_bytes()[..8]);
        Ok(u64::from_le_bytes(first))
    }

    /// Loss on the run's held-out sequences.
    pub fn eval_loss(&self) -> Result<f32, ReplicaError> {
        let _guard = TRAIN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let r = &self.spec.run;
        let offsets = self.sampler.eval_windows(r.eval_sequences);
        let batch = self.batch(&offsets)?;
        self.trainer
            .eval_loss(&batch, r.micro_batch)
            .map_err(ReplicaError::Train)
    }

    /// The weights and this replica's momentum after `round`, as checkpoint
    /// bytes: what a coordinator keeps to resume its own replica.
    pub fn checkpoint_bytes(&self, round: u64) -> Result<Vec<u8>, ReplicaError> {
        let momentum = self
            .peer
            .momentum()
            .map_err(ReplicaError::CheckpointMomentum)?;
        self.checkpoint_with(round, vec![momentum])
    }

    /// The weights after `round` alone, as checkpoint bytes: what a joiner
    /// needs (it starts its momentum from zero). Replicas hold bit-identical
    /// weights and the encoding is deterministic, so every replica that has
    /// applied `round` produces the same bytes, hence the same blob, and
    /// can serve it.
    pub fn shared_checkpoint_bytes(&self, round: u64) -> Result<Vec<u8>, ReplicaError> {
        self.checkpoint_with(round, Vec::new())
    }

    fn checkpoint_with(
        &self,
        round: u64,
        momentum: Vec<Vec<Vec<f32>>>,
    ) -> Result<Vec<u8>, ReplicaError> {
        let checkpoint = Checkpoint {
            model: self.spec.model.clone(),
            step: round.saturating_add(1),
            seed: self.spec.run.seed,
            params: self
                .trainer
                .params_host()
                .map_err(ReplicaError::CheckpointWeights)?,
            optimizer: OptimizerSnapshot::Distro(momentum),
        };
        checkpoint.to_bytes().map_err(ReplicaError::Checkpoint)
    }

    /// Load weights from checkpoint bytes (momentum too when `with_momentum`:
    /// a coordinator resuming its own replica; a joiner starts from zero).
    pub fn load_checkpoint(
        &mut self,
        bytes: &[u8],
        with_momentum: bool,
    ) -> Result<u64, ReplicaError> {
        let c = Checkpoint::from_bytes(bytes).map_err(ReplicaError::Checkpoint)?;
        if c.model != self.spec.model || c.seed != self.spec.run.seed {
            return Err(ReplicaError::ForeignCheckpoint);
        }
        self.trainer
            .set_params_host(&c.params)
            .map_err(ReplicaError::CheckpointWeights)?;
        if with_momentum
            && let OptimizerSnapshot::Distro(m) = &c.optimizer
            && let Some(mine) = m.first()
        {
            self.peer
                .set_momentum(mine)
                .map_err(ReplicaError::CheckpointMomentum)?;
        }
        Ok(c.step)
    }
}

#[cfg(test)]
mod tests {
    use starling_train::{DeviceChoice, select_device};

    use super::*;
    use crate::RunFile;

    #[test]
    fn the_checkpoint_bound_holds_the_real_checkpoint_and_little_more() {
        let (spec, tokens) = RunFile::default()
            .resolve(std::path::Path::new("."))
            .expect("the default run");
        let device = select_device(DeviceChoice::Cpu).expect("the CPU");
        let replica =
            Replica::new(&spec, &device, [1; 16], [2; 32], Tokens::All(tokens)).expect("replica");
        // A late round: the step in the header takes its most digits.
        let real = replica
            .shared_checkpoint_bytes(u64::MAX - 1)
            .expect("checkpoint")
            .len() as u64;
        let most = replica.max_checkpoint_bytes();
        assert!(real <= most, "{real} > {most}");
        // The weights themselves leave no room: a few MiB of slack at most.
        let weights = 4 * spec.model.param_count() as u64;
        assert!(real > weights);
        assert!(
            most - weights < 2 << 20,
            "{most} allows too much over {weights}"
        );
    }

    #[test]
    fn the_recomputed_loss_and_tokens_are_what_training_announced() {
        let (spec, tokens) = RunFile::default()
            .resolve(std::path::Path::new("."))
            .expect("the default run");
        let device = select_device(DeviceChoice::Cpu).expect("the CPU");
        let mut member = Replica::new(
            &spec,
            &device,
            [1; 16],
            [2; 32],
            Tokens::All(tokens.clone()),
        )
        .expect("member");
        let host =
            Replica::new(&spec, &device, [1; 16], [3; 32], Tokens::All(tokens)).expect("host");
        let trained = member.train(7, 2, 4).expect("train");
        let (loss, tokens) = host.recompute_loss(7, 2).expect("recompute");
        assert_eq!(tokens, trained.tokens);
        assert!(
            (loss - trained.loss).abs() < 1e-5,
            "{loss} vs {}",
            trained.loss
        );
        // Another slot's batch is another loss: the check tells them apart.
        let (other, _) = host.recompute_loss(7, 3).expect("recompute");
        assert!(
            (other - trained.loss).abs() > 1e-3,
            "{other} vs {}",
            trained.loss
        );
    }

    #[test]
    fn an_update_larger_than_the_runs_top_k_implies_is_refused_whatever_the_spec_allows() {
        let (mut spec, tokens) = RunFile::default()
            .resolve(std::path::Path::new("."))
            .expect("the default run");
        spec.rounds.max_update_bytes = 1 << 40;
        let device = select_device(DeviceChoice::Cpu).expect("the CPU");
        let mut replica =
            Replica::new(&spec, &device, [1; 16], [2; 32], Tokens::All(tokens)).expect("replica");
        // A real, full top-k update checks...
        let trained = replica.train(0, 0, spec.run.topk).expect("train");
        let values = replica.layout().config().values;
        let implied = update_wire_bytes(&replica.budgets, spec.run.topk, values);
        assert!(trained.bytes.len() as u64 <= implied);
        replica
            .check(&trained.bytes, 0, [2; 32])
            .expect("a member's own update checks");
        // ...and one byte over the bound is refused before it is read.
        let over = vec![0u8; implied as usize + 1];
        assert!(matches!(
            replica.check(&over, 0, [2; 32]),
            Err(UpdateError::Wire(DecodeError::Oversized { .. }))
        ));
    }
}
