//! `starling`: the headless face of Starling.
//!
//! Thin by design: argument parsing and printing live here, everything that
//! computes lives in the library crates, so the desktop app can call the same
//! code.

/// `println!` for command output: fails with an error instead of panicking,
/// and ends the process quietly when the reader has gone (`starling … | head`).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))?
    };
}

mod data_cmd;
mod demo;
mod distro_cmd;
mod idle;
mod robust_bench_cmd;
mod sim_cmd;
mod swarm_bench_cmd;
mod swarm_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Train open language models together, over home internet.
#[derive(Parser, Debug)]
#[command(name = "starling", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A host and three volunteers on this machine train the nano model over loopback iroh.
    Demo(swarm_cmd::DemoArgs),
    /// Create and coordinate a training run; prints the join ticket.
    Host(swarm_cmd::HostArgs),
    /// Join a run as a volunteer with the ticket its host printed.
    Join(swarm_cmd::JoinArgs),
    /// What this machine has (GPUs, VRAM, CPU, RAM) and which models each device can train.
    Check(CheckArgs),
    /// Inspect DisTrO: byte budgets, compress and decompress real tensors.
    #[command(subcommand)]
    Distro(distro_cmd::DistroCommand),
    /// Prepare training data: tokenize text into shards.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Train several simulated peers in one process (DisTrO or AdamW-DDP), recording every step.
    Sim(sim_cmd::SimArgs),
    /// Write a checkpoint as a Hugging Face LlamaForCausalLM (config.json + model.safetensors).
    Export(sim_cmd::ExportArgs),
    /// Benchmarks that answer a question with one table.
    #[command(subcommand)]
    Bench(sim_cmd::BenchCommand),
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn run_check(args: &CheckArgs) -> Result<()> {
    let report = starling_node::machine::probe();
    if args.json {
        say!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        say!("{}", report.render().trim_end());
    }
    Ok(())
}

fn write_stdout(args: std::fmt::Arguments<'_>) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        result => Ok(result?),
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => swarm_cmd::run_demo(&args),
        Command::Host(args) => swarm_cmd::run_host(&args),
        Command::Join(args) => swarm_cmd::run_join(&args),
        Command::Check(args) => run_check(&args),
        Command::Distro(cmd) => distro_cmd::run(cmd),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Sim(args) => sim_cmd::run_sim(&args),
        Command::Bench(cmd) => sim_cmd::run_bench(cmd),
        Command::Export(args) => sim_cmd::run_export(&args),
    }
}
