//! The sequencer end to end with the real engine: producers submit orders and cancels through the
//! lock-free queue; the engine thread applies, journals (one fdatasync per batch) and replies.
//! Reports commands/s and submit-to-reply latency percentiles (HDR histogram), from 1 and 2
//! producer threads, with the durable journal and without.
//!
//! `cargo bench --bench sequencer` (set `MEDIATOR_SEQ_COMMANDS` to change the run length).
//! The journal lives under the build directory (`CARGO_TARGET_TMPDIR`), on the real disk.

use matching_engine::bench::{run, BenchConfig};
use matching_engine::config::{BTC, USD};
use matching_engine::recovery::{Store, StoreConfig};
use matching_engine::sequencer::{Sequencer, SequencerConfig, SystemClock};
use matching_engine::*;

const ACCOUNTS: u32 = 1_000;

fn genesis() -> Engine {
    let mut e = Engine::new(EngineConfig::default()).expect("default config is valid");
    let mut out = Vec::new();
    for i in 1..=ACCOUNTS {
        e.apply(&Command::CreateAccount, Timestamp(1), &mut out)
            .expect("room for accounts");
        for (asset, amount) in [(BTC, 1u64 << 36), (USD, 1u64 << 52)] {
            let key = IdempotencyKey::reference(&format!("bench-{i}-{}", asset.0));
            let c = Command::Credit {
                account: AccountId(i),
                asset,
                amount: Amount(amount),
                key,
            };
            e.apply(&c, Timestamp(1), &mut out).expect("credit");
        }
        out.clear();
    }
    e
}

/// Producer `p`'s command `n`: odd n places a resting limit order with a client id from a ring
/// of 64, even n cancels the order placed just before (so the book stays small).
fn command(ids: &[Vec<ClientOrderId>], p: usize, n: u64) -> Command {
    let k = ((n - 1) / 2 % 64) as usize;
    let account = AccountId(1 + (p as u32 * 97 + k as u32) % ACCOUNTS);
    if n % 2 == 1 {
        let side = if k % 2 == 0 { Side::Buy } else { Side::Sell };
        let off = 100 + (n * 7919 % 3_000);
        let price = if side == Side::Buy {
            5_000_000 - off
        } else {
            5_000_000 + off
        };
        Command::NewOrder(NewOrder {
            account,
            market: MarketId(0),
            side,
            order_type: OrderType::Limit {
                price: Price(price),
                qty: Qty(10),
            },
            tif: TimeInForce::Gtc,
            post_only: false,
            stp: StpMode::None,
            client_id: Some(ids[p][k]),
        })
    } else {
        Command::Cancel {
            account,
            market: MarketId(0),
            order: OrderRef::Client(ids[p][k]),
        }
    }
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent: do a tiny run then.
    let full = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("MEDIATOR_SEQ_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 400_000 } else { 2_000 });
    let ids: Vec<Vec<ClientOrderId>> = (0..2)
        .map(|p| {
            (0..64)
                .map(|k| ClientOrderId::new(&format!("p{p}k{k}")).unwrap())
                .collect()
        })
        .collect();
    let cfg = SequencerConfig {
        queue_capacity: 8_192,
        max_batch: 4_096,
        max_in_flight: 4_096,
        ..SequencerConfig::default()
    };
    let base = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sequencer-bench");
    println!("sequencer bench: {n} commands per run, engine with {ACCOUNTS} funded accounts");
    for (durable, producers, window) in [
        (false, 1, 1),
        (false, 1, 256),
        (false, 2, 256),
        (true, 1, 1),
        (true, 1, 4_096),
        (true, 2, 4_096),
    ] {
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("bench dir");
        let seq = if durable {
            let store = StoreConfig {
                snapshot_every: 0,
                snapshots_kept: 2,
                ..StoreConfig::default()
            };
            let recovered = Store::open(&base, store, genesis).expect("open store");
            Sequencer::durable(recovered, SystemClock, cfg).expect("start")
        } else {
            Sequencer::volatile(genesis(), SystemClock, cfg).expect("start")
        };
        // A closed loop (window 1) measures latency; deep windows measure throughput.
        let per = if window == 1 {
            (n / 20).max(100)
        } else {
            n / producers as u64
        };
        let per = per - per % 2;
        let config = BenchConfig {
            producers,
            commands_per_producer: per,
            window,
        };
        let report = run(seq.handle(), &config, |p, i| command(&ids, p, i));
        assert_eq!(report.failed, 0);
        println!(
            "{:9} producers={} window={:5}: {}",
            if durable { "durable" } else { "volatile" },
            producers,
            window,
            report.summary()
        );
        seq.shutdown().expect("clean shutdown");
    }
    let _ = std::fs::remove_dir_all(&base);
}
