//! The two ways a step's gradients become new weights: DisTrO (each peer
//! keeps its own momentum and sends a sparse update; every peer applies the
//! same accepted set with the distro crate's deterministic apply) and AdamW
//! on all-reduced gradients, the baseline DisTrO is measured against.
//!
//! DisTrO runs where the model runs: on a wgpu device the momentum stays on
//! the GPU ([`GpuDistro`], WGSL kernels where they win), on the CPU backend it
//! is the host implementation. Both give the same bits, so peers on different
//! hardware stay identical.

use burn::tensor::{Tensor, TensorData};
use starling_distro::gpu::{GpuDistro, GpuError, KernelPath, is_wgpu};
use starling_distro::{
    ApplyError, ApplyReport, DistroConfig, DistroOptimizer, IncomingUpdate, ModelLayout,
    OutgoingUpdate, StepError, StepOptions,
};

use crate::trainer::{StepGrads, TrainError, Trainer};

/// Why an optimizer step or apply failed. Weights and momentum are unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptimError {
    /// The host DisTrO rejected the step.
    #[error(transparent)]
    Step(#[from] StepError),
    /// The host DisTrO rejected the updates.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The device DisTrO failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// Reading or writing the model failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// Checkpointed state does not fit this model.
    #[error("optimizer state: {0}")]
    State(String),
}

/// Where a peer's DisTrO momentum lives.
#[derive(Debug)]
enum Engine {
    Host(DistroOptimizer),
    Device(Box<GpuDistro>),
}

/// One peer's DisTrO state for a [`Trainer`]'s model.
#[derive(Debug)]
pub struct DistroPeer {
    engine: Engine,
}

impl DistroPeer {
    /// Zero momentum for `trainer`'s model, on its device when that is a GPU.
    pub fn new(trainer: &Trainer, config: DistroConfig) -> Result<Self, OptimError> {
        let shapes = trainer.shapes();
        let device = trainer.device();
        let engine = if is_wgpu(&device) {
            Engine::Device(Box::new(GpuDistro::new(
                &shapes,
                config,
                &device,
                KernelPath::Auto,
            )?))
        } else {
            Engine::Host(DistroOptimizer::new(&shapes, config))
        };
        Ok(Self { engine })
    }

    /// True when the momentum lives on the GPU.
    pub fn on_device(&self) -> bool {
        matches!(self.engine, Engine::Device(_))
    }

    /// Tensor shapes, chunking and settings.
    pub fn layout(&self) -> &ModelLayout {
        match &self.engine {
            Engine::Host(o) => o.layout(),
            Engine::Device(g) => g.layout(),
        }
    }

    /// Folds this peer's gradients into its momentum and returns the sparse
    /// update to send, with this round's `options` (its top-k, e.g. what
    /// fits the bandwidth budget).
    pub fn step(
        &mut self,
        grads: &StepGrads,
        lr: f32,
        options: StepOptions,
    ) -> Result<OutgoingUpdate, OptimError> {
        Ok(match &mut self.engine {
            Engine::Host(o) => {
                let host: Vec<Vec<f32>> = grads
                    .tensors
                    .iter()
                    .map(|g| g.clone().try_into_vec_as::<f32>().map_err(TrainError::Read))
                    .collect::<Result<_, _>>()?;
                let views: Vec<&[f32]> = host.iter().map(Vec::as_slice).collect();
                o.step(&views, lr, options)?
            }
            Engine::Device(g) => g.step(&grads.tensors, lr, options)?,
        })
    }

    /// Applies the round's accepted updates to `trainer`'s weights.
    pub fn apply(
        &self,
        trainer: &mut Trainer,
        updates: &[IncomingUpdate],
        lr: f32,
    ) -> Result<ApplyReport, OptimError> {
        match &self.engine {
            Engine::Host(o) => {
                let mut params = trainer.params_host()?;
                let mut views: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
                let report = o.apply(&mut views, updates, lr)?;
                trainer.set_params_host(&params)?;
                Ok(report)
            }
            Engine::Device(g) => {
                let mut params = trainer.params();
                let report = g.apply(&mut params, updates, lr)?;
                trainer.set_params(params)?;
                Ok(report)
            }
        }
    }

    /// The momentum, read back to the host in model order (for checkpoints).
    pub fn momentum(&self) -> Result<Vec<Vec<f32>>, OptimError> {
        let n = self.layout().tensors().len();
        (0..n)
            .map(|i| match &self.engine {
                Engine::Host(o) => o
                    .momentum(i)
                    .map(<[f32]>::to_vec)
                    .ok_or_else(|| OptimError::State(format!("no momentum {i}"))),
                Engine::Device(g) => g
                    .momentum(i)
                    .ok_or_else(|| OptimError::State(format!("no momentum {i}")))?
                    .clone()
                    .try_into_vec_as::<f32>()
                    .map_err(|e| OptimError::Train(TrainError::Read(e))),
            })
            .collect()
    }

