//! The DisTrO/DeMo optimizer for a whole model, as a state machine a peer
//! drives once per round: [`DistroOptimizer::step`] turns this peer's gradients
//! into the update it sends (with this round's [`StepOptions`]),
//! [`DistroOptimizer::apply`] applies the round's accepted updates to the weights.
//!
//! `step` and `apply` are split because the network sits between them: the
//! peer sends its update, waits for the round to close, and applies exactly
//! the set of updates the round accepted, its own included.

use rayon::prelude::*;

use crate::chunk::{ChunkGrid, DEFAULT_CHUNK};
use crate::compress::{
    CompressError, DecompressError, aggregate, check_dense, compress_in_place, decode_dense,
};
use crate::dct::{BasisCache, BlockTransform};
use crate::sign::{apply_signs, certify_signs, sign_thresholds};
use crate::sparse::{SparseTensor, ValueEncoding};

/// A peer's identity as it appears in updates: its ed25519 public key.
pub type PeerId = [u8; 32];

/// DeMo's hyper-parameters (learning rate excepted: it follows a schedule and
/// is passed to every call).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistroConfig {
    /// The run's top-k: coefficients sent per chunk (clamped to the chunk's
    /// size) when a round asks for nothing else, see [`Self::step_options`].
    /// A step uses the top-k of its [`StepOptions`]. DeMo: 32; Psyche: 4.
    pub topk: usize,
    /// Chunk edge target. DeMo: 64.
    pub chunk: usize,
    /// Momentum decay. DeMo: 0.999; Psyche: 0.995.
    pub decay: f32,
    /// Decoupled weight decay. DeMo: 0.0.
    pub weight_decay: f32,
    /// How values travel: 1 sign bit by default.
    pub values: ValueEncoding,
}

impl DistroConfig {
    /// Step options that send the run's top-k.
    pub fn step_options(&self) -> StepOptions {
        StepOptions { topk: self.topk }
    }
}

/// Per-round options of a step, chosen by the caller each round: future
/// per-round options (a value encoding, say) go here too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepOptions {
    /// Coefficients to send per chunk this round (clamped to `1..=` the
    /// chunk's size), e.g. the most that fits the upload budget.
    pub topk: usize,
}

impl Default for DistroConfig {
    fn default() -> Self {
        Self {
            topk: 32,
            chunk: DEFAULT_CHUNK,
            decay: 0.999,
            weight_decay: 0.0,
            values: ValueEncoding::Sign,
        }
    }
}

/// What this peer sends for one round: one sparse tensor per model tensor,
/// values already as the receivers will read them.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingUpdate {
    /// How the values were quantised.
    pub values: ValueEncoding,
    /// One entry per model tensor, in model order.
    pub tensors: Vec<SparseTensor>,
}

impl OutgoingUpdate {
    /// The same update as a receiver holds it.
    pub fn into_incoming(self, sender: PeerId) -> IncomingUpdate {
        IncomingUpdate {
            sender,
            tensors: self.tensors,
        }
    }
}

/// An update received from a peer (or this peer's own), ready to apply.
#[derive(Clone, Debug, PartialEq)]
pub struct IncomingUpdate {
    /// Who sent it; fixes its place in the canonical order.
    pub sender: PeerId,
    /// One entry per model tensor, in model order.
    pub tensors: Vec<SparseTensor>,
}

/// Why a step failed. The momentum is unchanged when it does.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum StepError {
    /// The number of gradients differs from the number of model tensors.
    #[error("{got} gradients for a model of {expected} tensors")]
    TensorCount {
        /// Tensors in the model.
        expected: usize,
        /// Gradients given.
        got: usize,
    },
    /// A gradient is malformed.
    #[error("gradient {tensor}: {source}")]
    Gradient {
        /// Model tensor index.
        tensor: usize,
        /// What is wrong.
        source: CompressError,
    },
    /// The learning rate is not a finite non-negative number.
    #[error("learning rate {0} is not finite and non-negative")]
    LearningRate(f32),
}

