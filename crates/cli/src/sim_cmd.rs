//! `starling sim` and `starling bench convergence`: several peers training
//! the real model in one process, recorded step by step.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use plotters::prelude::*;
use serde::Serialize;
use starling_distro::RobustConfig;
use starling_distro::{DistroConfig, ValueEncoding};
use starling_train::atomic::write_atomic;
use starling_train::data::shards::TokenStore;
use starling_train::{
    AdamWConfig, Adversary, Checkpoint, DeviceChoice, ModelConfig, Schedule, SelectedDevice,
    SimConfig, SimOptimizer, SimSummary, Simulation, StepRecord, Trainer, embedded_store,
    select_device,
};

use crate::distro_cmd::Values;

/// What every simulated run shares: model, data, batch, schedule, device.
#[derive(Args, Debug, Clone)]
pub struct RunOpts {
    /// Model: a preset (nano, small, 125m, 1b) or a JSON config file.
    #[arg(long, default_value = "nano")]
    pub model: String,
    /// Simulated peers.
    #[arg(long, default_value_t = 4)]
    pub peers: usize,
    /// Steps (rounds).
    #[arg(long, default_value_t = 400)]
    pub steps: u64,
    /// Sequences each peer trains on per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Sequences per forward/backward pass (accumulates up to --batch).
    #[arg(long, default_value_t = 16)]
    pub micro_batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Warmup steps (then cosine decay).
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    /// Where the cosine ends, as a fraction of the peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub final_lr: f32,
    /// Global-norm gradient clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// Run seed (initial weights and every batch).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Token shards made by `starling data prepare` (default: the embedded corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Bytes of embedded corpus to generate when --data is not given.
    #[arg(long, default_value_t = 8 << 20)]
    pub corpus_bytes: usize,
    /// Evaluate on the held-out split every this many steps.
    #[arg(long, default_value_t = 25)]
    pub eval_every: u64,
    /// Held-out sequences per evaluation.
    #[arg(long, default_value_t = 64)]
    pub eval_sequences: usize,
    /// auto, cpu, wgpu, wgpu:N or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerChoice {
    /// DisTrO/DeMo: sparse DCT momentum updates.
    Distro,
    /// AdamW on fp32 gradients averaged over the peers.
    AdamwDdp,
}

#[derive(Args, Debug)]
pub struct SimArgs {
    #[command(flatten)]
    pub run: RunOpts,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerChoice::Distro)]
    pub optimizer: OptimizerChoice,
    /// DisTrO: coefficients sent per 64x64 chunk.
    #[arg(long, default_value_t = 32)]
    pub topk: usize,
    /// DisTrO: how values travel.
    #[arg(long, value_enum, default_value_t = Values::F32)]
    pub values: Values,
    /// Peak learning rate (default: 1e-3 for DisTrO, 3e-3 for AdamW).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Output directory: steps.jsonl, summary.json, loss.svg, checkpoint/.
    #[arg(long, default_value = "runs/sim")]
    pub out: PathBuf,
    /// Also save a checkpoint (OUT/checkpoint) every this many steps; one is always saved at the end.
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// DisTrO: also run with each step's aggregate capped at this many
    /// coefficients per chunk (error feedback, as a run's `aggregate_topk`),
    /// and print both side by side (OUT/exact, OUT/capped).
    #[arg(long)]
    pub aggregate_topk: Option<usize>,
    /// Continue from a checkpoint directory (same settings), appending to steps.jsonl.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

/// Checkpointing for one run.
pub struct Saving<'a> {
    resume: Option<&'a Path>,
    every: u64,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// AdamW-DDP against DisTrO (k=32/f32 and k=4/sign) on the same data, one table.
    Convergence(ConvergenceArgs),
    /// A coordinator and N synthetic volunteers on loopback: what a round costs as N grows.
    Swarm(crate::swarm_bench_cmd::SwarmBenchArgs),
    /// Simulated runs with some peers attacking: what the host's screen keeps out, and the loss it costs.
    Robust(crate::robust_bench_cmd::RobustBenchArgs),
}

