//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! One safetensors file holds the weights (under `transformers`' names, in
//! Starling's stored layout, see [`ModelConfig::stored_shapes`]), every
//! optimizer state (DisTrO momentum per peer, or AdamW's moments) and, in its
//! metadata, the model config and the step. Being one file, it is replaced
//! atomically: a crash while saving leaves the previous checkpoint intact.
//! `config.json` next to it repeats the model config for people and tools.
//! Loading checks every name, shape and value before anything uses it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::config::{ConfigError, ModelConfig};
use crate::optim::AdamWState;

/// The checkpoint file inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The model config next to it.
pub const CONFIG_FILE: &str = "config.json";
const FORMAT: &str = "starling-checkpoint-v1";

/// Optimizer state saved with the weights.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerSnapshot {
    /// DisTrO momentum: one list of tensors (model order) per peer.
    Distro(Vec<Vec<Vec<f32>>>),
    /// AdamW moments.
    AdamW(AdamWState),
}

/// A run's state at the end of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The model's size and shape.
    pub model: ModelConfig,
    /// Steps completed (the next step to run).
    pub step: u64,
    /// Run seed.
    pub seed: u64,
    /// Weights in model order, stored layout.
    pub params: Vec<Vec<f32>>,
    /// Optimizer state.
    pub optimizer: OptimizerSnapshot,
}

