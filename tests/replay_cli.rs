//! `mediator replay` run as a user runs it: the built binary on files in a temp dir.

use matching_engine::feed;
use std::path::Path;
use std::process::{Command, Output};

fn replay(path: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mediator"))
        .arg("replay")
        .arg(path)
        .args(extra)
        .output()
        .expect("run mediator")
}

/// Checks `replay: <msgs> msgs, <rounds> rounds, best <x> ns/msg, median <y> ns/msg` and returns
/// (msgs, rounds, best tenths, median tenths).
fn parse_last_line(stdout: &str) -> (usize, u32, u64, u64) {
    let line = stdout.lines().last().expect("some output");
    let rest = line
        .strip_prefix("replay: ")
        .unwrap_or_else(|| panic!("prefix: {line:?}"));
    let words: Vec<&str> = rest.split(' ').collect();
    assert_eq!(words.len(), 10, "{line:?}");
    assert_eq!(
        [words[1], words[3], words[4], words[6], words[7], words[9]],
        ["msgs,", "rounds,", "best", "ns/msg,", "median", "ns/msg"],
        "{line:?}"
    );
    let tenths = |w: &str| -> u64 {
        let (int, frac) = w
            .split_once('.')
            .unwrap_or_else(|| panic!("one decimal: {w:?}"));
        assert_eq!(frac.len(), 1, "one decimal: {w:?}");
        int.parse::<u64>().unwrap() * 10 + frac.parse::<u64>().unwrap()
    };
    let rounds = words[2].trim_end_matches(',').parse().unwrap();
    (
        words[0].parse().unwrap(),
        rounds,
        tenths(words[5]),
        tenths(words[8].trim_end_matches(',')),
    )
}

#[test]
fn replays_a_generated_feed_and_reports_time_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feed.csv");
    let msgs = feed::generate(42, 5_000);
    std::fs::write(&path, feed::to_csv(&msgs)).unwrap();

    let out = replay(&path, &["--rounds", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    let (n, rounds, best, median) = parse_last_line(&stdout);
    assert_eq!((n, rounds), (5_000, 3));
    assert!(best <= median, "{stdout}");

    let out = replay(&path, &[]);
    assert!(out.status.success());
    let (n, rounds, _, _) = parse_last_line(&String::from_utf8(out.stdout).unwrap());
    assert_eq!((n, rounds), (5_000, 20), "default rounds");
}

#[test]
fn bad_input_exits_2_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "trader_id,side,price,qty\n1,Bid,4800,100\n1,Sideways,4800,100\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.csv");
    let cases: [(&str, &Path, &[&str], &str); 3] = [
        ("bad line", &bad, &[], "line 3"),
        ("missing file", &missing, &[], "cannot read"),
        ("bad rounds", &bad, &["--rounds", "zero"], "--rounds"),
    ];
    for (name, path, extra, needle) in cases {
        let out = replay(path, extra);
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(needle), "{name}: {stderr}");
        assert!(out.stdout.is_empty(), "{name}");
    }
}
