//! `presence-loadtest`: parses the command line, raises the open-file limit, and runs a scenario
//! (or, as the hidden `worker` subcommand, one worker process of a multi-process run).

mod admin;
mod cli;
mod client;
mod delivery;
mod fleet;
mod probe;
mod report;
mod run;
mod scenario;
mod target;
mod token;

use clap::Parser;

use crate::{cli::Command, scenario::Scenario};

#[tokio::main]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let cli = cli::Cli::parse();
    // Sockets are files: take the whole hard limit (it cannot be raised past it).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: cannot raise the open-file limit: {e}");
    }
    let scenario = match cli.command {
        Command::Worker(args) => {
            if let Err(e) = fleet::worker_process(args).await {
                eprintln!("worker error: {e:#}");
                std::process::exit(run::EXIT_FAILED);
            }
            return;
        }
        Command::Idle(a) => Scenario::Idle(a),
        Command::Churn(a) => Scenario::Churn(a),
        Command::Fanout(a) => Scenario::Fanout(a),
        Command::Private(a) => Scenario::Private(a),
        Command::Storm(a) => Scenario::Storm(a),
    };
    match run::run(scenario, argv).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
