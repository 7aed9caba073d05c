//! Lightning on regtest: a real bitcoind, Mediator's node ([`LightningService`] over the real
//! matching engine as the ledger) and a second ldk-node as the customer, who is funded on chain
//! and opens a channel to Mediator (Mediator opens one back with `open_channel`, the operator's
//! command, for outbound liquidity).
//!
//! Needs `BITCOIND_EXE` (or `bitcoind` on `PATH`).

use bdk_bitcoind_rpc::bitcoincore_rpc::{Auth, Client, RpcApi};
use lightning_custody::ldk_node::bitcoin::hashes::Hash;
use lightning_custody::ldk_node::bitcoin::Network;
use lightning_custody::ldk_node::config::Config;
use lightning_custody::ldk_node::lightning::ln::channelmanager::PaymentId;
use lightning_custody::ldk_node::lightning_invoice::{
    Bolt11Invoice, Bolt11InvoiceDescription, Currency, Description, InvoiceBuilder, PaymentSecret,
};
use lightning_custody::ldk_node::payment::{PaymentDirection, PaymentStatus};
use lightning_custody::ldk_node::{Builder, Event, Node};
use lightning_custody::{
    engine_withdrawal_id, ChainRpc, LightningConfig, LightningService, LnWithdrawalStatus,
    PayError, IN_DOUBT_BLOCKS,
};
use matching_engine::config::BTC;
use matching_engine::{
    AccountId, Amount, Command, Engine, EngineConfig, Event as EngineEvent, IdempotencyKey,
    RejectCode, Timestamp, Withdrawal, WithdrawalId, WithdrawalState,
};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wallet::{Ledger, LedgerError};

// ---- the ledger: the real engine --------------------------------------------------------------

#[derive(Default)]
struct EngineLedger {
    engine: Mutex<Option<(Engine, u64)>>,
    /// The next `WithdrawHold` is applied but answered `Unknown` (the engine's reply is lost).
    lose_next_hold_reply: std::sync::atomic::AtomicBool,
    /// Lookups answer `Unknown` (the engine is away).
    lookups_fail: std::sync::atomic::AtomicBool,
    /// Credits are not taken (`EngineBusy`: what `mediator serve`'s ledger answers while the
    /// circuit breaker is open).
    credits_halted: std::sync::atomic::AtomicBool,
}

impl EngineLedger {
    fn apply(&self, cmd: Command) -> (Result<(), RejectCode>, Vec<EngineEvent>) {
        let mut g = self.engine.lock().unwrap();
        let (engine, t) =
            g.get_or_insert_with(|| (Engine::new(EngineConfig::default()).unwrap(), 0));
        *t += 1;
        let mut events = Vec::new();
        let r = engine.apply(&cmd, Timestamp(*t), &mut events);
        (r, events)
    }

    fn create_account(&self) -> AccountId {
        let (r, events) = self.apply(Command::CreateAccount);
        r.unwrap();
        events
            .iter()
            .find_map(|e| match e {
                EngineEvent::AccountCreated { account } => Some(*account),
                _ => None,
            })
            .unwrap()
    }

    /// `(available, held)` BTC.
    fn btc(&self, account: AccountId) -> (u64, u64) {
        let g = self.engine.lock().unwrap();
        let (a, h) = g.as_ref().unwrap().0.balance(account, BTC).unwrap();
        (a.0, h.0)
    }

    fn record(&self, id: WithdrawalId) -> Option<Withdrawal> {
        self.engine
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .0
            .withdrawal(id)
    }
}

impl Ledger for EngineLedger {
    fn submit(&self, cmd: Command) -> Result<(), LedgerError> {
        use std::sync::atomic::Ordering::SeqCst;
        let hold = matches!(cmd, Command::WithdrawHold { .. });
        if matches!(cmd, Command::Credit { .. }) && self.credits_halted.load(SeqCst) {
            return Err(LedgerError::Rejected(RejectCode::EngineBusy));
        }
        let r = self.apply(cmd).0.map_err(LedgerError::Rejected);
        if hold && self.lose_next_hold_reply.swap(false, SeqCst) {
            return Err(LedgerError::Unknown);
        }
        r
    }
    fn withdrawal(&self, id: WithdrawalId) -> Result<Option<Withdrawal>, LedgerError> {
        if self.lookups_fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LedgerError::Unknown);
        }
        Ok(self.record(id))
    }
    fn credited(&self, key: IdempotencyKey) -> Result<bool, LedgerError> {
        let (r, events) = self.apply(Command::CreditStatus { key });
        r.map_err(LedgerError::Rejected)?;
        Ok(matches!(
            events.as_slice(),
            [EngineEvent::CreditStatus { credited: true, .. }]
        ))
    }
    fn btc_liabilities(&self) -> Amount {
        self.engine
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .0
            .asset_total(BTC)
    }
    fn account_exists(&self, account: AccountId) -> bool {
        self.engine
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|(e, _)| e.account_exists(account))
    }
    fn btc_available(&self, account: AccountId) -> Result<Amount, LedgerError> {
        let g = self.engine.lock().unwrap();
        let (e, _) = g.as_ref().ok_or(LedgerError::Unknown)?;
        let (available, _) = e.balance(account, BTC).unwrap_or_default();
        Ok(available)
    }
}

// ---- the world ----------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[path = "../../tests/common/ports.rs"]
mod ports;

/// A loopback address for a node to listen on (see `ports`: not an ephemeral port another
/// socket can take before the node binds it).
fn free_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ports::free_port()))
}

struct Chain {
    node: corepc_node::Node,
    rpc: Client,
    /// Where blocks are mined to once the nodes are funded (set by [`World::new`]).
    miner: Mutex<Option<String>>,
}

impl Chain {
    /// A regtest bitcoind without a wallet (the shared build has none): funds come from
    /// coinbases mined to the nodes' addresses.
    fn start() -> Self {
        let exe = corepc_node::exe_path().expect("set BITCOIND_EXE or put bitcoind on PATH");
        let mut conf = corepc_node::Conf::default();
        conf.wallet = None;
        conf.args = vec!["-regtest"];
        let node = corepc_node::Node::with_conf(exe, &conf).expect("start bitcoind");
        let rpc = Client::new(
            &node.rpc_url(),
            Auth::CookieFile(node.params.cookie_file.clone()),
        )
        .unwrap();
        Self {
            node,
            rpc,
            miner: Mutex::new(None),
        }
    }

    fn chain_rpc(&self) -> ChainRpc {
        ChainRpc::from_cookie(&self.node.rpc_url(), &self.node.params.cookie_file).unwrap()
    }

    fn mine_to(&self, n: u64, address: &str) {
        let a = bdk_bitcoind_rpc::bitcoincore_rpc::bitcoin::Address::from_str(address)
            .unwrap()
            .assume_checked();
        self.rpc.generate_to_address(n, &a).unwrap();
    }

    fn mine(&self, n: u64) {
        let to = self.miner.lock().unwrap().clone().expect("a miner address");
        self.mine_to(n, &to);
    }
}

fn customer(chain: &Chain, dir: &Path) -> Node {
    let config = Config {
        network: Network::Regtest,
        storage_dir_path: dir.to_string_lossy().into_owned(),
        listening_addresses: Some(vec![free_port().into()]),
        ..Default::default()
    };
    let mut b = Builder::from_config(config);
    let rpc = chain.chain_rpc();
    b.set_chain_source_bitcoind_rpc(rpc.host, rpc.port, rpc.user, rpc.password);
    b.set_entropy_seed_bytes([42u8; 64]);
    let node = b.build().unwrap();
    node.start().unwrap();
    node
}

