//! What the Lightning tests of `mediator serve` share: a customer's ldk-node on the server's
//! regtest bitcoind, its event queue drained, blocks mined to an address.

use super::Server;
use bdk_bitcoind_rpc::bitcoincore_rpc::RpcApi;
use lightning_custody::ldk_node::bitcoin::Network;
use lightning_custody::ldk_node::config::Config;
use lightning_custody::ldk_node::{Builder, Node};
use lightning_custody::ChainRpc;
use std::net::SocketAddr;
use std::str::FromStr;

/// A started ldk-node in `dir`, on the server's bitcoind, listening on a free loopback port;
/// `seed` fills its entropy (a test's customers differ by it).
pub fn customer(s: &Server, dir: &std::path::Path, seed: u8) -> Node {
    let url = std::fs::read_to_string(s.dir.join("bitcoind/mediator-rpc-url")).unwrap();
    let rpc = ChainRpc::from_cookie(url.trim(), &s.dir.join("bitcoind/regtest/.cookie")).unwrap();
    let config = Config {
        network: Network::Regtest,
        storage_dir_path: dir.to_string_lossy().into_owned(),
        listening_addresses: Some(vec![
            SocketAddr::from(([127, 0, 0, 1], super::free_port())).into()
        ]),
        ..Default::default()
    };
    let mut b = Builder::from_config(config);
    b.set_chain_source_bitcoind_rpc(rpc.host, rpc.port, rpc.user, rpc.password);
    b.set_entropy_seed_bytes([seed; 64]);
    let node = b.build().unwrap();
    node.start().unwrap();
    node
}

/// Handles every queued event of `n`.
pub fn drain(n: &Node) {
    while n.next_event().is_some() {
        n.event_handled().unwrap();
    }
}

/// Mines `n` blocks paying `address`.
pub fn mine_to(s: &Server, n: u64, address: &str) {
    let a = bdk_bitcoind_rpc::bitcoincore_rpc::bitcoin::Address::from_str(address)
        .unwrap()
        .assume_checked();
    s.rpc().generate_to_address(n, &a).unwrap();
}

/// Opens the two channels the Lightning tests of `serve` use: the operator's 2,000,000 sat to
/// the customer (`mediator ln open-channel`, retried until the server's node has synced its
/// coinbase past maturity: only then does it have the on-chain reserve the customer's anchor
/// channel needs) and the customer's 4,000,000 sat to the server's node `node_id`; mines them
/// 6 deep to `mine_address` and waits until the server lists both as usable. Returns the
/// server's node key.
pub fn open_channels(
    s: &Server,
    cust: &Node,
    node_id: &str,
    mine_address: &str,
) -> lightning_custody::ldk_node::bitcoin::secp256k1::PublicKey {
    use super::merchant::wait_until;
    let m_pk = lightning_custody::ldk_node::bitcoin::secp256k1::PublicKey::from_str(node_id)
        .expect("a node id");
    let peer = format!(
        "{}@{}",
        cust.node_id(),
        cust.listening_addresses().expect("listening")[0]
    );
    let opened = wait_until(90, || {
        std::process::Command::new(super::BIN)
            .args(["ln", "open-channel", &peer, "2000000", "--json"])
            .args(["--server", &s.admin_addr.to_string()])
            .arg("--data-dir")
            .arg(&s.dir)
            .output()
            .unwrap()
            .status
            .success()
    });
    assert!(
        opened,
        "timed out waiting for the node's spendable on-chain funds"
    );
    cust.open_channel(m_pk, s.ln_addr.into(), 4_000_000, None, None)
        .unwrap();
    assert!(
        wait_until(60, || s.rpc().get_raw_mempool().unwrap().len() >= 2),
        "timed out waiting for two funding transactions"
    );
    mine_to(s, 6, mine_address);
    let usable = wait_until(120, || {
        drain(cust);
        let _ = cust.sync_wallets();
        let v = s.admin(&["ln", "channels"]);
        let rows = v.as_array().unwrap();
        rows.len() == 2 && rows.iter().all(|c| c["usable"] == true)
    });
    assert!(usable, "timed out waiting for two usable channels");
    m_pk
}
