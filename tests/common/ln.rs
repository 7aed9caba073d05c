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
