//! Test support: a regtest bitcoind per test, a "customer" BDK wallet that pays deposits, and the
//! real matching engine as the ledger.
#![allow(dead_code)]

pub mod offline;

use bdk_bitcoind_rpc::bitcoincore_rpc::{Auth, Client, RpcApi};
use bdk_bitcoind_rpc::Emitter;
use bdk_wallet::bitcoin::bip32::Xpriv;
use bdk_wallet::bitcoin::secp256k1::Secp256k1;
use bdk_wallet::bitcoin::{
    Address, Amount as BtcAmount, BlockHash, FeeRate, Network, Transaction, Txid,
};
use bdk_wallet::template::Bip84;
use bdk_wallet::{KeychainKind, SignOptions, Wallet};
use matching_engine::config::BTC;
use matching_engine::units::{AccountId, Amount, Timestamp, WithdrawalId};
use matching_engine::{Command, Engine, EngineConfig, Event, RejectCode, Withdrawal};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wallet::{CustodyConfig, CustodyService, Ledger, LedgerError, RpcAuth, RpcConfig};

/// The bitcoind to test against: `BITCOIND_EXE`, else `bitcoind` on `PATH`.
pub fn bitcoind_exe() -> String {
    corepc_node::exe_path().expect("set BITCOIND_EXE or put bitcoind on PATH")
}

/// A regtest node in a temporary directory on free loopback ports; killed on drop.
pub struct TestNode {
    pub node: corepc_node::Node,
    pub rpc: Client,
    /// A mining address nobody in the test owns.
    burn: Address,
}

fn conf(staticdir: Option<PathBuf>) -> corepc_node::Conf<'static> {
    let mut conf = corepc_node::Conf::default();
    conf.wallet = None;
    conf.args = vec!["-regtest"];
    conf.staticdir = staticdir;
    conf
}

impl TestNode {
    pub fn start() -> Self {
        Self::with_conf(&conf(None))
    }

