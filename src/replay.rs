//! `mediator replay FEED.csv [--rounds N]`: replays a QuantCup feed on a fresh [`Book`] per round
//! and reports the best and median time per message.
//!
//! Only the replay is timed: reading and parsing the file and allocating each round's book are
//! not. Every round must trade exactly the same (the book is deterministic); a round that does
//! not is reported as an error.

use anyhow::{bail, ensure, Context as _};
use matching_engine::book::Book;
use matching_engine::feed::{self, FeedStats};
use std::time::{Duration, Instant};

/// Rounds when `--rounds` is not given.
const ROUNDS_DEFAULT: u32 = 20;
/// Upper bound on `--rounds`, so a typo cannot keep the machine busy for hours.
const ROUNDS_MAX: u32 = 100_000;

const USAGE: &str = "usage: mediator replay FEED.csv [--rounds N]";

#[derive(Debug, PartialEq, Eq)]
struct Args {
    path: String,
    rounds: u32,
}

fn parse_args(args: &[String]) -> anyhow::Result<Args> {
    let mut path = None;
    let mut rounds = ROUNDS_DEFAULT;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = match arg.as_str() {
            "--rounds" => Some(it.next().context("--rounds needs a value")?.as_str()),
            a => a.strip_prefix("--rounds="),
        };
        if let Some(v) = value {
            rounds = v
                .parse()
                .with_context(|| format!("--rounds {v:?} is not a number"))?;
            ensure!(
                (1..=ROUNDS_MAX).contains(&rounds),
                "--rounds must be in 1..={ROUNDS_MAX}, got {rounds}"
            );
        } else if arg.starts_with('-') {
            bail!("unknown option {arg:?}\n{USAGE}");
        } else if path.replace(arg.clone()).is_some() {
            bail!("more than one feed file given\n{USAGE}");
        }
    }
    let path = path.with_context(|| format!("no feed file given\n{USAGE}"))?;
    Ok(Args { path, rounds })
}

/// Runs the subcommand.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let Args { path, rounds } = parse_args(args)?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let msgs = feed::parse(&text).with_context(|| format!("bad feed {path}"))?;
    ensure!(!msgs.is_empty(), "feed {path} has no messages");
    let stats = FeedStats::of(&msgs);

    let mut times = Vec::with_capacity(rounds as usize);
    let mut first = None;
    for round in 0..rounds {
        let mut book: Book<()> = stats.book();
        let start = Instant::now();
        let tally = feed::replay(&mut book, &msgs);
        let elapsed = start.elapsed();
        let tally = tally.context("book full: the feed rests more orders than it has limits")?;
        match first {
            None => first = Some(tally),
            Some(t) => ensure!(t == tally, "round {round} traded {tally:?}, round 0 {t:?}"),
        }
        times.push(elapsed);
    }
    let tally = first.context("no round ran")?;
    times.sort_unstable();
    let best = times[0];
    let median = median(&times);
    let n = msgs.len() as u128;
    println!(
        "feed: {path}: {} limits, {} cancels; {} fills, {} lots filled, {} orders cancelled",
        stats.limits, stats.cancels, tally.fills, tally.filled_qty, tally.cancelled
    );
    println!(
        "replay: {} msgs, {rounds} rounds, best {} ns/msg, median {} ns/msg",
        msgs.len(),
        per_msg(best, n),
        per_msg(median, n)
    );
    Ok(())
}

/// The median of sorted durations (the mean of the middle two for an even count).
fn median(sorted: &[Duration]) -> Duration {
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2
    }
}

/// `total / n` in nanoseconds with one decimal, rounded half up, in integer arithmetic.
fn per_msg(total: Duration, n: u128) -> String {
    let tenths = (total.as_nanos() * 10 + n / 2) / n;
    format!("{}.{}", tenths / 10, tenths % 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn arguments() {
        let ok = |a: &[&str]| parse_args(&args(a)).unwrap();
        assert_eq!(
            ok(&["f.csv"]),
            Args {
                path: "f.csv".into(),
                rounds: ROUNDS_DEFAULT
            }
        );
        assert_eq!(
            ok(&["--rounds", "3", "f.csv"]),
            Args {
                path: "f.csv".into(),
                rounds: 3
            }
        );
        assert_eq!(
            ok(&["f.csv", "--rounds=4"]),
            Args {
                path: "f.csv".into(),
                rounds: 4
            }
        );
        for bad in [
            &[][..],
            &["f.csv", "--rounds"],
            &["f.csv", "--rounds", "0"],
            &["a", "b"],
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?}");
        }
        assert!(parse_args(&args(&["f.csv", "--fast"])).is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(per_msg(Duration::from_nanos(1234), 100), "12.3");
        assert_eq!(per_msg(Duration::from_nanos(1235), 100), "12.4");
        assert_eq!(per_msg(Duration::from_nanos(7), 1), "7.0");
        let d = |n| Duration::from_nanos(n);
        assert_eq!(median(&[d(1), d(5), d(9)]), d(5));
        assert_eq!(median(&[d(1), d(5), d(9), d(11)]), d(7));
    }
}
