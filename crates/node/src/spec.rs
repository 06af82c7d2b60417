//! What a run is: the host's `RUN.toml`, and the resolved spec it ships to
//! every volunteer.
//!
//! The TOML is for people (presets by name, sensible defaults, unknown keys
//! rejected so a typo is an error rather than a silently ignored setting). The
//! resolved [`RunSpec`] is for machines: the full model config rather than a
//! preset name, so a volunteer never needs the host's files to reproduce the
//! exact model, data and schedule every replica must agree on.

use std::path::Path;

use serde::{Deserialize, Serialize};
use starling_distro::{DistroConfig, ValueEncoding};
use starling_train::{ModelConfig, Schedule, data::shards::TokenStore};

use crate::data::{DataError, DataRef, load_tokens};

/// Why a run file was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML, or unknown/mistyped keys.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// Not a valid resolved spec.
    #[error("run spec is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The model is neither a preset nor a readable config.
    #[error("model {name:?}: {source}")]
    Model {
        /// What the run file says.
        name: String,
        /// Why it is unusable.
        source: starling_train::ConfigError,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The run's data is missing or unusable.
    #[error("data: {0}")]
    Data(#[from] DataError),
}

/// The host's run file, as written by a person.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// What is trained.
    #[serde(default)]
    pub run: RunSection,
    /// Round timing and acceptance.
    #[serde(default)]
    pub rounds: RoundsSection,
    /// Who may join.
    #[serde(default)]
    pub members: MembersSection,
}

/// `[run]`: model, data, optimizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// A human name for the run.
    pub name: String,
    /// A model preset or the path of a model config JSON.
    pub model: String,
    /// Seed of the initial weights and of every batch.
    pub seed: u64,
    /// Rounds to run (0: until stopped).
    pub total_rounds: u64,
    /// A shard directory from `starling data prepare` (relative to the run
    /// file); empty: the embedded corpus.
    pub data: String,
    /// Bytes of the embedded corpus (when `data` is empty).
    pub corpus_bytes: usize,
    /// Sequences each member trains on per round.
    pub batch: usize,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Warmup rounds.
    pub warmup: u64,
    /// Final learning rate as a fraction of the peak (cosine over `total_rounds`).
    pub final_lr: f32,
    /// Per-member global-norm gradient clipping (0: off).
    pub clip: f32,
    /// DCT components kept per chunk at most (a member may send fewer to fit its cap).
    pub topk: usize,
    /// `"f32"`, `"bf16"` or `"sign"`.
    pub values: String,
    /// Momentum decay.
    pub decay: f32,
    /// Held-out sequences per evaluation.
    pub eval_sequences: usize,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            name: "starling run".into(),
            model: "nano".into(),
            seed: 0,
            total_rounds: 0,
            data: String::new(),
            corpus_bytes: 2 << 20,
            batch: 4,
            micro_batch: 4,
            seq_len: 64,
            lr: 3e-3,
            warmup: 10,
            final_lr: 0.1,
            clip: 1.0,
            topk: 32,
            values: "f32".into(),
            decay: 0.999,
            eval_sequences: 16,
        }
    }
}

/// `[rounds]`: timing, checkpoints, acceptance.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoundsSection {
    /// Seconds from a round's opening to its deadline for announces.
    pub window_secs: f64,
    /// Close a round early once every member has announced.
    pub close_when_complete: bool,
    /// Open a round only once this many members have joined.
    pub min_members: usize,
    /// Write a checkpoint every this many rounds.
    pub checkpoint_every: u64,
    /// Members report their weight hash every this many rounds.
    pub report_every: u64,
    /// Evaluate the held-out loss every this many rounds (on the host).
    pub eval_every: u64,
    /// Largest update accepted, in bytes.
    pub max_update_bytes: u64,
    /// Leave out updates whose values (RMS) are over this multiple of the
    /// round's median, and clip the rest to the median (0: neither).
    pub robust_norm_factor: f32,
    /// Leave out updates whose signs agree with the others' this many
    /// standard errors below half the round's median agreement (0: off).
    pub robust_min_agreement: f32,
    /// Malformed updates within `fault_window` rounds after which a member
    /// is removed from the run.
    pub max_faults: u32,
    /// Rounds a fault counts for.
    pub fault_window: u64,
    /// Cap the round's aggregate at this many coefficients per chunk, the
    /// rest carried to the next round (`None`: send the exact aggregate).
    /// Fixes what every volunteer downloads per round, whatever the member
    /// count.
    pub aggregate_topk: Option<usize>,
    /// Seconds a provider may send nothing in the middle of a transfer
    /// before the blob is fetched from the next one.
    pub stall_secs: f64,
    /// Share of a round's kept updates whose announced loss and tokens the
    /// host recomputes (a forward pass on the sender's batch each); a
    /// mismatch is a fault (0: never).
    pub spot_check_rate: f64,
}

impl RoundsSection {
    /// Whether the coordinator checkpoints after applying `round` (every
    /// member holding that round's weights can then serve the checkpoint).
    pub fn checkpoints_after(&self, round: u64) -> bool {
        round
            .saturating_add(1)
            .is_multiple_of(self.checkpoint_every)
    }
}