    /// A node started with `args` after `-regtest` (e.g. a relay fee floor).
    pub fn start_with(args: &[&'static str]) -> Self {
        let mut c = conf(None);
        c.args.extend_from_slice(args);
        Self::with_conf(&c)
    }

    /// A node whose data directory survives it (for restarts).
    pub fn start_in(dir: &Path) -> Self {
        Self::with_conf(&conf(Some(dir.to_owned())))
    }

    /// [`start_in`](Self::start_in) with `args` after `-regtest`.
    pub fn start_in_with(dir: &Path, args: &[&'static str]) -> Self {
        let mut c = conf(Some(dir.to_owned()));
        c.args.extend_from_slice(args);
        Self::with_conf(&c)
    }

    fn with_conf(conf: &corepc_node::Conf) -> Self {
        let node = corepc_node::Node::with_conf(bitcoind_exe(), conf).expect("start bitcoind");
        let rpc = Client::new(
            &node.rpc_url(),
            Auth::CookieFile(node.params.cookie_file.clone()),
        )
        .expect("rpc client");
        let burn = Customer::new(250)
            .wallet
            .peek_address(KeychainKind::External, 0)
            .address;
        Self { node, rpc, burn }
    }

    pub fn rpc_config(&self) -> RpcConfig {
        RpcConfig {
            url: self.node.rpc_url(),
            auth: RpcAuth::CookieFile(self.node.params.cookie_file.clone()),
        }
    }

    pub fn mine(&self, n: u64) -> Vec<BlockHash> {
        self.rpc
            .generate_to_address(n, &self.burn)
            .expect("generatetoaddress")
    }

    pub fn mine_to(&self, n: u64, to: &Address) -> Vec<BlockHash> {
        self.rpc
            .generate_to_address(n, to)
            .expect("generatetoaddress")
    }

    /// Mines `n` blocks that leave the mempool alone (`generateblock` with no transactions).
    pub fn mine_empty(&self, n: u64) {
        for _ in 0..n {
            let _: serde_json::Value = self
                .rpc
                .call(
                    "generateblock",
                    &[self.burn.to_string().into(), serde_json::json!([])],
                )
                .expect("generateblock");
        }
    }

    pub fn height(&self) -> u64 {
        self.rpc.get_block_count().expect("getblockcount")
    }

    pub fn mempool(&self) -> Vec<Txid> {
        self.rpc.get_raw_mempool().expect("getrawmempool")
    }

    pub fn invalidate_tip(&self) -> BlockHash {
        let tip = self.rpc.get_best_block_hash().expect("getbestblockhash");
        self.rpc.invalidate_block(&tip).expect("invalidateblock");
        tip
    }
}

impl Drop for TestNode {
    /// Stops the node and reaps its process (corepc-node alone kills without waiting).
    fn drop(&mut self) {
        let _ = self.node.stop();
    }
}

/// A customer's BDK wallet (in memory) that pays deposits and receives withdrawals.
pub struct Customer {
    pub wallet: Wallet,
    xprv: Xpriv,
}

impl Customer {
    pub fn new(seed: u8) -> Self {
        let xprv = Xpriv::new_master(Network::Regtest, &[seed; 32]).unwrap();
        let wallet = Wallet::create(
            Bip84(xprv, KeychainKind::External),
            Bip84(xprv, KeychainKind::Internal),
        )
        .network(Network::Regtest)
        .create_wallet_no_persist()
        .unwrap();
        Self { wallet, xprv }
    }

    pub fn address(&mut self) -> Address {
        self.wallet
            .reveal_next_address(KeychainKind::External)
            .address
    }

    pub fn sync(&mut self, node: &TestNode) {
        let unconfirmed: Vec<Arc<Transaction>> = self
            .wallet
            .transactions()
            .filter(|t| t.chain_position.is_unconfirmed())
            .map(|t| t.tx_node.tx.clone())
            .collect();
        let mut emitter = Emitter::new(&node.rpc, self.wallet.latest_checkpoint(), 0, unconfirmed);
        while let Some(ev) = emitter.next_block().unwrap() {
            self.wallet
                .apply_block_connected_to(&ev.block, ev.block_height(), ev.connected_to())
                .unwrap();
        }
        let mempool = emitter.mempool().unwrap();
        self.wallet.apply_evicted_txs(mempool.evicted);
        self.wallet.apply_unconfirmed_txs(mempool.update);
    }

    /// Mines `blocks` coinbases to this wallet and matures them.
    pub fn fund(&mut self, node: &TestNode, blocks: u64) {
        let a = self.address();
        node.mine_to(blocks, &a);
        node.mine(100);
        self.sync(node);
    }

    /// Pays `outputs` in one transaction, broadcast with `sendrawtransaction`.
    pub fn pay(&mut self, node: &TestNode, outputs: &[(&Address, u64)]) -> Transaction {
        self.pay_at(node, outputs, FeeRate::from_sat_per_vb_u32(2))
    }

    /// [`pay`](Self::pay) at `rate`.
    pub fn pay_at(
        &mut self,
        node: &TestNode,
        outputs: &[(&Address, u64)],
        rate: FeeRate,
    ) -> Transaction {
        let mut b = self.wallet.build_tx();
        for (a, sat) in outputs {
            b.add_recipient(a.script_pubkey(), BtcAmount::from_sat(*sat));
        }
        b.fee_rate(rate);
        let psbt = b.finish().unwrap();
        self.sign_and_send(node, psbt, 0, "sendrawtransaction")
    }

    /// Replaces an unconfirmed payment of this wallet by one paying `rate` (RBF), broadcast.
    pub fn bump(&mut self, node: &TestNode, txid: Txid, rate: FeeRate) -> Transaction {
        let mut b = self.wallet.build_fee_bump(txid).expect("fee bump");
        b.fee_rate(rate);
        let psbt = b.finish().unwrap();
        self.sign_and_send(node, psbt, 1, "sendrawtransaction (replacement)")
    }

    /// Replaces an unconfirmed payment of this wallet by one paying `rate` that also pays
    /// `extra` sats more to `to` (a second output), broadcast.
    pub fn bump_adding(
        &mut self,
        node: &TestNode,
        txid: Txid,
        rate: FeeRate,
        to: &Address,
        extra: u64,
    ) -> Transaction {
        let mut b = self.wallet.build_fee_bump(txid).expect("fee bump");
        b.fee_rate(rate);
        b.add_recipient(to.script_pubkey(), BtcAmount::from_sat(extra));
        let psbt = b.finish().unwrap();
        self.sign_and_send(node, psbt, 1, "sendrawtransaction (replacement)")
    }

    /// Double-spends an unconfirmed payment of this wallet (RBF) with one paying this wallet
    /// what `tx` paid `to`: the payment taken back. Broadcast.
    pub fn take_back(&mut self, node: &TestNode, tx: &Transaction, to: &Address) -> Transaction {
        let paid = to.script_pubkey();
        let mine = self.address().script_pubkey();
        let mut b = self
            .wallet
            .build_fee_bump(tx.compute_txid())
            .expect("fee bump");
        b.fee_rate(FeeRate::from_sat_per_vb_u32(20));
        let mut psbt = b.finish().unwrap();
        let i = psbt
            .unsigned_tx
            .output
            .iter()
            .position(|o| o.script_pubkey == paid)
            .expect("the payment's output");
        psbt.unsigned_tx.output[i].script_pubkey = mine;
        psbt.outputs[i] = Default::default();
        self.sign_and_send(node, psbt, 1, "sendrawtransaction (double spend)")
    }

    /// Signs and finalizes `psbt`, broadcasts it and records it as unconfirmed, seen at `seen`
    /// (a replacement at 1, so that it outranks what it replaces).
    fn sign_and_send(
        &mut self,
        node: &TestNode,
        mut psbt: bdk_wallet::bitcoin::Psbt,
        seen: u64,
        what: &str,
    ) -> Transaction {
        psbt.sign(&self.xprv, &Secp256k1::new()).unwrap();
        assert!(self
            .wallet
            .finalize_psbt(&mut psbt, SignOptions::default())
            .unwrap());
        let tx = psbt.extract_tx().unwrap();
        node.rpc.send_raw_transaction(&tx).expect(what);
        self.wallet.apply_unconfirmed_txs([(tx.clone(), seen)]);
        tx
    }

    /// Confirmed plus pending balance, sats.
    pub fn balance(&self) -> u64 {
        self.wallet.balance().total().to_sat()
    }
}

/// The real engine as the ledger, behind a mutex.
pub struct EngineLedger {
    engine: Mutex<(Engine, u64)>,
    faults: Mutex<std::collections::VecDeque<Fault>>,
    lookups_fail: std::sync::atomic::AtomicBool,
}

/// How the next submissions answer (one fault per submission, in order; then normal again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Applies the command, then loses the answer: `Unknown` (the engine stopped after it).
    ApplyThenUnknown,
    /// Does not apply it and answers `Unknown` (taken, then lost before it ran).
    LoseUnknown,
    /// Not taken: `Rejected(EngineBusy)`.
    Busy,
    /// Applied and answered truly (holds a place in the queue).
    Pass,
}

impl Default for EngineLedger {
    fn default() -> Self {
        Self {
            engine: Mutex::new((Engine::new(EngineConfig::default()).unwrap(), 0)),
            faults: Mutex::new(Default::default()),
            lookups_fail: Default::default(),
        }
    }
}

impl EngineLedger {
    fn apply(&self, cmd: Command) -> (Result<(), RejectCode>, Vec<Event>) {
        let mut g = self.engine.lock().unwrap();
        g.1 += 1;
        let now = Timestamp(g.1);
        let mut events = Vec::new();
        let r = g.0.apply(&cmd, now, &mut events);
        (r, events)
    }