/// Why updates could not be applied. The weights are unchanged when they cannot.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ApplyError {
    /// No update to apply.
    #[error("no updates to apply")]
    NoUpdates,
    /// Two updates claim the same sender.
    #[error("two updates from the same sender {0:02x?}")]
    DuplicateSender(PeerId),
    /// An update does not carry one tensor per model tensor.
    #[error("update from {sender:02x?} has {got} tensors, the model {expected}")]
    TensorCount {
        /// The sender.
        sender: PeerId,
        /// Tensors in the model.
        expected: usize,
        /// Tensors in the update.
        got: usize,
    },
    /// A tensor's shape or chunking differs from the model's.
    #[error("update from {sender:02x?}: tensor {tensor} does not match the model")]
    ShapeMismatch {
        /// The sender.
        sender: PeerId,
        /// Model tensor index.
        tensor: usize,
    },
    /// A tensor is malformed.
    #[error("tensor {tensor}: {source}")]
    Invalid {
        /// Model tensor index.
        tensor: usize,
        /// What is wrong.
        source: DecompressError,
    },
    /// The number of parameter tensors differs from the model's.
    #[error("{got} parameter tensors for a model of {expected}")]
    ParamCount {
        /// Tensors in the model.
        expected: usize,
        /// Tensors given.
        got: usize,
    },
    /// A parameter tensor's size differs from the model's.
    #[error("parameter {tensor} has {got} values, the model {expected}")]
    ParamShape {
        /// Model tensor index.
        tensor: usize,
        /// Values expected.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// The learning rate is not a finite non-negative number.
    #[error("learning rate {0} is not finite and non-negative")]
    LearningRate(f32),
}

/// What an apply did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Updates applied.
    pub updates: usize,
    /// Elements whose sign needed the f64 tie-breaker.
    pub tie_breaks: usize,
}

/// One model tensor as DeMo sees it.
#[derive(Clone, Debug)]
pub struct TensorLayout {
    /// Dense shape.
    pub shape: Vec<usize>,
    /// Its chunking.
    pub grid: ChunkGrid,
    /// The chunk DCT.
    pub transform: BlockTransform,
}

/// The model as DeMo sees it (shapes, chunking, transforms, settings), shared
/// by the CPU optimizer and the GPU paths: everything but the momentum.
#[derive(Clone, Debug)]
pub struct ModelLayout {
    config: DistroConfig,
    tensors: Vec<TensorLayout>,
}

impl ModelLayout {
    /// The layout of tensors of the given shapes.
    pub fn new(shapes: &[Vec<usize>], config: DistroConfig) -> Self {
        let cache = BasisCache::default();
        let tensors = shapes
            .iter()
            .map(|shape| {
                let grid = ChunkGrid::for_shape(shape, config.chunk);
                TensorLayout {
                    shape: shape.clone(),
                    grid,
                    transform: BlockTransform::new(&cache, grid.chunk_rows, grid.chunk_cols),
                }
            })
            .collect();
        Self { config, tensors }
    }

    /// The settings.
    pub fn config(&self) -> &DistroConfig {
        &self.config
    }

    /// The model's tensors, in order.
    pub fn tensors(&self) -> &[TensorLayout] {
        &self.tensors
    }

    /// Checks a gradient count and each gradient's size and finiteness.
    pub fn check_grads(&self, grads: &[&[f32]], lr: f32) -> Result<(), StepError> {
        check_lr(lr).map_err(StepError::LearningRate)?;
        if grads.len() != self.tensors.len() {
            return Err(StepError::TensorCount {
                expected: self.tensors.len(),
                got: grads.len(),
            });
        }
        for (tensor, (t, g)) in self.tensors.iter().zip(grads).enumerate() {
            check_dense(g, &t.shape, &t.grid)
                .map_err(|source| StepError::Gradient { tensor, source })?;
        }
        Ok(())
    }

