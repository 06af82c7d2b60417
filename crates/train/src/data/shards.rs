//! Pre-tokenized shards: flat little-endian token files plus a JSON index.
//!
//! Tokenizing once, ahead of training, keeps text handling off the training
//! path, and fixed-width ids let a peer fetch exactly the byte range of the
//! windows it was assigned. The index is written last, so a directory with an
//! index is complete; every file is written through a temporary name and a
//! rename, so an interrupted `prepare` leaves nothing half-written.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::tokenizer::{Tokenizer, TokenizerError};
use crate::atomic::write_atomic;

/// Name of the index file in a shard directory.
pub const INDEX_FILE: &str = "index.json";
/// `format` value of this version.
pub const FORMAT: &str = "starling-tokens-v1";

/// Width of the stored token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Two bytes per token (vocabularies up to 65,536).
    U16,
    /// Four bytes per token.
    U32,
}

impl TokenDtype {
    /// The narrowest width that holds ids below `vocab`.
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab <= 1 << 16 {
            Self::U16
        } else {
            Self::U32
        }
    }

    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }

    /// Little-endian bytes of `tokens` at this width (ids must fit it).
    pub fn encode(self, tokens: &[u32]) -> Vec<u8> {
        match self {
            Self::U16 => tokens
                .iter()
                .flat_map(|&t| (t as u16).to_le_bytes())
                .collect(),
            Self::U32 => tokens.iter().flat_map(|&t| t.to_le_bytes()).collect(),
        }
    }

    /// Token ids from little-endian bytes at this width; a trailing partial
    /// token is ignored (callers check lengths first).
    pub fn decode(self, bytes: &[u8]) -> Vec<u32> {
        match self {
            Self::U16 => bytes
                .chunks_exact(2)
                .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            Self::U32 => bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        }
    }
}

/// One shard file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the directory.
    pub file: String,
    /// Tokens in it.
    pub tokens: u64,
}

/// The JSON index of a shard directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndex {
    /// Always [`FORMAT`].
    pub format: String,
    /// Tokenizer name (`bytes`).
    pub tokenizer: String,
    /// Vocabulary size: every id is below it.
    pub vocab_size: usize,
    /// Stored width.
    pub dtype: TokenDtype,
    /// The shards, in stream order.
    pub shards: Vec<ShardEntry>,
}

impl ShardIndex {
    /// Tokens in all shards.
    pub fn total_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.tokens).sum()
    }
}

/// Why shards could not be prepared or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// Reading or writing a file failed (missing input, full disk, ...).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A JSONL line is not an object with a string `text` field.
    #[error("{path} line {line}: expected a JSON object with a string \"text\" field")]
    Jsonl {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// The index is malformed or of another format.
    #[error("{path}: not a valid shard index: {reason}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The index is not the JSON of a shard index (or could not be written as JSON).
    #[error("{path}: not a valid shard index: {source}")]
    IndexJson {
        /// The index file.
        path: PathBuf,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A shard disagrees with its index (size, or an id outside the vocabulary).
    #[error("{path}: {reason}")]
    Shard {
        /// The shard file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Nothing to tokenize.
    #[error("the inputs hold no text")]
    Empty,
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// The tokenizer produced an id outside its own vocabulary.
    #[error("tokenizer: id {id} is outside its vocabulary of {vocab}")]
    OutOfVocabulary {
        /// The id.
        id: u32,
        /// The tokenizer's vocabulary size.
        vocab: usize,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the documents of one input: a `.jsonl` file gives each line's `text`
/// field; any other file is one plain-text document.
pub fn read_documents(path: &Path) -> Result<Vec<String>, ShardError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        return Ok(vec![text]);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || ShardError::Jsonl {
            path: path.to_path_buf(),
            line: i + 1,
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|_| bad())?;
        docs.push(
            value
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(bad)?
                .to_string(),
        );
    }
    Ok(docs)
}

/// Tokenizes `documents` into shards of at most `shard_tokens` tokens in
/// `out_dir`, index last. Byte-level documents are joined by newlines; a
/// Hugging Face tokenizer marks document starts with its own special tokens.
pub fn prepare(
    documents: &[String],
    tokenizer: &Tokenizer,
    out_dir: &Path,
    shard_tokens: usize,
) -> Result<ShardIndex, ShardError> {
    let mut tokens: Vec<u32> = Vec::new();
    for doc in documents {
        if !tokens.is_empty() && matches!(tokenizer, Tokenizer::Bytes) {
            tokens.push(u32::from(b'\n'));
        }
        tokens.extend(tokenizer.encode(doc)?);
    }
    if tokens.is_empty() {
        return Err(ShardError::Empty);
    }
    fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let vocab_size = tokenizer.vocab_size();
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(ShardError::OutOfVocabulary {
            id,
            vocab: vocab_size,
        });
    }
    let dtype = TokenDtype::for_vocab(vocab_size);
    let mut shards = Vec::new();
    for (n, part) in tokens.chunks(shard_tokens.max(1)).enumerate() {
        let file = format!("shard-{n:05}.bin");
        let path = out_dir.join(&file);
        write_atomic(&path, &dtype.encode(part)).map_err(io(&path))?;
        shards.push(ShardEntry {
            file,
            tokens: part.len() as u64,
        });
    }
    let index = ShardIndex {
        format: FORMAT.into(),
        tokenizer: tokenizer.name(),
        vocab_size,
        dtype,
        shards,
    };
    let index_path = out_dir.join(INDEX_FILE);
    let json = serde_json::to_vec_pretty(&index).map_err(|source| ShardError::IndexJson {
        path: index_path.clone(),
        source,
    })?;
    write_atomic(&index_path, &json).map_err(io(&index_path))?;
    Ok(index)
}

/// A shard directory's tokens, loaded and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenStore {
    /// The index it was loaded from.
    pub index: ShardIndex,
    tokens: Vec<u32>,
}

