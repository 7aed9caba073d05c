//! A scripted [`Custody`] for merchant tests.

use api::custody::{
    Custody, CustodyError, DepositInfo, DepositState, FlaggedAccount, ReconcileInfo,
    WithdrawalInfo, WithdrawalState,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// A scripted custody: deposits the test adds, withdrawals recorded (keys unique per account,
/// as in the wallet), and answers it can be told to lose.
#[derive(Default)]
pub struct Fake {
    pub addresses: Mutex<u32>,
    pub deposits: Mutex<Vec<DepositInfo>>,
    pub withdrawals: Mutex<Vec<WithdrawalInfo>>,
    /// Withdrawal requests still to answer with an internal error after recording them (the
    /// answer is lost: the caller cannot tell whether the withdrawal exists).
    pub lose: AtomicUsize,
    /// Withdrawal requests still to refuse (a definite 400: nothing recorded).
    pub refuse: AtomicUsize,
    /// Withdrawal requests still to panic on after recording them (the custody task dies: the
    /// caller sees a failed task and cannot tell whether the withdrawal exists).
    pub panic: AtomicUsize,
    /// How often withdrawals were listed ([`Custody::withdrawals`]): a look-up of one key must
    /// not list them.
    pub listed: AtomicUsize,
    /// Key look-ups still to answer with the withdrawal and then forget it (as the wallet frees
    /// the key of a `new` row whose ledger hold was refused, between two calls of a caller).
    pub free_after_lookup: AtomicUsize,
    /// Withdrawals still to record `Unresolved` (the wallet's `new` row: its ledger hold not
    /// known yet), until a test moves them on.
    pub unresolved: AtomicUsize,
    /// Accounts flagged for review ([`Custody::flagged_accounts`]).
    pub flagged: Mutex<Vec<u32>>,
    /// Withdrawal requests still to answer with an internal error before recording anything
    /// (custody failed first: the caller cannot tell, and nothing exists).
    pub fail: AtomicUsize,
    /// The next withdrawal request, once it knows its answer, tells the first channel it is
    /// here and waits on the second before answering (a caller held between its question and
    /// its answer, while others go on).
    pub hold_next: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl Fake {
    /// Scripts a deposit (or updates its confirmations/state when the outpoint exists).
    pub fn pay(&self, account: u32, address: &str, tx: u8, sat: u64, conf: u32, seen_ms: u64) {
        let mut d = self.deposits.lock().unwrap();
        let txid = format!("{tx:02x}").repeat(32);
        d.retain(|x| x.txid != txid);
        d.push(DepositInfo {
            account,
            txid,
            vout: 0,
            amount_sat: sat,
            address: address.into(),
            state: if conf >= 1 {
                DepositState::Credited
            } else {
                DepositState::Pending
            },
            confirmations: conf,
            required_confirmations: 1,
            seen_ms,
        });
    }
}

impl Custody for Fake {
    fn flagged_accounts(&self) -> Result<Vec<FlaggedAccount>, CustodyError> {
        Ok(self
            .flagged
            .lock()
            .unwrap()
            .iter()
            .map(|&account| FlaggedAccount {
                account,
                reason: "reorg".into(),
                debt_sat: 0,
            })
            .collect())
    }
    fn deposit_address(
        &self,
        account: u32,
        new: bool,
    ) -> Result<api::custody::DepositAddress, CustodyError> {
        assert!(new, "each invoice needs its own address");
        let mut n = self.addresses.lock().unwrap();
        *n += 1;
        Ok(api::custody::DepositAddress {
            address: format!("bcrt1q{account}x{n}"),
            made: true,
        })
    }
    fn deposits(&self, account: Option<u32>) -> Result<Vec<DepositInfo>, CustodyError> {
        assert_eq!(account, None);
        Ok(self.deposits.lock().unwrap().clone())
    }
    fn request_withdrawal(
        &self,
        account: u32,
        address: &str,
        amount_sat: u64,
        idempotency_key: &str,
    ) -> Result<WithdrawalInfo, CustodyError> {
        let refuse = take(&self.refuse);
        // Taken out first: the guard is dropped before the wait, so others are not held.
        let held = self.hold_next.lock().unwrap().take();
        if let Some((here, release)) = held {
            let _ = here.send(());
            let _ = release.recv();
        }
        if refuse {
            return Err(CustodyError::bad_request(-4026, "insufficient balance"));
        }
        if take(&self.fail) {
            return Err(CustodyError::internal("custody failed"));
        }
        let mut ws = self.withdrawals.lock().unwrap();
        // Keys are unique per account, as in the wallet.
        if ws
            .iter()
            .any(|w| w.account == account && w.idempotency_key == idempotency_key)
        {
            return Err(CustodyError::bad_request(-4029, "duplicate key"));
        }
        let w = WithdrawalInfo {
            id: 100 + ws.len() as u64,
            account,
            address: stored_address(address),
            amount_sat,
            fee_sat: 0,
            idempotency_key: idempotency_key.into(),
            state: if take(&self.unresolved) {
                WithdrawalState::Unresolved
            } else {
                WithdrawalState::Pending
            },
            reason: None,
            created_ms: 0,
            txid: None,
            confirmations: 0,
        };
        ws.push(w.clone());
        drop(ws);
        if take(&self.panic) {
            panic!("custody task panicked after recording the withdrawal");
        }
        if take(&self.lose) {
            return Err(CustodyError::internal("the answer was lost"));
        }
        Ok(w)
    }
    fn withdrawals(&self, account: Option<u32>) -> Result<Vec<WithdrawalInfo>, CustodyError> {
        self.listed.fetch_add(1, Ordering::SeqCst);
        let mut ws = self.withdrawals.lock().unwrap().clone();
        ws.retain(|w| account.is_none_or(|a| w.account == a));
        Ok(ws)
    }
    fn withdrawal_by_key(
        &self,
        account: u32,
        key: &str,
    ) -> Result<Option<WithdrawalInfo>, CustodyError> {
        let mut ws = self.withdrawals.lock().unwrap();
        let found = ws
            .iter()
            .position(|w| w.account == account && w.idempotency_key == key);
        Ok(match found {
            Some(i) if take(&self.free_after_lookup) => Some(ws.remove(i)),
            Some(i) => Some(ws[i].clone()),
            None => None,
        })
    }
    fn approve_withdrawal(&self, _: u64) -> Result<WithdrawalInfo, CustodyError> {
        Err(CustodyError::bad_request(-4000, "no"))
    }
    fn withdrawal_terms(&self) -> (u64, u64) {
        (0, 1)
    }
    fn reconcile(&self) -> Result<ReconcileInfo, CustodyError> {
        Err(CustodyError::internal("no"))
    }
    fn regtest_mine(&self, _: u32) -> Result<u32, CustodyError> {
        Err(CustodyError::internal("no"))
    }
    fn regtest_fund(&self, _: u32) -> Result<u64, CustodyError> {
        Err(CustodyError::internal("no"))
    }
}

/// The address as the wallet stores it (`Address::to_string()`): a bech32 address in lower
/// case whatever case it was sent in (BIP 173 allows all upper case, as QR codes carry it),
/// anything else as sent.
fn stored_address(address: &str) -> String {
    let lower = address.to_ascii_lowercase();
    if ["bc1", "tb1", "bcrt1"].iter().any(|h| lower.starts_with(h)) {
        lower
    } else {
        address.into()
    }
}

/// Takes one from a fault counter; true when there was one.
fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}