    /// Validates `updates` against the model and merges them per tensor in
    /// canonical (ascending sender) order: the input of every apply path.
    pub fn merge(
        &self,
        updates: &[IncomingUpdate],
        lr: f32,
    ) -> Result<Vec<SparseTensor>, ApplyError> {
        check_lr(lr).map_err(ApplyError::LearningRate)?;
        if updates.is_empty() {
            return Err(ApplyError::NoUpdates);
        }
        let mut ordered: Vec<&IncomingUpdate> = updates.iter().collect();
        ordered.sort_by_key(|u| u.sender);
        for w in ordered.windows(2) {
            if w[0].sender == w[1].sender {
                return Err(ApplyError::DuplicateSender(w[0].sender));
            }
        }
        for u in &ordered {
            if u.tensors.len() != self.tensors.len() {
                return Err(ApplyError::TensorCount {
                    sender: u.sender,
                    expected: self.tensors.len(),
                    got: u.tensors.len(),
                });
            }
            for (tensor, (t, s)) in self.tensors.iter().zip(&u.tensors).enumerate() {
                if s.shape != t.shape || s.grid != t.grid {
                    return Err(ApplyError::ShapeMismatch {
                        sender: u.sender,
                        tensor,
                    });
                }
            }
        }
        (0..self.tensors.len())
            .into_par_iter()
            .map(|tensor| {
                let parts: Vec<&SparseTensor> =
                    ordered.iter().map(|u| &u.tensors[tensor]).collect();
                aggregate(&parts).map_err(|source| ApplyError::Invalid { tensor, source })
            })
            .collect()
    }

    /// Checks that `sizes` (element counts of the parameters) match the model.
    pub fn check_params(
        &self,
        sizes: impl ExactSizeIterator<Item = usize>,
    ) -> Result<(), ApplyError> {
        if sizes.len() != self.tensors.len() {
            return Err(ApplyError::ParamCount {
                expected: self.tensors.len(),
                got: sizes.len(),
            });
        }
        for (tensor, (t, got)) in self.tensors.iter().zip(sizes).enumerate() {
            if got != t.grid.numel() {
                return Err(ApplyError::ParamShape {
                    tensor,
                    expected: t.grid.numel(),
                    got,
                });
            }
        }
        Ok(())
    }
}

fn check_lr(lr: f32) -> Result<(), f32> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(lr)
    }
}

/// DeMo for one model on the CPU: the layout plus each tensor's momentum.
#[derive(Clone, Debug)]
pub struct DistroOptimizer {
    layout: ModelLayout,
    deltas: Vec<Vec<f32>>,
}

impl DistroOptimizer {
    /// An optimizer with zero momentum for tensors of the given shapes.
    pub fn new(shapes: &[Vec<usize>], config: DistroConfig) -> Self {
        let layout = ModelLayout::new(shapes, config);
        let deltas = layout
            .tensors
            .iter()
            .map(|t| vec![0.0; t.grid.numel()])
            .collect();
        Self { layout, deltas }
    }

    /// The model layout and settings.
    pub fn layout(&self) -> &ModelLayout {
        &self.layout
    }

    /// The momentum of tensor `i` (for checkpoints).
    pub fn momentum(&self, i: usize) -> Option<&[f32]> {
        self.deltas.get(i).map(Vec::as_slice)
    }

    /// Restores the momentum of tensor `i` from a checkpoint.
    pub fn set_momentum(&mut self, i: usize, delta: &[f32]) -> Result<(), StepError> {
        let expected = self.deltas.len();
        let (Some(t), Some(d)) = (self.layout.tensors.get(i), self.deltas.get_mut(i)) else {
            return Err(StepError::TensorCount {
                expected,
                got: i + 1,
            });
        };
        check_dense(delta, &t.shape, &t.grid)
            .map_err(|source| StepError::Gradient { tensor: i, source })?;
        d.copy_from_slice(delta);
        Ok(())
    }