#[derive(Args, Debug)]
pub struct ConvergenceArgs {
    #[command(flatten)]
    pub run: RunOpts,
    /// AdamW-DDP peak learning rates to try (the best is compared): the
    /// baseline is tuned by default (1e-3 won on nano at 200 steps, 3e-3 in
    /// the calibration runs with twice the batch and steps).
    #[arg(long, value_delimiter = ',', default_value = "1e-3,3e-3")]
    pub adamw_lr: Vec<f32>,
    /// DisTrO peak learning rates to try, for each DisTrO setting.
    #[arg(long, value_delimiter = ',', default_value = "1e-3")]
    pub distro_lr: Vec<f32>,
    /// DisTrO settings as K/VALUES, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "32/f32,4/sign")]
    pub distro: Vec<String>,
    /// Also run every DisTrO setting with its aggregate capped at this many
    /// coefficients per chunk (a row each).
    #[arg(long)]
    pub aggregate_topk: Option<usize>,
    /// Output directory: one folder per run, convergence.json, convergence.svg.
    #[arg(long, default_value = "runs/convergence")]
    pub out: PathBuf,
}

pub fn load_model(spec: &str) -> Result<ModelConfig> {
    ModelConfig::preset_or_file(spec, Path::new("."))
        .with_context(|| format!("--model {spec}: not a preset or a usable model config file"))
}

pub fn load_data(run: &RunOpts, model: &ModelConfig) -> Result<TokenStore> {
    let store = match &run.data {
        Some(dir) => TokenStore::load(dir)
            .with_context(|| format!("cannot load token shards from {}", dir.display()))?,
        None => embedded_store(run.corpus_bytes, run.seed)
            .context("cannot tokenize the embedded corpus")?,
    };
    if store.index.vocab_size > model.vocab_size {
        bail!(
            "the data's vocabulary ({}) is larger than the model's ({})",
            store.index.vocab_size,
            model.vocab_size
        );
    }
    Ok(store)
}

/// What a run adds to DeMo's plain round, as a run's host would.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras {
    /// Cap each aggregate at this many coefficients per chunk.
    pub aggregate_topk: Option<usize>,
    /// Screen the updates before the merge.
    pub robust: Option<RobustConfig>,
    /// Some peers attack.
    pub adversary: Option<Adversary>,
}

fn sim_config(run: &RunOpts, optimizer: SimOptimizer, lr: f32, extras: Extras) -> SimConfig {
    let Extras {
        aggregate_topk,
        robust,
        adversary,
    } = extras;
    SimConfig {
        aggregate_topk,
        robust,
        adversary,
        peers: run.peers,
        steps: run.steps,
        batch: run.batch,
        micro_batch: run.micro_batch,
        seq_len: run.seq_len,
        schedule: Schedule {
            peak: lr,
            warmup: run.warmup,
            total: run.steps,
            final_fraction: run.final_lr,
        },
        clip: run.clip,
        optimizer,
        seed: run.seed,
        eval_fraction: 0.05,
        eval_sequences: run.eval_sequences,
        eval_every: run.eval_every,
    }
}

/// One simulated run: records to `out/steps.jsonl`, the summary to
/// `out/summary.json`, the curves to `out/loss.svg`.
/// What every run of one command shares.
pub struct Setup<'a> {
    pub run: &'a RunOpts,
    pub model: &'a ModelConfig,
    pub store: &'a TokenStore,
    pub device: &'a SelectedDevice,
}

