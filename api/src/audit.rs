//! The release-mode ledger auditor: folds every published event batch and checks, after each
//! command, that no money was created or destroyed.
//!
//! **Invariant checked** (per asset, after every command): Σ over all accounts of (available +
//! held), fee account included, = Σ credits − Σ completed withdrawals (amount + network fee).
//! The auditor keeps its own copy of every balance (from `Balance` events, which carry the new
//! values), its own running supply (from `Credited` and `WithdrawalCompleted`, with the amounts
//! of withdrawals in flight from `WithdrawalHeld`), and compares the two sums, each kept
//! incrementally: O(events) per command, on the read model's thread, never on the engine's.
//!
//! A violation is a bug, not a user error: the read model trips the circuit breaker
//! ([`crate::state::AppState::halted`]), which stops every command that moves money (cancels still
//! pass) until an operator has looked and restarted the server. The engine's own full check
//! runs at every snapshot and after recovery.

use crate::core::EventBatch;
use matching_engine::{AccountId, AssetId, Engine, Event, WithdrawalId, WithdrawalState};
use std::collections::HashMap;

/// What the auditor found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "ledger audit failed after command {seq}: asset {asset} balances sum to {balances}, \
     credits minus withdrawals are {supply}"
)]
pub struct Violation {
    /// The command after which it was found.
    pub seq: u64,
    /// Asset index.
    pub asset: u16,
    /// Σ (available + held).
    pub balances: u128,
    /// Σ credits − Σ completed withdrawals.
    pub supply: i128,
}

/// The auditor's state (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Auditor {
    balances: HashMap<(u32, u16), (u64, u64)>,
    sums: Vec<u128>,
    supply: Vec<i128>,
    in_flight: HashMap<WithdrawalId, (AssetId, u64)>,
    touched: Vec<u16>,
    checked: u64,
}

impl Auditor {
    /// An auditor for an empty ledger with `n_assets` assets.
    pub fn new(n_assets: usize) -> Self {
        Self {
            sums: vec![0; n_assets],
            supply: vec![0; n_assets],
            ..Self::default()
        }
    }

    /// An auditor that starts from a recovered engine's state (whose own invariants were
    /// checked by recovery).
    pub fn seed(engine: &Engine) -> Self {
        let n_assets = engine.config().assets.len();
        let mut a = Self::new(n_assets);
        for account in 0..engine.account_count() {
            let account = AccountId(account as u32);
            for asset in 0..n_assets {
                let asset = AssetId(asset as u16);
                if let Some((available, held)) = engine.balance(account, asset) {
                    if available.0 != 0 || held.0 != 0 {
                        a.set_balance(account.0, asset.0, available.0, held.0);
                    }
                }
            }
        }
        for (i, s) in a.supply.iter_mut().enumerate() {
            let t = engine.asset_totals(AssetId(i as u16));
            *s = t.credited as i128 - t.withdrawn as i128;
        }
        for (id, w) in engine.snapshot().withdrawals {
            if w.state == WithdrawalState::Held {
                a.in_flight.insert(id, (w.asset, w.amount.0));
            }
        }
        a
    }