    /// One DeMo step on this peer's gradients: `delta = decay*delta + lr*grad`,
    /// top-`options.topk` of the chunked DCT of `delta`, error feedback
    /// `delta -= IDCT(sent)`. Returns what to send. Error feedback removes the
    /// full-precision selected coefficients, as DeMo and Psyche do, whatever
    /// the value encoding.
    pub fn step(
        &mut self,
        grads: &[&[f32]],
        lr: f32,
        options: StepOptions,
    ) -> Result<OutgoingUpdate, StepError> {
        // Validate everything first so a bad gradient leaves the momentum untouched.
        self.layout.check_grads(grads, lr)?;
        let StepOptions { topk } = options;
        let DistroConfig { decay, values, .. } = self.layout.config;
        let tensors = self
            .layout
            .tensors
            .iter()
            .zip(&mut self.deltas)
            .zip(grads)
            .map(|((t, delta), g)| {
                delta.par_iter_mut().zip(g.par_iter()).for_each(|(d, &g)| {
                    *d = decay * *d + lr * g;
                });
                compress_in_place(delta, &t.shape, &t.grid, &t.transform, topk, true)
                    .quantized(values)
            })
            .collect();
        Ok(OutgoingUpdate { values, tensors })
    }

    /// Applies the round's accepted updates to `params` (one slice per model
    /// tensor): per tensor, scatter-mean over senders in ascending sender order,
    /// inverse DCT, certified sign, then the deterministic
    /// `p = p*(1 - lr*wd) - lr*sign`. The result is bit-identical whatever the
    /// order of `updates` and whatever machine runs it.
    pub fn apply(
        &self,
        params: &mut [&mut [f32]],
        updates: &[IncomingUpdate],
        lr: f32,
    ) -> Result<ApplyReport, ApplyError> {
        let merged = self.layout.merge(updates, lr)?;
        self.layout.check_params(params.iter().map(|p| p.len()))?;
        let mut tie_breaks = 0;
        for ((t, p), m) in self
            .layout
            .tensors
            .iter()
            .zip(params.iter_mut())
            .zip(&merged)
        {
            let mut signs = decode_dense(m, &t.transform);
            let thresholds = sign_thresholds(m, &t.transform);
            tie_breaks += certify_signs(m, &t.transform, &thresholds, &mut signs);
            apply_signs(p, &signs, lr, self.layout.config.weight_decay);
        }
        Ok(ApplyReport {
            updates: updates.len(),
            tie_breaks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn shapes() -> Vec<Vec<usize>> {
        vec![vec![128, 192], vec![96], vec![4, 6, 64], vec![67, 5]]
    }

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn digest(params: &[Vec<f32>]) -> blake3::Hash {
        crate::weights_digest(params.iter().map(Vec::as_slice))
    }

    /// Runs `rounds` rounds of `peers` peers and returns each peer's final weights.
    fn simulate(
        peers: usize,
        rounds: usize,
        config: DistroConfig,
        shuffle_seed: u64,
    ) -> Vec<Vec<Vec<f32>>> {
        let mut rng = StdRng::seed_from_u64(7);
        let init: Vec<Vec<f32>> = shapes()
            .iter()
            .map(|s| random(&mut rng, s.iter().product()))
            .collect();
        let mut opts: Vec<DistroOptimizer> = (0..peers)
            .map(|_| DistroOptimizer::new(&shapes(), config))
            .collect();
        let mut weights = vec![init; peers];
        let mut order_rng = StdRng::seed_from_u64(shuffle_seed);
        for round in 0..rounds {
            let updates: Vec<IncomingUpdate> = opts
                .iter_mut()
                .enumerate()
                .map(|(peer, opt)| {
                    let mut g = StdRng::seed_from_u64((round * 100 + peer) as u64);
                    let grads: Vec<Vec<f32>> = shapes()
                        .iter()
                        .map(|s| random(&mut g, s.iter().product()))
                        .collect();
                    let refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
                    let mut id = [0u8; 32];
                    id[0] = (peer * 37 % 256) as u8;
                    opt.step(&refs, 0.01, config.step_options())
                        .expect("step")
                        .into_incoming(id)
                })
                .collect();
            for (peer, w) in weights.iter_mut().enumerate() {
                let mut arrived = updates.clone();
                arrived.shuffle(&mut order_rng);
                let mut refs: Vec<&mut [f32]> = w.iter_mut().map(Vec::as_mut_slice).collect();
                opts[peer].apply(&mut refs, &arrived, 0.01).expect("apply");
            }
        }
        weights
    }

    #[test]
    fn replicas_stay_bit_identical_under_any_arrival_order() {
        for values in [ValueEncoding::Sign, ValueEncoding::Bf16, ValueEncoding::F32] {
            let config = DistroConfig {
                values,
                weight_decay: 0.1,
                ..DistroConfig::default()
            };
            let a = simulate(4, 3, config, 1);
            let b = simulate(4, 3, config, 2);
            let d0 = digest(&a[0]);
            for w in a.iter().chain(&b) {
                assert_eq!(digest(w), d0, "{values:?}");
            }
        }
    }

    #[test]
    fn the_wire_aggregate_applies_bit_identically_to_its_updates() {
        use crate::wire::{DecodeLimits, aggregate as agg};
        for values in [ValueEncoding::Sign, ValueEncoding::Bf16, ValueEncoding::F32] {
            let config = DistroConfig {
                values,
                topk: 4,
                weight_decay: 0.1,
                ..DistroConfig::default()
            };
            let mut rng = StdRng::seed_from_u64(11);
            let init: Vec<Vec<f32>> = shapes()
                .iter()
                .map(|s| random(&mut rng, s.iter().product()))
                .collect();
            let updates: Vec<IncomingUpdate> = (0..9u8)
                .map(|peer| {
                    let mut opt = DistroOptimizer::new(&shapes(), config);
                    let grads: Vec<Vec<f32>> = shapes()
                        .iter()
                        .map(|s| random(&mut rng, s.iter().product()))
                        .collect();
                    let refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
                    opt.step(&refs, 0.01, config.step_options())
                        .expect("step")
                        .into_incoming([peer * 29; 32])
                })
                .collect();
            let opt = DistroOptimizer::new(&shapes(), config);
            let mut direct = init.clone();
            let mut refs: Vec<&mut [f32]> = direct.iter_mut().map(Vec::as_mut_slice).collect();
            opt.apply(&mut refs, &updates, 0.01).expect("apply");

            let merged = opt.layout().merge(&updates, 0.0).expect("merge");
            let header = agg::AggregateHeader {
                run_id: [1; 16],
                round: 0,
                updates: 9,
            };
            let bytes = agg::encode(&header, &merged).expect("encode");
            let decoded = agg::decode(&bytes, &DecodeLimits::default()).expect("decode");
            let one = IncomingUpdate {
                sender: [0; 32],
                tensors: decoded.tensors,
            };
            let mut via_aggregate = init.clone();
            let mut refs: Vec<&mut [f32]> =
                via_aggregate.iter_mut().map(Vec::as_mut_slice).collect();
            opt.apply(&mut refs, &[one], 0.01).expect("apply");
            assert_eq!(digest(&direct), digest(&via_aggregate), "{values:?}");
        }
    }

    #[test]
    fn step_matches_reference_momentum_rule() {
        let shapes = vec![vec![8, 8]];
        let config = DistroConfig {
            topk: 3,
            decay: 0.5,
            values: ValueEncoding::F32,
            ..DistroConfig::default()
        };
        let mut opt = DistroOptimizer::new(&shapes, config);
        let g: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let sent = opt.step(&[&g], 0.1, config.step_options()).expect("step");
        // delta after = 0.1*g - IDCT(sent); so delta + IDCT(sent) == 0.1*g.
        let decoded = crate::decompress(&[&sent.tensors[0]]).expect("decode");
        let delta = opt.momentum(0).expect("m");
        for i in 0..64 {
            assert!((delta[i] + decoded[i] - 0.1 * g[i]).abs() < 1e-6);
        }
        // Top-k of the residual excludes what was already sent.
        let second = opt
            .step(&[&vec![0.0; 64]], 0.1, config.step_options())
            .expect("step");
        let first_idx = &sent.tensors[0].indices;
        assert!(
            second.tensors[0]
                .indices
                .iter()
                .all(|i| !first_idx.contains(i))
        );
    }

    #[test]
    fn each_step_sends_the_topk_of_its_options() {
        let shapes = vec![vec![128, 64]];
        let mut rng = StdRng::seed_from_u64(5);
        let mut adaptive = DistroOptimizer::new(&shapes, DistroConfig::default());
        for topk in [2, 7, 1] {
            let fixed_config = DistroConfig {
                topk,
                ..DistroConfig::default()
            };
            // A peer whose run top-k is this round's, with the same momentum.
            let mut fixed = adaptive.clone();
            fixed.layout.config = fixed_config;
            let g = random(&mut rng, 128 * 64);
            let sent = adaptive
                .step(&[&g], 0.01, StepOptions { topk })
                .expect("step");
            let want = fixed
                .step(&[&g], 0.01, fixed_config.step_options())
                .expect("step");
            assert_eq!(sent, want);
            assert!(
                sent.tensors[0]
                    .offsets
                    .windows(2)
                    .all(|w| w[1] - w[0] == topk as u32)
            );
            assert_eq!(adaptive.momentum(0), fixed.momentum(0));
        }
    }

    #[test]
    fn bad_inputs_leave_state_untouched() {
        let mut opt = DistroOptimizer::new(&[vec![4]], DistroConfig::default());
        let k = StepOptions { topk: 32 };
        assert!(matches!(
            opt.step(&[&[1.0, 2.0]], 0.1, k),
            Err(StepError::Gradient { .. })
        ));
        assert!(matches!(
            opt.step(&[&[1.0, f32::INFINITY, 0.0, 0.0]], 0.1, k),
            Err(StepError::Gradient { .. })
        ));
        assert!(matches!(
            opt.step(&[], 0.1, k),
            Err(StepError::TensorCount { .. })
        ));
        assert!(matches!(
            opt.step(&[&[0.0; 4]], f32::NAN, k),
            Err(StepError::LearningRate(_))
        ));
        assert_eq!(opt.momentum(0), Some(&[0.0f32; 4][..]));

        let up = opt
            .step(&[&[1.0, 2.0, 3.0, 4.0]], 0.1, k)
            .expect("step")
            .into_incoming([1; 32]);
        let mut p = vec![0.5f32; 4];
        let before = p.clone();
        let dup = [up.clone(), up.clone()];
        assert!(matches!(
            opt.apply(&mut [&mut p], &dup, 0.1),
            Err(ApplyError::DuplicateSender(_))
        ));
        let mut bad = up.clone();
        bad.tensors[0].indices[0] = 99;
        assert!(matches!(
            opt.apply(&mut [&mut p], &[bad], 0.1),
            Err(ApplyError::Invalid { .. })
        ));
        assert!(matches!(
            opt.apply(&mut [&mut p], &[], 0.1),
            Err(ApplyError::NoUpdates)
        ));
        let mut short = vec![0.0f32; 3];
        assert!(matches!(
            opt.apply(&mut [&mut short], &[up], 0.1),
            Err(ApplyError::ParamShape { .. })
        ));
        assert_eq!(p, before);
    }
}
