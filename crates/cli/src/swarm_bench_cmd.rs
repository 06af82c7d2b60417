//! `starling bench swarm`: what a round costs as the member count grows,
//! measured with a real coordinator and N synthetic volunteers on loopback,
//! then extended to 1,000 and 10,000 volunteers by a model built from the
//! measured per-member costs (the output says which numbers are which).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use starling_distro::{TensorBudget, ValueEncoding, update_wire_bytes, wire::bits_for};
use starling_node::{
    HostBookkeeping, SwarmBenchOptions, SwarmRoundReport, TREE_FANOUT, TREE_HOST_FANOUT, Ticket,
    bench_host_bookkeeping, bench_swarm,
};
use starling_train::ModelConfig;

/// Children per member of the aggregate's tree (as the volunteers use it).
const FANOUT: f64 = TREE_FANOUT as f64;
/// The coordinator's children in that tree.
const HOST_FANOUT: f64 = TREE_HOST_FANOUT as f64;
/// Member counts the coordinator's bookkeeping is also timed at, beyond
/// the benchmark's own (past what one machine's endpoints can hold).
const BOOKKEEPING_AT: [usize; 2] = [1_000, 10_000];

#[derive(Args, Debug)]
pub struct SwarmBenchArgs {
    /// Volunteers to start in this process.
    #[arg(long, default_value_t = 16)]
    pub volunteers: usize,
    /// Rounds to play.
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Model preset whose shapes the synthetic updates have.
    #[arg(long, default_value = "nano")]
    pub model: String,
    /// Coefficients per chunk in each update.
    #[arg(long, default_value_t = 4)]
    pub topk: usize,
    /// Value encoding of the updates: sign, bf16 or f32.
    #[arg(long, default_value = "sign")]
    pub values: String,
    /// Cap the aggregate at this many coefficients per chunk (error feedback on the host).
    #[arg(long)]
    pub aggregate_topk: Option<usize>,
    /// One JSON object per round, then a summary object.
    #[arg(long)]
    pub json: bool,
    /// Where the coordinator keeps its state while the benchmark runs.
    #[arg(long, default_value = "runs/bench-swarm")]
    pub dir: PathBuf,
    /// Join this run's host (its ticket) instead of starting one: the run's
    /// model and settings apply, and only the volunteers' side is measured.
    #[arg(long, value_name = "TICKET")]
    pub join: Option<String>,
    /// Make this many of the volunteers corrupt every blob they relay to
    /// others (their own updates stay honest): shows the tree routing
    /// around bad providers.
    #[arg(long, default_value_t = 0)]
    pub corrupt_relays: usize,
    /// How many of the volunteers (the last ones) send empty updates, as
    /// throwaway identities flooding a round would.
    #[arg(long, default_value_t = 0)]
    pub empty_updates: usize,
}

