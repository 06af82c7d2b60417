//! Model sizes, from JSON files (`assets/models/*.json` are built in).
//!
//! The shapes here are the contract between the trainer, DisTrO (which chunks
//! every tensor by its shape) and the Hugging Face export, so they are defined
//! once: tensor names and `[out, in]` layouts are those of `transformers`'
//! `LlamaForCausalLM`.

use serde::{Deserialize, Serialize};

/// A Llama-shaped decoder: embedding, `layers` x (RMSNorm, attention with
/// rotary positions, RMSNorm, SwiGLU MLP), final RMSNorm, untied head, no biases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Preset or user name.
    pub name: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub dim: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads (`dim` must be a multiple).
    pub heads: usize,
    /// SwiGLU hidden size.
    pub ffn_dim: usize,
    /// Longest sequence the model is trained on.
    pub max_seq_len: usize,
    /// Rotary embedding base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
}

/// Why a model config is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not valid JSON for a model config.
    #[error("model config is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    /// A size is zero or inconsistent.
    #[error("model config {name}: {reason}")]
    Invalid {
        /// Config name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// No built-in preset of that name.
    #[error("no built-in model {0:?} (choose nano, small, 125m or 1b)")]
    UnknownPreset(String),
    /// A config file could not be read.
    #[error("cannot read model config {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Upper bounds on a config's sizes, far above any model a volunteer can
/// train (the largest open models use a vocabulary of ~256 k, dim 16 k,
/// ~126 layers, ffn 53 k). A config can come from a run's host, so they
/// bound what a stranger's numbers can make this node compute or allocate
/// before its memory check, and keep the parameter count within 64 bits.
pub const MAX_VOCAB: usize = 1 << 20;
/// See [`MAX_VOCAB`].
pub const MAX_DIM: usize = 1 << 16;
/// See [`MAX_VOCAB`].
pub const MAX_LAYERS: usize = 1024;
/// See [`MAX_VOCAB`].
pub const MAX_FFN_DIM: usize = 1 << 18;
/// See [`MAX_VOCAB`].
pub const MAX_SEQ_LEN: usize = 1 << 20;

const PRESETS: [(&str, &str); 4] = [
    ("nano", include_str!("../../../assets/models/nano.json")),
    ("small", include_str!("../../../assets/models/small.json")),
    ("125m", include_str!("../../../assets/models/125m.json")),
    ("1b", include_str!("../../../assets/models/1b.json")),
];

/// True for the tensors `transformers` keeps as `nn.Linear` weights (`[out, in]`).
pub fn is_projection(hf_name: &str) -> bool {
    hf_name.ends_with("_proj.weight") || hf_name == "lm_head.weight"
}

impl ModelConfig {
    /// A built-in size: `nano` (~1.1 M), `small` (~26 M), `125m` (~134 M), `1b` (~1.2 B).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let (_, json) = PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| ConfigError::UnknownPreset(name.to_string()))?;
        Self::from_json(json)
    }

    /// A preset by name or, when no preset has that name and `base/spec` is
    /// a file, the config in that file.
    pub fn preset_or_file(spec: &str, base: &std::path::Path) -> Result<Self, ConfigError> {
        match Self::preset(spec) {
            Ok(c) => Ok(c),
            Err(unknown) => {
                let path = base.join(spec);
                if !path.is_file() {
                    return Err(unknown);
                }
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::Read { path, source })?;
                Self::from_json(&text)
            }
        }
    }

    /// Parses and validates a config.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let c: Self = serde_json::from_str(json)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks that sizes are positive and consistent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |reason: &str| {
            Err(ConfigError::Invalid {
                name: self.name.clone(),
                reason: reason.to_string(),
            })
        };
        if [
            self.vocab_size,
            self.dim,
            self.layers,
            self.heads,
            self.ffn_dim,
            self.max_seq_len,
        ]
        .contains(&0)
        {
            return bad("every size must be positive");
        }
        let limits = [
            (self.vocab_size, MAX_VOCAB, "vocab_size"),
            (self.dim, MAX_DIM, "dim"),
            (self.layers, MAX_LAYERS, "layers"),
            (self.ffn_dim, MAX_FFN_DIM, "ffn_dim"),
            (self.max_seq_len, MAX_SEQ_LEN, "max_seq_len"),
        ];
        if let Some((value, most, what)) = limits.into_iter().find(|(v, most, _)| v > most) {
            return bad(&format!("{what} is {value}; at most {most} is supported"));
        }
        if !self.dim.is_multiple_of(self.heads) || !(self.dim / self.heads).is_multiple_of(2) {
            return bad(
                "dim must split into heads of an even size (rotary embeddings rotate pairs)",
            );
        }
        if !(self.rope_theta.is_finite()
            && self.rope_theta > 0.0
            && self.norm_eps.is_finite()
            && self.norm_eps > 0.0)
        {
            return bad("rope_theta and norm_eps must be positive");
        }
        Ok(())
    }

    /// Every parameter tensor as `transformers` names it, with its shape
    /// (`[out, in]` for projections), in model order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.dim, self.ffn_dim);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, d],
        )];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                out.push((format!("{p}.self_attn.{proj}.weight"), vec![d, d]));
            }
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        out.push(("lm_head.weight".to_string(), vec![self.vocab_size, d]));
        out
    }

    /// Every parameter tensor with the shape Starling trains and checkpoints
    /// it in: Burn's `Linear` keeps `[in, out]`, so projections and the head
    /// are the transpose of [`Self::tensor_shapes`]. DisTrO chunks these shapes
    /// (a transpose selects the same coefficients, transposed, so the bytes
    /// per step do not change).
    pub fn stored_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.tensor_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let shape = if is_projection(&name) {
                    shape.into_iter().rev().collect()
                } else {
                    shape
                };
                (name, shape)
            })
            .collect()
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The Hugging Face `config.json` of this model (`LlamaForCausalLM`).
    pub fn hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_their_advertised_sizes() {
        let count = |n| ModelConfig::preset(n).expect("preset").param_count();
        assert_eq!(count("nano"), 1_115_264);
        assert!((20_000_000..30_000_000).contains(&count("small")));
        assert!((120_000_000..140_000_000).contains(&count("125m")));
        assert!((1_100_000_000..1_300_000_000).contains(&count("1b")));
        assert!(matches!(
            ModelConfig::preset("7b"),
            Err(ConfigError::UnknownPreset(_))
        ));
    }

    #[test]
    fn hf_names_and_shapes_are_llama_s() {
        let c = ModelConfig::preset("nano").expect("nano");
        let shapes = c.tensor_shapes();
        assert_eq!(shapes.len(), 2 + 9 * c.layers + 1);
        assert!(shapes.contains(&("model.layers.3.mlp.down_proj.weight".into(), vec![128, 512])));
        assert!(shapes.contains(&("lm_head.weight".into(), vec![256, 128])));
        let hf = c.hf_config();
        assert_eq!(hf["architectures"][0], "LlamaForCausalLM");
        assert_eq!(hf["intermediate_size"], 512);
    }

    #[test]
    fn invalid_configs_say_why() {
        let mut c = ModelConfig::preset("nano").expect("nano");
        c.heads = 3;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { .. })));
        assert!(matches!(
            ModelConfig::from_json("{\"name\": 1}"),
            Err(ConfigError::Parse(_))
        ));
        let extra = include_str!("../../../assets/models/nano.json")
            .replace("\"dim\"", "\"typo\": 1, \"dim\"");
        assert!(ModelConfig::from_json(&extra).is_err());
        let mut huge = ModelConfig::preset("nano").expect("nano");
        huge.ffn_dim = MAX_FFN_DIM + 1;
        let e = huge.validate().unwrap_err().to_string();
        assert!(
            e.contains("ffn_dim") && e.contains(&MAX_FFN_DIM.to_string()),
            "{e}"
        );
        // At the bounds the parameter count still fits 64 bits.
        let mut edge = ModelConfig::preset("nano").expect("nano");
        (
            edge.vocab_size,
            edge.dim,
            edge.layers,
            edge.ffn_dim,
            edge.heads,
        ) = (MAX_VOCAB, MAX_DIM, MAX_LAYERS, MAX_FFN_DIM, 64);
        edge.validate().expect("at the bounds");
        assert!(edge.param_count() > MAX_LAYERS * 3 * MAX_DIM * MAX_FFN_DIM);
    }
}
