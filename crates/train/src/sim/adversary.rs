//! Hostile peers for the simulation: what `starling bench robust` sets
//! against the coordinator's screen.
//!
//! An attacker trains exactly as an honest peer does (so it keeps a real
//! momentum and knows what an honest update of its slot looks like), then
//! sends something else in its place. Each attack is one thing a stranger
//! in a public run could send at no cost to itself.

use std::collections::VecDeque;
use std::str::FromStr;

use starling_distro::{OutgoingUpdate, ValueEncoding};

/// What an attacker sends instead of its honest update.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Attack {
    /// Its update with every value multiplied by this (sent as f32 when the
    /// run's encoding cannot carry it, as with signs).
    Scale(f32),
    /// Its update's coefficients with random signs.
    RandomSigns,
    /// Its update, negated.
    Negate,
    /// An update with no coefficient (throwaway identities flooding a round).
    Empty,
    /// Its own honest update from this many steps before (re-labelled for
    /// this step), or its oldest while it has none that old.
    Stale(u64),
    /// A copy of the first honest peer's update under its own name.
    Copy,
}

impl Attack {
    /// Every attack, with the parameters `starling bench robust` uses by default.
    pub const ALL: [Attack; 6] = [
        Attack::Scale(1000.0),
        Attack::RandomSigns,
        Attack::Negate,
        Attack::Empty,
        Attack::Stale(10),
        Attack::Copy,
    ];
}

impl std::fmt::Display for Attack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Scale(s) => write!(f, "scale:{s}"),
            Self::RandomSigns => f.write_str("random-signs"),
            Self::Negate => f.write_str("negate"),
            Self::Empty => f.write_str("empty"),
            Self::Stale(d) => write!(f, "stale:{d}"),
            Self::Copy => f.write_str("copy"),
        }
    }
}

impl FromStr for Attack {
    type Err = String;

    /// `scale:F`, `random-signs`, `negate`, `empty`, `stale[:STEPS]` or `copy`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let bad = || {
            format!(
                "unknown attack {s:?}: use scale:FACTOR, random-signs, negate, empty, stale[:STEPS] or copy"
            )
        };
        match (name, arg) {
            ("scale", f) => match f.parse::<f32>() {
                Ok(f) if f.is_finite() && f > 0.0 => Ok(Self::Scale(f)),
                _ => Err(format!("scale:{f}: the factor must be a positive number")),
            },
            ("random-signs", "") => Ok(Self::RandomSigns),
            ("negate", "") => Ok(Self::Negate),
            ("empty", "") => Ok(Self::Empty),
            ("stale", "") => Ok(Self::Stale(10)),
            ("stale", d) => d
                .parse()
                .map(Self::Stale)
                .map_err(|_| format!("stale:{d}: the delay must be a whole number of steps")),
            ("copy", "") => Ok(Self::Copy),
            _ => Err(bad()),
        }
    }
}

/// Attackers among the simulated peers: the last `attackers` slots.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adversary {
    /// How many of the peers attack.
    pub attackers: usize,
    /// What they send.
    pub attack: Attack,
}

/// What the attackers remember between steps.
pub struct Attackers {
    attack: Attack,
    /// Each attacker's past honest updates, oldest first (for `Stale`).
    past: Vec<VecDeque<OutgoingUpdate>>,
    /// State of the sign generator (for `RandomSigns`).
    rng: u64,
}

impl Attackers {
    /// Attackers as `adversary` says, their random signs seeded by `seed`.
    pub fn new(adversary: &Adversary, seed: u64) -> Self {
        Self {
            attack: adversary.attack,
            past: vec![VecDeque::new(); adversary.attackers],
            rng: seed ^ 0xA77A_C4E5,
        }
    }

    /// What attacker `index` sends in place of its `honest` update;
    /// `first_honest` is the first honest peer's update of the step.
    pub fn corrupt(
        &mut self,
        index: usize,
        honest: OutgoingUpdate,
        first_honest: Option<&OutgoingUpdate>,
    ) -> OutgoingUpdate {
        match self.attack {
            Attack::Scale(s) => {
                let encoding = honest.values;
                let mut u = map_values(honest, |v| {
                    let v = v * s;
                    encoding.quantize(v).unwrap_or(v)
                });
                // Signs cannot carry a size: the attacker sends floats.
                if encoding == ValueEncoding::Sign {
                    u.values = ValueEncoding::F32;
                }
                u
            }
            Attack::RandomSigns => {
                let rng = &mut self.rng;
                map_values(honest, |v| if splitmix(rng) & 1 == 0 { v } else { -v })
            }
            Attack::Negate => map_values(honest, |v| -v),
            Attack::Empty => {
                let mut u = honest;
                for t in &mut u.tensors {
                    t.offsets.iter_mut().for_each(|o| *o = 0);
                    t.indices.clear();
                    t.values.clear();
                }
                u
            }
            Attack::Stale(delay) => {
                let Some(past) = self.past.get_mut(index) else {
                    return honest;
                };
                past.push_back(honest.clone());
                if past.len() as u64 > delay
                    && let Some(old) = past.pop_front()
                {
                    return old;
                }
                past.front().cloned().unwrap_or(honest)
            }
            Attack::Copy => first_honest.cloned().unwrap_or(honest),
        }
    }
}

fn map_values(mut u: OutgoingUpdate, mut f: impl FnMut(f32) -> f32) -> OutgoingUpdate {
    for t in &mut u.tensors {
        for v in &mut t.values {
            *v = f(*v);
        }
    }
    u
}

/// SplitMix64: a small, seeded generator (the simulation replays exactly).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_parse_and_print_back() {
        for a in Attack::ALL {
            assert_eq!(a.to_string().parse::<Attack>(), Ok(a));
        }
        assert_eq!("stale".parse::<Attack>(), Ok(Attack::Stale(10)));
        assert!("scale:-1".parse::<Attack>().is_err());
        assert!("scale:nan".parse::<Attack>().is_err());
        assert!("negate:2".parse::<Attack>().is_err());
        assert!(
            "poison"
                .parse::<Attack>()
                .unwrap_err()
                .contains("random-signs")
        );
    }
}
