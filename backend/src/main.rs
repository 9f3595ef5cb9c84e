//! `snapblk` command-line entry point: parses arguments and dispatches to the library.
//!
//! Every failure ends as one line on stderr and a non-zero exit: argument errors (clap's usage
//! text is cut to its first line), command errors, and even a panic (the hook prints one line).

use std::io::Write as _;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use snapblk::cli::{Cli, Command};
use snapblk::image_cmd;

/// Prints a panic as one line; the default hook prints several.
fn one_line_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let _ = writeln!(
            std::io::stderr(),
            "snapblk: internal error{at}: {}",
            msg.replace('\n', " ")
        );
    }));
}

fn main() -> ExitCode {
    one_line_panics();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::FAILURE;
        }
        Err(e) => {
            // clap's first paragraph is the error (with the names it is about); the usage and
            // tips after the first blank line are left out.
            let text = e.to_string();
            let first = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            let _ = writeln!(std::io::stderr(), "snapblk: {first} (see snapblk --help)");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => snapblk::serve::serve(&args),
        Command::Create(args) => return image_cmd::create(&args),
        Command::Info(args) => return image_cmd::info(&args),
        Command::Check(args) => return image_cmd::check(&args),
        Command::Commit(args) => return image_cmd::commit(&args),
        Command::Export(args) => return image_cmd::export(&args),
        Command::Checksum(args) => return image_cmd::checksum(&args),
        Command::Convert(args) => return snapblk::convert_cmd::run(&args),
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
