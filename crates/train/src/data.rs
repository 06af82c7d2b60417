//! Text in, token batches out.
//!
//! Raw text (plain or JSONL) is tokenized once into shards of little-endian
//! token ids with a JSON index (`starling data prepare`), so training reads
//! numbers, not text, and a host can serve byte ranges of a shard. Which
//! window of tokens a peer trains on is a pure function of the run seed, the
//! round and the peer's slot ([`sampling`]), never of timing or arrival order.

pub mod corpus;
pub mod rng;
pub mod sampling;
pub mod shards;
pub mod tokenizer;