    pub fn create_account(&self) -> AccountId {
        let (r, events) = self.apply(Command::CreateAccount);
        r.unwrap();
        events
            .iter()
            .find_map(|e| match e {
                Event::AccountCreated { account } => Some(*account),
                _ => None,
            })
            .unwrap()
    }

    /// `(available, held)` BTC of an account.
    pub fn btc(&self, account: AccountId) -> (u64, u64) {
        let g = self.engine.lock().unwrap();
        let (a, h) = g.0.balance(account, BTC).unwrap();
        (a.0, h.0)
    }

    /// A user's withdrawal straight into the engine (for a ledger that drifts from the wallet).
    pub fn raw(&self, cmd: Command) -> Result<(), RejectCode> {
        self.apply(cmd).0
    }
}

impl EngineLedger {
    /// The next submission answers with `fault` (queued after earlier ones).
    pub fn fault_next(&self, fault: Fault) {
        self.faults.lock().unwrap().push_back(fault);
    }

    /// While set, [`Ledger::withdrawal`] answers `Unknown` (the engine is away).
    pub fn fail_lookups(&self, fail: bool) {
        self.lookups_fail
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    /// The engine's record of a withdrawal.
    pub fn record(&self, id: WithdrawalId) -> Option<Withdrawal> {
        self.engine.lock().unwrap().0.withdrawal(id)
    }
}

impl Ledger for EngineLedger {
    fn submit(&self, cmd: Command) -> Result<(), LedgerError> {
        let fault = self.faults.lock().unwrap().pop_front();
        match fault {
            None | Some(Fault::Pass) => self.apply(cmd).0.map_err(LedgerError::Rejected),
            Some(Fault::ApplyThenUnknown) => {
                let _ = self.apply(cmd);
                Err(LedgerError::Unknown)
            }
            Some(Fault::LoseUnknown) => Err(LedgerError::Unknown),
            Some(Fault::Busy) => Err(LedgerError::Rejected(RejectCode::EngineBusy)),
        }
    }
    fn withdrawal(&self, id: WithdrawalId) -> Result<Option<Withdrawal>, LedgerError> {
        if self.lookups_fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LedgerError::Unknown);
        }
        let (r, events) = self.apply(Command::WithdrawalStatus { id });
        r.map_err(LedgerError::Rejected)?;
        match events.as_slice() {
            [Event::WithdrawalStatus { withdrawal, .. }] => Ok(*withdrawal),
            other => panic!("a query answers once: {other:?}"),
        }
    }
    fn credited(&self, key: matching_engine::IdempotencyKey) -> Result<bool, LedgerError> {
        if self.lookups_fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LedgerError::Unknown);
        }
        let (r, events) = self.apply(Command::CreditStatus { key });
        r.map_err(LedgerError::Rejected)?;
        match events.as_slice() {
            [Event::CreditStatus { credited, .. }] => Ok(*credited),
            other => panic!("a query answers once: {other:?}"),
        }
    }
    fn btc_liabilities(&self) -> Amount {
        self.engine.lock().unwrap().0.asset_total(BTC)
    }
    fn account_exists(&self, account: AccountId) -> bool {
        self.engine.lock().unwrap().0.account_exists(account)
    }
    fn btc_available(&self, account: AccountId) -> Result<Amount, LedgerError> {
        let g = self.engine.lock().unwrap();
        let (available, _) = g.0.balance(account, BTC).unwrap_or_default();
        Ok(available)
    }
}

