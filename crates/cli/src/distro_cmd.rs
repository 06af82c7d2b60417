//! `starling distro …`: DisTrO's byte budget and its compression of real tensors.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use starling_distro::sparse_file::{self, NamedSparse, NamedTensor};
use starling_distro::{DEFAULT_CHUNK, TensorBudget, ValueEncoding, compress, decompress};
use starling_train::ModelConfig;
use starling_train::atomic::write_atomic;

/// Home upload speed the estimate quotes, in bits per second.
const HOME_UPLINK_BPS: f64 = 10e6;

#[derive(Subcommand, Debug)]
pub enum DistroCommand {
    /// Exact wire bytes per step of a model's update, per tensor and in total.
    Estimate(EstimateArgs),
    /// Compress dense tensors (e.g. a gradient) to DisTrO's sparse coefficients.
    Compress(CompressArgs),
    /// Decode one or more peers' sparse files to dense tensors (scatter-mean over peers).
    Decompress(DecompressArgs),
    /// DeMo's math end to end on a toy model (linear regression), several peers in one process.
    Demo(crate::demo::DemoArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Values {
    /// One sign bit per value.
    Sign,
    /// bfloat16.
    Bf16,
    /// f32.
    F32,
}

impl From<Values> for ValueEncoding {
    fn from(v: Values) -> Self {
        match v {
            Values::Sign => ValueEncoding::Sign,
            Values::Bf16 => ValueEncoding::Bf16,
            Values::F32 => ValueEncoding::F32,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LlamaPreset {
    /// ~1.1 M parameters (vocab 256, dim 128, 4 layers).
    Nano,
    /// ~26 M parameters (vocab 256, dim 512, 8 layers).
    Small,
    /// ~134 M parameters (vocab 32000, dim 768, 12 layers).
    #[value(name = "125m")]
    M125,
    /// ~1.2 B parameters, the DisTrO report's Llama-2 shape (dim 2048, 16 layers).
    #[value(name = "1b")]
    B1,
}

impl LlamaPreset {
    fn name(self) -> &'static str {
        match self {
            Self::Nano => "nano",
            Self::Small => "small",
            Self::M125 => "125m",
            Self::B1 => "1b",
        }
    }
}

#[derive(Args, Debug)]
pub struct CodecArgs {
    /// Coefficients sent per chunk (clamped to the chunk's size).
    #[arg(long, default_value_t = 32)]
    pub topk: usize,
    /// Chunk edge target: each dimension uses its largest divisor not above it.
    #[arg(long, default_value_t = DEFAULT_CHUNK)]
    pub chunk: usize,
    /// How values travel.
    #[arg(long, value_enum, default_value_t = Values::Sign)]
    pub values: Values,
}

#[derive(Args, Debug)]
pub struct EstimateArgs {
    /// A safetensors file whose tensor shapes define the model (only its header is read).
    #[arg(long, conflicts_with = "llama", required_unless_present = "llama")]
    pub model: Option<PathBuf>,
    /// Instead of a file, a Llama-shaped model of this size.
    #[arg(long, value_enum)]
    pub llama: Option<LlamaPreset>,
    #[command(flatten)]
    pub codec: CodecArgs,
    /// Print every tensor, not only the total.
    #[arg(long)]
    pub per_tensor: bool,
}

#[derive(Args, Debug)]
pub struct CompressArgs {
    /// Dense safetensors input (F32, F64, F16 or BF16 tensors).
    #[arg(long)]
    pub input: PathBuf,
    /// Sparse safetensors output.
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub codec: CodecArgs,
}

#[derive(Args, Debug)]
pub struct DecompressArgs {
    /// Sparse files, one per peer, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub input: Vec<PathBuf>,
    /// Dense safetensors output (F32, original tensor names).
    #[arg(long)]
    pub output: PathBuf,
}

pub fn run(cmd: DistroCommand) -> Result<()> {
    match cmd {
        DistroCommand::Estimate(a) => estimate(&a),
        DistroCommand::Compress(a) => compress_file(&a),
        DistroCommand::Decompress(a) => decompress_files(&a),
        DistroCommand::Demo(a) => crate::demo::run(&a),
    }
}

fn estimate(a: &EstimateArgs) -> Result<()> {
    let shapes = match (&a.model, a.llama) {
        (Some(path), _) => {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            sparse_file::read_shapes(BufReader::new(file)).with_context(|| {
                format!("cannot read the safetensors header of {}", path.display())
            })?
        }
        (None, Some(preset)) => ModelConfig::preset(preset.name())?.tensor_shapes(),
        (None, None) => bail!("give --model FILE or --llama SIZE"),
    };
    say!(
        "{}",
        estimate_table(&shapes, &a.codec, a.per_tensor).trim_end()
    );
    Ok(())
}

/// The estimate as printed.
pub fn estimate_table(
    shapes: &[(String, Vec<usize>)],
    codec: &CodecArgs,
    per_tensor: bool,
) -> String {
    let values: ValueEncoding = codec.values.into();
    let mut s = String::new();
    let mut params: u64 = 0;
    let budgets: Vec<TensorBudget> = shapes
        .iter()
        .map(|(_, sh)| TensorBudget::for_shape(sh, codec.chunk))
        .collect();
    if per_tensor {
        s += &format!(
            "{:<48} {:>14} {:>9} {:>5} {:>12} {:>9}\n",
            "tensor", "shape", "chunk", "k", "wire bytes", "ratio"
        );
    }
    for ((name, shape), b) in shapes.iter().zip(&budgets) {
        let n = b.grid.numel() as u64;
        params += n;
        if per_tensor {
            let bytes = b.wire_bytes(codec.topk, values);
            s += &format!(
                "{:<48} {:>14} {:>9} {:>5} {:>12} {:>8.1}x\n",
                name,
                format!("{shape:?}"),
                format!("{}x{}", b.grid.chunk_rows, b.grid.chunk_cols),
                b.grid.clamp_topk(codec.topk),
                bytes,
                (4 * n) as f64 / bytes as f64
            );
        }
    }
    let total = starling_distro::update_wire_bytes(&budgets, codec.topk, values);
    let fp32 = 4 * params;
    s += &format!(
        "model: {} tensors, {} parameters; top-k {} per chunk (target {}), values {}\n",
        shapes.len(),
        params,
        codec.topk,
        codec.chunk,
        values.name()
    );
    s += &format!(
        "wire bytes per step: {total} ({:.6} bytes/parameter)\n",
        total as f64 / params.max(1) as f64
    );
    s += &format!(
        "full fp32 gradient:  {fp32} bytes; ratio {:.1}x (4 bytes x parameters / this peer's wire bytes)\n",
        fp32 as f64 / total as f64
    );
    s += &format!(
        "upload at 10 Mbit/s: {:.3} s per step (fp32 gradient: {:.1} s)\n",
        total as f64 * 8.0 / HOME_UPLINK_BPS,
        fp32 as f64 * 8.0 / HOME_UPLINK_BPS
    );
    s
}

fn compress_file(a: &CompressArgs) -> Result<()> {
    let bytes =
        std::fs::read(&a.input).with_context(|| format!("cannot read {}", a.input.display()))?;
    let dense = sparse_file::read_dense(&bytes)
        .with_context(|| format!("cannot parse {}", a.input.display()))?;
    let values: ValueEncoding = a.codec.values.into();
    let mut out = Vec::with_capacity(dense.len());
    for t in &dense {
        let s = compress(&t.data, &t.shape, a.codec.topk, a.codec.chunk)
            .with_context(|| format!("cannot compress tensor {}", t.name))?;
        out.push(NamedSparse {
            name: t.name.clone(),
            tensor: s.quantized(values),
        });
    }
    let file = sparse_file::write_sparse(&out, values)?;
    write_atomic(&a.output, &file)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    let nnz: usize = out.iter().map(|t| t.tensor.nnz()).sum();
    let params: usize = dense.iter().map(|t| t.data.len()).sum();
    say!(
        "compressed {} tensors, {} parameters -> {} coefficients ({} values) into {}",
        out.len(),
        params,
        nnz,
        values.name(),
        a.output.display()
    );
    Ok(())
}

fn decompress_files(a: &DecompressArgs) -> Result<()> {
    let mut peers = Vec::with_capacity(a.input.len());
    for path in &a.input {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let (_, tensors) = sparse_file::read_sparse(&bytes)
            .with_context(|| format!("cannot parse {}", path.display()))?;
        peers.push((path, tensors));
    }
    let (first_path, first) = &peers[0];
    let mut out = Vec::with_capacity(first.len());
    for (i, t) in first.iter().enumerate() {
        let mut parts = vec![&t.tensor];
        for (path, other) in &peers[1..] {
            let o = other.get(i).filter(|o| o.name == t.name).with_context(|| {
                format!(
                    "{} has no tensor {} (unlike {})",
                    path.display(),
                    t.name,
                    first_path.display()
                )
            })?;
            parts.push(&o.tensor);
        }
        let data =
            decompress(&parts).with_context(|| format!("cannot decode tensor {}", t.name))?;
        out.push(NamedTensor {
            name: t.name.clone(),
            shape: t.tensor.shape.clone(),
            data,
        });
    }
    for (path, other) in &peers[1..] {
        if other.len() != first.len() {
            bail!(
                "{} has {} tensors, {} has {}",
                path.display(),
                other.len(),
                first_path.display(),
                first.len()
            );
        }
    }
    write_atomic(&a.output, &sparse_file::write_dense(&out)?)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    say!(
        "decoded {} tensors from {} peer file(s) into {}",
        out.len(),
        peers.len(),
        a.output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("starling-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn codec(topk: usize, values: Values) -> CodecArgs {
        CodecArgs {
            topk,
            chunk: 64,
            values,
        }
    }

    #[test]
    fn full_topk_roundtrip_reproduces_the_input() {
        let dir = scratch_dir("roundtrip");
        let tensors = vec![
            NamedTensor {
                name: "layers.0.mlp.weight".into(),
                shape: vec![96, 128],
                data: (0..96 * 128)
                    .map(|i| ((i * 7919 % 997) as f32 - 498.0) * 0.01)
                    .collect(),
            },
            NamedTensor {
                name: "norm.weight".into(),
                shape: vec![96],
                data: (0..96).map(|i| (i as f32 * 0.3).sin()).collect(),
            },
        ];
        let input = dir.join("grad.safetensors");
        write_atomic(&input, &sparse_file::write_dense(&tensors).expect("dense")).expect("write");
        let sparse = dir.join("sparse.safetensors");
        compress_file(&CompressArgs {
            input: input.clone(),
            output: sparse.clone(),
            codec: codec(4096, Values::F32),
        })
        .expect("compress");
        let dense = dir.join("dense.safetensors");
        decompress_files(&DecompressArgs {
            input: vec![sparse],
            output: dense.clone(),
        })
        .expect("decompress");
        let back = sparse_file::read_dense(&std::fs::read(&dense).expect("read")).expect("parse");
        assert_eq!(back.len(), 2);
        for (a, b) in tensors.iter().zip(&back) {
            assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
            for (x, y) in a.data.iter().zip(&b.data) {
                assert!((x - y).abs() <= 1e-5, "{}: {x} vs {y}", a.name);
            }
        }
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn two_peers_decode_to_their_mean() {
        let dir = scratch_dir("mean");
        let make = |scale: f32, name: &str| {
            let t = NamedTensor {
                name: "w".into(),
                shape: vec![64],
                data: (0..64).map(|i| scale * (i as f32 * 0.1).cos()).collect(),
            };
            let input = dir.join(format!("{name}.in"));
            write_atomic(&input, &sparse_file::write_dense(&[t]).expect("dense")).expect("write");
            let out = dir.join(format!("{name}.sparse"));
            compress_file(&CompressArgs {
                input,
                output: out.clone(),
                codec: codec(64, Values::F32),
            })
            .expect("compress");
            out
        };
        let (a, b) = (make(1.0, "a"), make(3.0, "b"));
        let dense = dir.join("dense");
        decompress_files(&DecompressArgs {
            input: vec![a, b],
            output: dense.clone(),
        })
        .expect("decompress");
        let back = sparse_file::read_dense(&std::fs::read(&dense).expect("read")).expect("parse");
        for (i, v) in back[0].data.iter().enumerate() {
            assert!((v - 2.0 * (i as f32 * 0.1).cos()).abs() < 1e-5);
        }
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn estimate_reports_exact_bytes_and_ratio() {
        let shapes = vec![("w".to_string(), vec![2048, 2048])];
        let table = estimate_table(&shapes, &codec(4, Values::Sign), true);
        // 1024 chunks x (3 + 4 x 13) bits = 56320 bits = 7040 bytes, plus 25 of
        // tensor header and 72 of update header and checksum.
        assert!(table.contains("wire bytes per step: 7137 "), "{table}");
        assert!(table.contains("ratio 2350.7x"), "{table}");
        assert!(table.contains("4 bytes x parameters / this peer's wire bytes"));
    }

    #[test]
    fn unreadable_inputs_are_clear_errors() {
        let dir = scratch_dir("errors");
        let missing = dir.join("missing.safetensors");
        let err = compress_file(&CompressArgs {
            input: missing.clone(),
            output: dir.join("out"),
            codec: codec(4, Values::Sign),
        })
        .expect_err("missing input");
        assert!(format!("{err:#}").contains("cannot read"));
        std::fs::write(&missing, b"not safetensors").expect("write");
        let err = decompress_files(&DecompressArgs {
            input: vec![missing],
            output: dir.join("out"),
        })
        .expect_err("garbage input");
        assert!(format!("{err:#}").contains("cannot parse"));
        assert!(!dir.join("out").exists());
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
