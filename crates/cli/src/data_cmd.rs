//! `starling data …`: turn text into the token shards training reads.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use starling_train::data::shards::{prepare, read_documents};
use starling_train::{Tokenizer, embedded_corpus};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Tokenize text (plain files, or JSONL with a "text" field) into shards with a JSON index.
    Prepare(PrepareArgs),
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Input files, comma separated (`.jsonl`: one JSON object per line).
    #[arg(long, value_delimiter = ',', required_unless_present = "embedded")]
    pub input: Vec<PathBuf>,
    /// Instead of files, this many bytes of Starling's own generated corpus.
    #[arg(long, conflicts_with = "input")]
    pub embedded: Option<usize>,
    /// Output directory (created; shards and index.json are written there).
    #[arg(long)]
    pub output: PathBuf,
    /// `bytes` (one token per UTF-8 byte, vocabulary 256, needs no file) or
    /// the path of a Hugging Face tokenizer.json.
    #[arg(long, default_value = "bytes")]
    pub tokenizer: String,
    /// Most tokens per shard file.
    #[arg(long, default_value_t = 1 << 20)]
    pub shard_tokens: usize,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare(a) => prepare_cmd(&a),
    }
}

fn prepare_cmd(a: &PrepareArgs) -> Result<()> {
    let tokenizer = if a.tokenizer == "bytes" {
        Tokenizer::Bytes
    } else {
        Tokenizer::from_file(Path::new(&a.tokenizer))
            .with_context(|| format!("cannot load the tokenizer {}", a.tokenizer))?
    };
    let docs = match a.embedded {
        Some(0) => bail!("--embedded needs a positive number of bytes"),
        Some(bytes) => vec![embedded_corpus(bytes, 0)],
        None => {
            let mut docs = Vec::new();
            for path in &a.input {
                docs.extend(
                    read_documents(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                );
            }
            docs
        }
    };
    let index = prepare(&docs, &tokenizer, &a.output, a.shard_tokens)
        .with_context(|| format!("cannot prepare shards in {}", a.output.display()))?;
    say!(
        "{} documents -> {} tokens in {} shard(s) ({} tokenizer, vocabulary {}) in {}",
        docs.len(),
        index.total_tokens(),
        index.shards.len(),
        index.tokenizer,
        index.vocab_size,
        a.output.display()
    );
    Ok(())
}