impl Default for RoundsSection {
    fn default() -> Self {
        Self {
            window_secs: 30.0,
            close_when_complete: true,
            min_members: 1,
            checkpoint_every: 10,
            report_every: 5,
            eval_every: 5,
            max_update_bytes: 8 << 20,
            robust_norm_factor: 5.0,
            robust_min_agreement: starling_distro::robust::DEFAULT_MIN_AGREEMENT,
            max_faults: 3,
            fault_window: 50,
            aggregate_topk: None,
            stall_secs: starling_swarm::DEFAULT_STALL_TIMEOUT.as_secs_f64(),
            spot_check_rate: 0.25,
        }
    }
}

/// Most sequences a batch (or the held-out set) may have: a spec can come
/// from a run's host, and this bounds what it can make a volunteer sample.
pub const MAX_BATCH: usize = 1 << 16;

/// `[members]`: who may connect.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MembersSection {
    /// Endpoint ids allowed to join; empty means anyone with the ticket.
    pub allow: Vec<String>,
}

/// The resolved run every replica reproduces exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The full model config.
    pub model: ModelConfig,
    /// The `[run]` settings (`model` keeps the name the host gave).
    pub run: RunSection,
    /// Round settings.
    pub rounds: RoundsSection,
    /// The token stream the host serves.
    pub data: DataRef,
}

fn parse_values(s: &str) -> Result<ValueEncoding, SpecError> {
    match s {
        "f32" => Ok(ValueEncoding::F32),
        "bf16" => Ok(ValueEncoding::Bf16),
        "sign" => Ok(ValueEncoding::Sign),
        other => Err(SpecError::Invalid(format!(
            "values = {other:?}: use \"f32\", \"bf16\" or \"sign\""
        ))),
    }
}

fn check_corpus_bytes(n: usize) -> Result<(), SpecError> {
    if !(64 * 1024..=1 << 30).contains(&n) {
        return Err(SpecError::Invalid(
            "corpus_bytes must be between 64 KiB and 1 GiB".into(),
        ));
    }
    Ok(())
}

impl RunFile {
    /// Read and parse a run file.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parse run-file text.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        Ok(toml::from_str(text)?)
    }

    /// Resolve presets, load the data and check every value; `base` is
    /// where relative paths start. Returns the spec and the tokens it describes.
    pub fn resolve(&self, base: &Path) -> Result<(RunSpec, TokenStore), SpecError> {
        let r = &self.run;
        let model =
            ModelConfig::preset_or_file(&r.model, base).map_err(|source| SpecError::Model {
                name: r.model.clone(),
                source,
            })?;
        if r.data.is_empty() {
            check_corpus_bytes(r.corpus_bytes)?;
        }
        let tokens = load_tokens(&r.data, r.corpus_bytes, r.seed, base)?;
        let (data, _) = DataRef::describe(&tokens);
        let spec = RunSpec {
            model,
            run: r.clone(),
            rounds: self.rounds.clone(),
            data,
        };
        spec.check()?;
        Ok((spec, tokens))
    }
}

