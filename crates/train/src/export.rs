//! Hugging Face export: a trained model as `transformers`' `LlamaForCausalLM`
//! loads it, so volunteers' work is usable by everyone's tools.
//!
//! Two layouts differ from how Starling stores weights: `nn.Linear` keeps
//! `[out, in]` (Burn keeps `[in, out]`), and `transformers` applies rotary
//! embeddings to the two halves of each head (`rotate_half`) where Burn rotates
//! interleaved pairs. Rotating pair `(2i, 2i+1)` equals rotating `(i, i + d/2)`
//! once the q and k output rows are permuted accordingly; attention scores are
//! unchanged because q and k get the same permutation. The test runs an
//! independent forward pass written from `transformers`' definition on the
//! exported tensors and compares it with the Burn model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

use crate::atomic::write_atomic;
use crate::config::{ModelConfig, is_projection};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The weights do not match the model config.
    #[error("weights do not match the model: {0}")]
    Shape(String),
    /// Writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The weights could not be serialised as safetensors.
    #[error("cannot serialize the weights: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// `config.json` could not be serialised.
    #[error("cannot serialize config.json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Row order that turns Burn's interleaved rotary pairs into `rotate_half`
/// halves: HF row `j` of a head reads Burn row `perm[j]`.
fn rotary_permutation(head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..head_dim)
        .map(|j| if j < half { 2 * j } else { 2 * (j - half) + 1 })
        .collect()
}

/// A tensor as written: name, shape, row-major values.
pub type HfTensor = (String, Vec<usize>, Vec<f32>);

/// The weights in `transformers`' names and layouts, model order.
pub fn hf_tensors(config: &ModelConfig, params: &[Vec<f32>]) -> Result<Vec<HfTensor>, ExportError> {
    let hf = config.tensor_shapes();
    if params.len() != hf.len() {
        return Err(ExportError::Shape(format!(
            "{} tensors for a model of {}",
            params.len(),
            hf.len()
        )));
    }
    let head_dim = config.dim / config.heads;
    let perm = rotary_permutation(head_dim);
    hf.into_iter()
        .zip(params)
        .map(|((name, shape), p)| {
            if p.len() != shape.iter().product::<usize>() {
                return Err(ExportError::Shape(format!("{name} has {} values", p.len())));
            }
            if !is_projection(&name) {
                return Ok((name, shape, p.clone()));
            }
            // Stored [in, out] -> HF [out, in].
            let (out_dim, in_dim) = (shape[0], shape[1]);
            let rotary = name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight");
            let mut t = vec![0.0f32; p.len()];
            for o in 0..out_dim {
                let src = if rotary {
                    (o / head_dim) * head_dim + perm[o % head_dim]
                } else {
                    o
                };
                for i in 0..in_dim {
                    t[o * in_dim + i] = p[i * out_dim + src];
                }
            }
            Ok((name, shape, t))
        })
        .collect()
}

