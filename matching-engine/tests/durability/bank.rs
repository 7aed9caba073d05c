//! A small deterministic state machine for the durability tests: a bank of accounts with deposits
//! and transfers that rejects overdrafts. It records, per producer, the last command number it
//! applied and counts commands that arrive out of order, and folds every command's time into its
//! state so that a replay with other times gives another hash.

use matching_engine::{RejectCode, StateMachine, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum BankCmd {
    Deposit {
        account: u32,
        amount: u64,
        producer: u32,
        n: u64,
    },
    Transfer {
        from: u32,
        to: u32,
        amount: u64,
        producer: u32,
        n: u64,
    },
    /// Panics in `apply`: stands for a bug in the state machine.
    Explode { producer: u32, n: u64 },
    /// Accepted, but refuses to be encoded: stands for a journal that fails.
    Unjournalable {
        producer: u32,
        n: u64,
        #[serde(serialize_with = "refuse")]
        poison: (),
    },
}

fn refuse<S: serde::Serializer>(_: &(), _: S) -> Result<S::Ok, S::Error> {
    Err(serde::ser::Error::custom(
        "this command cannot be journaled",
    ))
}

impl BankCmd {
    pub fn origin(&self) -> (u32, u64) {
        match *self {
            BankCmd::Deposit { producer, n, .. }
            | BankCmd::Transfer { producer, n, .. }
            | BankCmd::Explode { producer, n }
            | BankCmd::Unjournalable { producer, n, .. } => (producer, n),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BankEvent {
    Deposited {
        seq: u64,
        account: u32,
        balance: u64,
    },
    Transferred {
        seq: u64,
        from: u32,
        to: u32,
        amount: u64,
    },
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Bank {
    seq: u64,
    balances: Vec<u64>,
    last_n: Vec<u64>,
    disorder: u64,
    time_sum: u64,
}

impl Bank {
    pub fn new(accounts: usize, producers: usize) -> Self {
        Self {
            seq: 0,
            balances: vec![0; accounts],
            last_n: vec![0; producers],
            disorder: 0,
            time_sum: 0,
        }
    }

    pub fn balance(&self, account: u32) -> u64 {
        self.balances[account as usize]
    }

    pub fn total(&self) -> u64 {
        self.balances.iter().sum()
    }

    /// Commands applied out of their producer's order.
    pub fn disorder(&self) -> u64 {
        self.disorder
    }

    pub fn last_n(&self, producer: u32) -> u64 {
        self.last_n[producer as usize]
    }

    fn account(&self, account: u32) -> Result<usize, RejectCode> {
        let i = account as usize;
        if i < self.balances.len() {
            Ok(i)
        } else {
            Err(RejectCode::UnknownAccount)
        }
    }
}

impl StateMachine for Bank {
    type Command = BankCmd;
    type Event = BankEvent;
    type Snapshot = Bank;

    fn apply(
        &mut self,
        cmd: &BankCmd,
        now: Timestamp,
        out: &mut Vec<BankEvent>,
    ) -> Result<(), RejectCode> {
        let (producer, n) = cmd.origin();
        let producer = producer as usize;
        if producer >= self.last_n.len() {
            return Err(RejectCode::UnknownAccount);
        }
        let seq = self.seq + 1;
        match *cmd {
            BankCmd::Deposit {
                account, amount, ..
            } => {
                let i = self.account(account)?;
                let balance = self.balances[i]
                    .checked_add(amount)
                    .ok_or(RejectCode::InvalidAmount)?;
                self.balances[i] = balance;
                out.push(BankEvent::Deposited {
                    seq,
                    account,
                    balance,
                });
            }
            BankCmd::Transfer {
                from, to, amount, ..
            } => {
                let (f, t) = (self.account(from)?, self.account(to)?);
                if f == t {
                    return Err(RejectCode::SelfTransfer);
                }
                let left = self.balances[f]
                    .checked_sub(amount)
                    .ok_or(RejectCode::InsufficientBalance)?;
                let credited = self.balances[t]
                    .checked_add(amount)
                    .ok_or(RejectCode::InvalidAmount)?;
                self.balances[f] = left;
                self.balances[t] = credited;
                out.push(BankEvent::Transferred {
                    seq,
                    from,
                    to,
                    amount,
                });
            }
            BankCmd::Explode { .. } => panic!("the bank exploded"),
            BankCmd::Unjournalable { .. } => {}
        }
        if n <= self.last_n[producer] {
            self.disorder += 1;
        }
        self.last_n[producer] = n;
        self.time_sum = self.time_sum.wrapping_add(now.0);
        self.seq = seq;
        Ok(())
    }

    fn seq(&self) -> u64 {
        self.seq
    }

    fn snapshot(&self) -> Bank {
        self.clone()
    }

    fn restore(snapshot: Bank) -> Result<Self, matching_engine::RestoreError> {
        if snapshot
            .balances
            .iter()
            .try_fold(0u64, |a, b| a.checked_add(*b))
            .is_none()
        {
            return Err("balances overflow".into());
        }
        Ok(snapshot)
    }

    fn state_hash(&self) -> [u8; 32] {
        Sha256::digest(postcard::to_stdvec(self).expect("encodes")).into()
    }

    /// The bank's invariant: each producer's commands arrive in order.
    fn validate(&self) -> Result<(), matching_engine::RestoreError> {
        if self.disorder == 0 {
            Ok(())
        } else {
            Err(format!("{} commands applied out of order", self.disorder).into())
        }
    }
}

/// A deterministic command stream: deposits, transfers, and every seventh an overdraft that is
/// rejected.
pub fn workload(len: u64, producer: u32) -> Vec<BankCmd> {
    (1..=len)
        .map(|n| match n % 7 {
            0 => BankCmd::Transfer {
                from: (n % 4) as u32,
                to: ((n + 1) % 4) as u32,
                amount: u64::MAX / 2,
                producer,
                n,
            },
            1 | 3 | 5 => BankCmd::Deposit {
                account: (n % 4) as u32,
                amount: n * 3,
                producer,
                n,
            },
            _ => BankCmd::Transfer {
                from: (n % 4) as u32,
                to: ((n + 2) % 4) as u32,
                amount: n,
                producer,
                n,
            },
        })
        .collect()
}
