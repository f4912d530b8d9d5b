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

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let cli = cli::Cli::parse();
    // The runtime is chosen by the scenario's `--threads`; a worker process reads it from its
    // assignment (a spec it cannot read fails later, with its message, on the default runtime).
    let threads = match &cli.command {
        Command::Worker(args) => serde_json::from_str::<fleet::RunSpec>(&args.spec)
            .map(|spec| spec.scenario.common().threads)
            .unwrap_or(0),
        Command::Idle(a) => a.common.threads,
        Command::Churn(a) => a.common.threads,
        Command::Fanout(a) => a.common.threads,
        Command::Private(a) => a.common.threads,
        Command::Storm(a) => a.common.threads,
    };
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(usize::from(threads));
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = runtime.block_on(run(cli, argv));
    // Connection tasks still open when a run gave up must not hold the exit.
    runtime.shutdown_background();
    std::process::exit(code);
}

async fn run(cli: cli::Cli, argv: Vec<String>) -> i32 {
    // Sockets are files: take the whole hard limit (it cannot be raised past it).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: cannot raise the open-file limit: {e}");
    }
    let scenario = match cli.command {
        Command::Worker(args) => {
            if let Err(e) = fleet::worker_process(args).await {
                eprintln!("worker error: {e:#}");
                return run::EXIT_FAILED;
            }
            return 0;
        }
        Command::Idle(a) => Scenario::Idle(a),
        Command::Churn(a) => Scenario::Churn(a),
        Command::Fanout(a) => Scenario::Fanout(a),
        Command::Private(a) => Scenario::Private(a),
        Command::Storm(a) => Scenario::Storm(a),
    };
    match run::run(scenario, argv).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}
