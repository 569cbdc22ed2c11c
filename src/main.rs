//! The `envelopefs` binary: parse the command line, run it, turn a failure into its exit
//! code (listed under EXIT STATUS in `envelopefs man`).

use std::process::ExitCode;

use clap::Parser;

use envelopefs::cli::helper_args;
use envelopefs::cli::{self, Cli};

fn main() -> ExitCode {
    // mount(8) and mount.fuse3 call the binary in their own ways: make those `mount`.
    let args = helper_args::rewrite(std::env::args_os().collect());
    let cli = Cli::parse_from(&args);
    match cli::run(cli, &args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("envelopefs: error: {}", cli::describe(&e));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
