//! One peer's share of a training step, kept apart from how the update is
//! exchanged: the trainer turns a batch into gradients (accumulated over
//! micro-batches so a small GPU reaches the configured batch), clips them by
//! their global norm, and hands them out in the `[rows, cols]` view DisTrO
//! chunks. Whatever optimizer then produces new weights writes them back
//! through [`Trainer::set_params`], so the trainer never needs to know whether
//! they came from a DisTrO round or from AdamW.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Int, Tensor, TensorData, TensorReadError};
use starling_distro::{ChunkGrid, DEFAULT_CHUNK};

use crate::config::ModelConfig;
use crate::data::rng::{SplitMix64, splitmix64};
use crate::data::shards::TokenStore;
use crate::model::Llama;

/// Why a training step failed. The model is unchanged when one is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A batch window was outside the token store or of the wrong length.
    #[error("batch window at token {offset} is outside the data ({tokens} tokens)")]
    Window {
        /// Start of the window.
        offset: u64,
        /// Tokens in the store.
        tokens: u64,
    },
    /// A window held the wrong number of tokens.
    #[error("batch window of {len} tokens, expected {expected}")]
    WindowLength {
        /// Tokens in the window.
        len: usize,
        /// Sequence length + 1.
        expected: usize,
    },
    /// A token id was outside the model's vocabulary.
    #[error("token id {id} is outside the model's vocabulary of {vocab}")]
    Token {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Nothing to train on.
    #[error("empty batch")]
    EmptyBatch,
    /// The loss or the gradients were NaN or infinite.
    #[error("the {0} is not finite (diverged, or bad data)")]
    NonFinite(&'static str),
    /// The device could not give a value back.
    #[error("cannot read from the device: {0}")]
    Read(#[from] TensorReadError),
    /// New parameters did not match the model.
    #[error("parameter {index}: expected {expected} values, got {got}")]
    ParamShape {
        /// Parameter index in model order.
        index: usize,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
}

/// Warmup then cosine decay: the learning rate for a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak: f32,
    /// Steps of linear warmup from `peak / warmup` to `peak`.
    pub warmup: u64,
    /// Step at which the cosine reaches `peak * final_fraction`; it stays there after.
    pub total: u64,
    /// Where the cosine ends, as a fraction of the peak.
    pub final_fraction: f32,
}

impl Schedule {
    /// The learning rate at `step` (counting from 0).
    pub fn lr(&self, step: u64) -> f32 {
        let floor = self.peak * self.final_fraction;
        if step < self.warmup {
            return self.peak * (step + 1) as f32 / self.warmup as f32;
        }
        if step >= self.total || self.total <= self.warmup {
            return floor;
        }
        let t = (step - self.warmup) as f64 / (self.total - self.warmup) as f64;
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        floor + (self.peak - floor) * cos as f32
    }
}

/// Gradients of one step in model order, each in its `[rows, cols]` view, on
/// the trainer's device (without autodiff).
#[derive(Clone, Debug)]
pub struct StepGrads {
    /// One matrix per parameter tensor.
    pub tensors: Vec<Tensor<2>>,
    /// Mean training loss over the batch.
    pub loss: f32,
    /// Global L2 norm before clipping.
    pub norm: f32,
    /// Tokens the batch predicted.
    pub tokens: u64,
}

/// Inputs and next-token targets for `rows` windows of `seq_len + 1` tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    rows: usize,
    seq_len: usize,
    windows: Vec<u32>,
}

impl Batch {
    /// Reads the windows starting at `offsets` from `store`, checking every
    /// token against the vocabulary.
    pub fn from_store(
        store: &TokenStore,
        offsets: &[u64],
        seq_len: usize,
        vocab: usize,
    ) -> Result<Self, TrainError> {
        let len = seq_len as u64 + 1;
        let windows = offsets
            .iter()
            .map(|&offset| {
                store.window(offset, len).ok_or(TrainError::Window {
                    offset,
                    tokens: store.tokens().len() as u64,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_windows(&windows, seq_len, vocab)
    }

    /// A batch of windows already in memory (fetched from a peer), each
    /// `seq_len + 1` tokens, checking every token against the vocabulary.
    pub fn from_windows(
        windows: &[&[u32]],
        seq_len: usize,
        vocab: usize,
    ) -> Result<Self, TrainError> {
        if windows.is_empty() || seq_len == 0 {
            return Err(TrainError::EmptyBatch);
        }
        let mut flat = Vec::with_capacity(windows.len() * (seq_len + 1));
        for w in windows {
            if w.len() != seq_len + 1 {
                return Err(TrainError::WindowLength {
                    len: w.len(),
                    expected: seq_len + 1,
                });
            }
            if let Some(&id) = w.iter().find(|&&t| t as usize >= vocab) {
                return Err(TrainError::Token { id, vocab });
            }
            flat.extend_from_slice(w);
        }
        Ok(Self {
            rows: windows.len(),
            seq_len,
            windows: flat,
        })
    }

    /// Number of sequences.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Rows `from..to` as input and target tensors on `device`.
    fn tensors(&self, from: usize, to: usize, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let w = self.seq_len + 1;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for r in from..to {
            let row = &self.windows[r * w..(r + 1) * w];
            x.extend(row[..self.seq_len].iter().map(|&t| i64::from(t)));
            y.extend(row[1..].iter().map(|&t| i64::from(t)));
        }
        let shape = [to - from, self.seq_len];
        (
            Tensor::from_data(TensorData::new(x, shape), device),
            Tensor::from_data(TensorData::new(y, shape), device),
        )
    }
}

/// The model on one device, with the matrix view of each parameter.
#[derive(Debug)]
pub struct Trainer {
    config: ModelConfig,
    model: Llama,
    device: Device,
    views: Vec<[usize; 2]>,
}

/// The `[rows, cols]` view DisTrO uses for a tensor of this shape.
fn matrix_view(shape: &[usize]) -> [usize; 2] {
    let g = ChunkGrid::for_shape(shape, DEFAULT_CHUNK);
    [g.rows, g.cols]
}

/// Scales `grads` so their global L2 norm is at most `clip` (unchanged when
/// `clip` is 0 or not finite); returns them with the norm before scaling.
pub fn clip_global_norm(
    grads: Vec<Tensor<2>>,
    clip: f32,
) -> Result<(Vec<Tensor<2>>, f32), TrainError> {
    let squares: Vec<Tensor<1>> = grads.iter().map(|g| g.clone().square().sum()).collect();
    let norm = read_scalar(Tensor::cat(squares, 0).sum())?.sqrt();
    if !norm.is_finite() {
        return Err(TrainError::NonFinite("gradient norm"));
    }
    let grads = if clip.is_finite() && clip > 0.0 && norm > clip {
        let scale = clip / norm;
        grads.into_iter().map(|g| g.mul_scalar(scale)).collect()
    } else {
        grads
    };
    Ok((grads, norm))
}

fn read_vec(t: Tensor<2>) -> Result<Vec<f32>, TrainError> {
    Ok(t.try_into_vec_as::<f32>()?)
}

fn read_scalar(t: Tensor<1>) -> Result<f32, TrainError> {
    Ok(t.try_into_scalar::<f32>()?)
}

/// The initial weights of a run with `seed`, in model order: normal with
/// std 0.02 (as `transformers` initialises Llama), norm gains 1. Made on the
/// host with SplitMix64 so every backend and machine starts from the same bits.
pub fn initial_params(config: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    config
        .stored_shapes()
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product::<usize>();
            if name.ends_with("norm.weight") {
                return vec![1.0; n];
            }
            let mut rng = SplitMix64::new(splitmix64(seed ^ splitmix64(i as u64)));
            (0..n).map(|_| 0.02 * rng.normal()).collect()
        })
        .collect()
}

impl Trainer {
    /// The model of a run with `seed`, initialised by [`initial_params`], on
    /// `device` (its plain form: autodiff is added here).
    pub fn new(config: &ModelConfig, device: &Device, seed: u64) -> Result<Self, TrainError> {
        let device = device.clone().autodiff();
        let mut t = Self::from_model(config, Llama::new(config, &device), &device);
        t.set_params_host(&initial_params(config, seed))?;
        Ok(t)
    }

    /// Wraps an existing model that lives on `device` (an autodiff device).
    fn from_model(config: &ModelConfig, model: Llama, device: &Device) -> Self {
        let views = config
            .stored_shapes()
            .iter()
            .map(|(_, s)| matrix_view(s))
            .collect();
        Self {
            config: config.clone(),
            model,
            device: device.clone(),
            views,
        }
    }

    /// The model's size and shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the model trains on (without autodiff).
    pub fn device(&self) -> Device {
        self.device.clone().inner()
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Each parameter's shape as stored, in model order (what DisTrO chunks).
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        self.config
            .stored_shapes()
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    /// Gradients of the mean loss over `batch`, computed `micro_batch` rows at
    /// a time and averaged, then scaled so their global norm is at most
    /// `clip` (no clipping when `clip` is 0 or not finite).
    pub fn gradients(
        &self,
        batch: &Batch,
        micro_batch: usize,
        clip: f32,
    ) -> Result<StepGrads, TrainError> {
        let rows = batch.rows();
        let micro = micro_batch.clamp(1, rows.max(1));
        let mut sum: Option<Vec<Tensor<2>>> = None;
        let mut loss = 0.0f64;
        let mut from = 0;
        while from < rows {
            let to = (from + micro).min(rows);
            let weight = (to - from) as f32 / rows as f32;
            let (x, y) = batch.tensors(from, to, &self.device);
            let l = self.model.loss(x, y);
            let value = read_scalar(l.clone().inner())?;
            if !value.is_finite() {
                return Err(TrainError::NonFinite("loss"));
            }
            loss += f64::from(value) * f64::from(weight);
            let grads = l.backward();
            let g = self.collect_grads(&grads, weight);
            sum = Some(match sum {
                None => g,
                Some(acc) => acc.into_iter().zip(g).map(|(a, b)| a + b).collect(),
            });
            from = to;
        }
        let tensors = sum.ok_or(TrainError::EmptyBatch)?;
        let (tensors, norm) = clip_global_norm(tensors, clip)?;
        Ok(StepGrads {
            tensors,
            loss: loss as f32,
            norm,
            tokens: (rows * batch.seq_len) as u64,
        })
    }

    fn collect_grads(&self, grads: &Gradients, weight: f32) -> Vec<Tensor<2>> {
        struct Collect<'a> {
            grads: &'a Gradients,
            views: &'a [[usize; 2]],
            device: Device,
            weight: f32,
            out: Vec<Tensor<2>>,
        }
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                let view = self.views[self.out.len()];
                // A parameter the loss does not reach has a zero gradient.
                let g = match p.grad(self.grads) {
                    Some(g) => g.reshape(view).mul_scalar(self.weight),
                    None => Tensor::zeros(view, &self.device),
                };
                self.out.push(g);
            }
        }
        let mut c = Collect {
            grads,
            views: &self.views,
            device: self.device(),
            weight,
            out: Vec::with_capacity(self.views.len()),
        };
        self.model.visit(&mut c);
        c.out
    }

    /// The parameters in model order, each in its `[rows, cols]` view, on the
    /// trainer's device without autodiff.
    pub fn params(&self) -> Vec<Tensor<2>> {
        struct Collect<'a> {
            views: &'a [[usize; 2]],
            out: Vec<Tensor<2>>,
        }
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                let view = self.views[self.out.len()];
                self.out.push(p.val().inner().reshape(view));
            }
        }
        let mut c = Collect {
            views: &self.views,
            out: Vec::with_capacity(self.views.len()),
        };
        self.model.visit(&mut c);
        c.out
    }

    /// The parameters read back to the host, in model order.
    pub fn params_host(&self) -> Result<Vec<Vec<f32>>, TrainError> {
        self.params().into_iter().map(read_vec).collect()
    }

    /// Replaces every parameter (model order, `[rows, cols]` views or any
    /// tensor with the same number of elements).
    pub fn set_params(&mut self, params: Vec<Tensor<2>>) -> Result<(), TrainError> {
        if params.len() != self.views.len() {
            return Err(TrainError::ParamShape {
                index: params.len().min(self.views.len()),
                expected: self.views.len(),
                got: params.len(),
            });
        }
        for (index, (p, v)) in params.iter().zip(&self.views).enumerate() {
            let (expected, got) = (v[0] * v[1], p.shape().num_elements());
            if expected != got {
                return Err(TrainError::ParamShape {
                    index,
                    expected,
                    got,
                });
            }
        }
        struct Set {
            values: std::vec::IntoIter<Tensor<2>>,
            device: Device,
        }
        impl ModuleMapper for Set {
            fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let Some(new) = self.values.next() else {
                    return p;
                };
                let device = self.device.clone();
                p.map(|old| {
                    new.to_device(&device.clone().inner())
                        .reshape(old.dims())
                        .autodiff()
                        .require_grad()
                })
            }
        }
        let model = self.model.clone().map(&mut Set {
            values: params.into_iter(),
            device: self.device.clone(),
        });
        self.model = model;
        Ok(())
    }

    /// Replaces every parameter from host values (model order).
    pub fn set_params_host(&mut self, params: &[Vec<f32>]) -> Result<(), TrainError> {
        let device = self.device();
        let mut tensors = Vec::with_capacity(params.len());
        for (index, (p, v)) in params.iter().zip(&self.views).enumerate() {
            if p.len() != v[0] * v[1] {
                return Err(TrainError::ParamShape {
                    index,
                    expected: v[0] * v[1],
                    got: p.len(),
                });
            }
            tensors.push(Tensor::from_data(TensorData::new(p.clone(), *v), &device));
        }
        self.set_params(tensors)
    }

    /// Mean loss over `batch` without gradients, `micro_batch` rows at a time.
    pub fn eval_loss(&self, batch: &Batch, micro_batch: usize) -> Result<f32, TrainError> {
        let model = self.model.valid();
        let device = self.device();
        let rows = batch.rows();
        let micro = micro_batch.clamp(1, rows.max(1));
        let mut loss = 0.0f64;
        let mut from = 0;
        while from < rows {
            let to = (from + micro).min(rows);
            let (x, y) = batch.tensors(from, to, &device);
            let value = read_scalar(model.loss(x, y))?;
            if !value.is_finite() {
                return Err(TrainError::NonFinite("evaluation loss"));
            }
            loss += f64::from(value) * (to - from) as f64 / rows as f64;
            from = to;
        }
        Ok(loss as f32)
    }

    /// BLAKE3 of the weights as little-endian f32 in model order: equal digests
    /// mean bit-identical replicas.
    pub fn digest(&self) -> Result<blake3::Hash, TrainError> {
        let params = self.params_host()?;
        Ok(starling_distro::weights_digest(
            params.iter().map(Vec::as_slice),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::shards::TokenStore;

    #[allow(deprecated)]
    fn cpu() -> Device {
        Device::ndarray()
    }

    /// The wgpu device for GPU tests; `None` (the test skips) only where
    /// `STARLING_REQUIRE_GPU` is unset and no adapter exists.
    pub(crate) fn test_gpu() -> Option<Device> {
        match starling_distro::gpu::wgpu_device() {
            Ok(d) => Some(d),
            Err(e) => {
                assert!(std::env::var_os("STARLING_REQUIRE_GPU").is_none(), "{e}");
                eprintln!("skipping: {e}");
                None
            }
        }
    }

    pub(crate) fn tiny() -> ModelConfig {
        ModelConfig {
            name: "tiny".into(),
            vocab_size: 32,
            dim: 16,
            layers: 1,
            heads: 2,
            ffn_dim: 32,
            max_seq_len: 16,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
        }
    }

    pub(crate) fn store() -> TokenStore {
        TokenStore::from_tokens(
            (0..4000u32).map(|i| (i * 7 + i / 13) % 32).collect(),
            "test",
            32,
        )
        .unwrap()
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            peak: 1.0,
            warmup: 10,
            total: 110,
            final_fraction: 0.1,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-6);
        assert!((s.lr(110) - 0.1).abs() < 1e-6);
        assert!((s.lr(1000) - 0.1).abs() < 1e-6);
        for step in 10..110 {
            assert!(s.lr(step + 1) <= s.lr(step));
        }
    }

    #[test]
    fn parameter_views_follow_the_stored_shapes() {
        let c = tiny();
        let t = Trainer::new(&c, &cpu(), 1).unwrap();
        let params = t.params();
        let shapes = c.stored_shapes();
        assert_eq!(params.len(), shapes.len());
        for (p, (name, s)) in params.iter().zip(&shapes) {
            assert_eq!(
                p.shape().num_elements(),
                s.iter().product::<usize>(),
                "{name}"
            );
        }
        // The model's own shapes agree: the visitor sees Burn's layout.
        struct Shapes(Vec<Vec<usize>>);
        impl ModuleVisitor for Shapes {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                self.0.push(p.val().dims().to_vec());
            }
        }
        let mut v = Shapes(Vec::new());
        t.model().visit(&mut v);
        let stored: Vec<Vec<usize>> = shapes.into_iter().map(|(_, s)| s).collect();
        assert_eq!(v.0, stored);
    }

    #[test]
    fn accumulation_gives_the_full_batch_gradient() {
        let c = tiny();
        let t = Trainer::new(&c, &cpu(), 1).unwrap();
        let batch = Batch::from_store(&store(), &[0, 100, 200, 300], 8, c.vocab_size).unwrap();
        let full = t.gradients(&batch, 4, 0.0).unwrap();
        let parts = t.gradients(&batch, 1, 0.0).unwrap();
        assert!((full.loss - parts.loss).abs() < 1e-5);
        assert!((full.norm - parts.norm).abs() < 1e-4 * full.norm);
        for (a, b) in full.tensors.into_iter().zip(parts.tensors) {
            let (a, b) = (read_vec(a).unwrap(), read_vec(b).unwrap());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5 + 1e-4 * x.abs(), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let c = tiny();
        let t = Trainer::new(&c, &cpu(), 1).unwrap();
        let batch = Batch::from_store(&store(), &[0, 50], 8, c.vocab_size).unwrap();
        let raw = t.gradients(&batch, 2, 0.0).unwrap();
        let clip = raw.norm / 4.0;
        let clipped = t.gradients(&batch, 2, clip).unwrap();
        assert_eq!(
            clipped.norm, raw.norm,
            "the norm reported is before clipping"
        );
        let n: f32 = clipped
            .tensors
            .into_iter()
            .map(|g| read_vec(g).unwrap().iter().map(|x| x * x).sum::<f32>())
            .sum::<f32>()
            .sqrt();
        assert!((n - clip).abs() < 1e-4 * clip, "{n} vs {clip}");
    }

    #[test]
    fn params_round_trip_through_the_host() {
        let c = tiny();
        let mut t = Trainer::new(&c, &cpu(), 1).unwrap();
        let mut host = t.params_host().unwrap();
        host[3][5] += 0.25;
        t.set_params_host(&host).unwrap();
        assert_eq!(t.params_host().unwrap(), host);
        // Still trainable: the new leaves take gradients.
        let batch = Batch::from_store(&store(), &[0], 8, c.vocab_size).unwrap();
        let g = t.gradients(&batch, 1, 0.0).unwrap();
        assert!(g.norm > 0.0);
        host.pop();
        assert!(matches!(
            t.set_params_host(&host),
            Err(TrainError::ParamShape { .. })
        ));
    }

    #[test]
    fn bad_windows_and_tokens_are_errors() {
        let s = store();
        assert!(matches!(
            Batch::from_store(&s, &[3990], 16, 32),
            Err(TrainError::Window { .. })
        ));
        assert!(matches!(
            Batch::from_store(&s, &[0], 8, 16),
            Err(TrainError::Token { .. })
        ));
        assert!(matches!(
            Batch::from_store(&s, &[], 8, 32),
            Err(TrainError::EmptyBatch)
        ));
        let short = &s.tokens()[..5];
        assert!(matches!(
            Batch::from_windows(&[short], 8, 32),
            Err(TrainError::WindowLength {
                len: 5,
                expected: 9
            })
        ));
        let fetched = [&s.tokens()[10..19], &s.tokens()[40..49]];
        assert_eq!(
            Batch::from_windows(&fetched, 8, 32).unwrap(),
            Batch::from_store(&s, &[10, 40], 8, 32).unwrap()
        );
    }
}
