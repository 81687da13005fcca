//! `netstatfs <MOUNTPOINT>`: parse the command line, set up logging, run.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use netstatfs::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(cli.log_filter()))
        .format(|out, record| {
            writeln!(
                out,
                "netstatfs: {}: {}",
                record.level().as_str().to_ascii_lowercase(),
                record.args()
            )
        })
        .init();
    match netstatfs::daemon::run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("netstatfs: error: {message}");
            ExitCode::FAILURE
        }
    }
}
