//! `starling distro demo`: several DisTrO peers on this machine, in one process.
//!
//! The optimizer's math with nothing else in the way: each
//! peer trains the same model (a linear regression onto a hidden teacher, so
//! the loss has a known floor) on its own data, compresses its momentum with
//! DeMo, sends the update through the real wire format, decodes everyone's
//! updates and applies them. Per round it prints the held-out loss and the
//! bytes each peer sent and received next to what a full fp32 gradient costs;
//! at the end it checks that every replica holds bit-identical weights.

use anyhow::{Context, Result, ensure};
use clap::Args;
use starling_distro::wire::{self, DecodeLimits, UpdateHeader};
use starling_distro::{
    DistroConfig, DistroOptimizer, IncomingUpdate, ValueEncoding, weights_digest,
};

use starling_train::data::rng::SplitMix64 as Rng;

use crate::distro_cmd::Values;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of peers.
    #[arg(long, default_value_t = 4)]
    pub peers: usize,
    /// Rounds to train.
    #[arg(long, default_value_t = 300)]
    pub rounds: usize,
    /// Coefficients each peer sends per 64x64 chunk.
    #[arg(long, default_value_t = 16)]
    pub topk: usize,
    /// How values travel.
    #[arg(long, value_enum, default_value_t = Values::Sign)]
    pub values: Values,
    /// Peak learning rate (sign descent: the step every weight may take per round).
    #[arg(long, default_value_t = 4e-3)]
    pub lr: f32,
}

const IN: usize = 512;
const OUT: usize = 256;
const BATCH: usize = 32;
const EVAL: usize = 256;

/// The regression task: `y = W* x + noise`.
struct Task {
    teacher: Vec<f32>,
}

impl Task {
    fn new() -> Self {
        let mut rng = Rng::new(1);
        let scale = 1.0 / (IN as f32).sqrt();
        Self {
            teacher: (0..OUT * IN).map(|_| rng.normal() * scale).collect(),
        }
    }

    fn batch(&self, seed: u64, n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let x: Vec<f32> = (0..n * IN).map(|_| rng.normal()).collect();
        let mut y = vec![0.0; n * OUT];
        for s in 0..n {
            let xs = &x[s * IN..(s + 1) * IN];
            for o in 0..OUT {
                let row = &self.teacher[o * IN..(o + 1) * IN];
                y[s * OUT + o] =
                    row.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>() + 0.1 * rng.normal();
            }
        }
        (x, y)
    }
}

/// Mean squared error / 2 of `(w, b)` on a batch, and optionally its gradients.
fn loss_and_grad(
    w: &[f32],
    b: &[f32],
    x: &[f32],
    y: &[f32],
    grads: Option<(&mut [f32], &mut [f32])>,
) -> f32 {
    let n = y.len() / OUT;
    let mut loss = 0.0f64;
    let mut residuals = vec![0.0f32; n * OUT];
    for s in 0..n {
        let xs = &x[s * IN..(s + 1) * IN];
        for o in 0..OUT {
            let pred = w[o * IN..(o + 1) * IN]
                .iter()
                .zip(xs)
                .map(|(a, b)| a * b)
                .sum::<f32>()
                + b[o];
            let r = pred - y[s * OUT + o];
            residuals[s * OUT + o] = r;
            loss += f64::from(r * r);
        }
    }
    if let Some((gw, gb)) = grads {
        gw.fill(0.0);
        gb.fill(0.0);
        let inv = 1.0 / n as f32;
        for s in 0..n {
            let xs = &x[s * IN..(s + 1) * IN];
            for o in 0..OUT {
                let r = residuals[s * OUT + o] * inv;
                gb[o] += r;
                for (g, xv) in gw[o * IN..(o + 1) * IN].iter_mut().zip(xs) {
                    *g += r * xv;
                }
            }
        }
    }
    (0.5 * loss / n as f64) as f32
}

