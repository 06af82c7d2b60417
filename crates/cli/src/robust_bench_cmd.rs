//! `starling bench robust`: the simulated swarm with some peers attacking,
//! each attack against the clean run (same seed, same data, every peer
//! honest), all screened as a run's host screens a round.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use starling_distro::RobustConfig;
use starling_distro::robust::DEFAULT_MIN_AGREEMENT;
use starling_train::{Adversary, Attack, SimSummary, select_device};

use crate::distro_cmd::Values;
use crate::sim_cmd::{Extras, RunOpts, Setup, distro_optimizer, load_data, load_model, run_one};

/// How far the attacked run's final eval loss may be from the clean one's.
const GOAL_LOSS: f64 = 0.02;

#[derive(Args, Debug)]
#[command(
    mut_arg("peers", |a| a.default_value("8")),
    mut_arg("steps", |a| a.default_value("30")),
    mut_arg("eval_every", |a| a.default_value("10")),
)]
pub struct RobustBenchArgs {
    #[command(flatten)]
    pub run: RunOpts,
    /// How many of the peers attack (the last ones).
    #[arg(long, default_value_t = 2)]
    pub attackers: usize,
    /// Attacks to run, comma separated: scale:FACTOR, random-signs, negate,
    /// empty, stale[:STEPS], copy (default: all six).
    #[arg(long, value_delimiter = ',')]
    pub attack: Vec<Attack>,
    /// Coefficients sent per 64x64 chunk.
    #[arg(long, default_value_t = 32)]
    pub topk: usize,
    /// How values travel.
    #[arg(long, value_enum, default_value_t = Values::F32)]
    pub values: Values,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// The screen's size limit, as a multiple of the round's median (0: off).
    #[arg(long, default_value_t = 5.0)]
    pub norm_factor: f32,
    /// The screen's agreement limit, in standard errors below half the
    /// round's median agreement.
    #[arg(long, default_value_t = DEFAULT_MIN_AGREEMENT)]
    pub min_agreement: f32,
    /// Also run the clean run and every attack without the screen
    /// (DeMo's plain mean), to show what the screen saves and costs.
    #[arg(long)]
    pub unscreened: bool,
    /// Print one JSON object per attack (the last line is the last attack's).
    #[arg(long)]
    pub json: bool,
    /// Output directory: one folder per run.
    #[arg(long, default_value = "runs/robust")]
    pub out: PathBuf,
}

/// One attack's result; the JSON line `--json` prints.
#[derive(Serialize)]
struct Outcome {
    attack: String,
    peers: usize,
    attackers: usize,
    screened: bool,
    clean_eval: f32,
    attacked_eval: f32,
    /// (attacked - clean) / clean.
    loss_change: f64,
    bad_updates_sent: u64,
    bad_updates_accepted: u64,
    honest_updates_rejected: u64,
    /// Within 2% of the clean run, and every scale, random-signs and
    /// empty update left out.
    meets_goal: bool,
}

pub fn run(a: &RobustBenchArgs) -> Result<()> {
    if a.attackers == 0 || a.attackers >= a.run.peers {
        anyhow::bail!(
            "--attackers must be between 1 and --peers minus one (got {} of {})",
            a.attackers,
            a.run.peers
        );
    }
    let attacks: Vec<Attack> = if a.attack.is_empty() {
        Attack::ALL.to_vec()
    } else {
        a.attack.clone()
    };
    let model = load_model(&a.run.model)?;
    let store = load_data(&a.run, &model)?;
    let device = select_device(a.run.device).context("cannot open the training device")?;
    let setup = Setup {
        run: &a.run,
        model: &model,
        store: &store,
        device: &device,
    };
    let optimizer = distro_optimizer(a.topk, a.values.into());
    let screen = RobustConfig {
        norm_factor: a.norm_factor,
        min_agreement: Some(a.min_agreement),
    };
    let mut screens = vec![Some(screen)];
    if a.unscreened {
        screens.push(None);
    }
    let mut outcomes = Vec::new();
    for robust in screens {
        let tag = if robust.is_some() {
            "screened"
        } else {
            "unscreened"
        };
        let sim = |label: &str, adversary: Option<Adversary>| -> Result<SimSummary> {
            let dir = a.out.join(format!("{tag}-{label}").replace(':', "_"));
            let extras = Extras {
                robust,
                adversary,
                ..Extras::default()
            };
            Ok(run_one(
                &format!("{tag} {label}"),
                &setup,
                optimizer,
                a.lr,
                extras,
                &dir,
                None,
            )?
            .0)
        };
        let clean = sim("clean", None)?;
        say!(
            "[{tag} clean] final eval {:.4}; {} honest updates left out",
            clean.final_eval_loss,
            clean.honest_updates_rejected
        );
        for &attack in &attacks {
            let s = sim(
                &attack.to_string(),
                Some(Adversary {
                    attackers: a.attackers,
                    attack,
                }),
            )?;
            let change = f64::from(s.final_eval_loss - clean.final_eval_loss)
                / f64::from(clean.final_eval_loss);
            let must_reject = matches!(
                attack,
                Attack::Scale(_) | Attack::RandomSigns | Attack::Empty
            );
            let outcome = Outcome {
                attack: attack.to_string(),
                peers: a.run.peers,
                attackers: a.attackers,
                screened: robust.is_some(),
                clean_eval: clean.final_eval_loss,
                attacked_eval: s.final_eval_loss,
                loss_change: change,
                bad_updates_sent: s.bad_updates_sent,
                bad_updates_accepted: s.bad_updates_accepted,
                honest_updates_rejected: s.honest_updates_rejected + clean.honest_updates_rejected,
                meets_goal: change.abs() <= GOAL_LOSS
                    && !(must_reject && s.bad_updates_accepted > 0),
            };
            if a.json {
                crate::write_stdout(format_args!(
                    "{}",
                    serde_json::to_string(&outcome).context("cannot serialize the outcome")?
                ))?;
            }
            outcomes.push(outcome);
        }
    }
    say!("");
    say!(
        "{} peers, {} attacking, {} steps, top-{} {:?}, lr {:e}",
        a.run.peers,
        a.attackers,
        a.run.steps,
        a.topk,
        a.values,
        a.lr
    );
    say!(
        "| attack | screen | clean eval | attacked eval | change | bad sent | bad accepted | honest left out | goal |"
    );
    say!("|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        say!(
            "| {} | {} | {:.4} | {:.4} | {:+.2}% | {} | {} | {} | {} |",
            o.attack,
            if o.screened { "on" } else { "off" },
            o.clean_eval,
            o.attacked_eval,
            100.0 * o.loss_change,
            o.bad_updates_sent,
            o.bad_updates_accepted,
            o.honest_updates_rejected,
            if o.meets_goal { "met" } else { "missed" }
        );
    }
    Ok(())
}
