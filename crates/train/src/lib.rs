//! One volunteer's share of training, independent of how updates travel:
//! the model and where it runs, the step that turns a batch into gradients,
//! the two optimizers (DisTrO and the AdamW baseline), the data a peer trains
//! on, checkpoints and the Hugging Face export. The swarm drives these a round
//! at a time; `sim` drives them for several peers in one process to measure
//! what DisTrO saves and costs. See `docs/TRAINING.md`.

pub mod atomic;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod export;
pub mod model;
pub mod optim;
pub mod sim;
pub mod trainer;

pub use checkpoint::{Checkpoint, CheckpointError, OptimizerSnapshot};
pub use config::{ConfigError, ModelConfig};
pub use data::corpus::{embedded_corpus, embedded_store};
pub use data::sampling::{Sampler, SamplerError, Split};
pub use data::shards::{ShardError, ShardIndex, TokenDtype, TokenStore};
pub use data::tokenizer::{ByteTokenizer, Tokenizer, TokenizerError};
pub use device::{DeviceChoice, DeviceError, SelectedDevice, select_device};
pub use export::{ExportError, export_hf};
pub use model::Llama;
pub use optim::{AdamW, AdamWConfig, AdamWState, DistroPeer, OptimError};
pub use sim::{
    Adversary, Attack, SimConfig, SimError, SimOptimizer, SimSummary, Simulation, StepRecord,
    simulate,
};
pub use trainer::{Batch, Schedule, StepGrads, TrainError, Trainer, initial_params};