pub fn run(a: &DemoArgs) -> Result<()> {
    ensure!(a.peers >= 1, "--peers must be at least 1");
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        a.lr.is_finite() && a.lr > 0.0,
        "--lr must be a positive number"
    );
    let values: ValueEncoding = a.values.into();
    let shapes = vec![vec![OUT, IN], vec![OUT]];
    let params = (OUT * IN + OUT) as u64;
    let config = DistroConfig {
        topk: a.topk,
        values,
        ..DistroConfig::default()
    };
    let task = Task::new();
    let (eval_x, eval_y) = task.batch(u64::MAX, EVAL);
    let ids: Vec<[u8; 32]> = (0..a.peers)
        .map(|p| *blake3::hash(&p.to_le_bytes()).as_bytes())
        .collect();
    let run_id = [0x5Au8; 16];
    let mut opts: Vec<DistroOptimizer> = (0..a.peers)
        .map(|_| DistroOptimizer::new(&shapes, config))
        .collect();
    let mut weights: Vec<[Vec<f32>; 2]> = (0..a.peers)
        .map(|_| [vec![0.0; OUT * IN], vec![0.0; OUT]])
        .collect();
    let (mut gw, mut gb) = (vec![0.0; OUT * IN], vec![0.0; OUT]);

    say!(
        "starling demo: {} peers train a {}-parameter linear model with DisTrO (top-{} per 64x64 chunk, {} values)",
        a.peers,
        params,
        a.topk,
        values.name()
    );
    say!(
        "{:>5} {:>10} {:>14} {:>14} {:>16} {:>9}",
        "round",
        "eval loss",
        "sent/peer B",
        "recv/peer B",
        "fp32 grad B",
        "ratio"
    );
    let initial = loss_and_grad(&weights[0][0], &weights[0][1], &eval_x, &eval_y, None);
    say!("{:>5} {:>10.4}", 0, initial);
    let mut total_sent = 0u64;
    for round in 0..a.rounds {
        // Cosine decay from the peak to a tenth of it.
        let progress = round as f32 / a.rounds as f32;
        let lr = a.lr * (0.1 + 0.45 * (1.0 + (std::f32::consts::PI * progress).cos()));
        let mut wire_updates = Vec::with_capacity(a.peers);
        for peer in 0..a.peers {
            let (x, y) = task.batch((round * a.peers + peer) as u64 + 17, BATCH);
            let [w, b] = &weights[peer];
            loss_and_grad(w, b, &x, &y, Some((&mut gw, &mut gb)));
            let update = opts[peer]
                .step(&[&gw, &gb], lr, config.step_options())
                .context("DisTrO step failed")?;
            let header = UpdateHeader {
                run_id,
                round: round as u64,
                sender: ids[peer],
            };
            wire_updates.push(wire::encode(&header, &update).context("cannot encode an update")?);
        }
        let sent: Vec<u64> = wire_updates.iter().map(|u| u.len() as u64).collect();
        let all: u64 = sent.iter().sum();
        total_sent += all;
        for peer in 0..a.peers {
            // Every peer decodes every update from its bytes, as it would off the network.
            let incoming = wire_updates
                .iter()
                .map(|bytes| {
                    let d = wire::decode(bytes, &DecodeLimits::default())?;
                    anyhow::ensure!(
                        d.header.run_id == run_id && d.header.round == round as u64,
                        "stale update"
                    );
                    Ok(d.into_incoming())
                })
                .collect::<Result<Vec<IncomingUpdate>>>()?;
            let [w, b] = &mut weights[peer];
            opts[peer]
                .apply(&mut [w.as_mut_slice(), b.as_mut_slice()], &incoming, lr)
                .context("cannot apply the round's updates")?;
        }
        let report_every = (a.rounds / 15).max(1);
        if round % report_every == 0 || round + 1 == a.rounds {
            let loss = loss_and_grad(&weights[0][0], &weights[0][1], &eval_x, &eval_y, None);
            let per_peer = all / a.peers as u64;
            say!(
                "{:>5} {:>10.4} {:>14} {:>14} {:>16} {:>8.0}x",
                round + 1,
                loss,
                per_peer,
                all - per_peer,
                4 * params,
                (4 * params) as f64 / per_peer as f64
            );
        }
    }
    let digests: Vec<_> = weights
        .iter()
        .map(|[w, b]| weights_digest([w.as_slice(), b.as_slice()]))
        .collect();
    let same = digests.iter().all(|d| *d == digests[0]);
    say!(
        "sent {} bytes in all ({} per peer per round on average); fp32 all-reduce would send {} per peer per round",
        total_sent,
        total_sent / (a.peers * a.rounds) as u64,
        4 * params
    );
    say!(
        "replicas: {} peers, weights digest {} — {}",
        a.peers,
        &digests[0].to_hex()[..16],
        if same { "all identical" } else { "DIFFERENT" }
    );
    ensure!(same, "replicas diverged: this is a bug");
    Ok(())
}