pub fn run_one(
    label: &str,
    setup: &Setup<'_>,
    optimizer: SimOptimizer,
    lr: f32,
    extras: Extras,
    out: &Path,
    saving: Option<Saving<'_>>,
) -> Result<(SimSummary, Vec<StepRecord>)> {
    let Setup {
        run,
        model,
        store,
        device: selected,
    } = *setup;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut trainer =
        Trainer::new(model, &selected.device, run.seed).context("cannot build the model")?;
    say!(
        "[{label}] model {} ({} parameters), {} peers x {} sequences x {} tokens, lr {lr:e}; {}",
        model.name,
        model.param_count(),
        run.peers,
        run.batch,
        run.seq_len,
        selected.reason
    );
    let config = sim_config(run, optimizer, lr, extras);
    let mut sim = match saving.as_ref().and_then(|s| s.resume) {
        Some(dir) => {
            let ck = Checkpoint::load(dir)
                .with_context(|| format!("cannot load the checkpoint in {}", dir.display()))?;
            let sim = Simulation::resume(&mut trainer, &config, &ck)
                .context("cannot resume from the checkpoint")?;
            if sim.next_step() >= config.steps {
                bail!(
                    "the checkpoint is already at step {} of {}: raise --steps to train further",
                    sim.next_step(),
                    config.steps
                );
            }
            say!("[{label}] resuming after step {}", sim.next_step());
            sim
        }
        None => Simulation::new(&trainer, &config).context("cannot start the simulation")?,
    };
    let steps_path = out.join("steps.jsonl");
    let steps_file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(sim.next_step() > 0)
        .truncate(sim.next_step() == 0)
        .open(&steps_path)
        .with_context(|| format!("cannot create {}", steps_path.display()))?;
    let mut steps_file = BufWriter::new(steps_file);
    let mut records = Vec::new();
    let mut write_err: Option<std::io::Error> = None;
    let mut print_err: Option<anyhow::Error> = None;
    let mut on_step = |r: &StepRecord| {
        if write_err.is_none()
            && let Err(e) = serde_json::to_writer(&mut steps_file, r)
                .map_err(std::io::Error::from)
                .and_then(|()| steps_file.write_all(b"\n"))
        {
            write_err = Some(e);
        }
        if let Some(eval) = r.eval_loss
            && print_err.is_none()
        {
            let line = format!(
                "[{label}] step {:>5}  loss {:.4}  eval {:.4}  lr {:.2e}  sent {} B/peer  ({:.0} s)",
                r.step + 1,
                r.loss,
                eval,
                r.lr,
                r.bytes_sent_per_peer,
                r.wall_s
            );
            if let Err(e) = crate::write_stdout(format_args!("{line}")) {
                print_err = Some(e);
            }
        }
        records.push(r.clone());
    };
    let every = saving.as_ref().map_or(0, |s| s.every);
    let mut summary: Option<SimSummary> = None;
    while sim.next_step() < config.steps || summary.is_none() {
        let until = sim
            .next_step()
            .checked_div(every)
            .map_or(config.steps, |done| (done + 1) * every);
        let part = sim
            .run(&mut trainer, store, &config, until, &mut on_step)
            .with_context(|| format!("simulation {label} failed"))?;
        summary = Some(match summary {
            None => part,
            Some(s) => merge(s, part),
        });
        if saving.is_some() {
            let dir = out.join("checkpoint");
            sim.checkpoint(&trainer, run.seed)
                .context("cannot read the state to checkpoint")?
                .save(&dir)
                .with_context(|| format!("cannot save a checkpoint in {}", dir.display()))?;
        }
    }
    let summary = summary.context("no steps ran")?;
    if let Some(e) = print_err {
        return Err(e);
    }
    if let Some(e) = write_err {
        return Err(e).with_context(|| format!("cannot write {}", steps_path.display()));
    }
    steps_file
        .flush()
        .with_context(|| format!("cannot write {}", steps_path.display()))?;
    let json = serde_json::to_vec_pretty(&summary).context("cannot serialize the summary")?;
    let summary_path = out.join("summary.json");
    write_atomic(&summary_path, &json)
        .with_context(|| format!("cannot write {}", summary_path.display()))?;
    plot(
        &out.join("loss.svg"),
        &format!("{label}: loss per step"),
        &[series(label, &records)],
    )?;
    Ok((summary, records))
}