    /// Restores the momentum saved by [`Self::momentum`]. Checked in full
    /// before anything changes.
    pub fn set_momentum(&mut self, momentum: &[Vec<f32>]) -> Result<(), OptimError> {
        let tensors = self.layout().tensors();
        if momentum.len() != tensors.len() {
            return Err(OptimError::State(format!(
                "{} momentum tensors for a model of {}",
                momentum.len(),
                tensors.len()
            )));
        }
        for (i, (m, t)) in momentum.iter().zip(tensors).enumerate() {
            if m.len() != t.grid.numel() || m.iter().any(|x| !x.is_finite()) {
                return Err(OptimError::State(format!(
                    "momentum {i}: {} values (the model has {}) or non-finite values",
                    m.len(),
                    t.grid.numel()
                )));
            }
        }
        match &mut self.engine {
            Engine::Host(o) => {
                for (i, m) in momentum.iter().enumerate() {
                    o.set_momentum(i, m)?;
                }
            }
            Engine::Device(g) => {
                let device = g.device().clone();
                let views: Vec<[usize; 2]> = g
                    .layout()
                    .tensors()
                    .iter()
                    .map(starling_distro::gpu::matrix_shape)
                    .collect();
                for (i, (m, v)) in momentum.iter().zip(views).enumerate() {
                    g.set_momentum(i, Tensor::from_data(TensorData::new(m.clone(), v), &device))?;
                }
            }
        }
        Ok(())
    }
}

/// AdamW's hyper-parameters (learning rate excepted: it follows the schedule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    /// Decoupled weight decay, applied to matrices (not to norm gains).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// The settings of the calibration runs (GPT-style betas 0.9/0.95, decay 0.1).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW's moments on the host, for checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    /// First moments, model order, `[rows, cols]` flattened.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
    /// Steps taken (for bias correction).
    pub steps: u64,
}

/// AdamW on the trainer's device, for gradients already averaged over peers.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    decays: Vec<bool>,
    m: Vec<Tensor<2>>,
    v: Vec<Tensor<2>>,
    steps: u64,
}