/// Why a checkpoint could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading or writing failed (missing file, full disk, ...).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a readable safetensors file.
    #[error("{path}: not a valid safetensors file: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the safetensors reader said.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// The tensors could not be serialised as safetensors.
    #[error("{path}: cannot serialize the tensors: {source}")]
    Serialize {
        /// The file.
        path: PathBuf,
        /// What the safetensors writer said.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// The model config or the checkpoint metadata is not valid JSON (or
    /// could not be written as JSON).
    #[error("{path}: {what}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Which JSON: `model config` or `checkpoint metadata`.
        what: &'static str,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// The model config in the metadata is not a usable model.
    #[error("{path}: model config: {source}")]
    Model {
        /// The file.
        path: PathBuf,
        /// Why the model is unusable.
        #[source]
        source: ConfigError,
    },
    /// The file is readable but its content does not add up.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What the metadata records besides the tensors.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: String,
    model: ModelConfig,
    step: u64,
    seed: u64,
    optimizer: String,
    peers: usize,
    adamw_steps: u64,
}

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Checkpoint {
    fn names(&self) -> Vec<(String, Vec<usize>)> {
        self.model.stored_shapes()
    }

    /// Writes `dir/checkpoint.safetensors` and `dir/config.json` (creating `dir`).
    pub fn save(&self, dir: &Path) -> Result<(), CheckpointError> {
        let path = dir.join(CHECKPOINT_FILE);
        let file = self.encode(&path)?;
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let config_path = dir.join(CONFIG_FILE);
        let config =
            serde_json::to_vec_pretty(&self.model).map_err(|source| CheckpointError::Json {
                path: config_path.clone(),
                what: "model config",
                source,
            })?;
        write_atomic(&config_path, &config).map_err(|source| CheckpointError::Io {
            path: config_path,
            source,
        })?;
        write_atomic(&path, &file).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })
    }

    /// The checkpoint as the bytes of one safetensors file (what `save`
    /// writes and `from_bytes` reads), e.g. to serve it as a blob.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        self.encode(Path::new("<bytes>"))
    }

    fn encode(&self, path: &Path) -> Result<Vec<u8>, CheckpointError> {
        let invalid = |reason: String| CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let names = self.names();
        let (optimizer, peers, adamw_steps) = match &self.optimizer {
            OptimizerSnapshot::Distro(m) => ("distro", m.len(), 0),
            OptimizerSnapshot::AdamW(s) => ("adamw", 0, s.steps),
        };
        // Every tensor as (name, shape, little-endian bytes).
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut add = |prefix: &str, values: &[Vec<f32>]| -> Result<(), CheckpointError> {
            if values.len() != names.len() {
                return Err(invalid(format!(
                    "{prefix}: {} tensors for a model of {}",
                    values.len(),
                    names.len()
                )));
            }
            for ((name, shape), v) in names.iter().zip(values) {
                if v.len() != shape.iter().product::<usize>() {
                    return Err(invalid(format!("{prefix}{name}: wrong size")));
                }
                tensors.push((format!("{prefix}{name}"), shape.clone(), bytes_of(v)));
            }
            Ok(())
        };
        add("", &self.params)?;
        match &self.optimizer {
            OptimizerSnapshot::Distro(per_peer) => {
                for (p, m) in per_peer.iter().enumerate() {
                    add(&format!("optim.{p}.momentum."), m)?;
                }
            }
            OptimizerSnapshot::AdamW(s) => {
                add("optim.adam_m.", &s.m)?;
                add("optim.adam_v.", &s.v)?;
            }
        }
        let meta = Meta {
            format: FORMAT.into(),
            model: self.model.clone(),
            step: self.step,
            seed: self.seed,
            optimizer: optimizer.into(),
            peers,
            adamw_steps,
        };
        let meta_json = serde_json::to_string(&meta).map_err(|source| CheckpointError::Json {
            path: path.to_path_buf(),
            what: "checkpoint metadata",
            source,
        })?;
        let serialize = |source| CheckpointError::Serialize {
            path: path.to_path_buf(),
            source,
        };
        let views = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(serialize)?;
        let info = HashMap::from([("starling".to_string(), meta_json)]);
        safetensors::serialize(views, Some(info)).map_err(serialize)
    }

    /// Reads and fully checks `dir/checkpoint.safetensors`.
    pub fn load(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(CHECKPOINT_FILE);
        let bytes = std::fs::read(&path).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Checks and decodes the bytes of a checkpoint file (e.g. one fetched
    /// from a peer); errors name it `<bytes>`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CheckpointError> {
        Self::parse(bytes, PathBuf::from("<bytes>"))
    }

    fn parse(bytes: &[u8], path: PathBuf) -> Result<Self, CheckpointError> {
        let format = |source| CheckpointError::Format {
            path: path.clone(),
            source,
        };
        let invalid = |reason: String| CheckpointError::Invalid {
            path: path.clone(),
            reason,
        };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(format)?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("starling"))
            .ok_or_else(|| invalid("no Starling metadata: not a Starling checkpoint".into()))?;
        let meta: Meta =
            serde_json::from_str(meta_json).map_err(|source| CheckpointError::Json {
                path: path.clone(),
                what: "checkpoint metadata",
                source,
            })?;
        if meta.format != FORMAT {
            return Err(invalid(format!(
                "format {:?}, expected {FORMAT:?}",
                meta.format
            )));
        }
        meta.model
            .validate()
            .map_err(|source| CheckpointError::Model {
                path: path.clone(),
                source,
            })?;
        let st = SafeTensors::deserialize(bytes).map_err(format)?;
        let names = meta.model.stored_shapes();
        let read = |prefix: &str| -> Result<Vec<Vec<f32>>, CheckpointError> {
            names
                .iter()
                .map(|(name, shape)| {
                    let full = format!("{prefix}{name}");
                    let view = st
                        .tensor(&full)
                        .map_err(|_| invalid(format!("tensor {full} is missing")))?;
                    if view.dtype() != Dtype::F32 || view.shape() != shape.as_slice() {
                        return Err(invalid(format!(
                            "tensor {full} is {:?} {:?}, expected F32 {shape:?}",
                            view.dtype(),
                            view.shape()
                        )));
                    }
                    let values: Vec<f32> = view
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    if values.iter().any(|x| !x.is_finite()) {
                        return Err(invalid(format!("tensor {full} holds NaN or infinity")));
                    }
                    Ok(values)
                })
                .collect()
        };
        let params = read("")?;
        let optimizer = match meta.optimizer.as_str() {
            "distro" => {
                if meta.peers > 4096 {
                    return Err(invalid(format!("{} peers is not plausible", meta.peers)));
                }
                OptimizerSnapshot::Distro(
                    (0..meta.peers)
                        .map(|p| read(&format!("optim.{p}.momentum.")))
                        .collect::<Result<_, _>>()?,
                )
            }
            "adamw" => OptimizerSnapshot::AdamW(AdamWState {
                m: read("optim.adam_m.")?,
                v: read("optim.adam_v.")?,
                steps: meta.adamw_steps,
            }),
            other => return Err(invalid(format!("unknown optimizer {other:?}"))),
        };
        let expected = names.len()
            * (1 + match &optimizer {
                OptimizerSnapshot::Distro(m) => m.len(),
                OptimizerSnapshot::AdamW(_) => 2,
            });
        if st.len() != expected {
            return Err(invalid(format!(
                "{} tensors, expected {expected}",
                st.len()
            )));
        }
        Ok(Self {
            model: meta.model,
            step: meta.step,
            seed: meta.seed,
            params,
            optimizer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::initial_params;
    use crate::trainer::tests::tiny;
    use proptest::prelude::*;

    fn valid_bytes() -> Vec<u8> {
        let dir = scratch("bytes");
        sample(OptimizerSnapshot::Distro(vec![initial_params(&tiny(), 2)]))
            .save(&dir)
            .unwrap();
        let bytes = std::fs::read(dir.join(CHECKPOINT_FILE)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Checkpoints may come from other peers: damaged bytes anywhere
        /// (most often in the header, where sizes and names live) give an
        /// error or a fully valid checkpoint, never a panic.
        #[test]
        fn corrupted_bytes_never_panic(
            edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..100_000),
        ) {
            let mut bytes = valid_bytes();
            for (at, value) in edits {
                let i = at % bytes.len();
                bytes[i] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.min(bytes.len()));
            }
            if let Ok(ck) = Checkpoint::from_bytes(&bytes) {
                prop_assert_eq!(ck.params.len(), ck.model.stored_shapes().len());
                prop_assert!(ck.params.iter().flatten().all(|x| x.is_finite()));
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Checkpoint::from_bytes(&bytes);
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("starling-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn sample(optimizer: OptimizerSnapshot) -> Checkpoint {
        let model = tiny();
        Checkpoint {
            params: initial_params(&model, 3),
            model,
            step: 17,
            seed: 3,
            optimizer,
        }
    }

    #[test]
    fn both_optimizers_round_trip() {
        let c = tiny();
        let m = initial_params(&c, 9);
        for opt in [
            OptimizerSnapshot::Distro(vec![m.clone(), initial_params(&c, 10)]),
            OptimizerSnapshot::AdamW(AdamWState {
                m: m.clone(),
                v: initial_params(&c, 11),
                steps: 17,
            }),
        ] {
            let dir = scratch("roundtrip");
            let ck = sample(opt);
            ck.save(&dir).unwrap();
            assert_eq!(Checkpoint::load(&dir).unwrap(), ck);
            let config: ModelConfig =
                serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
            assert_eq!(config, c);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn damaged_checkpoints_are_refused_with_a_reason() {
        let dir = scratch("damaged");
        let ck = sample(OptimizerSnapshot::Distro(vec![initial_params(&tiny(), 1)]));
        ck.save(&dir).unwrap();
        let path = dir.join(CHECKPOINT_FILE);
        let good = std::fs::read(&path).unwrap();
        // Truncated.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(matches!(
            Checkpoint::load(&dir),
            Err(CheckpointError::Format { .. })
        ));
        // Not a checkpoint at all.
        std::fs::write(&path, b"hello").unwrap();
        assert!(Checkpoint::load(&dir).is_err());
        // A NaN in the weights.
        let mut bad = ck.clone();
        bad.params[0][0] = f32::NAN;
        bad.save(&dir).unwrap();
        let err = Checkpoint::load(&dir).unwrap_err().to_string();
        assert!(err.contains("NaN"), "{err}");
        // Missing file.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            Checkpoint::load(&dir),
            Err(CheckpointError::Io { .. })
        ));
        // Wrong sizes are refused on save, and the old file stays.
        ck.save(&dir).unwrap();
        let mut short = ck.clone();
        short.params[1].pop();
        assert!(short.save(&dir).is_err());
        assert_eq!(Checkpoint::load(&dir).unwrap(), ck);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