/// Two consecutive parts of one run as one summary.
fn merge(a: SimSummary, b: SimSummary) -> SimSummary {
    let steps = |s: &SimSummary| s.tokens as f64;
    let total = steps(&a) + steps(&b);
    SimSummary {
        final_eval_loss: b.final_eval_loss,
        bytes_per_peer_per_step: if total > 0.0 {
            (a.bytes_per_peer_per_step * steps(&a) + b.bytes_per_peer_per_step * steps(&b)) / total
        } else {
            b.bytes_per_peer_per_step
        },
        bytes_received_per_peer_per_step: if total > 0.0 {
            (a.bytes_received_per_peer_per_step * steps(&a)
                + b.bytes_received_per_peer_per_step * steps(&b))
                / total
        } else {
            b.bytes_received_per_peer_per_step
        },
        allreduce_bytes_per_peer: b.allreduce_bytes_per_peer,
        tokens: a.tokens + b.tokens,
        bad_updates_sent: a.bad_updates_sent + b.bad_updates_sent,
        bad_updates_accepted: a.bad_updates_accepted + b.bad_updates_accepted,
        honest_updates_rejected: a.honest_updates_rejected + b.honest_updates_rejected,
        wall_s: a.wall_s + b.wall_s,
    }
}

type Series = (String, Vec<(f64, f64)>, Vec<(f64, f64)>);

/// Training and held-out loss points of one run.
fn series(label: &str, records: &[StepRecord]) -> Series {
    let train = records
        .iter()
        .map(|r| (r.step as f64 + 1.0, f64::from(r.loss)))
        .collect();
    let eval = records
        .iter()
        .filter_map(|r| r.eval_loss.map(|e| (r.step as f64 + 1.0, f64::from(e))))
        .collect();
    (label.to_string(), train, eval)
}