impl RunSpec {
    /// The learning-rate schedule over rounds.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            peak: self.run.lr,
            warmup: self.run.warmup,
            total: self.run.total_rounds.max(1),
            final_fraction: self.run.final_lr,
        }
    }

    /// The DisTrO settings (its top-k is the ceiling a member may send).
    pub fn distro(&self) -> Result<DistroConfig, SpecError> {
        Ok(DistroConfig {
            topk: self.run.topk,
            values: parse_values(&self.run.values)?,
            decay: self.run.decay,
            ..DistroConfig::default()
        })
    }

    /// Check every value is usable (also run on specs received from a host).
    pub fn check(&self) -> Result<(), SpecError> {
        let bad = |m: &str| Err(SpecError::Invalid(m.into()));
        self.model.validate().map_err(|source| SpecError::Model {
            name: self.model.name.clone(),
            source,
        })?;
        let r = &self.run;
        if r.batch == 0 || r.micro_batch == 0 || r.eval_sequences == 0 {
            return bad("batch, micro_batch and eval_sequences must be at least 1");
        }
        if [r.batch, r.micro_batch, r.eval_sequences]
            .iter()
            .any(|&n| n > MAX_BATCH)
        {
            return Err(SpecError::Invalid(format!(
                "batch, micro_batch and eval_sequences must be at most {MAX_BATCH}"
            )));
        }
        if r.seq_len == 0 || r.seq_len > self.model.max_seq_len {
            return bad("seq_len must be between 1 and the model's max_seq_len");
        }
        self.data.check()?;
        if self.data.vocab_size > self.model.vocab_size {
            return Err(SpecError::Invalid(format!(
                "the data's vocabulary ({}) exceeds the model's ({})",
                self.data.vocab_size, self.model.vocab_size
            )));
        }
        if !(r.lr.is_finite() && r.lr > 0.0 && r.final_lr.is_finite()) {
            return bad("lr must be positive and final_lr finite");
        }
        if !(r.clip.is_finite() && r.clip >= 0.0) {
            return bad("clip must be 0 (off) or positive");
        }
        if r.topk == 0 || !(r.decay > 0.0 && r.decay < 1.0) {
            return bad("topk must be at least 1 and decay between 0 and 1");
        }
        self.distro()?;
        let rd = &self.rounds;
        if !(rd.window_secs.is_finite() && rd.window_secs >= 0.5 && rd.window_secs <= 86_400.0) {
            return bad("rounds.window_secs must be between 0.5 and 86400");
        }
        if rd.min_members == 0 {
            return bad("rounds.min_members must be at least 1");
        }
        if rd.checkpoint_every == 0 || rd.report_every == 0 || rd.eval_every == 0 {
            return bad("checkpoint_every, report_every and eval_every must be at least 1");
        }
        if rd.max_update_bytes < 1024 {
            return bad("rounds.max_update_bytes must be at least 1024");
        }
        if !(rd.robust_norm_factor.is_finite() && rd.robust_norm_factor >= 0.0) {
            return bad("rounds.robust_norm_factor must be 0 (off) or positive");
        }
        if !(rd.robust_min_agreement.is_finite() && rd.robust_min_agreement >= 0.0) {
            return bad("rounds.robust_min_agreement must be 0 (off) or positive");
        }
        if rd.max_faults == 0 || rd.fault_window == 0 {
            return bad("rounds.max_faults and rounds.fault_window must be at least 1");
        }
        if rd.aggregate_topk == Some(0) {
            return bad("rounds.aggregate_topk must be at least 1 (or left out)");
        }
        if !(rd.stall_secs.is_finite() && (0.1..=3600.0).contains(&rd.stall_secs)) {
            return bad("rounds.stall_secs must be between 0.1 and 3600");
        }
        if !(0.0..=1.0).contains(&rd.spot_check_rate) {
            return bad("rounds.spot_check_rate must be between 0 and 1");
        }
        Ok(())
    }

    /// Encode for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decode and check a spec received from a host.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SpecError> {
        let spec: RunSpec = serde_json::from_slice(bytes)?;
        spec.check()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve_and_round_trip() {
        let (spec, tokens) = RunFile::parse("").unwrap().resolve(Path::new(".")).unwrap();
        assert_eq!(spec.model.name, "nano");
        assert_eq!(spec.data.tokens, tokens.tokens().len() as u64);
        assert_eq!(spec.distro().unwrap().topk, 32);
        assert_eq!(RunSpec::from_bytes(&spec.to_bytes()).unwrap(), spec);
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        let typo = RunFile::parse("[run]\nmodle = \"nano\"\n").unwrap_err();
        assert!(typo.to_string().contains("modle"), "{typo}");
        let bad = RunFile::parse("[run]\nvalues = \"bf8\"\n")
            .unwrap()
            .resolve(Path::new("."))
            .unwrap_err();
        assert!(bad.to_string().contains("bf8"));
        let window = RunFile::parse("[rounds]\nwindow_secs = 0.0\n")
            .unwrap()
            .resolve(Path::new("."))
            .unwrap_err();
        assert!(window.to_string().contains("window_secs"));
        assert!(RunSpec::from_bytes(b"{\"name\": 3}").is_err());
        let missing = RunFile::parse("[run]\ndata = \"no-such-shards\"\n")
            .unwrap()
            .resolve(Path::new("."))
            .unwrap_err();
        assert!(missing.to_string().contains("no-such-shards"), "{missing}");
    }

    #[test]
    fn a_hosts_spec_with_a_model_or_batch_out_of_bounds_is_refused() {
        let (spec, _) = RunFile::parse("").unwrap().resolve(Path::new(".")).unwrap();
        let refused = |change: &dyn Fn(&mut RunSpec), says: &str| {
            let mut s = spec.clone();
            change(&mut s);
            let e = RunSpec::from_bytes(&s.to_bytes()).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        };
        // Heads that do not split the width (would fail building the model).
        refused(&|s| s.model.dim = 130, "heads");
        // Sizes that would allocate or overflow before any memory check.
        refused(&|s| s.model.layers = 1 << 30, "layers");
        refused(&|s| s.model.vocab_size = usize::MAX, "vocab_size");
        refused(&|s| s.model.dim = 0, "positive");
        refused(&|s| s.run.batch = 1 << 40, "batch");
        refused(&|s| s.run.eval_sequences = MAX_BATCH + 1, "eval_sequences");
        // Round numbers come from the host too: the last one does not
        // overflow (a debug build would panic).
        assert!(!spec.rounds.checkpoints_after(u64::MAX));
        // The bounds leave every preset alone.
        for name in ["nano", "small", "125m", "1b"] {
            let mut s = spec.clone();
            s.model = starling_train::ModelConfig::preset(name).unwrap();
            s.run.seq_len = s.run.seq_len.min(s.model.max_seq_len);
            s.check().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
