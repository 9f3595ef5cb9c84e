//! `snapblk` command-line entry point: parses arguments and dispatches to the library.

use std::process::ExitCode;

use clap::Parser;
use snapblk::cli::{Cli, Command};
use snapblk::image_cmd;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => snapblk::serve::serve(&args),
        Command::Create(args) => return image_cmd::create(&args),
        Command::Info(args) => return image_cmd::info(&args),
        Command::Check(args) => return image_cmd::check(&args),
        Command::Commit(args) => return image_cmd::commit(&args),
        Command::Export(args) => return image_cmd::export(&args),
        Command::Checksum(args) => return image_cmd::checksum(&args),
        Command::Ctl(args) => return snapblk::ctl::ctl(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