/// Loss against step for each run: faint training loss, solid held-out loss.
fn plot(path: &Path, title: &str, runs: &[Series]) -> Result<()> {
    let points = || runs.iter().flat_map(|(_, t, e)| t.iter().chain(e));
    let max_step = points().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    if !lo.is_finite() {
        return Ok(());
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats/token)")
            .draw()?;
        for (i, (name, train, eval)) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart.draw_series(LineSeries::new(train.iter().copied(), color.mix(0.25)))?;
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), color.stroke_width(2)))?
                .label(format!("{name} (held-out)"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}

pub fn distro_optimizer(topk: usize, values: ValueEncoding) -> SimOptimizer {
    SimOptimizer::Distro(DistroConfig {
        topk,
        values,
        ..DistroConfig::default()
    })
}

pub fn run_sim(a: &SimArgs) -> Result<()> {
    let model = load_model(&a.run.model)?;
    let store = load_data(&a.run, &model)?;
    let (optimizer, lr, label) = match a.optimizer {
        OptimizerChoice::Distro => (
            distro_optimizer(a.topk, a.values.into()),
            a.lr.unwrap_or(1e-3),
            format!("distro k={}/{:?}", a.topk, a.values).to_lowercase(),
        ),
        OptimizerChoice::AdamwDdp => (
            SimOptimizer::AdamWDdp(AdamWConfig::default()),
            a.lr.unwrap_or(3e-3),
            "adamw-ddp".to_string(),
        ),
    };
    let saving = Saving {
        resume: a.resume.as_deref(),
        every: a.checkpoint_every,
    };
    let setup = Setup {
        run: &a.run,
        model: &model,
        store: &store,
        device: &select_device(a.run.device).context("cannot open the training device")?,
    };
    if let Some(k) = a.aggregate_topk {
        if a.optimizer != OptimizerChoice::Distro {
            bail!("--aggregate-topk applies to DisTrO only");
        }
        if a.resume.is_some() || a.checkpoint_every > 0 {
            bail!(
                "--aggregate-topk runs two simulations: use it without --resume and --checkpoint-every"
            );
        }
        return compare_capped(&label, &setup, optimizer, lr, k, &a.out);
    }
    let (s, _) = run_one(
        &label,
        &setup,
        optimizer,
        lr,
        Extras::default(),
        &a.out,
        Some(saving),
    )?;
    say!(
        "final eval loss {:.4}; {:.0} B/peer/step vs {} B for fp32 all-reduce ({:.1}x fewer); {:.0} s; records in {}",
        s.final_eval_loss,
        s.bytes_per_peer_per_step,
        s.allreduce_bytes_per_peer,
        s.allreduce_bytes_per_peer as f64 / s.bytes_per_peer_per_step.max(1.0),
        s.wall_s,
        a.out.display()
    );
    Ok(())
}

/// One row of the convergence table.
#[derive(Serialize)]
struct Row {
    run: String,
    lr: f32,
    final_eval_loss: f32,
    bytes_per_peer_per_step: f64,
    bytes_received_per_peer_per_step: f64,
    fewer_bytes_than_allreduce: f64,
    vs_best_adamw: f64,
    wall_s: f64,
}

fn parse_distro(spec: &str) -> Result<(usize, Values)> {
    let (k, v) = spec
        .split_once('/')
        .with_context(|| format!("DisTrO setting {spec:?} is not K/VALUES (e.g. 4/sign)"))?;
    let k: usize = k
        .parse()
        .with_context(|| format!("bad top-k in {spec:?}"))?;
    let v =
        Values::from_str(v, true).map_err(|e| anyhow::anyhow!("bad values in {spec:?}: {e}"))?;
    if k == 0 {
        bail!("top-k must be at least 1 in {spec:?}");
    }
    Ok((k, v))
}

pub fn run_bench(cmd: BenchCommand) -> Result<()> {
    let a = match cmd {
        BenchCommand::Convergence(a) => a,
        BenchCommand::Swarm(a) => return crate::swarm_bench_cmd::run(&a),
        BenchCommand::Robust(a) => return crate::robust_bench_cmd::run(&a),
    };
    let model = load_model(&a.run.model)?;
    let store = load_data(&a.run, &model)?;
    let mut plans: Vec<(String, SimOptimizer, f32, Option<usize>)> = Vec::new();
    for &lr in &a.adamw_lr {
        plans.push((
            "adamw-ddp".into(),
            SimOptimizer::AdamWDdp(AdamWConfig::default()),
            lr,
            None,
        ));
    }
    for spec in &a.distro {
        let (k, v) = parse_distro(spec)?;
        for &lr in &a.distro_lr {
            for cap in std::iter::once(None).chain(a.aggregate_topk.map(Some)) {
                let capped = cap.map(|c| format!(" cap {c}")).unwrap_or_default();
                plans.push((
                    format!("distro k={k}/{v:?}{capped}").to_lowercase(),
                    distro_optimizer(k, v.into()),
                    lr,
                    cap,
                ));
            }
        }
    }
    let setup = Setup {
        run: &a.run,
        model: &model,
        store: &store,
        device: &select_device(a.run.device).context("cannot open the training device")?,
    };
    let mut done: Vec<(String, f32, SimSummary, Vec<StepRecord>)> = Vec::new();
    for (label, optimizer, lr, cap) in plans {
        let dir = a
            .out
            .join(format!("{label}-lr{lr:e}").replace([' ', '/', '='], "_"));
        let extras = Extras {
            aggregate_topk: cap,
            ..Extras::default()
        };
        let (s, r) = run_one(&label, &setup, optimizer, lr, extras, &dir, None)?;
        done.push((label, lr, s, r));
    }
    let best_adamw = done
        .iter()
        .filter(|d| d.0 == "adamw-ddp")
        .map(|d| d.2.final_eval_loss)
        .fold(f32::INFINITY, f32::min);
    let rows: Vec<Row> = done
        .iter()
        .map(|(label, lr, s, _)| Row {
            run: label.clone(),
            lr: *lr,
            final_eval_loss: s.final_eval_loss,
            bytes_per_peer_per_step: s.bytes_per_peer_per_step,
            bytes_received_per_peer_per_step: s.bytes_received_per_peer_per_step,
            fewer_bytes_than_allreduce: s.allreduce_bytes_per_peer as f64
                / s.bytes_per_peer_per_step.max(1.0),
            vs_best_adamw: f64::from(s.final_eval_loss / best_adamw - 1.0),
            wall_s: s.wall_s,
        })
        .collect();
    say!("");
    say!(
        "{} peers, {} steps, {} x {} tokens per peer per step, model {} ({} parameters)",
        a.run.peers,
        a.run.steps,
        a.run.batch,
        a.run.seq_len,
        model.name,
        model.param_count()
    );
    say!(
        "| run | peak lr | final eval loss | vs best AdamW | bytes sent/peer/step | bytes received/peer/step | fewer bytes than fp32 all-reduce | wall s |"
    );
    say!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        say!(
            "| {} | {:e} | {:.4} | {:+.1}% | {:.0} | {:.0} | {:.1}x | {:.0} |",
            r.run,
            r.lr,
            r.final_eval_loss,
            100.0 * r.vs_best_adamw,
            r.bytes_per_peer_per_step,
            r.bytes_received_per_peer_per_step,
            r.fewer_bytes_than_allreduce,
            r.wall_s
        );
    }
    let json = serde_json::to_vec_pretty(&rows).context("cannot serialize the table")?;
    let table_path = a.out.join("convergence.json");
    write_atomic(&table_path, &json)
        .with_context(|| format!("cannot write {}", table_path.display()))?;
    let curves: Vec<Series> = done
        .iter()
        .map(|(label, lr, _, r)| series(&format!("{label} lr {lr:e}"), r))
        .collect();
    plot(
        &a.out.join("convergence.svg"),
        "DisTrO vs AdamW-DDP",
        &curves,
    )?;
    say!(
        "table in {}, curves in {}",
        a.out.join("convergence.json").display(),
        a.out.join("convergence.svg").display()
    );
    Ok(())
}