pub fn run(args: &SwarmBenchArgs) -> Result<()> {
    if args.volunteers == 0 || args.rounds == 0 {
        bail!("--volunteers and --rounds must be at least 1");
    }
    let values = ValueEncoding::from_name(&args.values)
        .with_context(|| format!("--values {}: use sign, bf16 or f32", args.values))?;
    let join = args
        .join
        .as_deref()
        .map(|t| t.trim().parse::<Ticket>())
        .transpose()
        .context("--join: not a join ticket")?;
    let opts = SwarmBenchOptions {
        volunteers: args.volunteers,
        rounds: args.rounds,
        model: args.model.clone(),
        topk: args.topk,
        values: args.values.clone(),
        aggregate_topk: args.aggregate_topk,
        dir: args.dir.clone(),
        join,
        corrupt_relays: args.corrupt_relays,
        empty_updates: args.empty_updates,
    };
    if !args.json {
        say!(
            "starling bench swarm: a coordinator and {} synthetic volunteers on loopback, {} rounds of {} \
             (top-{} {}{})",
            args.volunteers,
            args.rounds,
            args.model,
            args.topk,
            args.values,
            args.aggregate_topk
                .map(|k| format!(", aggregate capped at {k}"))
                .unwrap_or_default()
        );
        say!(
            "{:>5} {:>7} {:>8} {:>11} {:>9} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9} {:>8} {:>9}",
            "round",
            "members",
            "accepted",
            "aggregate",
            "roster",
            "down median",
            "down max",
            "up max",
            "host up",
            "of agg",
            "from host",
            "secs",
            "rss MB"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut lines: Vec<String> = Vec::new();
    let json = args.json;
    let reports = runtime.block_on(bench_swarm(&opts, |r: &SwarmRoundReport| {
        lines.push(if json {
            json!({ "type": "round", "round": r }).to_string()
        } else {
            format!(
                "{:>5} {:>7} {:>8} {:>11} {:>9} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9} {:>8.1} {:>9}",
                r.round,
                r.members,
                r.accepted,
                r.aggregate_bytes,
                r.roster_bytes,
                r.download_median_bytes,
                r.download_max_bytes,
                r.upload_max_bytes,
                r.host_upload_bytes,
                r.host_aggregate_upload_bytes,
                r.aggregates_from_host,
                r.round_secs,
                r.process_rss_bytes
                    .map(|b| (b >> 20).to_string())
                    .unwrap_or_else(|| "-".into())
            )
        });
    }))?;
    for line in &lines {
        say!("{line}");
    }
    // The coordinator's own work per round, timed at this run's size and
    // beyond it (not when joined to another's run: no coordinator here).
    let mut bookkeeping = Vec::new();
    if opts.join.is_none() {
        let mut sizes = vec![args.volunteers];
        sizes.extend(BOOKKEEPING_AT.iter().filter(|&&n| n > args.volunteers));
        for members in sizes {
            bookkeeping.push(bench_host_bookkeeping(&opts, members)?);
        }
    }
    let mut summary = summarize(args, values, &reports)?;
    summary["host_bookkeeping"] = json!(bookkeeping);
    if json {
        say!("{}", summary);
    } else {
        say!("");
        say!("measured (bytes are blob transfers; gossip and control frames are not counted):");
        for key in [
            "per_volunteer_download_median_bytes",
            "per_volunteer_download_max_bytes",
            "host_upload_bytes_per_round",
            "host_upload_aggregates_per_round",
            "host_upload_bytes_joining",
            "host_aggregate_copies_median",
            "aggregate_bytes",
            "update_bytes",
            "round_secs_median",
        ] {
            say!("  {key}: {}", summary[key]);
        }
        if !bookkeeping.is_empty() {
            say!(
                "the coordinator's bookkeeping per round (measured: its functions on synthetic updates, one thread):"
            );
            say!(
                "  {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11}",
                "members",
                "verify s",
                "check s",
                "filter s",
                "merge s",
                "lists s",
                "total s",
                "held MB",
                "aggregate"
            );
            for b in &bookkeeping {
                say!("  {}", bookkeeping_row(b));
            }
        }
        say!("modelled from the measured per-member costs (not measured):");
        if let Some(model) = summary["model"].as_array() {
            for m in model {
                say!("  {m}");
            }
        }
    }
    Ok(())
}

/// One row of the bookkeeping table.
fn bookkeeping_row(b: &HostBookkeeping) -> String {
    format!(
        "{:>7} {:>9.3} {:>9.3} {:>9.4} {:>9.3} {:>9.4} {:>9.3} {:>10.1} {:>11}",
        b.members,
        b.verify_secs,
        b.check_secs,
        b.filter_secs,
        b.merge_secs,
        b.lists_secs,
        b.total_secs,
        b.held_update_bytes as f64 / 1e6,
        b.aggregate_bytes
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The summary object: measured medians, then the model for 1,000 and
/// 10,000 volunteers.
fn summarize(
    args: &SwarmBenchArgs,
    values: ValueEncoding,
    reports: &[SwarmRoundReport],
) -> Result<serde_json::Value> {
    let downloads: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.downloads.iter().map(|&d| d as f64))
        .collect();
    let down_median = median(downloads.clone());
    let down_max = downloads.iter().copied().fold(0.0, f64::max);
    // The join: every volunteer is new and gets its first member list
    // from the host (no member admits it yet). What the host uploaded
    // beyond that, spread over the rounds, is what a round costs it.
    let host_up_join = reports
        .first()
        .map_or(0.0, |r| r.host_roster_upload_bytes as f64);
    let host_up_total: f64 = reports.iter().map(|r| r.host_upload_bytes as f64).sum();
    let host_up = (host_up_total - host_up_join).max(0.0) / reports.len().max(1) as f64;
    let host_aggregate_copies = median(
        reports
            .iter()
            .map(|r| r.host_aggregate_upload_bytes as f64 / r.aggregate_bytes.max(1) as f64)
            .collect(),
    );
    let aggregate = median(reports.iter().map(|r| r.aggregate_bytes as f64).collect());
    let roster = median(reports.iter().map(|r| r.roster_bytes as f64).collect());
    let secs = median(reports.iter().map(|r| r.round_secs).collect());
    let n = args.volunteers as f64;
    let roster_per_member = roster / n;
    let model = ModelConfig::preset(&args.model)
        .with_context(|| format!("--model {}: not a preset", args.model))?;
    let budgets = budgets_of(&model);
    let update = update_wire_bytes(&budgets, args.topk, values) as f64;
    // Copies of the shared blobs the host served per round, beyond its tree
    // children: fallbacks, which may grow with the member count.
    let host_copies = host_up / (aggregate + roster).max(1.0);
    let fallback_per_member = ((host_copies - HOST_FANOUT) / n).max(0.0);

    let one_b = ModelConfig::preset("1b").context("the 1b preset")?;
    let one_b_budgets = budgets_of(&one_b);
    let mut modelled = Vec::new();
    for (label, cfg, b) in [
        (args.model.as_str(), &model, &budgets),
        ("1b", &one_b, &one_b_budgets),
    ] {
        let upd = update_wire_bytes(b, args.topk, values) as f64;
        for volunteers in [1_000f64, 10_000f64] {
            let agg = aggregate_model(b, args.topk, values, args.aggregate_topk, volunteers);
            let ros = roster_per_member * volunteers;
            let copies = HOST_FANOUT + fallback_per_member * volunteers;
            let depth = tree_depth(volunteers);
            // 1B on 10 Mbit/s up, 50 Mbit/s down; an inner node uploads the
            // blobs to FANOUT children, hop after hop down the tree.
            let (up_rate, down_rate) = (10e6 / 8.0, 50e6 / 8.0);
            let hop = (FANOUT * (agg + ros) / up_rate).max((agg + ros) / down_rate);
            let comm = upd / up_rate + depth * hop;
            // Assumed step: 6 x params x tokens FLOPs (8 x 2048 tokens per
            // volunteer step) at a sustained 20 TFLOP/s (a mid-range GPU
            // such as an RTX 4070 in bf16).
            let step = 6.0 * cfg.param_count() as f64 * 8.0 * 2048.0 / 20e12;
            modelled.push(json!({
                "model": label,
                "volunteers": volunteers,
                "per_volunteer_download_bytes": (agg + ros).round(),
                "aggregate_bytes": agg.round(),
                "roster_bytes": ros.round(),
                "update_bytes": upd,
                "host_upload_bytes_per_round": (copies * (agg + ros)).round(),
                "host_download_bytes_per_round": (upd * volunteers).round(),
                "tree_depth": depth,
                "round_comm_secs_10up_50down": (comm * 10.0).round() / 10.0,
                "assumed_step_secs": (step * 10.0).round() / 10.0,
                "note": "modelled, not measured",
            }));
        }
    }
    Ok(json!({
        "type": "summary",
        "volunteers": args.volunteers,
        "rounds": args.rounds,
        "model_name": args.model,
        "topk": args.topk,
        "values": args.values,
        "aggregate_topk": args.aggregate_topk,
        "per_volunteer_download_median_bytes": down_median,
        "per_volunteer_download_max_bytes": down_max,
        "host_upload_bytes_per_round": host_up.round(),
        "host_upload_aggregates_per_round": (host_up / aggregate.max(1.0) * 100.0).round() / 100.0,
        "host_aggregate_copies_median": (host_aggregate_copies * 100.0).round() / 100.0,
        "host_upload_bytes_joining": host_up_join.round(),
        "aggregate_bytes": aggregate,
        "roster_bytes": roster,
        "update_bytes": update,
        "round_secs_median": (secs * 100.0).round() / 100.0,
        "model": modelled,
    }))
}

fn budgets_of(model: &ModelConfig) -> Vec<TensorBudget> {
    model
        .stored_shapes()
        .iter()
        .map(|(_, s)| TensorBudget::for_shape(s, starling_distro::DEFAULT_CHUNK))
        .collect()
}

/// Levels of the aggregate's tree below the coordinator for `n` members.
fn tree_depth(n: f64) -> f64 {
    let (mut depth, mut covered, mut level) = (1.0, HOST_FANOUT, HOST_FANOUT);
    while covered < n {
        level *= FANOUT;
        covered += level;
        depth += 1.0;
    }
    depth
}

/// The aggregate's size for `n` senders of top-`k` updates: the expected
/// union of independent top-k per chunk (E·(1−(1−k/E)^n)), its indices as a
/// list or a bitmap, whichever is smaller, and its values in the bits the
/// encoder would pick (a palette of sign means, else 16/32 bits); with a cap,
/// `cap` bf16 values per chunk.
fn aggregate_model(
    tensors: &[TensorBudget],
    k: usize,
    values: ValueEncoding,
    cap: Option<usize>,
    n: f64,
) -> f64 {
    let mut bits = 0.0;
    for t in tensors {
        let elems = t.grid.chunk_elems() as f64;
        let k = t.grid.clamp_topk(k) as f64;
        let union = elems * (1.0 - (1.0 - k / elems).powf(n));
        let (entries, value_bits) = match cap {
            Some(c) => (union.min(c as f64), 16.0),
            None => {
                let vb = match values {
                    ValueEncoding::Sign => {
                        // Means of up to c_max signs: at most sum (c+1) distinct values.
                        let lambda = n * k / elems;
                        let c_max = (lambda + 5.0 * lambda.sqrt() + 3.0).ceil();
                        let distinct = c_max * (c_max + 3.0) / 2.0;
                        f64::from(bits_for(distinct as u64))
                    }
                    ValueEncoding::Bf16 => 16.0,
                    _ => 32.0,
                };
                (union, vb)
            }
        };
        let position_bits = f64::from(bits_for(elems as u64 - 1));
        let index = (entries * position_bits).min(elems);
        bits += t.grid.num_chunks() as f64
            * (f64::from(bits_for(elems as u64)) + index + entries * value_bits);
    }
    (bits / 8.0).ceil()
}
