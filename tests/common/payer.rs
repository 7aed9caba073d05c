//! A customer's wallet for the tests of the binary: an in-memory BDK wallet that gets coins by
//! mining to itself on the server's regtest node and pays exact amounts to any address.

use bdk_bitcoind_rpc::bitcoincore_rpc::{Client, RpcApi};
use bdk_bitcoind_rpc::Emitter;
use bdk_wallet::bitcoin::bip32::Xpriv;
use bdk_wallet::bitcoin::secp256k1::Secp256k1;
use bdk_wallet::bitcoin::{Address, Amount, FeeRate, Network, Psbt, ScriptBuf, Transaction};
use bdk_wallet::template::Bip84;
use bdk_wallet::{KeychainKind, SignOptions, Wallet};
use std::sync::Arc;

pub struct Payer {
    wallet: Wallet,
    xprv: Xpriv,
}

/// An address nobody spends from, for blocks mined only to confirm.
pub fn throwaway() -> Address {
    Address::p2wsh(&ScriptBuf::from_bytes(vec![0x51]), Network::Regtest)
}

pub fn parse_address(s: &str) -> Address {
    s.parse::<Address<_>>()
        .unwrap()
        .require_network(Network::Regtest)
        .unwrap()
}

impl Payer {
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

    /// Mines one coinbase to this wallet and 100 blocks after it, so it can be spent.
    pub fn fund(&mut self, rpc: &Client) {
        let a = self
            .wallet
            .reveal_next_address(KeychainKind::External)
            .address;
        rpc.generate_to_address(1, &a).unwrap();
        rpc.generate_to_address(100, &throwaway()).unwrap();
        self.sync(rpc);
    }

    pub fn sync(&mut self, rpc: &Client) {
        let unconfirmed: Vec<Arc<Transaction>> = self
            .wallet
            .transactions()
            .filter(|t| t.chain_position.is_unconfirmed())
            .map(|t| t.tx_node.tx.clone())
            .collect();
        let mut emitter = Emitter::new(rpc, self.wallet.latest_checkpoint(), 0, unconfirmed);
        while let Some(ev) = emitter.next_block().unwrap() {
            self.wallet
                .apply_block_connected_to(&ev.block, ev.block_height(), ev.connected_to())
                .unwrap();
        }
        let mempool = emitter.mempool().unwrap();
        self.wallet.apply_evicted_txs(mempool.evicted);
        self.wallet.apply_unconfirmed_txs(mempool.update);
    }

    /// A fresh receiving address of this wallet (e.g. for a refund).
    pub fn receive_address(&mut self) -> Address {
        self.wallet
            .reveal_next_address(KeychainKind::External)
            .address
    }

    /// Satoshis of this wallet's unspent outputs paying `address` (after [`Payer::sync`]).
    pub fn unspent_at(&self, address: &Address) -> u64 {
        let spk = address.script_pubkey();
        self.wallet
            .list_unspent()
            .filter(|u| u.txout.script_pubkey == spk)
            .map(|u| u.txout.value.to_sat())
            .sum()
    }

    /// Pays `sat` to `address` in one transaction, broadcast to the node's mempool.
    pub fn pay(&mut self, rpc: &Client, address: &str, sat: u64) -> Transaction {
        let to = parse_address(address);
        let mut b = self.wallet.build_tx();
        b.add_recipient(to.script_pubkey(), Amount::from_sat(sat));
        b.fee_rate(FeeRate::from_sat_per_vb_u32(2));
        let psbt = b.finish().unwrap();
        self.sign_and_send(rpc, psbt, 0, "sendrawtransaction")
    }

    /// Replaces an unconfirmed payment of this wallet by one paying 10 sat/vB (RBF: same
    /// outputs, less change), broadcast to the node's mempool.
    pub fn bump(&mut self, rpc: &Client, tx: &Transaction) -> Transaction {
        let psbt = self.bump_psbt(tx);
        self.sign_and_send(rpc, psbt, 1, "sendrawtransaction (replacement)")
    }

    /// A double spend of an unconfirmed payment of this wallet: the same inputs at 10 sat/vB,
    /// the output that paid `address` paying this wallet instead (what a payer does to take a
    /// payment back once a reorg put it out of the chain), broadcast to the node's mempool.
    pub fn take_back(&mut self, rpc: &Client, tx: &Transaction, address: &str) -> Transaction {
        let paid = parse_address(address).script_pubkey();
        let mine = self.receive_address().script_pubkey();
        let mut psbt = self.bump_psbt(tx);
        let i = psbt
            .unsigned_tx
            .output
            .iter()
            .position(|o| o.script_pubkey == paid)
            .expect("the payment's output");
        psbt.unsigned_tx.output[i].script_pubkey = mine;
        psbt.outputs[i] = Default::default();
        self.sign_and_send(rpc, psbt, 1, "sendrawtransaction (double spend)")
    }

    /// The unsigned RBF replacement of `tx` at 10 sat/vB.
    fn bump_psbt(&mut self, tx: &Transaction) -> Psbt {
        let mut b = self.wallet.build_fee_bump(tx.compute_txid()).unwrap();
        b.fee_rate(FeeRate::from_sat_per_vb_u32(10));
        b.finish().unwrap()
    }

    /// Signs and finalizes `psbt`, broadcasts it and records it as unconfirmed (seen at
    /// `seen`, so that a replacement outranks what it replaces).
    fn sign_and_send(
        &mut self,
        rpc: &Client,
        mut psbt: Psbt,
        seen: u64,
        what: &str,
    ) -> Transaction {
        psbt.sign(&self.xprv, &Secp256k1::new()).unwrap();
        assert!(self
            .wallet
            .finalize_psbt(&mut psbt, SignOptions::default())
            .unwrap());
        let tx = psbt.extract_tx().unwrap();
        rpc.send_raw_transaction(&tx).expect(what);
        self.wallet.apply_unconfirmed_txs([(tx.clone(), seen)]);
        tx
    }
}