impl AdamW {
    /// Zero moments for `trainer`'s model.
    pub fn new(trainer: &Trainer, config: AdamWConfig) -> Self {
        let params = trainer.params();
        let zeros = || {
            params
                .iter()
                .map(|p| Tensor::zeros(p.dims(), &p.device()))
                .collect::<Vec<_>>()
        };
        Self {
            config,
            decays: trainer.shapes().iter().map(|s| s.len() >= 2).collect(),
            m: zeros(),
            v: zeros(),
            steps: 0,
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One AdamW update of `trainer`'s weights from `grads` (model order,
    /// `[rows, cols]` views).
    pub fn step(
        &mut self,
        trainer: &mut Trainer,
        grads: &[Tensor<2>],
        lr: f32,
    ) -> Result<(), OptimError> {
        if grads.len() != self.m.len() {
            return Err(OptimError::State(format!(
                "{} gradients for a model of {}",
                grads.len(),
                self.m.len()
            )));
        }
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(StepError::LearningRate(lr).into());
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let t = (self.steps + 1) as i32;
        let c1 = 1.0 - beta1.powi(t);
        let c2 = 1.0 - beta2.powi(t);
        let params = trainer.params();
        let mut new_params = Vec::with_capacity(params.len());
        let (mut new_m, mut new_v) = (Vec::new(), Vec::new());
        for (i, (p, g)) in params.into_iter().zip(grads).enumerate() {
            let m = self.m[i].clone().mul_scalar(beta1) + g.clone().mul_scalar(1.0 - beta1);
            let v =
                self.v[i].clone().mul_scalar(beta2) + g.clone().square().mul_scalar(1.0 - beta2);
            let update = m.clone().div_scalar(c1) / v.clone().div_scalar(c2).sqrt().add_scalar(eps);
            let p = if self.decays[i] {
                p.mul_scalar(1.0 - lr * weight_decay)
            } else {
                p
            };
            new_params.push(p - update.mul_scalar(lr));
            new_m.push(m);
            new_v.push(v);
        }
        trainer.set_params(new_params)?;
        self.m = new_m;
        self.v = new_v;
        self.steps += 1;
        Ok(())
    }

    /// Moments and step count, read back to the host (for checkpoints).
    pub fn state(&self) -> Result<AdamWState, OptimError> {
        let read = |ts: &[Tensor<2>]| -> Result<Vec<Vec<f32>>, OptimError> {
            ts.iter()
                .map(|t| {
                    t.clone()
                        .try_into_vec_as::<f32>()
                        .map_err(|e| OptimError::Train(TrainError::Read(e)))
                })
                .collect()
        };
        Ok(AdamWState {
            m: read(&self.m)?,
            v: read(&self.v)?,
            steps: self.steps,
        })
    }

    /// Restores what [`Self::state`] returned. Checked before anything changes.
    pub fn set_state(&mut self, state: &AdamWState) -> Result<(), OptimError> {
        let (m, v) = (&state.m, &state.v);
        let n = self.m.len();
        if m.len() != n || v.len() != n {
            return Err(OptimError::State(format!(
                "{}/{} moment tensors for a model of {n}",
                m.len(),
                v.len()
            )));
        }
        let upload =
            |host: &[Vec<f32>], like: &[Tensor<2>]| -> Result<Vec<Tensor<2>>, OptimError> {
                host.iter()
                    .zip(like)
                    .enumerate()
                    .map(|(i, (h, t))| {
                        let dims = t.dims();
                        if h.len() != dims[0] * dims[1] || h.iter().any(|x| !x.is_finite()) {
                            return Err(OptimError::State(format!("moment {i} does not fit")));
                        }
                        Ok(Tensor::from_data(
                            TensorData::new(h.clone(), dims),
                            &t.device(),
                        ))
                    })
                    .collect()
            };
        let (m, v) = (upload(m, &self.m)?, upload(v, &self.v)?);
        self.m = m;
        self.v = v;
        self.steps = state.steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::Batch;
    use crate::trainer::tests::{store, tiny};
    use burn::tensor::Device;
    use starling_distro::ValueEncoding;

    #[allow(deprecated)]
    fn cpu() -> Device {
        Device::ndarray()
    }

    fn loss_after(
        steps: usize,
        mut update: impl FnMut(&mut Trainer, &StepGrads, u64),
    ) -> (f32, f32) {
        let c = tiny();
        let mut t = Trainer::new(&c, &cpu(), 1).unwrap();
        let s = store();
        let batch = Batch::from_store(&s, &[0, 700, 1400, 2100], 12, c.vocab_size).unwrap();
        let first = t.eval_loss(&batch, 4).unwrap();
        for step in 0..steps {
            let g = t.gradients(&batch, 4, 1.0).unwrap();
            update(&mut t, &g, step as u64);
        }
        (first, t.eval_loss(&batch, 4).unwrap())
    }

    #[test]
    fn adamw_fits_a_batch() {
        let c = tiny();
        let probe = Trainer::new(&c, &cpu(), 1).unwrap();
        let mut opt = AdamW::new(&probe, AdamWConfig::default());
        let (before, after) = loss_after(30, |t, g, _| opt.step(t, &g.tensors, 1e-2).unwrap());
        assert!(after < 0.5 * before, "{before} -> {after}");
        assert_eq!(opt.steps(), 30);
    }

    #[test]
    fn distro_fits_a_batch_and_its_momentum_round_trips() {
        let c = tiny();
        let probe = Trainer::new(&c, &cpu(), 1).unwrap();
        let config = DistroConfig {
            topk: 8,
            values: ValueEncoding::Sign,
            ..DistroConfig::default()
        };
        let mut peer = DistroPeer::new(&probe, config).unwrap();
        assert!(!peer.on_device());
        let (before, after) = loss_after(30, |t, g, _| {
            let out = peer.step(g, 5e-3, config.step_options()).unwrap();
            peer.apply(t, &[out.into_incoming([1; 32])], 5e-3).unwrap();
        });
        assert!(after < 0.8 * before, "{before} -> {after}");
        let m = peer.momentum().unwrap();
        let mut other = DistroPeer::new(&probe, config).unwrap();
        other.set_momentum(&m).unwrap();
        assert_eq!(other.momentum().unwrap(), m);
        let mut bad = m.clone();
        bad[0].pop();
        assert!(other.set_momentum(&bad).is_err());
        assert_eq!(
            other.momentum().unwrap(),
            m,
            "a rejected restore changes nothing"
        );
    }

    #[test]
    fn gpu_and_cpu_distro_peers_produce_the_same_weights() {
        let Some(gpu) = crate::trainer::tests::test_gpu() else {
            return;
        };
        let c = tiny();
        let mut on_cpu = Trainer::new(&c, &cpu(), 1).unwrap();
        let mut on_gpu = Trainer::new(&c, &gpu, 1).unwrap();
        on_gpu
            .set_params_host(&on_cpu.params_host().unwrap())
            .unwrap();
        let config = DistroConfig {
            topk: 8,
            ..DistroConfig::default()
        };
        let mut p_cpu = DistroPeer::new(&on_cpu, config).unwrap();
        let mut p_gpu = DistroPeer::new(&on_gpu, config).unwrap();
        assert!(p_gpu.on_device());
        let s = store();
        let batch = Batch::from_store(&s, &[0, 900], 12, c.vocab_size).unwrap();
        for _ in 0..2 {
            // Both apply the same update (the CPU peer's), as a swarm would.
            let g = on_cpu.gradients(&batch, 2, 1.0).unwrap();
            let out = p_cpu.step(&g, 1e-2, config.step_options()).unwrap();
            let g_gpu = on_gpu.gradients(&batch, 2, 1.0).unwrap();
            p_gpu.step(&g_gpu, 1e-2, config.step_options()).unwrap();
            let update = [out.into_incoming([3; 32])];
            p_cpu.apply(&mut on_cpu, &update, 1e-2).unwrap();
            p_gpu.apply(&mut on_gpu, &update, 1e-2).unwrap();
            assert_eq!(on_cpu.digest().unwrap(), on_gpu.digest().unwrap());
        }
    }
}
