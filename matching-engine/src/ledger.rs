//! Balances per account and asset: available and held. Every change marks the balance dirty so the
//! engine reports it once per command. Conservation: per asset, the sum of all balances equals
//! credits minus withdrawals (checked by [`Ledger::check_conservation`]).

use crate::units::{AccountId, Amount, AssetId};
use serde::{Deserialize, Serialize};

/// One account's balance of one asset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// Free to use.
    pub available: u64,
    /// Held by open orders and withdrawals.
    pub held: u64,
}

/// Running totals of what entered and left the ledger, per asset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetTotals {
    /// Sum of all credits.
    pub credited: u128,
    /// Sum of all completed withdrawals (amount plus network fee).
    pub withdrawn: u128,
}

#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    pub(crate) n_assets: usize,
    pub(crate) balances: Vec<Balance>,
    pub(crate) totals: Vec<AssetTotals>,
    pub(crate) dirty: Vec<(AccountId, AssetId)>,
}

impl Ledger {
    pub(crate) fn new(n_assets: usize) -> Self {
        Self {
            n_assets,
            balances: Vec::new(),
            totals: vec![AssetTotals::default(); n_assets],
            dirty: Vec::with_capacity(64),
        }
    }

    pub(crate) fn add_account(&mut self) {
        self.balances
            .extend(std::iter::repeat_n(Balance::default(), self.n_assets));
    }

    #[inline]
    fn idx(&self, a: AccountId, asset: AssetId) -> usize {
        a.0 as usize * self.n_assets + asset.0 as usize
    }

    #[inline]
    pub(crate) fn get(&self, a: AccountId, asset: AssetId) -> Balance {
        self.balances[self.idx(a, asset)]
    }

    #[inline(always)]
    fn entry(&mut self, a: AccountId, asset: AssetId) -> &mut Balance {
        mark_dirty(&mut self.dirty, (a, asset));
        let i = self.idx(a, asset);
        &mut self.balances[i]
    }

    /// Moves `amt` from available to held. The caller has checked `available >= amt`.
    #[inline]
    pub(crate) fn hold(&mut self, a: AccountId, asset: AssetId, amt: u64) {
        if amt == 0 {
            return;
        }
        let b = self.entry(a, asset);
        b.available = b
            .available
            .checked_sub(amt)
            .expect("hold exceeds available");
        b.held += amt;
    }

    /// Moves `amt` from held back to available.
    #[inline]
    pub(crate) fn release(&mut self, a: AccountId, asset: AssetId, amt: u64) {
        if amt == 0 {
            return;
        }
        let b = self.entry(a, asset);
        b.held = b.held.checked_sub(amt).expect("release exceeds held");
        b.available += amt;
    }

    /// Takes `amt` out of held (it moves to another account through [`Ledger::add_available`], or
    /// leaves the ledger as a withdrawal).
    #[inline]
    pub(crate) fn take_held(&mut self, a: AccountId, asset: AssetId, amt: u64) {
        if amt == 0 {
            return;
        }
        let b = self.entry(a, asset);
        b.held = b.held.checked_sub(amt).expect("take exceeds held");
    }

    /// Takes `amt` out of available.
    #[inline]
    pub(crate) fn take_available(&mut self, a: AccountId, asset: AssetId, amt: u64) {
        if amt == 0 {
            return;
        }
        let b = self.entry(a, asset);
        b.available = b
            .available
            .checked_sub(amt)
            .expect("take exceeds available");
    }

    /// Adds `amt` to available. Balances are bounded by the asset's total, which is bounded by
    /// credits checked against overflow, so this cannot overflow.
    #[inline]
    pub(crate) fn add_available(&mut self, a: AccountId, asset: AssetId, amt: u64) {
        if amt == 0 {
            return;
        }
        let b = self.entry(a, asset);
        b.available = b.available.checked_add(amt).expect("balance overflow");
    }

    /// Sum of available + held of `asset` over all accounts.
    pub(crate) fn asset_total(&self, asset: AssetId) -> u128 {
        self.balances
            .iter()
            .skip(asset.0 as usize)
            .step_by(self.n_assets)
            .map(|b| u128::from(b.available) + u128::from(b.held))
            .sum()
    }

    /// Panics unless, per asset, the sum of all balances equals credits minus withdrawals (debug
    /// builds, after every command; release builds check the same in `Engine::validate`).
    #[cfg(debug_assertions)]
    pub(crate) fn check_conservation(&self) {
        for (i, t) in self.totals.iter().enumerate() {
            let sum = self.asset_total(AssetId(i as u16));
            assert_eq!(
                sum,
                t.credited - t.withdrawn,
                "conservation broken for asset {i}: balances {sum}, credited {}, withdrawn {}",
                t.credited,
                t.withdrawn
            );
        }
    }

    pub(crate) fn asset_total_u64(&self, asset: AssetId) -> Amount {
        Amount(u64::try_from(self.asset_total(asset)).unwrap_or(u64::MAX))
    }
}

/// Entries kept unique by a linear scan while the list is short (the common case: a command
/// touches a handful of balances or levels); past that, pushed as they come and deduplicated by
/// [`dedup_dirty`].
pub(crate) const DIRTY_SCAN: usize = 16;

/// Marks `x` dirty (see [`DIRTY_SCAN`]).
#[inline(always)]
pub(crate) fn mark_dirty<T: PartialEq + Copy>(dirty: &mut Vec<T>, x: T) {
    if dirty.len() > DIRTY_SCAN || !dirty.contains(&x) {
        dirty.push(x);
    }
}

/// Makes the entries unique. Short lists already are (in first-touch order, deterministic); long
/// ones are sorted.
#[inline]
pub(crate) fn dedup_dirty<T: Ord + Copy>(dirty: &mut Vec<T>) {
    if dirty.len() > DIRTY_SCAN {
        dirty.sort_unstable();
        dirty.dedup();
    }
}
