//! The demo's training text, made here, deterministically: no download, nothing
//! copied. It has structure at several scales so a small byte-level model's
//! loss visibly falls: spelling (a small fixed vocabulary), grammar (sentence
//! templates), facts (each animal always makes the same sound and lives in the
//! same place) and arithmetic (sums that are always right).

use super::rng::SplitMix64;
use super::shards::{ShardError, TokenStore};
use super::tokenizer::ByteTokenizer;

/// Picks from lists with the corpus's fixed generator.
struct Mix(SplitMix64);

impl Mix {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.0.below(items.len() as u64) as usize]
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
}

const ANIMALS: [(&str, &str, &str); 8] = [
    ("cow", "moo", "barn"),
    ("dog", "woof", "yard"),
    ("cat", "meow", "house"),
    ("duck", "quack", "pond"),
    ("owl", "hoot", "tree"),
    ("sheep", "baa", "field"),
    ("frog", "croak", "marsh"),
    ("horse", "neigh", "stable"),
];
const COLORS: [&str; 6] = ["red", "green", "blue", "yellow", "brown", "white"];
const SIZES: [&str; 4] = ["small", "big", "tiny", "large"];
const VERBS: [&str; 6] = [
    "runs to",
    "walks to",
    "looks at",
    "jumps over",
    "sleeps by",
    "waits near",
];
const NUMBERS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// The embedded corpus tokenized as bytes: the default data of simulations
/// and of runs that name no dataset, identical on every replica.
pub fn embedded_store(bytes: usize, seed: u64) -> Result<TokenStore, ShardError> {
    let text = embedded_corpus(bytes, seed);
    TokenStore::from_tokens(ByteTokenizer.encode(&text), "bytes", ByteTokenizer::VOCAB)
}

/// About `bytes` bytes of the embedded corpus (whole sentences, one per line),
/// the same for a given `seed` on every machine and version.
pub fn embedded_corpus(bytes: usize, seed: u64) -> String {
    let mut rng = Mix(SplitMix64::new(seed));
    let mut out = String::with_capacity(bytes + 128);
    while out.len() < bytes {
        let (animal, sound, home) = ANIMALS[rng.below(ANIMALS.len() as u64) as usize];
        let line = match rng.below(5) {
            0 => format!("the {animal} says {sound}."),
            1 => format!("the {animal} lives in the {home}."),
            2 => {
                let (a, b) = (rng.below(50), rng.below(50));
                format!("{a} plus {b} is {}.", a + b)
            }
            3 => {
                let start = rng.below(6) as usize;
                let words: Vec<&str> = NUMBERS[start..start + 4].to_vec();
                format!("count: {}.", words.join(" "))
            }
            _ => {
                let (other, _, place) = ANIMALS[rng.below(ANIMALS.len() as u64) as usize];
                format!(
                    "a {} {} {animal} {} the {other} in the {place}.",
                    rng.pick(&SIZES),
                    rng.pick(&COLORS),
                    rng.pick(&VERBS)
                )
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_deterministic_and_structured() {
        let a = embedded_corpus(10_000, 1);
        assert_eq!(a, embedded_corpus(10_000, 1));
        assert_ne!(a, embedded_corpus(10_000, 2));
        assert!(a.len() >= 10_000 && a.is_ascii());
        // Facts hold everywhere: a cow always says moo.
        assert!(
            a.lines()
                .filter(|l| l.starts_with("the cow says"))
                .all(|l| l == "the cow says moo.")
        );
        // Sums are right.
        for l in a.lines().filter(|l| l.contains(" plus ")) {
            let w: Vec<&str> = l.trim_end_matches('.').split(' ').collect();
            let (x, y, z): (u64, u64, u64) = (
                w[0].parse().unwrap(),
                w[2].parse().unwrap(),
                w[4].parse().unwrap(),
            );
            assert_eq!(x + y, z, "{l}");
        }
    }
}