    /// Commands checked so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    fn set_balance(&mut self, account: u32, asset: u16, available: u64, held: u64) {
        let Some(sum) = self.sums.get_mut(usize::from(asset)) else {
            return;
        };
        let new = u128::from(available) + u128::from(held);
        let old = self
            .balances
            .insert((account, asset), (available, held))
            .map_or(0, |(a, h)| u128::from(a) + u128::from(h));
        // `sum` is a sum of current balances, `old` one of them: no underflow.
        *sum = *sum - old + new;
        self.touch(asset);
    }

    fn touch(&mut self, asset: u16) {
        if !self.touched.contains(&asset) {
            self.touched.push(asset);
        }
    }

    fn add_supply(&mut self, asset: AssetId, delta: i128) {
        if let Some(s) = self.supply.get_mut(usize::from(asset.0)) {
            *s += delta;
            self.touch(asset.0);
        }
    }

    /// Folds one command's events and checks the assets they touched.
    pub fn fold(&mut self, batch: &EventBatch) -> Result<(), Violation> {
        self.fold_events(batch.seq, &batch.events)
    }

    /// [`Auditor::fold`] of the events of command `seq`.
    pub fn fold_events(&mut self, seq: u64, events: &[Event]) -> Result<(), Violation> {
        self.touched.clear();
        for e in events {
            match *e {
                Event::Balance {
                    account,
                    asset,
                    available,
                    held,
                } => self.set_balance(account.0, asset.0, available.0, held.0),
                Event::Credited { asset, amount, .. } => {
                    self.add_supply(asset, i128::from(amount.0))
                }
                Event::WithdrawalHeld {
                    id, asset, amount, ..
                } => {
                    self.in_flight.insert(id, (asset, amount.0));
                }
                Event::WithdrawalReleased { id, .. } => {
                    self.in_flight.remove(&id);
                }
                Event::WithdrawalCompleted {
                    id, network_fee, ..
                } => {
                    // A completion of a withdrawal the auditor never saw held cannot be
                    // accounted for: the supply check below catches the difference.
                    if let Some((asset, amount)) = self.in_flight.remove(&id) {
                        self.add_supply(asset, -(i128::from(amount) + i128::from(network_fee.0)));
                    }
                }
                _ => {}
            }
        }
        self.checked += 1;
        for &asset in &self.touched {
            let i = usize::from(asset);
            let (balances, supply) = (self.sums[i], self.supply[i]);
            if supply < 0 || balances != supply as u128 {
                return Err(Violation {
                    seq,
                    asset,
                    balances,
                    supply,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matching_engine::{Amount, IdempotencyKey, Timestamp};
    use std::sync::Arc;

    fn batch(seq: u64, events: Vec<Event>) -> EventBatch {
        EventBatch {
            seq,
            time: Timestamp(seq),
            events: Arc::from(events),
        }
    }

    fn bal(account: u32, available: u64, held: u64) -> Event {
        Event::Balance {
            account: AccountId(account),
            asset: AssetId(0),
            available: Amount(available),
            held: Amount(held),
        }
    }

    fn credit(account: u32, amount: u64) -> Event {
        Event::Credited {
            account: AccountId(account),
            asset: AssetId(0),
            amount: Amount(amount),
            key: IdempotencyKey::reference("k"),
        }
    }

    #[test]
    fn balanced_commands_pass_and_money_from_nowhere_is_caught() {
        let mut a = Auditor::new(2);
        a.fold(&batch(1, vec![credit(1, 100), bal(1, 100, 0)]))
            .unwrap();
        // A trade-like move: 1 pays 30 to 2, fee 1 to account 0.
        a.fold(&batch(2, vec![bal(1, 69, 0), bal(2, 30, 0), bal(0, 1, 0)]))
            .unwrap();
        // A withdrawal held, then completed with a network fee of 2 (the rest of the flat fee
        // of 5 goes to the fee account).
        a.fold(&batch(
            3,
            vec![
                Event::WithdrawalHeld {
                    id: WithdrawalId(7),
                    account: AccountId(1),
                    asset: AssetId(0),
                    amount: Amount(50),
                    fee: Amount(5),
                },
                bal(1, 14, 55),
            ],
        ))
        .unwrap();
        a.fold(&batch(
            4,
            vec![
                Event::WithdrawalCompleted {
                    id: WithdrawalId(7),
                    account: AccountId(1),
                    network_fee: Amount(2),
                },
                bal(1, 14, 0),
                bal(0, 4, 0),
            ],
        ))
        .unwrap();
        assert_eq!(a.checked(), 4);
        // One unit appears in account 2 with no credit.
        let v = a.fold(&batch(5, vec![bal(2, 31, 0)])).unwrap_err();
        assert_eq!(
            v,
            Violation {
                seq: 5,
                asset: 0,
                balances: 49,
                supply: 48
            }
        );
    }

    #[test]
    fn a_credit_without_its_balance_is_caught() {
        let mut a = Auditor::new(1);
        let v = a.fold(&batch(1, vec![credit(1, 10)])).unwrap_err();
        assert_eq!((v.balances, v.supply), (0, 10));
    }

    #[test]
    fn seeding_from_an_engine_matches_its_books() {
        use matching_engine::{Command, EngineConfig};
        let mut e = Engine::new(EngineConfig::default()).unwrap();
        let mut out = Vec::new();
        e.apply(&Command::CreateAccount, Timestamp(1), &mut out)
            .unwrap();
        e.apply(
            &Command::Credit {
                account: AccountId(1),
                asset: AssetId(0),
                amount: Amount(1_000_000),
                key: IdempotencyKey::reference("d"),
            },
            Timestamp(2),
            &mut out,
        )
        .unwrap();
        let mut a = Auditor::seed(&e);
        // A later command that moves money correctly passes; one that invents it does not.
        a.fold(&batch(3, vec![bal(1, 999_000, 0), bal(0, 1_000, 0)]))
            .unwrap();
        assert!(a.fold(&batch(4, vec![bal(0, 1_001, 0)])).is_err());
    }
}