/// `starling sim --aggregate-topk K`: the same DisTrO run with the exact
/// aggregate and with the capped one, their held-out losses side by side.
fn compare_capped(
    label: &str,
    setup: &Setup<'_>,
    optimizer: SimOptimizer,
    lr: f32,
    k: usize,
    out: &Path,
) -> Result<()> {
    let (exact, exact_steps) = run_one(
        label,
        setup,
        optimizer,
        lr,
        Extras::default(),
        &out.join("exact"),
        None,
    )?;
    let capped_label = format!("{label} cap {k}");
    let (capped, capped_steps) = run_one(
        &capped_label,
        setup,
        optimizer,
        lr,
        Extras {
            aggregate_topk: Some(k),
            ..Extras::default()
        },
        &out.join("capped"),
        None,
    )?;
    say!("");
    say!("| step | eval loss, exact aggregate | eval loss, capped at {k} |");
    say!("|---|---|---|");
    for (a, b) in exact_steps.iter().zip(&capped_steps) {
        if let (Some(x), Some(y)) = (a.eval_loss, b.eval_loss) {
            say!("| {} | {x:.4} | {y:.4} |", a.step + 1);
        }
    }
    say!(
        "final eval loss: exact {:.4}, capped {:.4} ({:+.2}%); received per peer per step: exact {:.0} B, capped {:.0} B; {} peers",
        exact.final_eval_loss,
        capped.final_eval_loss,
        100.0 * f64::from(capped.final_eval_loss / exact.final_eval_loss - 1.0),
        exact.bytes_received_per_peer_per_step,
        capped.bytes_received_per_peer_per_step,
        setup.run.peers
    );
    plot(
        &out.join("loss.svg"),
        &format!("{label}: exact vs capped aggregate"),
        &[
            series(label, &exact_steps),
            series(&capped_label, &capped_steps),
        ],
    )
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint directory (made by `starling sim`).
    #[arg(long, default_value = "runs/sim/checkpoint")]
    pub checkpoint: PathBuf,
    /// Output directory for the Hugging Face model.
    #[arg(long)]
    pub hf: PathBuf,
}

pub fn run_export(a: &ExportArgs) -> Result<()> {
    let ck = Checkpoint::load(&a.checkpoint)
        .with_context(|| format!("cannot load the checkpoint in {}", a.checkpoint.display()))?;
    starling_train::export_hf(&ck.model, &ck.params, &a.hf)
        .with_context(|| format!("cannot export to {}", a.hf.display()))?;
    say!(
        "exported {} ({} parameters, step {}) to {} (config.json, model.safetensors; LlamaForCausalLM)",
        ck.model.name,
        ck.model.param_count(),
        ck.step,
        a.hf.display()
    );
    Ok(())
}