impl TokenStore {
    /// Loads every shard of `dir`, checking sizes against the index and every
    /// id against the vocabulary.
    pub fn load(dir: &Path) -> Result<Self, ShardError> {
        let index_path = dir.join(INDEX_FILE);
        let bad_index = |reason: String| ShardError::Index {
            path: index_path.clone(),
            reason,
        };
        let text = fs::read(&index_path).map_err(io(&index_path))?;
        let index: ShardIndex =
            serde_json::from_slice(&text).map_err(|source| ShardError::IndexJson {
                path: index_path.clone(),
                source,
            })?;
        if index.format != FORMAT {
            return Err(bad_index(format!(
                "format is {:?}, expected {FORMAT:?}",
                index.format
            )));
        }
        let mut tokens = Vec::new();
        for shard in &index.shards {
            if shard.file.contains(['/', '\\']) || shard.file.starts_with('.') {
                return Err(bad_index(format!(
                    "shard name {:?} leaves the directory",
                    shard.file
                )));
            }
            let path = dir.join(&shard.file);
            let bytes = fs::read(&path).map_err(io(&path))?;
            let width = index.dtype.bytes();
            if bytes.len() as u64 != shard.tokens.saturating_mul(width as u64) {
                return Err(ShardError::Shard {
                    path,
                    reason: format!(
                        "{} bytes, the index says {} tokens of {width} bytes",
                        bytes.len(),
                        shard.tokens
                    ),
                });
            }
            let start = tokens.len();
            tokens.extend(index.dtype.decode(&bytes));
            if let Some(bad) = tokens[start..]
                .iter()
                .find(|&&t| t as usize >= index.vocab_size)
            {
                return Err(ShardError::Shard {
                    path,
                    reason: format!(
                        "token id {bad} is outside the vocabulary of {}",
                        index.vocab_size
                    ),
                });
            }
        }
        Ok(Self { index, tokens })
    }

    /// A store over tokens already in memory (the embedded corpus, a test),
    /// checked against `vocab_size` like loaded shards.
    pub fn from_tokens(
        tokens: Vec<u32>,
        tokenizer: &str,
        vocab_size: usize,
    ) -> Result<Self, ShardError> {
        if tokens.is_empty() {
            return Err(ShardError::Empty);
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(ShardError::Shard {
                path: PathBuf::from("<memory>"),
                reason: format!("token id {bad} is outside the vocabulary of {vocab_size}"),
            });
        }
        let index = ShardIndex {
            format: FORMAT.into(),
            tokenizer: tokenizer.into(),
            vocab_size,
            dtype: TokenDtype::for_vocab(vocab_size),
            shards: vec![ShardEntry {
                file: "<memory>".into(),
                tokens: tokens.len() as u64,
            }],
        };
        Ok(Self { index, tokens })
    }

