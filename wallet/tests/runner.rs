//! The service loop survives bitcoind going away: it waits, reconnects and catches up.

mod support;

use bdk_bitcoind_rpc::bitcoincore_rpc::RpcApi;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Customer, EngineLedger, ManualNode, TestNode};
use wallet::{system_now, CustodyConfig, CustodyService, Runner};

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bitcoind_stopped_and_restarted_while_the_service_runs() {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    let mut node = TestNode::start_in(&node_dir);
    let ledger = Arc::new(EngineLedger::default());
    let alice = ledger.create_account();
    let mut config = CustodyConfig::new(
        bdk_wallet::bitcoin::Network::Regtest,
        dir.path().join("custody"),
        node.rpc_config(),
    );
    config.poll_interval = Duration::from_millis(100);
    let poll = config.poll_interval;
    let mut svc = CustodyService::open(config, ledger.clone()).unwrap();
    let addr = svc.new_deposit_address(alice, system_now()).unwrap();
    let service = Arc::new(Mutex::new(svc));
    let runner = Runner::spawn(service.clone()).unwrap();

    let mut customer = Customer::new(21);
    customer.fund(&node, 1);
    let height = node.height() as u32;
    wait_for("initial sync", || {
        service.lock().unwrap().tip_height() == height
    });
    let tx = customer.pay(&node, &[(&addr, 250_000)]);
    let txid = tx.compute_txid();
    wait_for("mempool deposit", || {
        service.lock().unwrap().transaction(txid).is_some()
    });

    // bitcoind goes away; the service keeps running (its steps fail and are retried).
    let port = node.node.params.rpc_socket.port();
    node.node.stop().unwrap();
    std::thread::sleep(poll * 5);
    assert_eq!(ledger.btc(alice), (0, 0));

    // It comes back on the same port and data directory, and the chain moves on meanwhile.
    drop(node);
    let back = ManualNode::start(&node_dir, port);
    assert!(
        back.rpc.get_raw_mempool().unwrap().contains(&txid),
        "mempool persisted"
    );
    let burn = Customer::new(250).address();
    back.rpc.generate_to_address(3, &burn).unwrap();
    let height = back.rpc.get_block_count().unwrap() as u32;
    wait_for("reconnect and catch up", || {
        let s = service.lock().unwrap();
        s.tip_height() == height && ledger.btc(alice) == (250_000, 0)
    });
    runner.stop();
    let s = service.lock().unwrap();
    assert_eq!(s.transaction(txid).unwrap().1, 3);
    let r = s.reconcile().unwrap();
    assert_eq!(r.surplus_sat, 0, "{r:?}");
}
