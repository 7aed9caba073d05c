//! Reconciliation counts custody's money outside the BDK wallet (the Lightning node). No
//! bitcoind needed.

mod support;

use std::sync::Arc;
use support::offline::{config, funded};
use support::EngineLedger;
use wallet::{CustodyService, OtherAssets};

struct Node(u64);

impl OtherAssets for Node {
    fn sats(&self) -> u64 {
        self.0
    }
}

/// Defect: the periodic reconciliation (the runner's step, the audit log's `custody.reconcile`,
/// the `mediator_reconciliation_gap_sats` gauge) counted only the BDK wallet, so every satoshi a
/// Lightning payment brought in (owed by the ledger, held by the node) showed as a shortfall:
/// an error in the log and a false alarm for the operator.
#[test]
fn money_held_by_the_lightning_node_is_no_shortfall() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    // A merchant paid 250,000 sat over Lightning: the ledger owes it, the node holds it.
    funded(&ledger, 250_000, "ln:merchant-invoice");
    let mut svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    let without = svc.reconcile().unwrap();
    assert!(without.shortfall, "{without:?}");
    assert_eq!(without.surplus_sat, -250_000);

    svc.set_other_assets(Arc::new(Node(250_000)));
    let with = svc.reconcile().unwrap();
    assert_eq!(with.other_assets.0, 250_000);
    assert_eq!(with.surplus_sat, 0, "{with:?}");
    assert!(!with.shortfall);

    // Money missing from the node is still a shortfall.
    svc.set_other_assets(Arc::new(Node(200_000)));
    let short = svc.reconcile().unwrap();
    assert_eq!(short.surplus_sat, -50_000);
    assert!(short.shortfall);
}
