use std::process::ExitCode;

use clap::Parser;
use keygate::cli::{self, Cli, Command};

/// Allocation is about 8 % of the server's CPU under load with glibc's malloc; mimalloc
/// takes about 5 % of the whole off (BENCHMARKS.md, session 19).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Started by the Windows service manager (see src/windows.rs and packaging/wix/main.wxs).
    #[cfg(windows)]
    if let Some(args) = keygate::windows::service_args() {
        return keygate::windows::run(move || start(Cli::parse_from(args)));
    }
    start(Cli::parse())
}

fn start(cli: Cli) -> ExitCode {
    let config = match cli.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let serving = matches!(cli.command, Command::Serve { .. });
    let (errors, logs_to_files) = match cli::init_tracing(&config, serving) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve { .. } => cli::serve(config, errors),
        command => cli::run(command, config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cli::reader_went_away(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // In the log files too: a Windows service's standard error goes nowhere.
            if logs_to_files {
                tracing::error!("{e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
