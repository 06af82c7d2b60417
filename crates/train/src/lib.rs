//! One volunteer's share of training: the data a peer trains on, and (as the
//! engine grows) the model and its step.
//!
//! Today this crate holds the model sizes (shared with DisTrO's chunking and
//! the Hugging Face export) and the data pipeline: tokenizers, pre-tokenized
//! shards, the project's own embedded corpus, and the deterministic assignment
//! of batches to peers that makes a run reproducible and checkable.

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
pub use data::corpus::embedded_corpus;
pub use data::sampling::{Sampler, Split};
pub use data::shards::{ShardError, ShardIndex, TokenDtype, TokenStore};
pub use data::tokenizer::{ByteTokenizer, Tokenizer, TokenizerError};
pub use device::{DeviceChoice, DeviceError, SelectedDevice, select_device};
pub use export::{ExportError, export_hf};
pub use model::Llama;
pub use optim::{AdamW, AdamWConfig, AdamWState, DistroPeer, OptimError};
pub use sim::{SimConfig, SimError, SimOptimizer, SimSummary, Simulation, StepRecord, simulate};
pub use trainer::{Batch, Schedule, StepGrads, TrainError, Trainer, initial_params};