/// A test clock: starts at the real time, moves only when told.
#[derive(Clone, Copy, Debug)]
pub struct Clock(pub u64);

impl Clock {
    pub fn new() -> Self {
        Self(wallet::system_now().as_millis())
    }
    pub fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0)
    }
    pub fn advance(&mut self, d: Duration) -> Timestamp {
        self.0 += d.as_millis() as u64;
        self.now()
    }
}

/// One test's world: node, ledger, data directory, clock.
pub struct World {
    pub node: TestNode,
    pub ledger: Arc<EngineLedger>,
    pub dir: tempfile::TempDir,
    pub clock: Clock,
}

impl World {
    pub fn new() -> Self {
        Self::with_node(TestNode::start())
    }

    /// A world around a node started by the caller (e.g. [`TestNode::start_with`]).
    pub fn with_node(node: TestNode) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("wallet=info")
            .try_init();
        Self {
            node,
            ledger: Arc::new(EngineLedger::default()),
            dir: tempfile::tempdir().unwrap(),
            clock: Clock::new(),
        }
    }

    pub fn config(&self) -> CustodyConfig {
        let mut c = CustodyConfig::new(
            Network::Regtest,
            self.dir.path().join("custody"),
            self.node.rpc_config(),
        );
        c.poll_interval = Duration::from_millis(100);
        c
    }

    pub fn open(&self, config: CustodyConfig) -> CustodyService {
        CustodyService::open(config, self.ledger.clone()).expect("open custody service")
    }

    /// Steps the service until `done` holds (at most 10 s).
    pub fn step_until(
        &mut self,
        service: &mut CustodyService,
        mut done: impl FnMut(&CustodyService) -> bool,
    ) {
        let start = Instant::now();
        loop {
            service.step(self.clock.now()).expect("step");
            if done(service) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "condition not reached"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A bitcoind started by hand on a given data directory and RPC port (to restart a node where it
/// was); killed on drop.
pub struct ManualNode {
    child: std::process::Child,
    pub rpc: Client,
}

impl ManualNode {
    pub fn start(datadir: &Path, rpc_port: u16) -> Self {
        Self::start_with(datadir, rpc_port, &[])
    }

    /// [`start`](Self::start) with more arguments (e.g. `-persistmempool=0`: a node that comes
    /// back with an empty mempool).
    pub fn start_with(datadir: &Path, rpc_port: u16, args: &[&str]) -> Self {
        let mut child = std::process::Command::new(bitcoind_exe())
            .arg(format!("-datadir={}", datadir.display()))
            .arg(format!("-rpcport={rpc_port}"))
            .args(["-regtest", "-listen=0"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn bitcoind");
        let cookie = datadir.join("regtest").join(".cookie");
        let url = format!("http://127.0.0.1:{rpc_port}");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(rpc) = Client::new(&url, Auth::CookieFile(cookie.clone())) {
                if rpc.get_block_count().is_ok() {
                    return Self { child, rpc };
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("bitcoind did not come back");
    }
}

impl Drop for ManualNode {
    fn drop(&mut self) {
        let _ = self.rpc.stop();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
