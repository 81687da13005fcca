//! `netstatfs-extcap`: Wireshark's capture source for netstatfs (see
//! `netstatfs::extcap`). Errors go to stderr with a non-zero exit, which
//! Wireshark shows in a dialog.

use std::process::ExitCode;

use clap::Parser;
use netstatfs::extcap::{ExtcapArgs, run};

fn main() -> ExitCode {
    let args = ExtcapArgs::parse();
    match run(&args, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("netstatfs-extcap: {failure}");
            ExitCode::FAILURE
        }
    }
}