    /// All tokens, in stream order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The `len` tokens from `offset`, or `None` past the end.
    pub fn window(&self, offset: u64, len: u64) -> Option<&[u32]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.tokens.get(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::ByteTokenizer;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("starling-shards-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn prepare_then_load_roundtrips() {
        let dir = scratch("roundtrip");
        let docs = vec!["hello world".to_string(), "é ünïcode".to_string()];
        let index = prepare(&docs, &Tokenizer::Bytes, &dir, 5).expect("prepare");
        assert_eq!(index.shards.len(), 5);
        let store = TokenStore::load(&dir).expect("load");
        assert_eq!(
            ByteTokenizer.decode(store.tokens()),
            "hello world\né ünïcode"
        );
        assert_eq!(
            store.window(6, 5).map(|w| ByteTokenizer.decode(w)),
            Some("world".into())
        );
        assert_eq!(store.window(u64::MAX, 2), None);
        fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn jsonl_reads_text_fields_and_names_bad_lines() {
        let dir = scratch("jsonl");
        fs::create_dir_all(&dir).expect("dir");
        let good = dir.join("a.jsonl");
        fs::write(
            &good,
            "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 3}\n",
        )
        .expect("write");
        assert_eq!(read_documents(&good).expect("read"), vec!["one", "two"]);
        let bad = dir.join("b.jsonl");
        fs::write(&bad, "{\"text\": \"one\"}\n{\"body\": 1}\n").expect("write");
        assert!(matches!(
            read_documents(&bad),
            Err(ShardError::Jsonl { line: 2, .. })
        ));
        assert!(matches!(
            read_documents(&dir.join("missing.txt")),
            Err(ShardError::Io { .. })
        ));
        fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn damaged_shards_are_refused() {
        let dir = scratch("damaged");
        prepare(&["abcdef".to_string()], &Tokenizer::Bytes, &dir, 4).expect("prepare");
        // A truncated shard.
        fs::write(dir.join("shard-00001.bin"), [b'e', 0]).expect("write");
        assert!(matches!(
            TokenStore::load(&dir),
            Err(ShardError::Shard { .. })
        ));
        // An id outside the vocabulary.
        fs::write(dir.join("shard-00001.bin"), [0, 1, 0, 0]).expect("write");
        assert!(matches!(
            TokenStore::load(&dir),
            Err(ShardError::Shard { .. })
        ));
        // An index naming a file outside the directory.
        let mut index: ShardIndex =
            serde_json::from_slice(&fs::read(dir.join(INDEX_FILE)).expect("r")).expect("json");
        index.shards[0].file = "../etc/passwd".into();
        fs::write(
            dir.join(INDEX_FILE),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("write");
        assert!(matches!(
            TokenStore::load(&dir),
            Err(ShardError::Index { .. })
        ));
        fs::write(dir.join(INDEX_FILE), b"{").expect("write");
        assert!(matches!(
            TokenStore::load(&dir),
            Err(ShardError::IndexJson { .. })
        ));
        fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn hugging_face_tokenizers_prepare_shards() {
        let dir = scratch("hf");
        let path = crate::data::tokenizer::tests::word_tokenizer(&dir.join("tok"));
        let tok = Tokenizer::from_file(&path).expect("tokenizer");
        let docs = vec!["the cow says moo.".to_string(), "moo moo".to_string()];
        let index = prepare(&docs, &tok, &dir.join("shards"), 3).expect("prepare");
        assert_eq!(index.tokenizer, "hf:tokenizer.json");
        assert_eq!(index.vocab_size, 6);
        let store = TokenStore::load(&dir.join("shards")).expect("load");
        assert_eq!(store.tokens(), &[1, 2, 3, 4, 5, 4, 4]);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn empty_input_is_an_error() {
        assert!(matches!(
            prepare(&[], &Tokenizer::Bytes, &scratch("empty"), 10),
            Err(ShardError::Empty)
        ));
    }
}