/// Writes `dir/config.json` and `dir/model.safetensors` for `transformers`.
pub fn export_hf(config: &ModelConfig, params: &[Vec<f32>], dir: &Path) -> Result<(), ExportError> {
    let tensors = hf_tensors(config, params)?;
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // `transformers` expects the PyTorch marker in the metadata.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let file = safetensors::serialize(views, Some(meta))?;
    let json = serde_json::to_vec_pretty(&config.hf_config())?;
    std::fs::create_dir_all(dir).map_err(|source| ExportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for (name, content) in [("config.json", &json), ("model.safetensors", &file)] {
        let path = dir.join(name);
        write_atomic(&path, content).map_err(|source| ExportError::Io { path, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::tests::tiny;
    use crate::trainer::{Trainer, initial_params};
    use burn::module::Module;
    use burn::tensor::{Device, Int, Tensor, TensorData};
    use safetensors::SafeTensors;

    /// `transformers`' Llama forward for one sequence, from the exported tensors.
    fn hf_forward(c: &ModelConfig, w: &HashMap<String, Vec<f32>>, tokens: &[usize]) -> Vec<f32> {
        let (d, f, t_len, v) = (c.dim, c.ffn_dim, tokens.len(), c.vocab_size);
        let hd = d / c.heads;
        let get = |n: &str| &w[n];
        // y = W x for W [out, in].
        let lin = |wt: &[f32], x: &[f32], out: usize| -> Vec<f32> {
            (0..out)
                .map(|o| (0..x.len()).map(|i| wt[o * x.len() + i] * x[i]).sum())
                .collect()
        };
        let rms = |x: &[f32], g: &[f32]| -> Vec<f32> {
            let ms = x.iter().map(|a| a * a).sum::<f32>() / x.len() as f32;
            let r = 1.0 / (ms + c.norm_eps as f32).sqrt();
            x.iter().zip(g).map(|(a, b)| a * r * b).collect()
        };
        let rope = |x: &mut [f32], pos: usize| {
            for h in 0..c.heads {
                let s = &mut x[h * hd..(h + 1) * hd];
                let half = hd / 2;
                let orig = s.to_vec();
                for i in 0..half {
                    let inv = (c.rope_theta as f32).powf(-2.0 * i as f32 / hd as f32);
                    let (sin, cos) = (pos as f32 * inv).sin_cos();
                    s[i] = orig[i] * cos - orig[i + half] * sin;
                    s[i + half] = orig[i + half] * cos + orig[i] * sin;
                }
            }
        };
        let emb = get("model.embed_tokens.weight");
        let mut x: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&tok| emb[tok * d..(tok + 1) * d].to_vec())
            .collect();
        for l in 0..c.layers {
            let p = |n: &str| format!("model.layers.{l}.{n}");
            let n: Vec<Vec<f32>> = x
                .iter()
                .map(|r| rms(r, get(&p("input_layernorm.weight"))))
                .collect();
            let mut q: Vec<Vec<f32>> = n
                .iter()
                .map(|r| lin(get(&p("self_attn.q_proj.weight")), r, d))
                .collect();
            let mut k: Vec<Vec<f32>> = n
                .iter()
                .map(|r| lin(get(&p("self_attn.k_proj.weight")), r, d))
                .collect();
            let vv: Vec<Vec<f32>> = n
                .iter()
                .map(|r| lin(get(&p("self_attn.v_proj.weight")), r, d))
                .collect();
            for pos in 0..t_len {
                rope(&mut q[pos], pos);
                rope(&mut k[pos], pos);
            }
            for pos in 0..t_len {
                let mut ctx = vec![0.0f32; d];
                for h in 0..c.heads {
                    let r = h * hd..(h + 1) * hd;
                    let scores: Vec<f32> = (0..=pos)
                        .map(|j| {
                            q[pos][r.clone()]
                                .iter()
                                .zip(&k[j][r.clone()])
                                .map(|(a, b)| a * b)
                                .sum::<f32>()
                                / (hd as f32).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f32::MIN, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        for i in r.clone() {
                            ctx[i] += ej / z * vv[j][i];
                        }
                    }
                }
                let o = lin(get(&p("self_attn.o_proj.weight")), &ctx, d);
                for i in 0..d {
                    x[pos][i] += o[i];
                }
                let n2 = rms(&x[pos], get(&p("post_attention_layernorm.weight")));
                let g = lin(get(&p("mlp.gate_proj.weight")), &n2, f);
                let u = lin(get(&p("mlp.up_proj.weight")), &n2, f);
                let act: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                    .collect();
                let dn = lin(get(&p("mlp.down_proj.weight")), &act, d);
                for i in 0..d {
                    x[pos][i] += dn[i];
                }
            }
        }
        x.iter()
            .flat_map(|r| lin(get("lm_head.weight"), &rms(r, get("model.norm.weight")), v))
            .collect()
    }

    #[test]
    fn export_has_llama_names_shapes_and_the_same_function() {
        let c = tiny();
        // Random (non-unit) norm gains too, so a misplaced norm would show.
        let mut params = initial_params(&c, 4);
        for (p, (name, _)) in params.iter_mut().zip(c.stored_shapes()) {
            if name.ends_with("norm.weight") {
                for (i, x) in p.iter_mut().enumerate() {
                    *x = 1.0 + 0.1 * (i as f32).sin();
                }
            }
            // Larger weights than the 0.02 init, so attention is not uniform.
            for x in p.iter_mut() {
                *x *= 10.0;
            }
        }
        let dir = std::env::temp_dir().join(format!("starling-export-{}", std::process::id()));
        export_hf(&c, &params, &dir).unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut weights = HashMap::new();
        for (name, shape) in c.tensor_shapes() {
            let view = st.tensor(&name).unwrap();
            assert_eq!(view.shape(), shape.as_slice(), "{name}");
            assert_eq!(view.dtype(), Dtype::F32);
            let v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            weights.insert(name, v);
        }
        assert_eq!(st.len(), c.tensor_shapes().len());
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], "LlamaForCausalLM");
        assert_eq!(config["num_hidden_layers"], c.layers);
        std::fs::remove_dir_all(&dir).unwrap();

        // The same logits as the Burn model.
        #[allow(deprecated)]
        let cpu = Device::ndarray();
        let mut t = Trainer::new(&c, &cpu, 0).unwrap();
        t.set_params_host(&params).unwrap();
        let tokens = [3usize, 17, 5, 30, 9, 1];
        let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &cpu);
        let burn: Vec<f32> = t
            .model()
            .valid()
            .forward(input)
            .try_into_vec_as::<f32>()
            .unwrap();
        let reference = hf_forward(&c, &weights, &tokens);
        let scale = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.1, "logits too small to tell anything: {scale}");
        for (i, (a, b)) in burn.iter().zip(&reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "logit {i}: burn {a} vs hf {b}"
            );
        }
        // Without the rotary permutation the functions differ: the test can fail.
        let mut unpermuted = weights.clone();
        let q = "model.layers.0.self_attn.q_proj.weight";
        let d = c.dim;
        let mut swapped = unpermuted[q].clone();
        for i in 0..d {
            swapped.swap(i, d + i);
        }
        unpermuted.insert(q.into(), swapped);
        let wrong = hf_forward(&c, &unpermuted, &tokens);
        assert!(
            wrong
                .iter()
                .zip(&reference)
                .any(|(a, b)| (a - b).abs() > 1e-3 * scale)
        );
    }
}
