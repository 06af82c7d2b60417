//! `starling`: the headless face of Starling.
//!
//! Thin by design: argument parsing and printing live here, everything that
//! computes lives in the library crates, so the desktop app can call the same
//! code.

mod demo;
mod distro_cmd;

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
    /// Run several DisTrO peers on this machine and show what they exchange.
    Demo(demo::DemoArgs),
    /// Inspect DisTrO: byte budgets, compress and decompress real tensors.
    #[command(subcommand)]
    Distro(distro_cmd::DistroCommand),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => demo::run(&args),
        Command::Distro(cmd) => distro_cmd::run(cmd),
    }
}
