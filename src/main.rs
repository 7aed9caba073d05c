//! The `mediator` binary: one subcommand per job (`mediator help` lists them).
//!
//! Each subcommand lives in its own module and returns `anyhow::Result`; `main` only dispatches
//! and turns an error into a message on stderr and exit code 2.

mod replay;

use std::process::ExitCode;

const USAGE: &str = "\
usage: mediator <command> [args]

commands:
  replay FEED.csv [--rounds N]   replay a QuantCup order feed on a fresh book N times (default 20)
                                 and print the time per message
  help                           print this message";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("", &[][..]),
    };
    let result = match command {
        "replay" => replay::run(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        "" => Err(anyhow::anyhow!("no command given\n\n{USAGE}")),
        other => Err(anyhow::anyhow!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mediator: {e:#}");
            ExitCode::from(2)
        }
    }
}