fn mediator_config(chain: &Chain, data: &Path) -> LightningConfig {
    let mut cfg = LightningConfig::new(Network::Regtest, data, free_port(), chain.chain_rpc());
    cfg.withdrawal_fee = Amount(50);
    cfg.min_withdrawal = Amount(100);
    cfg.max_withdrawal = Amount(500_000);
    cfg
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Drains a node's events until `pred` matches one (the customer's side).
fn wait_event(node: &Node, what: &str, mut pred: impl FnMut(&Event) -> bool) {
    let start = Instant::now();
    loop {
        if let Some(e) = node.next_event() {
            let hit = pred(&e);
            node.event_handled().unwrap();
            if hit {
                return;
            }
            continue;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct World {
    chain: Chain,
    ledger: Arc<EngineLedger>,
    mediator: Option<LightningService<Arc<EngineLedger>>>,
    customer: Node,
    data: tempfile::TempDir,
    _customer_dir: tempfile::TempDir,
}

impl World {
    /// Both nodes funded; a 4,000,000-sat channel customer → Mediator (LDK accepts at most 10% of
    /// an inbound channel in flight at once) and a 2,000,000-sat one
    /// Mediator → customer (the operator's `open_channel`), both ready.
    fn new() -> Self {
        let chain = Chain::start();
        let data = tempfile::tempdir().unwrap();
        let customer_dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(EngineLedger::default());
        let mediator =
            LightningService::open(mediator_config(&chain, data.path()), ledger.clone()).unwrap();
        let customer = customer(&chain, customer_dir.path());
        // One coinbase (50 BTC) each, matured by 100 blocks mined to the customer.
        chain.mine_to(1, &mediator.onchain_address().unwrap());
        let to_customer = customer
            .onchain_payment()
            .new_address()
            .unwrap()
            .to_string();
        chain.mine_to(1, &to_customer);
        *chain.miner.lock().unwrap() = Some(to_customer);
        chain.mine(100);
        // A sync already under way when the blocks came is not repeated by `sync_wallets`: sync
        // until both coinbases show (bounded; the assertion below says what was missing).
        for _ in 0..300 {
            mediator.node().sync_wallets().unwrap();
            customer.sync_wallets().unwrap();
            if mediator.balances().onchain_sat == 5_000_000_000
                && customer.list_balances().spendable_onchain_balance_sats > 4_100_000
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert_eq!(mediator.balances().onchain_sat, 5_000_000_000);
        assert!(customer.list_balances().spendable_onchain_balance_sats > 4_100_000);

        // The customer opens a channel to Mediator.
        let m_addr = mediator.node().listening_addresses().unwrap()[0].clone();
        customer
            .open_channel(mediator.node().node_id(), m_addr, 4_000_000, None, None)
            .unwrap();
        wait_event(&customer, "channel pending", |e| {
            matches!(e, Event::ChannelPending { .. })
        });
        // Mediator's operator opens one to the customer (`mediator ln open-channel`).
        let c_addr = customer.listening_addresses().unwrap()[0].clone();
        let peer = format!("{}@{}", customer.node_id(), c_addr);
        mediator.open_channel(&peer, 2_000_000).unwrap();
        wait_event(&customer, "second channel pending", |e| {
            matches!(e, Event::ChannelPending { .. })
        });
        let w = Self {
            chain,
            ledger,
            mediator: Some(mediator),
            customer,
            data,
            _customer_dir: customer_dir,
        };
        w.confirm_channels(2);
        w
    }

    fn m(&self) -> &LightningService<Arc<EngineLedger>> {
        self.mediator.as_ref().unwrap()
    }

    fn confirm_channels(&self, n: usize) {
        wait_until(
            "funding txs in the mempool",
            Duration::from_secs(30),
            || self.chain.rpc.get_raw_mempool().unwrap().len() >= n,
        );
        self.chain.mine(6);
        self.m().node().sync_wallets().unwrap();
        self.customer.sync_wallets().unwrap();
        wait_until("channels usable", Duration::from_secs(60), || {
            let _ = self.m().step(now_ms());
            while let Some(_e) = self.customer.next_event() {
                self.customer.event_handled().unwrap();
            }
            let ours = self.m().channels();
            ours.len() == n && ours.iter().all(|c| c.usable)
        });
    }

    /// Steps Mediator until `done`.
    fn step_until(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        wait_until(what, Duration::from_secs(60), || {
            self.m().step(now_ms()).unwrap();
            done(self)
        });
    }

    /// Waits, without stepping, until the node's next event is the receipt of `hash` (earlier
    /// events, the setup's, are acknowledged here): the node marks a payment received before
    /// it queues the event, so a test that steps right after seeing the payment may step
    /// before the event exists.
    fn wait_for_received_event(&self, hash: [u8; 32]) {
        wait_until(
            "the payment's event",
            Duration::from_secs(60),
            || match self.m().node().next_event() {
                Some(Event::PaymentReceived { payment_hash, .. }) if payment_hash.0 == hash => true,
                Some(_) => {
                    self.m().node().event_handled().unwrap();
                    false
                }
                None => false,
            },
        );
    }

    /// A customer invoice for `sat`.
    fn customer_invoice(&self, sat: u64, expiry_secs: u32) -> Bolt11Invoice {
        self.customer
            .bolt11_payment()
            .receive(
                sat * 1000,
                &Bolt11InvoiceDescription::Direct(Description::new("withdrawal".into()).unwrap()),
                expiry_secs,
            )
            .unwrap()
    }

    fn customer_received(&self, invoice: &Bolt11Invoice) -> Option<u64> {
        let p = self
            .customer
            .payment(&PaymentId(invoice.payment_hash().to_byte_array()))?;
        (p.direction == PaymentDirection::Inbound && p.status == PaymentStatus::Succeeded)
            .then_some(p.amount_msat.unwrap())
    }

    /// Credits `account` `sat` over Lightning: a deposit invoice the customer pays.
    fn deposit(&self, account: AccountId, sat: u64) {
        let d = self
            .m()
            .deposit_invoice(account, Amount(sat), now_ms())
            .unwrap();
        let inv = Bolt11Invoice::from_str(&d.bolt11).unwrap();
        self.customer.bolt11_payment().send(&inv, None).unwrap();
        self.step_until("deposit credited", |w| {
            w.m()
                .deposit(&d.payment_hash)
                .unwrap()
                .unwrap()
                .credited_sat
                .is_some()
        });
    }
}

/// A BOLT11 invoice signed by a throwaway key, for a currency of our choosing.
fn foreign_invoice(currency: Currency, sat: u64) -> Bolt11Invoice {
    use lightning_custody::ldk_node::bitcoin::hashes::sha256;
    use lightning_custody::ldk_node::bitcoin::secp256k1::{Secp256k1, SecretKey};
    let secp = Secp256k1::new();
    let key = SecretKey::from_slice(&[0x11; 32]).unwrap();
    InvoiceBuilder::new(currency)
        .description("elsewhere".into())
        .payment_hash(sha256::Hash::hash(&now_ms().to_le_bytes()))
        .payment_secret(PaymentSecret([7u8; 32]))
        .current_timestamp()
        .min_final_cltv_expiry_delta(144)
        .amount_milli_satoshis(sat * 1000)
        .build_signed(|h| secp.sign_ecdsa_recoverable(h, &key))
        .unwrap()
}

// ---- the tests ----------------------------------------------------------------------------

/// A deposit invoice paid by the customer is credited exactly once (by payment hash), and a
/// withdrawal to the customer's invoice debits exactly amount + fee and pays the customer exactly
/// the amount; refusals (expired, wrong network, already paid, bounds, no amount, insufficient
/// balance) change nothing.
/// Defect: `free_port` bound `127.0.0.1:0` and dropped the listener, then a node bound that
/// port later: an ephemeral port, which the OS may hand to any other socket in between (an
/// outgoing connection to bitcoind, another test's `bind(:0)`; failed a CI run for `serve`).
/// The ports now come from a counter below the ephemeral range. Failed on the old code (its
/// ports were in the ephemeral range). Needs no bitcoind.
#[test]
fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
    // Linux's range (default 32768..=60999), as configured on this machine when readable.
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            let mut it = r.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    let mut held = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let addr = free_port();
        assert!(addr.ip().is_loopback(), "{addr}");
        let port = addr.port();
        assert!(
            !(lo..=hi).contains(&port),
            "{port} is in the ephemeral range {lo}..={hi}"
        );
        assert!(seen.insert(port), "{port} twice");
        // Held while the next ones are chosen: they must skip it.
        held.push(TcpListener::bind(addr).unwrap());
    }
}

#[test]
fn deposit_and_withdrawal_over_lightning_are_exact() {
    let w = World::new();
    let alice = w.ledger.create_account();

    // Deposit.
    let d = w
        .m()
        .deposit_invoice(alice, Amount(200_000), now_ms())
        .unwrap();
    assert!(d.bolt11.starts_with("lnbcrt"));
    let inv = Bolt11Invoice::from_str(&d.bolt11).unwrap();
    w.customer.bolt11_payment().send(&inv, None).unwrap();
    w.step_until("deposit credited", |w| w.ledger.btc(alice) == (200_000, 0));
    // More steps (and the node's payment store, asked by hash) never credit it again.
    for _ in 0..5 {
        w.m().step(now_ms()).unwrap();
    }
    assert_eq!(w.ledger.btc(alice), (200_000, 0));
    assert_eq!(
        w.m()
            .deposit(&d.payment_hash)
            .unwrap()
            .unwrap()
            .credited_sat,
        Some(200_000)
    );
    assert!(w
        .ledger
        .credited(lightning_custody::deposit_key(&d.payment_hash))
        .unwrap());
    // The customer cannot pay the same invoice twice.
    assert!(w.customer.bolt11_payment().send(&inv, None).is_err());

    // Withdrawal: 30,000 sat to the customer's invoice; fee 50 held and charged.
    let out = w.customer_invoice(30_000, 3600);
    let wd = w.m().pay(alice, &out.to_string(), now_ms()).unwrap();
    assert_eq!(wd.status, LnWithdrawalStatus::Sending);
    assert_eq!(w.ledger.btc(alice), (200_000 - 30_050, 30_050));
    w.step_until("withdrawal completed", |w| {
        w.m().withdrawal(wd.id).unwrap().unwrap().status == LnWithdrawalStatus::Completed
    });
    assert_eq!(w.ledger.btc(alice), (200_000 - 30_050, 0));
    assert_eq!(w.customer_received(&out), Some(30_000_000));
    let rec = w.ledger.record(engine_withdrawal_id(wd.id)).unwrap();
    assert_eq!(rec.state, WithdrawalState::Completed);
    assert_eq!((rec.amount, rec.fee), (Amount(30_000), Amount(50)));

    // Paying it again (a retry after a lost reply): the same withdrawal back, nothing sent or
    // held twice.
    let before = w.ledger.btc(alice);
    let again = w.m().pay(alice, &out.to_string(), now_ms()).unwrap();
    assert_eq!(
        (again.id, again.status),
        (wd.id, LnWithdrawalStatus::Completed)
    );
    assert_eq!(w.ledger.btc(alice), before);
    // Expired (time is passed in: an hour and a minute later).
    let late = w.customer_invoice(1_000, 3600);
    let e = w
        .m()
        .pay(alice, &late.to_string(), now_ms() + 3_660_000)
        .unwrap_err();
    assert!(matches!(e, PayError::Expired), "{e:?}");
    assert_eq!(e.code(), -4603);
    // Wrong network.
    let e = w
        .m()
        .pay(
            alice,
            &foreign_invoice(Currency::Bitcoin, 1_000).to_string(),
            now_ms(),
        )
        .unwrap_err();
    assert!(matches!(e, PayError::WrongNetwork { .. }), "{e:?}");
    assert_eq!(e.code(), -4602);
    // Bounds, garbage, more than the balance.
    let e = w
        .m()
        .pay(alice, &w.customer_invoice(99, 3600).to_string(), now_ms())
        .unwrap_err();
    assert!(matches!(e, PayError::BelowMinimum { .. }), "{e:?}");
    assert!(matches!(
        w.m().pay(alice, "lnbcrt1garbage", now_ms()),
        Err(PayError::MalformedInvoice)
    ));
    let e = w
        .m()
        .pay(
            alice,
            &w.customer_invoice(180_000, 3600).to_string(),
            now_ms(),
        )
        .unwrap_err();
    assert!(matches!(e, PayError::InsufficientBalance), "{e:?}");
    assert_eq!(e.code(), -4026);
    // Our own deposit invoice.
    let own = w
        .m()
        .deposit_invoice(alice, Amount(1_000), now_ms())
        .unwrap();
    assert!(matches!(
        w.m().pay(alice, &own.bolt11, now_ms()),
        Err(PayError::OwnInvoice)
    ));
    assert_eq!(w.ledger.btc(alice), before);

    // Reconciliation: the node holds at least what the ledger owes over Lightning.
    let b = w.m().balances();
    assert!(b.channels_sat > 0 && b.onchain_sat > 0, "{b:?}");
}

/// A withdrawal with no route (the payee is a node nobody has a channel to), and one to the
/// customer while the customer's node is offline: each refused as no route, the hold released
/// exactly, the balance as before; the invoice can be paid once the customer is back. A hold
/// whose reply is lost is answered unknown, nothing is sent, and once the engine can be asked the
/// hold is released exactly (never guessed, never sent).
#[test]
fn no_route_and_customer_offline_release_the_hold_exactly() {
    let w = World::new();
    let bob = w.ledger.create_account();
    w.deposit(bob, 100_000);
    assert_eq!(w.ledger.btc(bob), (100_000, 0));

    // A regtest invoice of a node that has no channel: no route.
    let e = w
        .m()
        .pay(
            bob,
            &foreign_invoice(Currency::Regtest, 5_000).to_string(),
            now_ms(),
        )
        .unwrap_err();
    assert!(matches!(e, PayError::NoRoute), "{e:?}");
    assert_eq!(e.code(), -4610);
    assert_eq!(w.ledger.btc(bob), (100_000, 0));

    // The customer goes offline.
    let out = w.customer_invoice(10_000, 3600);
    w.customer.stop().unwrap();
    wait_until("channels unusable", Duration::from_secs(30), || {
        w.m().channels().iter().all(|c| !c.usable)
    });
    let e = w.m().pay(bob, &out.to_string(), now_ms()).unwrap_err();
    assert!(matches!(e, PayError::NoRoute), "{e:?}");
    assert_eq!(w.ledger.btc(bob), (100_000, 0));

    // Back online.
    w.customer.start().unwrap();
    wait_until("channels usable again", Duration::from_secs(60), || {
        let _ = w.m().step(now_ms());
        w.m().channels().iter().all(|c| c.usable)
    });

    // The hold's reply is lost and the engine cannot be asked: the outcome is unknown, nothing
    // is sent; once the engine answers, the hold (it was applied) is released exactly.
    w.ledger
        .lose_next_hold_reply
        .store(true, std::sync::atomic::Ordering::SeqCst);
    w.ledger
        .lookups_fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let lost = w.customer_invoice(7_000, 3600);
    let e = w.m().pay(bob, &lost.to_string(), now_ms()).unwrap_err();
    let PayError::Unknown { id } = e else {
        panic!("{e:?}")
    };
    assert_eq!(e.code(), -1007);
    assert_eq!(w.ledger.btc(bob), (100_000 - 7_050, 7_050));
    assert_eq!(
        w.m().withdrawal(id).unwrap().unwrap().status,
        LnWithdrawalStatus::New
    );
    w.m().step(now_ms()).unwrap();
    assert_eq!(
        w.ledger.btc(bob),
        (100_000 - 7_050, 7_050),
        "nothing guessed"
    );
    w.ledger
        .lookups_fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    w.step_until("the unsent hold released", |w| {
        w.m().withdrawal(id).unwrap().unwrap().status == LnWithdrawalStatus::Released
    });
    assert_eq!(w.ledger.btc(bob), (100_000, 0));
    assert_eq!(
        w.ledger.record(engine_withdrawal_id(id)).unwrap().state,
        WithdrawalState::Released
    );
    assert_eq!(w.customer_received(&lost), None);

    // The same invoice that found the customer offline pays now, once.
    let wd = w.m().pay(bob, &out.to_string(), now_ms()).unwrap();
    w.step_until("withdrawal completed", |w| {
        w.m().withdrawal(wd.id).unwrap().unwrap().status == LnWithdrawalStatus::Completed
    });
    assert_eq!(w.ledger.btc(bob), (100_000 - 10_050, 0));
    assert_eq!(w.customer_received(&out), Some(10_000_000));

    // The node stopped under the service: ldk-node refuses the send before it touches anything
    // (`NotRunning`), so nothing left: released at once, `-1008` (it was read as maybe sent,
    // `-1007`, and held in doubt). Paid once when asked again with the node back.
    let maybe = w.customer_invoice(3_000, 3600);
    w.m().node().stop().unwrap();
    let e = w.m().pay(bob, &maybe.to_string(), now_ms()).unwrap_err();
    assert_eq!(e.code(), -1008, "{e:?}");
    assert_eq!(w.ledger.btc(bob), (100_000 - 10_050, 0));
    w.m().node().start().unwrap();
    wait_until("channels usable again", Duration::from_secs(60), || {
        w.m().channels().iter().all(|c| c.usable)
    });
    let wd = w.m().pay(bob, &maybe.to_string(), now_ms()).unwrap();
    w.step_until("the withdrawal asked again completed", |w| {
        w.m().withdrawal(wd.id).unwrap().unwrap().status == LnWithdrawalStatus::Completed
    });
    assert_eq!(w.customer_received(&maybe), Some(3_000_000), "paid once");
    assert_eq!(w.ledger.btc(bob), (100_000 - 10_050 - 3_050, 0));
}

/// Defect: a payment retried after its invoice expired (its first reply lost) was refused
/// `Expired` (`-4603`, "nothing changed") although the first call had paid it: the client, told
/// nothing was paid, would pay the payee again some other way. The retry is now looked up before
/// any check that can change between the two calls and answers the first call's withdrawal.
#[test]
fn a_payment_retried_after_its_invoice_expired_gets_its_withdrawal_back() {
    let w = World::new();
    let carol = w.ledger.create_account();
    w.deposit(carol, 100_000);
    let out = w.customer_invoice(20_000, 60);
    let wd = w.m().pay(carol, &out.to_string(), now_ms()).unwrap();
    w.step_until("the withdrawal completed", |w| {
        w.m().withdrawal(wd.id).unwrap().unwrap().status == LnWithdrawalStatus::Completed
    });
    let later = now_ms() + 3_600_000;
    let again = w.m().pay(carol, &out.to_string(), later).unwrap();
    assert_eq!(
        (again.id, again.status),
        (wd.id, LnWithdrawalStatus::Completed)
    );
    // Another account's try is still refused, and nobody paid twice.
    let dave = w.ledger.create_account();
    w.deposit(dave, 100_000);
    assert!(matches!(
        w.m().pay(dave, &out.to_string(), later),
        Err(PayError::AlreadyPaid)
    ));
    assert_eq!(w.customer_received(&out), Some(20_000_000));
    assert_eq!(w.ledger.btc(carol), (100_000 - 20_050, 0));
    assert_eq!(w.ledger.btc(dave), (100_000, 0));
}

/// The server stops between handing a withdrawal to the node and learning its result; after a
/// restart over the same data the service resolves it by payment hash: completed once, the
/// customer paid once, the account debited amount + fee once. Then an expired deposit invoice:
/// the payer's node refuses it and nothing is credited.
#[test]
fn a_crash_between_send_and_result_is_resolved_by_payment_hash_and_paid_once() {
    let mut w = World::new();
    let carol = w.ledger.create_account();
    w.deposit(carol, 100_000);

    let out = w.customer_invoice(20_000, 3600);
    let wd = w.m().pay(carol, &out.to_string(), now_ms()).unwrap();
    assert_eq!(wd.status, LnWithdrawalStatus::Sending);
    // "Crash": the node stops with the payment in flight; no step ever saw its result.
    let m = w.mediator.take().unwrap();
    m.stop();
    drop(m);
    assert_eq!(w.ledger.btc(carol), (100_000 - 20_050, 20_050));

    // Restart over the same directories and seed.
    let m =
        LightningService::open(mediator_config(&w.chain, w.data.path()), w.ledger.clone()).unwrap();
    w.mediator = Some(m);
    assert_eq!(
        w.m().withdrawal(wd.id).unwrap().unwrap().status,
        LnWithdrawalStatus::Sending
    );
    // Held in the ledger and maybe out of the channel: custody counts it as in flight (never a
    // shortfall while it is on its way).
    assert_eq!(w.m().balances().withdrawals_in_flight_sat, 20_050);
    // Resolved by payment hash alone (the node's events are not looked at).
    wait_until("withdrawal resolved", Duration::from_secs(60), || {
        w.m().resolve_pending().unwrap();
        w.m().withdrawal(wd.id).unwrap().unwrap().status == LnWithdrawalStatus::Completed
    });
    // Drain the customer's events; it received the payment exactly once.
    while let Some(_e) = w.customer.next_event() {
        w.customer.event_handled().unwrap();
    }
    assert_eq!(w.customer_received(&out), Some(20_000_000));
    let inbound: Vec<_> = w
        .customer
        .list_payments()
        .into_iter()
        .filter(|p| p.direction == PaymentDirection::Inbound && p.amount_msat == Some(20_000_000))
        .collect();
    assert_eq!(inbound.len(), 1);
    assert_eq!(w.ledger.btc(carol), (100_000 - 20_050, 0));
    assert_eq!(w.m().balances().withdrawals_in_flight_sat, 0, "completed");
    // Paying it again after the restart answers the one withdrawal; nothing is paid twice.
    let again = w.m().pay(carol, &out.to_string(), now_ms()).unwrap();
    assert_eq!(again.status, LnWithdrawalStatus::Completed);
    assert_eq!(w.ledger.btc(carol), (100_000 - 20_050, 0));
    // What a gateway asks before a refusal by a rule changed since: the same withdrawal, for
    // its account only.
    let found = w
        .m()
        .withdrawal_of_invoice(carol, &out.to_string())
        .unwrap();
    assert_eq!(found.map(|f| f.id), Some(wd.id));
    let other = w.ledger.create_account();
    assert!(w
        .m()
        .withdrawal_of_invoice(other, &out.to_string())
        .unwrap()
        .is_none());
    assert!(w
        .m()
        .withdrawal_of_invoice(carol, "lnbcrt1xyz")
        .unwrap()
        .is_none());

    // An expired deposit invoice: the customer's node refuses to pay it, nothing is credited,
    // nothing is lost (reopened with 1-second invoices).
    let m = w.mediator.take().unwrap();
    m.stop();
    drop(m);
    let mut cfg = mediator_config(&w.chain, w.data.path());
    cfg.invoice_expiry_secs = 1;
    w.mediator = Some(LightningService::open(cfg, w.ledger.clone()).unwrap());
    wait_until(
        "channels usable after the reopen",
        Duration::from_secs(60),
        || {
            let _ = w.m().step(now_ms());
            w.m().channels().iter().all(|c| c.usable)
        },
    );
    let before = w.ledger.btc(carol);
    let d = w
        .m()
        .deposit_invoice(carol, Amount(5_000), now_ms())
        .unwrap();
    let inv = Bolt11Invoice::from_str(&d.bolt11).unwrap();
    std::thread::sleep(Duration::from_millis(2_100));
    assert!(inv.is_expired());
    assert!(w.customer.bolt11_payment().send(&inv, None).is_err());
    for _ in 0..5 {
        w.m().step(now_ms()).unwrap();
    }
    assert_eq!(
        w.m()
            .deposit(&d.payment_hash)
            .unwrap()
            .unwrap()
            .credited_sat,
        None
    );
    assert_eq!(w.ledger.btc(carol), before);
}

/// Defect (money): the node keeps one payment record per invoice, and an invoice whose attempt
/// failed may be paid again. The failure event of the first attempt, queued after a
/// resolution by payment hash had already released it, was applied to whichever withdrawal of
/// that invoice was live: the second attempt, still on its way. Its hold was released, then the
/// payee claimed it: the account was paid and never debited (a payee who fails its own HTLCs
/// controls that timing). A failure is applied only when the node's record says this attempt
/// failed. Failed on the old code (the second attempt was `released` while its HTLC was held).
#[test]
fn an_earlier_attempts_failure_does_not_release_a_payment_sent_again() {
    use lightning_custody::ldk_node::bitcoin::hashes::sha256;
    use lightning_custody::ldk_node::lightning_types::payment::{PaymentHash, PaymentPreimage};
    let w = World::new();
    let dave = w.ledger.create_account();
    w.deposit(dave, 100_000);
    assert_eq!(w.ledger.btc(dave), (100_000, 0));

    // The customer's invoice, settled by hand: it fails or claims each attempt when it likes.
    let preimage = [0x5au8; 32];
    let hash = PaymentHash(sha256::Hash::hash(&preimage).to_byte_array());
    let inv = w
        .customer
        .bolt11_payment()
        .receive_for_hash(
            10_000_000,
            &Bolt11InvoiceDescription::Direct(Description::new("held".into()).unwrap()),
            3600,
            hash,
        )
        .unwrap();
    let claimable = |what: &str| {
        wait_event(
            &w.customer,
            what,
            |e| matches!(e, Event::PaymentClaimable { payment_hash, .. } if *payment_hash == hash),
        )
    };

    // 1. The first attempt; the customer fails it. The node records the failure before it
    // queues the event: a resolution by payment hash (no events) releases the hold first.
    let first = w.m().pay(dave, &inv.to_string(), now_ms()).unwrap();
    claimable("the first attempt");
    w.customer.bolt11_payment().fail_for_hash(hash).unwrap();
    let pid = PaymentId(hash.0);
    wait_until("the first attempt failed", Duration::from_secs(60), || {
        w.m().node().payment(&pid).map(|p| p.status) == Some(PaymentStatus::Failed)
    });
    w.m().resolve_pending().unwrap();
    assert_eq!(
        w.m().withdrawal(first.id).unwrap().unwrap().status,
        LnWithdrawalStatus::Released
    );
    assert_eq!(w.ledger.btc(dave), (100_000, 0));

    // 2. Paid again; the customer holds this attempt's HTLC.
    let second = w.m().pay(dave, &inv.to_string(), now_ms()).unwrap();
    assert_ne!(second.id, first.id);
    assert_eq!(second.status, LnWithdrawalStatus::Sending);
    assert_eq!(w.ledger.btc(dave), (100_000 - 10_050, 10_050));
    claimable("the second attempt");

    // 3. A step handles the first attempt's failure event: the second attempt is on its way.
    w.m().step(now_ms()).unwrap();
    assert_eq!(
        w.m().withdrawal(second.id).unwrap().unwrap().status,
        LnWithdrawalStatus::Sending,
        "an earlier attempt's failure released a payment still on its way"
    );
    assert_eq!(w.ledger.btc(dave), (100_000 - 10_050, 10_050));

    // 4. The customer claims it: paid once, debited once.
    w.customer
        .bolt11_payment()
        .claim_for_hash(hash, 10_000_000, PaymentPreimage(preimage))
        .unwrap();
    w.step_until("the second attempt completed", |w| {
        w.m().withdrawal(second.id).unwrap().unwrap().status == LnWithdrawalStatus::Completed
    });
    assert_eq!(w.ledger.btc(dave), (100_000 - 10_050, 0));
    assert_eq!(
        w.ledger
            .record(engine_withdrawal_id(second.id))
            .unwrap()
            .state,
        WithdrawalState::Completed
    );
}

/// A withdrawal of `account` paying an invoice the customer settles by hand (its HTLC held),
/// then the node stopped and its record of the payment deleted, as if the stop had come between
/// LDK taking the payment and ldk-node's write of the record; the customer stopped too if
/// `customer_offline`; restarted (alarms attached, `reconnect_grace_secs` as given), once the
/// invoice expired if `expire` (so that sending it again is refused), else at once (the
/// invoice valid for an hour). Returns the withdrawal, the invoice's hash and preimage, and the
/// alarms.
fn held_payment_without_record(
    w: &mut World,
    account: AccountId,
    secret: u8,
    expire: bool,
    customer_offline: bool,
    reconnect_grace_secs: u64,
) -> (
    lightning_custody::LnWithdrawal,
    lightning_custody::ldk_node::lightning_types::payment::PaymentHash,
    [u8; 32],
    Arc<FakeAlarms>,
) {
    use lightning_custody::ldk_node::bitcoin::hashes::sha256;
    use lightning_custody::ldk_node::lightning_types::payment::PaymentHash;
    let preimage = [secret; 32];
    let hash = PaymentHash(sha256::Hash::hash(&preimage).to_byte_array());
    let inv = w
        .customer
        .bolt11_payment()
        .receive_for_hash(
            10_000_000,
            &Bolt11InvoiceDescription::Direct(Description::new("held".into()).unwrap()),
            if expire { 5 } else { 3600 },
            hash,
        )
        .unwrap();
    let wd = w.m().pay(account, &inv.to_string(), now_ms()).unwrap();
    assert_eq!(wd.status, LnWithdrawalStatus::Sending);
    wait_event(
        &w.customer,
        "the customer holds the HTLC",
        |e| matches!(e, Event::PaymentClaimable { payment_hash, .. } if *payment_hash == hash),
    );

    let m = w.mediator.take().unwrap();
    m.stop();
    drop(m);
    let kv = rusqlite::Connection::open(
        w.data
            .path()
            .join("lightning")
            .join("ldk")
            .join("ldk_node_data.sqlite"),
    )
    .unwrap();
    let deleted = kv
        .execute(
            "DELETE FROM ldk_node_data WHERE primary_namespace = 'payments' AND key = ?1",
            [hex::encode(hash.0)],
        )
        .unwrap();
    assert_eq!(deleted, 1, "the node's record of the payment");
    drop(kv);
    if expire {
        wait_until("the invoice expired", Duration::from_secs(30), || {
            inv.is_expired()
        });
    }
    if customer_offline {
        w.customer.stop().unwrap();
    }

    let mut cfg = mediator_config(&w.chain, w.data.path());
    cfg.reconnect_grace_secs = reconnect_grace_secs;
    let m = LightningService::open(cfg, w.ledger.clone()).unwrap();
    let alarms = Arc::new(FakeAlarms::default());
    assert!(m.set_alarms(alarms.clone()));
    w.mediator = Some(m);
    if !customer_offline {
        channels_usable(w);
    }
    (wd, hash, preimage, alarms)
}

/// Steps until both channels are usable (the peers reconnected).
fn channels_usable(w: &World) {
    w.step_until("channels usable", |w| {
        let ch = w.m().channels();
        !ch.is_empty() && ch.iter().all(|c| c.usable)
    });
}

/// The customer back online and connected to Mediator, the channels usable.
fn customer_back(w: &World) {
    w.customer.start().unwrap();
    let m_addr = w.m().node().listening_addresses().unwrap()[0].clone();
    // A node just started may refuse the first connection (its listener not up yet: a CI run
    // failed with ConnectionFailed here); tried again for a while.
    let mut tries = 0;
    while let Err(e) = w
        .customer
        .connect(w.m().node().node_id(), m_addr.clone(), true)
    {
        tries += 1;
        assert!(tries < 40, "cannot connect to Mediator's node: {e:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    channels_usable(w);
}

/// The customer claims the held HTLC of withdrawal `wd`: completed, `account` debited once
/// (10,050 sat held, then spent).
fn claimed_and_completed(
    w: &World,
    account: AccountId,
    wd: u64,
    hash: lightning_custody::ldk_node::lightning_types::payment::PaymentHash,
    preimage: [u8; 32],
) {
    use lightning_custody::ldk_node::lightning_types::payment::PaymentPreimage;
    w.customer
        .bolt11_payment()
        .claim_for_hash(hash, 10_000_000, PaymentPreimage(preimage))
        .unwrap();
    w.step_until("the withdrawal completed", |w| {
        w.m().withdrawal(wd).unwrap().unwrap().status == LnWithdrawalStatus::Completed
    });
    assert_eq!(w.ledger.btc(account), (100_000 - 10_050, 0));
    assert_eq!(
        w.ledger.record(engine_withdrawal_id(wd)).unwrap().state,
        WithdrawalState::Completed
    );
}

/// Resolves and steps a few times: a withdrawal in doubt stays `sending`, however often the
/// loop looks, with one alarm.
fn stays_in_doubt(w: &World, id: u64, alarms: &FakeAlarms) {
    for _ in 0..5 {
        w.m().resolve_pending().unwrap();
        w.m().step(now_ms()).unwrap();
    }
    assert_eq!(
        w.m().withdrawal(id).unwrap().unwrap().status,
        LnWithdrawalStatus::Sending,
        "released while its HTLC may still be claimed"
    );
    let subject = format!("lightning withdrawal {id}");
    let raised = alarms
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, s)| k == "lightning_withdrawal_in_doubt" && *s == subject)
        .count();
    assert_eq!(raised, 1, "{:?}", alarms.0.lock().unwrap());
}

/// Defect (money): a withdrawal whose send reached LDK's channel manager but not ldk-node's
/// payment store (a stop in between, or a failed write of the record) has no record after a
/// restart, so it is sent again under the same payment id. LDK looks for a route before it
/// looks for a duplicate: with the invoice expired (or the channel's liquidity taken by the
/// first HTLC) the second send failed "no route" and the hold was released, while the first
/// HTLC, held by the payee, could still be claimed: the payee was paid and the account never
/// debited. Such a withdrawal now stays `sending`, in doubt and with an alarm, until the node
/// reports how the payment ended or its HTLCs' time has run out. Failed on the old code (the
/// withdrawal was `released` while its HTLC was held).
#[test]
fn a_payment_whose_node_record_is_lost_stays_held_until_its_htlc_settles() {
    let mut w = World::new();
    let erin = w.ledger.create_account();
    w.deposit(erin, 100_000);
    let (wd, hash, preimage, alarms) =
        held_payment_without_record(&mut w, erin, 0x6b, true, false, 600);
    stays_in_doubt(&w, wd.id, &alarms);
    assert_eq!(w.ledger.btc(erin), (100_000 - 10_050, 10_050));

    claimed_and_completed(&w, erin, wd.id, hash, preimage);
}

/// The same lost record with the invoice still valid, the customer offline at the restart.
/// Nothing is sent again while no channel is usable (review finding: right after a start the
/// send was refused for want of a channel, and the withdrawal held in doubt for nothing). Once
/// the customer is back it is sent again, once: LDK finds a route and refuses the duplicate
/// (the first send is in flight). It is in doubt all the same (a first send that fails could
/// make LDK take a later send as new, and ldk-node then marks that one failed), and the
/// payee's claim completes it: paid once, debited once.
#[test]
fn a_payment_whose_node_record_is_lost_is_sent_again_once_its_channels_are_back() {
    let mut w = World::new();
    let gus = w.ledger.create_account();
    w.deposit(gus, 100_000);
    let (wd, hash, preimage, alarms) =
        held_payment_without_record(&mut w, gus, 0x6d, false, true, 600);
    for _ in 0..5 {
        w.m().resolve_pending().unwrap();
        w.m().step(now_ms()).unwrap();
    }
    let row = w.m().withdrawal(wd.id).unwrap().unwrap();
    assert_eq!(
        (row.status, row.doubt_until_height),
        (LnWithdrawalStatus::Sending, None),
        "held in doubt for want of a channel"
    );
    assert!(
        alarms.0.lock().unwrap().is_empty(),
        "{:?}",
        alarms.0.lock().unwrap()
    );
    customer_back(&w);
    stays_in_doubt(&w, wd.id, &alarms);
    assert_eq!(w.ledger.btc(gus), (100_000 - 10_050, 10_050));
    claimed_and_completed(&w, gus, wd.id, hash, preimage);
    let inbound = w
        .customer
        .list_payments()
        .into_iter()
        .filter(|p| p.direction == PaymentDirection::Inbound && p.amount_msat == Some(10_000_000))
        .count();
    assert_eq!(inbound, 1, "paid once");
}

/// With no channel usable once the reconnection grace is over (here 0 s: the peer gone), the
/// withdrawal is held in doubt without a send, with the alarm, rather than waiting for a
/// channel without a word; the payee's claim, once it is back, completes it.
#[test]
fn a_payment_whose_node_record_is_lost_with_no_channel_back_is_held_in_doubt() {
    let mut w = World::new();
    let hal = w.ledger.create_account();
    w.deposit(hal, 100_000);
    let (wd, hash, preimage, alarms) =
        held_payment_without_record(&mut w, hal, 0x6e, false, true, 0);
    assert!(w.m().channels().iter().all(|c| !c.usable));
    stays_in_doubt(&w, wd.id, &alarms);
    assert!(
        w.m()
            .withdrawal(wd.id)
            .unwrap()
            .unwrap()
            .doubt_until_height
            .is_some(),
        "marked"
    );
    assert_eq!(w.ledger.btc(hal), (100_000 - 10_050, 10_050));
    customer_back(&w);
    claimed_and_completed(&w, hal, wd.id, hash, preimage);
}

/// A withdrawal in doubt whose HTLC the payee failed stays held (the node's failure record
/// cannot be told from the one the refused second send left), and is released once the chain
/// has passed the height after which no HTLC of the first send can be claimed
/// (`IN_DOUBT_BLOCKS`): the account gets its money back, and the customer was never paid.
#[test]
fn a_payment_in_doubt_is_released_once_its_htlcs_time_has_run_out() {
    let mut w = World::new();
    let fay = w.ledger.create_account();
    w.deposit(fay, 100_000);
    let (wd, hash, _preimage, alarms) =
        held_payment_without_record(&mut w, fay, 0x6c, true, false, 600);
    stays_in_doubt(&w, wd.id, &alarms);
    // The customer fails the HTLC; the node reports the payment failed (the event is left
    // queued for the steps below to handle; earlier ones are acknowledged here).
    w.customer.bolt11_payment().fail_for_hash(hash).unwrap();
    wait_until(
        "the node's payment failure event",
        Duration::from_secs(60),
        || match w.m().node().next_event() {
            Some(Event::PaymentFailed {
                payment_hash: Some(h),
                ..
            }) if h == hash => true,
            Some(_) => {
                w.m().node().event_handled().unwrap();
                false
            }
            None => false,
        },
    );
    stays_in_doubt(&w, wd.id, &alarms);
    assert_eq!(w.ledger.btc(fay), (100_000 - 10_050, 10_050));

    // Held up to the block before its deadline (the node synced to it), released at it.
    let until = w.m().withdrawal(wd.id).unwrap().unwrap().doubt_until_height;
    let until = u64::from(until.expect("in doubt"));
    let height = w.chain.rpc.get_block_count().unwrap();
    assert!(
        until >= height + u64::from(IN_DOUBT_BLOCKS),
        "{until} {height}"
    );
    w.chain.mine(until - 1 - height);
    w.step_until("the node at the block before the deadline", |w| {
        w.m().node().sync_wallets().unwrap();
        u64::from(w.m().node().status().current_best_block.height) == until - 1
    });
    stays_in_doubt(&w, wd.id, &alarms);
    w.chain.mine(1);
    w.step_until("the withdrawal released", |w| {
        let _ = w.m().node().sync_wallets();
        w.m().withdrawal(wd.id).unwrap().unwrap().status == LnWithdrawalStatus::Released
    });
    let reason = w.m().withdrawal(wd.id).unwrap().unwrap().reason.unwrap();
    assert!(reason.starts_with("in doubt"), "{reason}");
    assert_eq!(w.ledger.btc(fay), (100_000, 0));
    assert_eq!(
        w.ledger.record(engine_withdrawal_id(wd.id)).unwrap().state,
        WithdrawalState::Released
    );
    while let Some(_e) = w.customer.next_event() {
        w.customer.event_handled().unwrap();
    }
    assert_eq!(
        w.customer.payment(&PaymentId(hash.0)).map(|p| p.status),
        Some(PaymentStatus::Failed),
        "the customer was not paid"
    );
}

/// Defect (money): a deposit paid while the ledger refused credits (the circuit breaker open)
/// was retried only until an hour after its invoice's expiry; after that the paid invoice was
/// never credited. A payment the node received is recorded as received and retried until it is
/// credited, however long the ledger refuses.
#[test]
fn a_deposit_paid_while_credits_are_refused_is_credited_whenever_they_resume() {
    let w = World::new();
    let erin = w.ledger.create_account();
    w.ledger
        .credits_halted
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let t0 = now_ms();
    let d = w.m().deposit_invoice(erin, Amount(6_000), t0).unwrap();
    let inv = Bolt11Invoice::from_str(&d.bolt11).unwrap();
    w.customer.bolt11_payment().send(&inv, None).unwrap();
    let pid = PaymentId(d.payment_hash);
    w.wait_for_received_event(d.payment_hash);
    assert!(w.m().node().payment(&pid).is_some_and(|p| {
        p.direction == PaymentDirection::Inbound && p.status == PaymentStatus::Succeeded
    }));
    // Steps: the event is handled, the credit refused each time.
    for _ in 0..3 {
        w.m().step(now_ms()).unwrap();
    }
    assert_eq!(w.ledger.btc(erin), (0, 0));
    // The breaker stays open for a day (the invoice expired 23 hours ago), then closes.
    let later = d.expires_ms + 23 * 3_600_000;
    w.m().step(later).unwrap();
    assert_eq!(w.ledger.btc(erin), (0, 0));
    w.ledger
        .credits_halted
        .store(false, std::sync::atomic::Ordering::SeqCst);
    w.m().step(later + 1_000).unwrap();
    assert_eq!(
        w.ledger.btc(erin),
        (6_000, 0),
        "credited once the ledger takes it"
    );
    assert_eq!(
        w.m()
            .deposit(&d.payment_hash)
            .unwrap()
            .unwrap()
            .credited_sat,
        Some(6_000)
    );
    // Never twice.
    w.m().step(later + 2_000).unwrap();
    w.m().resolve_pending().unwrap();
    assert_eq!(w.ledger.btc(erin), (6_000, 0));
}

/// Review finding: a received payment's event was acknowledged even when nothing of ours
/// recorded the receipt (the store's write of `received_msat` failed and the ledger refused
/// the credit): only the sweep could find it again, and the sweep looks at deposits expired at
/// most `OPEN_DEPOSIT_GRACE_MS` ago, while the node takes a payment up to two hours past the
/// expiry (LDK's own margin) and the ledger may refuse credits for longer. The event is
/// acknowledged only once the receipt is durable; until then the node delivers it again.
/// Failed on the old code (not credited once the store and the ledger were back).
#[test]
fn a_received_payment_is_acknowledged_only_once_the_receipt_is_recorded() {
    let w = World::new();
    let frank = w.ledger.create_account();
    w.ledger
        .credits_halted
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // The store cannot record the receipt (a full disk, say) while the ledger refuses.
    let db = rusqlite::Connection::open(
        w.data
            .path()
            .join("lightning")
            .join(lightning_custody::DATABASE_FILE),
    )
    .unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute_batch(
        "CREATE TRIGGER no_receipt BEFORE UPDATE OF received_msat ON ln_deposits \
         BEGIN SELECT RAISE(ABORT, 'injected: disk full'); END;",
    )
    .unwrap();
    let t0 = now_ms();
    let d = w.m().deposit_invoice(frank, Amount(7_000), t0).unwrap();
    let inv = Bolt11Invoice::from_str(&d.bolt11).unwrap();
    w.customer.bolt11_payment().send(&inv, None).unwrap();
    // The event is there before the service steps: each step below handles it, and neither
    // the store nor the ledger takes it.
    w.wait_for_received_event(d.payment_hash);
    for _ in 0..3 {
        w.m().step(now_ms()).unwrap();
    }
    assert_eq!(w.ledger.btc(frank), (0, 0));
    // Both come back long after the invoice expired, beyond any sweep's window.
    db.execute_batch("DROP TRIGGER no_receipt;").unwrap();
    w.ledger
        .credits_halted
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let later = d.expires_ms + 30 * 3_600_000;
    w.m().step(later).unwrap();
    assert_eq!(
        w.ledger.btc(frank),
        (7_000, 0),
        "credited from the event kept for it"
    );
    // Never twice.
    w.m().step(later + 1_000).unwrap();
    w.m().resolve_pending().unwrap();
    assert_eq!(w.ledger.btc(frank), (7_000, 0));
    // Listed among the credits once, after every credit applied before it.
    let credits = w.m().credited_after(0, 1_000).unwrap();
    let ours: Vec<u64> = credits
        .iter()
        .filter(|(_, h)| *h == d.payment_hash)
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(ours.len(), 1, "{credits:?}");
    assert_eq!(ours[0], credits.last().unwrap().0);
    assert!(w.m().credited_after(ours[0], 1_000).unwrap().is_empty());
}

/// Custody's rules as `mediator serve` sets them, faked: account `flagged` is refused (-4032), and
/// a payment is refused (-4025) when it and what the account already sent over Lightning in 24
/// hours pass `limit_sat`.
struct FakeRules {
    flagged: AccountId,
    limit_sat: u64,
    /// `lightning_used` of every check, as the service passed it.
    seen: Mutex<Vec<u64>>,
}

impl lightning_custody::PayPolicy for FakeRules {
    fn check(
        &self,
        account: AccountId,
        amount: Amount,
        lightning_used: Amount,
        _now_ms: u64,
    ) -> Result<(), (i32, String)> {
        self.seen.lock().unwrap().push(lightning_used.0);
        if account == self.flagged {
            return Err((-4032, "account is flagged for review".into()));
        }
        if lightning_used.0 + amount.0 > self.limit_sat {
            return Err((-4025, "24-hour limit".into()));
        }
        Ok(())
    }
}

/// A payment custody's rules refuse (a flagged account; past the 24-hour limit, counting what
/// the account already sent over Lightning) is refused with custody's code before anything is
/// held or sent: the balance is untouched, the node has no payment for the invoice, the payee
/// received nothing, and the invoice can be paid by an account the rules allow.
#[test]
fn custodys_rules_refuse_a_payment_and_nothing_leaves_the_node() {
    let w = World::new();
    let frank = w.ledger.create_account();
    let grace = w.ledger.create_account();
    w.deposit(frank, 100_000);
    w.deposit(grace, 100_000);
    let rules = Arc::new(FakeRules {
        flagged: frank,
        limit_sat: 50_000,
        seen: Mutex::new(Vec::new()),
    });
    assert!(w.m().set_policy(rules.clone()));
    let nothing_sent = |inv: &Bolt11Invoice| {
        w.m()
            .node()
            .payment(&PaymentId(inv.payment_hash().to_byte_array()))
            .is_none()
            && w.customer_received(inv).is_none()
    };

    // Flagged.
    let inv = w.customer_invoice(10_000, 3600);
    let e = w.m().pay(frank, &inv.to_string(), now_ms()).unwrap_err();
    assert!(matches!(e, PayError::Refused { .. }), "{e:?}");
    assert_eq!(e.code(), -4032);
    assert_eq!(w.ledger.btc(frank), (100_000, 0), "nothing held");
    w.m().step(now_ms()).unwrap();
    assert!(nothing_sent(&inv));

    // The limit counts what grace sent over Lightning: 30,000 passes, 30,000 more does not.
    let first = w.customer_invoice(30_000, 3600);
    let wd = w.m().pay(grace, &first.to_string(), now_ms()).unwrap();
    w.step_until("the first payment", |w| {
        w.m().withdrawal(wd.id).unwrap().unwrap().status == LnWithdrawalStatus::Completed
    });
    let before = w.ledger.btc(grace);
    let second = w.customer_invoice(30_000, 3600);
    let e = w.m().pay(grace, &second.to_string(), now_ms()).unwrap_err();
    assert_eq!(e.code(), -4025, "{e:?}");
    assert_eq!(w.ledger.btc(grace), before, "nothing held");
    w.m().step(now_ms()).unwrap();
    assert!(nothing_sent(&second));
    assert_eq!(*rules.seen.lock().unwrap(), [0, 0, 30_000]);

    // The invoice frank could not pay is paid by grace within her limit: it was never blocked.
    let wd = w.m().pay(grace, &inv.to_string(), now_ms()).unwrap();
    w.step_until("grace's payment", |w| {
        w.m().withdrawal(wd.id).unwrap().unwrap().status == LnWithdrawalStatus::Completed
    });
    assert_eq!(w.customer_received(&inv), Some(10_000_000));
}

/// Custody's alarm table, faked: what the service raised.
#[derive(Default)]
struct FakeAlarms(Mutex<Vec<(String, String)>>);

impl lightning_custody::AlarmSink for FakeAlarms {
    fn raise(&self, kind: &str, subject: &str, _message: &str) {
        self.0.lock().unwrap().push((kind.into(), subject.into()));
    }
}

/// Lightning's discrepancies reach custody's alarms (`AlarmSink`), not only the log: a payment
/// for no invoice of ours (a keysend: credited to nobody), and a withdrawal the node paid whose
/// hold the ledger released (the ledger and the node disagree).
#[test]
fn a_payment_for_no_invoice_of_ours_raises_a_custody_alarm() {
    let w = World::new();
    let alarms = Arc::new(FakeAlarms::default());
    assert!(w.m().set_alarms(alarms.clone()));
    let hank = w.ledger.create_account();
    w.deposit(hank, 100_000);
    let supply = w.ledger.btc_liabilities();

    // Three keysends: one alarm subject for all (custody keeps one open alarm per subject), so
    // that payments for nothing cannot add an alarm row each.
    for msat in [4_000_000, 1_000, 2_000] {
        let pid = w
            .customer
            .spontaneous_payment()
            .send(msat, w.m().node().node_id(), None)
            .unwrap();
        w.step_until("the node received the keysend", |w| {
            w.m().node().payment(&pid).is_some_and(|p| {
                p.direction == PaymentDirection::Inbound && p.status == PaymentStatus::Succeeded
            })
        });
    }
    let unknown = |alarms: &FakeAlarms| -> (usize, std::collections::BTreeSet<String>) {
        let a = alarms.0.lock().unwrap();
        let mine: Vec<_> = a
            .iter()
            .filter(|(k, _)| k == "lightning_payment_unknown")
            .collect();
        (mine.len(), mine.iter().map(|(_, s)| s.clone()).collect())
    };
    w.step_until("the unknown payments' alarms", |_| unknown(&alarms).0 == 3);
    assert_eq!(unknown(&alarms).1.len(), 1, "{:?}", unknown(&alarms).1);
    assert_eq!(w.ledger.btc_liabilities(), supply, "credited to nobody");

    let out = w.customer_invoice(5_000, 3600);
    let wd = w.m().pay(hank, &out.to_string(), now_ms()).unwrap();
    w.ledger
        .submit(Command::WithdrawRelease {
            id: engine_withdrawal_id(wd.id),
        })
        .unwrap();
    let subject = format!("lightning withdrawal {}", wd.id);
    w.step_until("the mismatch alarm", |_| {
        alarms
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|(k, s)| k == "lightning_withdrawal_mismatch" && *s == subject)
    });
}

/// Measurement for README's table (not a check; run by hand):
/// `cargo test -p lightning-custody --release --test regtest -- --ignored --nocapture measure`.
/// Prints the node's start-up time (open = seed, build, start on bitcoind RPC) and the time from
/// the customer's `send` to the deposit's credit in the ledger (Mediator's step loop polling
/// every 5 ms), p50 and p99 over 200 payments.
#[test]
#[ignore]
fn measure_startup_and_send_to_credited() {
    let w = World::new();
    // Start-up: stop and reopen over the same data (channels, seed), 5 times.
    let mut w = w;
    let mut startups = Vec::new();
    for _ in 0..5 {
        let m = w.mediator.take().unwrap();
        m.stop();
        drop(m);
        let t = Instant::now();
        let m = LightningService::open(mediator_config(&w.chain, w.data.path()), w.ledger.clone())
            .unwrap();
        startups.push(t.elapsed());
        w.mediator = Some(m);
    }
    wait_until(
        "channels usable after restarts",
        Duration::from_secs(60),
        || {
            let _ = w.m().step(now_ms());
            w.m().channels().iter().all(|c| c.usable)
        },
    );
    let dave = w.ledger.create_account();
    let mut lat = Vec::with_capacity(200);
    for i in 0..200u64 {
        let d = w
            .m()
            .deposit_invoice(dave, Amount(1_000 + i), now_ms())
            .unwrap();
        let inv = Bolt11Invoice::from_str(&d.bolt11).unwrap();
        let t = Instant::now();
        w.customer.bolt11_payment().send(&inv, None).unwrap();
        loop {
            w.m().step(now_ms()).unwrap();
            if w.m()
                .deposit(&d.payment_hash)
                .unwrap()
                .unwrap()
                .credited_sat
                .is_some()
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "payment {i} not credited"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        lat.push(t.elapsed());
        while let Some(_e) = w.customer.next_event() {
            w.customer.event_handled().unwrap();
        }
    }
    lat.sort();
    startups.sort();
    let p = |v: &[Duration], q: usize| v[(v.len() * q / 100).min(v.len() - 1)];
    println!(
        "lightning: node start-up p50 {:?} max {:?} (5 restarts); send -> credited p50 {:?} p99 {:?} over {} payments",
        p(&startups, 50),
        startups.last().unwrap(),
        p(&lat, 50),
        p(&lat, 99),
        lat.len()
    );
    let expected: u64 = (0..200u64).map(|i| 1_000 + i).sum();
    assert_eq!(w.ledger.btc(dave), (expected, 0));
}

/// Review finding: a cooperatively closed channel's money was counted twice in the node's
/// balances (custody's reconciliation adds them): once by the wallet, which the closing
/// transaction pays (from the mempool on), and once by LDK, as the channel's balance until the
/// close is in a block and then as `ClaimableAwaitingConfirmations` for six more. A shortfall
/// of that size was hidden. Counted once now, in the wallet. Failed on the old code: one block
/// after the close the total was about 2,000,000 sat more than before it.
#[test]
fn a_cooperatively_closed_channels_money_is_counted_once() {
    let w = World::new();
    let sync = |w: &World| {
        w.m().node().sync_wallets().unwrap();
        w.customer.sync_wallets().unwrap();
    };
    sync(&w);
    let before = w.m().balances().total_sat().unwrap();
    let ours = w.m().channels().into_iter().find(|c| c.outbound).unwrap();
    assert_eq!(ours.capacity_sat, 2_000_000);
    w.m().close_channel(ours.user_channel_id).unwrap();
    wait_until(
        "the closing transaction in the mempool",
        Duration::from_secs(60),
        || {
            let _ = w.m().step(now_ms());
            while let Some(_e) = w.customer.next_event() {
                w.customer.event_handled().unwrap();
            }
            !w.chain.rpc.get_raw_mempool().unwrap().is_empty()
        },
    );
    // The close's fee and the commitment's (which the channel's balance leaves out) differ by
    // far less than this; counting the channel twice adds its 2,000,000.
    let slack = 100_000;
    sync(&w);
    let b = w.m().balances();
    assert!(
        b.total_sat().unwrap() < before + slack,
        "in the mempool: {before} then {b:?}"
    );
    for blocks in [1, 6] {
        w.chain.mine(blocks);
        sync(&w);
        let _ = w.m().step(now_ms());
        let b = w.m().balances();
        let total = b.total_sat().unwrap();
        assert!(
            total < before + slack && total + slack > before,
            "{blocks} block(s) after the close: {before} then {b:?}"
        );
    }
}

/// Review finding: ldk-node stamps its payment records in whole seconds, and an attempt sent
/// after a failed one is told from it by a later stamp. A retry that failed again within the
/// second of the earlier failure read as an attempt with no record: held in doubt (about eight
/// days, an alarm) and sent again unasked, instead of released. A retry now waits until the
/// node's clock is past that second. Each round pays, the customer fails the payment at once,
/// and the next round pays again straight away. Failed on the old code: a round within the
/// same second never released its withdrawal.
#[test]
fn a_payment_failing_again_within_the_second_of_its_earlier_failure_is_released() {
    use lightning_custody::ldk_node::bitcoin::hashes::sha256;
    use lightning_custody::ldk_node::lightning_types::payment::PaymentHash;
    let w = World::new();
    let erin = w.ledger.create_account();
    w.deposit(erin, 100_000);
    let preimage = [0x6bu8; 32];
    let hash = PaymentHash(sha256::Hash::hash(&preimage).to_byte_array());
    let inv = w
        .customer
        .bolt11_payment()
        .receive_for_hash(
            10_000_000,
            &Bolt11InvoiceDescription::Direct(Description::new("refused".into()).unwrap()),
            3600,
            hash,
        )
        .unwrap();
    let pid = PaymentId(hash.0);
    for round in 0..4 {
        let p = w.m().pay(erin, &inv.to_string(), now_ms()).unwrap();
        assert_eq!(p.status, LnWithdrawalStatus::Sending, "round {round}");
        wait_event(
            &w.customer,
            "the attempt",
            |e| matches!(e, Event::PaymentClaimable { payment_hash, .. } if *payment_hash == hash),
        );
        w.customer.bolt11_payment().fail_for_hash(hash).unwrap();
        wait_until("the attempt failed", Duration::from_secs(60), || {
            w.m().node().payment(&pid).map(|p| p.status) == Some(PaymentStatus::Failed)
        });
        w.step_until("the attempt released", |w| {
            let s = w.m().withdrawal(p.id).unwrap().unwrap();
            assert!(
                s.doubt_until_height.is_none(),
                "round {round}: held in doubt"
            );
            s.status == LnWithdrawalStatus::Released
        });
        assert_eq!(w.ledger.btc(erin), (100_000, 0), "round {round}");
    }
}

/// Review finding: a payment whose send the node refused because it was not running (stopped
/// for a shutdown while the request waited) was read as maybe sent: `-1007`, the hold kept, and
/// after a restart held in doubt for about eight days (sent again unasked, or never), though
/// ldk-node answers `NotRunning` before it touches anything. Released at once and answered busy
/// (failed on the old code: Unknown, and the hold kept).
#[test]
fn a_payment_refused_because_the_node_is_stopped_is_released_not_held_in_doubt() {
    let w = World::new();
    let carol = w.ledger.create_account();
    w.deposit(carol, 100_000);
    let out = w.customer_invoice(20_000, 3600);
    w.m().stop();
    let e = w.m().pay(carol, &out.to_string(), now_ms()).unwrap_err();
    assert!(matches!(e, PayError::Busy), "{e:?}");
    assert_eq!(w.ledger.btc(carol), (100_000, 0), "nothing held");
    let live = w
        .m()
        .withdrawal_of_invoice(carol, &out.to_string())
        .unwrap();
    assert!(live.is_none(), "released, no payment on its way: {live:?}");
}
