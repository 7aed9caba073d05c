//! The invoice state machine: pure, no I/O, the time passed in.
//!
//! An invoice's status is a function of its payments, its expiry, the time, and two facts that
//! only move forward (it was marked invalid at some time; it was settled once). [`Invoice::observe`]
//! merges what custody or the engine reports about payments, recomputes, and returns the webhook
//! events of the transition, in order.
//!
//! Rules (modelled on BTCPay Server's Greenfield invoices, with these decisions):
//! * **On time** means first seen (custody's `seen_ms`: when its step first saw the output, or
//!   its block's time when first seen in a block; not when the monitor noticed it) before
//!   the expiry and before the invoice was marked invalid. Only on-time payments count towards
//!   the status; a payment seen later is recorded, marks the invoice `PaidLate` and changes
//!   nothing else. Custody credits every payment to the merchant's account anyway: none is lost,
//!   and the merchant can refund it.
//! * Several on-time payments add up. `threshold = due − ⌊due × tolerance_bps / 10 000⌋`
//!   (tolerance in basis points: 100 = 1 %). Paid ≥ threshold → `Processing` (`PaidOver` when
//!   paid > due); 0 < paid < threshold → `PaidPartial` (status `New`, or `Expired` after expiry).
//! * `Processing` → `Settled` once the on-time payments with at least the speed policy's
//!   confirmations (0, 1, 2 or 6; balance payments are final) reach the threshold. Policy 0
//!   settles at once. `Settled` is final, with one exception: a reorg afterwards does not
//!   unsettle it (custody flags the account; the merchant was paid in the ledger), but a payment
//!   custody **reversed** (its transaction double-spent after it was credited: the credit taken
//!   back from the merchant) or one **dropped** (replaced in the mempool, or reorged and
//!   double-spent, before custody credited it: the merchant was never paid; a 0-confirmation
//!   settlement's double spend) no longer counts, and a settled invoice left paid below the
//!   threshold by them becomes `Invalid` with the `Reversed` mark (`InvoiceInvalid`), so
//!   that the merchant does not ship an order nobody paid for. It stays `Invalid` (final) if the
//!   reversed payment confirms after all and custody credits it again: the merchant decides
//!   (mark it settled, or refund).
//! * A chain payment removed by a reorg before settlement no longer counts (`Processing` may fall
//!   back to `New`/`Expired`; no event exists for that).
//! * `Invalid` is set by the merchant, from `New` or `Expired` only: a `Processing` invoice was
//!   paid in full on time, so the merchant refunds it after settlement instead.
//! * An invoice whose on-time payment is detected only after the monitor expired it (wallet sync
//!   lag) becomes `Processing`: the customer paid on time.

use super::webhook::EventType;

/// Speed policies: confirmations required to settle.
pub const SPEED_POLICIES: [u32; 4] = [0, 1, 2, 6];
/// Basis points in a whole.
pub const BPS: u64 = 10_000;
/// The most any amount may be, satoshis: every bitcoin there will be (21,000,000 BTC). An
/// invoice or pull payment above it is refused (it could never be paid, and it would not fit
/// the database's signed 64-bit integers near `u64::MAX`).
pub const MAX_AMOUNT_SAT: u64 = 21_000_000 * 100_000_000;
/// The most `PaymentReceived` events an invoice raises (and Greenfield
/// `InvoicePaymentSettled` deliveries per webhook at its settlement). A payer can split a
/// payment into thousands of outputs, and each event's webhook body carries the invoice with
/// every payment: without a bound the outbox grew with the square of the payments (3,000
/// outputs, ~2 GB in one transaction). Later payments still count in the invoice's amounts,
/// status and payment list; in a transition that reaches the bound, its latest ones are the
/// ones reported.
pub const MAX_PAYMENT_EVENTS: usize = 32;

/// An invoice's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Waiting for payment.
    New,
    /// Paid (within tolerance), waiting for the speed policy's confirmations.
    Processing,
    /// Paid and confirmed; final.
    Settled,
    /// Expired without enough payment.
    Expired,
    /// Marked invalid by the merchant; final.
    Invalid,
}

impl Status {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::New => "New",
            Status::Processing => "Processing",
            Status::Settled => "Settled",
            Status::Expired => "Expired",
            Status::Invalid => "Invalid",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::New,
            Status::Processing,
            Status::Settled,
            Status::Expired,
            Status::Invalid,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// Additional marks, as bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Marks(pub u8);

impl Marks {
    /// Something was paid on time, less than the threshold.
    pub const PAID_PARTIAL: Marks = Marks(1);
    /// More than due was paid on time.
    pub const PAID_OVER: Marks = Marks(2);
    /// A payment was seen after the expiry (or after the invoice was marked invalid).
    pub const PAID_LATE: Marks = Marks(4);
    /// The merchant marked it (Greenfield `POST .../status` with `Settled`); kept by [`Invoice::derive`].
    pub const MARKED: Marks = Marks(8);
    /// Settled, then invalid: custody reversed payments it counted (double-spent after they
    /// were credited); kept by [`Invoice::derive`].
    pub const REVERSED: Marks = Marks(16);
    /// The marks [`Invoice::derive`] keeps: facts, not functions of the payments.
    const KEPT: Marks = Marks(Self::MARKED.0 | Self::REVERSED.0);

    /// True when every bit of `m` is set.
    pub fn has(self, m: Marks) -> bool {
        self.0 & m.0 == m.0
    }

    /// The wire names of the set marks.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Marks::PAID_PARTIAL, "PaidPartial"),
            (Marks::PAID_OVER, "PaidOver"),
            (Marks::PAID_LATE, "PaidLate"),
            (Marks::MARKED, "Marked"),
            (Marks::REVERSED, "Reversed"),
        ]
        .into_iter()
        .filter(|(m, _)| self.has(*m))
        .map(|(_, n)| n)
        .collect()
    }
}

/// Where a payment came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// An output paying the invoice's address.
    Chain {
        /// `txid:vout`.
        outpoint: String,
    },
    /// A transfer from an exchange account (final at once).
    Balance {
        /// The paying account.
        payer: u32,
    },
    /// A Lightning payment of the invoice's BOLT11 part (final at once: no confirmations).
    Lightning {
        /// The payment hash, hex.
        payment_hash: String,
    },
}

/// The payment id of a Lightning payment: `ln:` and the payment hash (hex); an outpoint id is
/// `txid:vout` and a balance payment's id a reference, neither starts with `ln:`.
pub fn lightning_payment_id(payment_hash: &str) -> String {
    format!("ln:{payment_hash}")
}

/// One payment to an invoice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    /// Unique within the invoice: the outpoint, or the transfer's reference.
    pub id: String,
    /// Chain or balance.
    pub source: Source,
    /// Satoshis.
    pub amount_sat: u64,
    /// Confirmations now (balance payments: `u32::MAX`).
    pub confirmations: u32,
    /// Credited to the merchant's account (balance payments: always).
    pub credited: bool,
    /// Removed from the chain by a reorg (or replaced, or reversed): not a payment.
    pub reorged: bool,
    /// Reversed by custody: double-spent after it was credited, the credit taken back (implies
    /// `reorged`).
    pub reversed: bool,
    /// Replaced in the mempool before any credit (implies `reorged`): never paid anything.
    pub dropped: bool,
    /// First seen, ms since the epoch.
    pub seen_ms: u64,
}

impl Payment {
    /// A balance payment (final at once).
    pub fn balance(id: String, payer: u32, amount_sat: u64, now_ms: u64) -> Self {
        Self {
            id,
            source: Source::Balance { payer },
            amount_sat,
            confirmations: u32::MAX,
            credited: true,
            reorged: false,
            reversed: false,
            dropped: false,
            seen_ms: now_ms,
        }
    }

    /// A Lightning payment, credited to the merchant by the node's service (final at once).
    pub fn lightning(payment_hash: &str, amount_sat: u64, time_ms: u64) -> Self {
        Self {
            id: lightning_payment_id(payment_hash),
            source: Source::Lightning {
                payment_hash: payment_hash.to_owned(),
            },
            amount_sat,
            confirmations: u32::MAX,
            credited: true,
            reorged: false,
            reversed: false,
            dropped: false,
            seen_ms: time_ms,
        }
    }

    /// True for a balance payment.
    pub fn is_balance(&self) -> bool {
        matches!(self.source, Source::Balance { .. })
    }

    /// True for a payment that has no confirmations (balance and Lightning: final at once).
    pub fn is_off_chain(&self) -> bool {
        !matches!(self.source, Source::Chain { .. })
    }

    /// The wire name of its source: `chain`, `balance` or `lightning`.
    pub fn source_name(&self) -> &'static str {
        match self.source {
            Source::Chain { .. } => "chain",
            Source::Balance { .. } => "balance",
            Source::Lightning { .. } => "lightning",
        }
    }
}

/// What a quote-currency invoice was asked in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Quote asset symbol, e.g. `USD`.
    pub asset: String,
    /// The amount asked, in the quote asset's smallest units.
    pub amount_units: u64,
    /// The locked rate: quote units per whole BTC.
    pub rate_units: u64,
}

/// Converts a quote amount to satoshis at a rate (quote units per BTC), rounding **up** so the
/// merchant receives at least the amount asked. `None` on a zero rate or overflow.
pub fn quote_to_sat(amount_units: u64, rate_units: u64) -> Option<u64> {
    if rate_units == 0 {
        return None;
    }
    let num = u128::from(amount_units).checked_mul(100_000_000)?;
    u64::try_from(num.div_ceil(u128::from(rate_units))).ok()
}

/// An invoice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invoice {
    /// Id (unguessable).
    pub id: String,
    /// The merchant's account.
    pub merchant: u32,
    /// Amount due, satoshis.
    pub amount_sat: u64,
    /// The currency asked in (`BTC` or a quote asset).
    pub currency: String,
    /// The amount as asked (decimal string in `currency`).
    pub amount_asked: String,
    /// The quote amount and locked rate, for a quote-currency invoice.
    pub quote: Option<Quote>,
    /// Confirmations required (one of [`SPEED_POLICIES`]).
    pub speed: u32,
    /// Payment tolerance, basis points (0..=10 000).
    pub tolerance_bps: u16,
    /// Created, ms since the epoch.
    pub created_ms: u64,
    /// Expires, ms since the epoch.
    pub expires_ms: u64,
    /// Status.
    pub status: Status,
    /// Marks.
    pub marks: Marks,
    /// When it became invalid: marked by the merchant, or settled and then reversed.
    pub invalid_ms: Option<u64>,
    /// Payments, in the order seen.
    pub payments: Vec<Payment>,
    /// Satoshis refunded (or reserved for a refund in flight).
    pub refunded_sat: u64,
}

/// A state machine refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// The status does not allow it.
    #[error("invoice is {0:?}")]
    WrongStatus(Status),
}

/// The status and marks as derived from payments and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Derived {
    /// Status.
    pub status: Status,
    /// Marks.
    pub marks: Marks,
    /// Satoshis paid on time (counted).
    pub paid_sat: u64,
}

impl Invoice {
    /// The least on-time payment that counts as paid in full.
    pub fn threshold_sat(&self) -> u64 {
        let slack = u128::from(self.amount_sat) * u128::from(self.tolerance_bps) / u128::from(BPS);
        self.amount_sat - slack as u64
    }

    /// True when `p` was seen in time to count.
    pub fn on_time(&self, p: &Payment) -> bool {
        p.seen_ms < self.expires_ms && self.invalid_ms.is_none_or(|t| p.seen_ms < t)
    }

    /// Satoshis of every payment (late ones too, reorged ones not).
    pub fn received_sat(&self) -> u64 {
        self.payments
            .iter()
            .filter(|p| !p.reorged)
            .map(|p| p.amount_sat)
            .sum()
    }

    /// Satoshis received and credited to the merchant's account (balance payments always are).
    pub fn credited_sat(&self) -> u64 {
        self.payments
            .iter()
            .filter(|p| !p.reorged && p.credited)
            .map(|p| p.amount_sat)
            .sum()
    }

    /// The part of `refunded_sat` that late payments do not account for: refunds are drawn on
    /// late payments first (they never paid for the invoice), then on on-time ones.
    fn refunded_on_time_sat(&self) -> u64 {
        let late: u64 = self
            .payments
            .iter()
            .filter(|p| !p.reorged && !self.on_time(p))
            .map(|p| p.amount_sat)
            .sum();
        self.refunded_sat.saturating_sub(late)
    }

    /// True when on-time payments were taken back (reversed by custody: double-spent after
    /// they were credited) or never paid anything (dropped: replaced before any credit) and
    /// what is left of them, refunds taken off, no longer pays for the invoice. A payment merely
    /// reorged still counts here (a reorg does not unsettle: see the module rules).
    fn reversed_below_threshold(&self) -> bool {
        let on_time = |p: &&Payment| self.on_time(p);
        if !self
            .payments
            .iter()
            .filter(on_time)
            .any(|p| p.reversed || p.dropped)
        {
            return false;
        }
        let kept: u64 = self
            .payments
            .iter()
            .filter(on_time)
            .filter(|p| !p.reversed && !p.dropped)
            .map(|p| p.amount_sat)
            .sum();
        kept.saturating_sub(self.refunded_on_time_sat()) < self.threshold_sat()
    }

    /// Satoshis still to pay for the invoice to count as paid in full (0 when paid).
    pub fn due_sat(&self) -> u64 {
        self.amount_sat.saturating_sub(self.derive(0).paid_sat)
    }

    /// Status and marks at `now_ms`, from the payments (see the module rules).
    pub fn derive(&self, now_ms: u64) -> Derived {
        let mut marks = Marks(self.marks.0 & Marks::KEPT.0);
        let (mut paid, mut confirmed) = (0u64, 0u64);
        for p in self.payments.iter().filter(|p| !p.reorged) {
            if self.on_time(p) {
                paid = paid.saturating_add(p.amount_sat);
                if p.confirmations >= self.speed {
                    confirmed = confirmed.saturating_add(p.amount_sat);
                }
            } else {
                marks.0 |= Marks::PAID_LATE.0;
            }
        }
        let threshold = self.threshold_sat();
        if paid > 0 && paid < threshold {
            marks.0 |= Marks::PAID_PARTIAL.0;
        }
        if paid > self.amount_sat {
            marks.0 |= Marks::PAID_OVER.0;
        }
        // What was refunded pays for nothing: an `Expired` invoice refunded, then paid up by a
        // payment that came back to the chain, is not paid.
        let refunded = self.refunded_on_time_sat();
        let (net_paid, net_confirmed) = (
            paid.saturating_sub(refunded),
            confirmed.saturating_sub(refunded),
        );
        let status = if self.status == Status::Settled {
            Status::Settled
        } else if self.invalid_ms.is_some() {
            Status::Invalid
        } else if net_paid >= threshold && net_confirmed >= threshold {
            Status::Settled
        } else if net_paid >= threshold {
            Status::Processing
        } else if now_ms >= self.expires_ms {
            Status::Expired
        } else {
            Status::New
        };
        Derived {
            status,
            marks,
            paid_sat: paid,
        }
    }

    /// Merges `observed` payments (new ones appended; known ones get their confirmations, credit
    /// and reorg state updated), recomputes status and marks at `now_ms`, and returns the events
    /// of the transition in order (one `PaymentReceived` per new payment up to [`MAX_PAYMENT_EVENTS`] an invoice, then the status
    /// events). An empty `observed` just advances time (expiry).
    pub fn observe(&mut self, observed: &[Payment], now_ms: u64) -> Vec<EventType> {
        let mut events = Vec::new();
        let reported = self
            .payments
            .iter()
            .filter(|p| !p.reorged)
            .count()
            .min(MAX_PAYMENT_EVENTS);
        let mut appended = 0usize;
        for o in observed {
            match self.payments.iter_mut().find(|p| p.id == o.id) {
                Some(p) => {
                    p.confirmations = o.confirmations;
                    p.credited = o.credited;
                    p.reorged = o.reorged;
                    p.reversed = o.reversed;
                    p.dropped = o.dropped;
                }
                None => {
                    self.payments.push(o.clone());
                    if !o.reorged {
                        appended += 1;
                    }
                }
            }
        }
        // One per new payment, up to the bound; the webhook of the k-th of n is about the k-th
        // of this transition's last n payments (`store::commit_transition`).
        let report = appended.min(MAX_PAYMENT_EVENTS - reported);
        events.extend(std::iter::repeat_n(EventType::PaymentReceived, report));
        let before = self.status;
        if before == Status::Settled
            && !self.marks.has(Marks::MARKED)
            && self.reversed_below_threshold()
        {
            // Custody took back what settled it: no longer paid (see the module rules).
            self.status = Status::Invalid;
            self.invalid_ms = Some(now_ms);
            self.marks.0 |= Marks::REVERSED.0;
        }
        let d = self.derive(now_ms);
        self.status = d.status;
        self.marks = d.marks;
        match (before, d.status) {
            (a, b) if a == b => {}
            (_, Status::Processing) => events.push(EventType::InvoiceProcessing),
            (Status::Processing, Status::Settled) => events.push(EventType::InvoiceSettled),
            (_, Status::Settled) => {
                events.push(EventType::InvoiceProcessing);
                events.push(EventType::InvoiceSettled);
            }
            (_, Status::Expired) => events.push(EventType::InvoiceExpired),
            (_, Status::Invalid) => events.push(EventType::InvoiceInvalid),
            // Processing → New after a reorg: no event type for it.
            (_, Status::New) => {}
        }
        events
    }

    /// Marks the invoice invalid (merchant's decision): only from `New` or `Expired`.
    pub fn mark_invalid(&mut self, now_ms: u64) -> Result<Vec<EventType>, TransitionError> {
        let cur = self.derive(now_ms).status;
        if !matches!(cur, Status::New | Status::Expired) {
            return Err(TransitionError::WrongStatus(cur));
        }
        self.invalid_ms = Some(now_ms);
        let d = self.derive(now_ms);
        self.status = d.status;
        self.marks = d.marks;
        Ok(vec![EventType::InvoiceInvalid])
    }

    /// Marks the invoice settled (merchant's decision, e.g. paid another way): from any status
    /// but `Settled`; final. The `Marked` mark says so. Nothing is credited by it: refunds stay
    /// limited to what was received and credited.
    pub fn mark_settled(&mut self, now_ms: u64) -> Result<Vec<EventType>, TransitionError> {
        let cur = self.derive(now_ms).status;
        if cur == Status::Settled {
            return Err(TransitionError::WrongStatus(cur));
        }
        self.status = Status::Settled;
        self.marks.0 |= Marks::MARKED.0;
        let d = self.derive(now_ms);
        self.marks = d.marks;
        Ok(vec![EventType::InvoiceSettled])
    }

    /// Satoshis that may still be refunded: everything received (late payments included) minus
    /// what was refunded. Refunds are allowed once the invoice is `Settled`, `Expired` or
    /// `Invalid` (a `New` or `Processing` invoice may still change).
    pub fn refundable_sat(&self) -> Result<u64, TransitionError> {
        match self.status {
            // Only credited payments: an unconfirmed (RBF-able) one can still vanish.
            Status::Settled | Status::Expired | Status::Invalid => {
                Ok(self.credited_sat().saturating_sub(self.refunded_sat))
            }
            s => Err(TransitionError::WrongStatus(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(amount: u64, speed: u32, tol: u16) -> Invoice {
        Invoice {
            id: "i".into(),
            merchant: 1,
            amount_sat: amount,
            currency: "BTC".into(),
            amount_asked: "x".into(),
            quote: None,
            speed,
            tolerance_bps: tol,
            created_ms: 0,
            expires_ms: 1_000,
            status: Status::New,
            marks: Marks::default(),
            invalid_ms: None,
            payments: vec![],
            refunded_sat: 0,
        }
    }

    fn chain(n: u8, amount: u64, conf: u32, seen: u64) -> Payment {
        Payment {
            id: format!("tx{n}:0"),
            source: Source::Chain {
                outpoint: format!("tx{n}:0"),
            },
            amount_sat: amount,
            confirmations: conf,
            credited: conf >= 1,
            reorged: false,
            reversed: false,
            dropped: false,
            seen_ms: seen,
        }
    }

    /// A step where `payments`, all new, settle the invoice at `now` (one `PaymentReceived` each).
    fn settled_by(
        payments: Vec<Payment>,
        now: u64,
        marks: u8,
    ) -> (Vec<Payment>, u64, Status, u8, Vec<EventType>) {
        let mut events = vec![EventType::PaymentReceived; payments.len()];
        events.extend([EventType::InvoiceProcessing, EventType::InvoiceSettled]);
        (payments, now, Status::Settled, marks, events)
    }

    fn reversed(p: Payment) -> Payment {
        Payment {
            reorged: true,
            reversed: true,
            credited: false,
            ..p
        }
    }

    use EventType as E;

    /// Defect: an `Expired` invoice with a credited payment and one the mempool dropped was
    /// refunded the credited one; the dropped one came back and confirmed, and the invoice
    /// settled (`invoice.settled`) though half of what settled it had been refunded: the
    /// merchant would ship for half the price. What was refunded no longer counts as paid.
    #[test]
    fn a_refunded_expired_invoice_does_not_settle_when_a_dropped_payment_returns() {
        let mut i = inv(1000, 1, 0);
        let got = i.observe(&[chain(1, 500, 1, 10), chain(2, 500, 0, 11)], 20);
        assert_eq!(i.status, Status::Processing, "{got:?}");
        let dropped = Payment {
            reorged: true,
            ..chain(2, 500, 0, 11)
        };
        assert_eq!(i.observe(&[dropped], 1_500), vec![E::InvoiceExpired]);
        assert_eq!(i.refundable_sat(), Ok(500));
        i.refunded_sat = 500;
        let got = i.observe(&[chain(2, 500, 1, 11)], 1_600);
        assert_eq!((i.status, got), (Status::Expired, vec![]));
        assert_eq!(i.derive(1_600).paid_sat, 1000, "both payments still shown");
    }

    /// Review finding: refunds were all taken off the on-time payments, late ones' too: an
    /// invoice whose on-time payment was dropped (so it expired), paid late in full and refunded
    /// that late payment, did not settle when the on-time payment came back and confirmed,
    /// though the customer had paid in full and on time. Refunds are drawn on late payments
    /// first.
    #[test]
    fn a_refunded_late_payment_does_not_keep_an_on_time_payment_from_settling() {
        let mut i = inv(1000, 1, 0);
        i.observe(&[chain(1, 1000, 0, 10)], 20);
        let dropped = Payment {
            reorged: true,
            ..chain(1, 1000, 0, 10)
        };
        assert_eq!(i.observe(&[dropped], 1_500), vec![E::InvoiceExpired]);
        i.observe(&[chain(2, 1000, 1, 1_600)], 1_700);
        assert_eq!(i.status, Status::Expired);
        i.refunded_sat = 1000;
        let got = i.observe(&[chain(1, 1000, 1, 10)], 1_800);
        assert_eq!(
            (i.status, got),
            (
                Status::Settled,
                vec![E::InvoiceProcessing, E::InvoiceSettled]
            )
        );
    }

    /// Review finding: a settled invoice whose on-time payments were reversed was judged on
    /// what was left before refunds: overpaid 2,000 on 1,000, 1,000 refunded, then 1,000
    /// reversed: nothing kept net, yet it stayed `Settled`. Without the refund, it would stay.
    #[test]
    fn a_reversal_counts_refunds_against_what_is_left() {
        for (refunded, status, events) in [
            (0, Status::Settled, vec![]),
            (1000, Status::Invalid, vec![E::InvoiceInvalid]),
        ] {
            let mut i = inv(1000, 1, 0);
            i.observe(&[chain(1, 1000, 1, 10), chain(2, 1000, 1, 11)], 20);
            assert_eq!(i.status, Status::Settled);
            i.refunded_sat = refunded;
            let got = i.observe(&[reversed(chain(2, 1000, 0, 11))], 30);
            assert_eq!((i.status, got), (status, events), "refunded {refunded}");
        }
    }

    #[test]
    fn mark_settled_is_final_keeps_its_mark_and_credits_nothing() {
        // From New, Expired, Processing and Invalid; never twice.
        let mut a = inv(1000, 1, 0);
        assert_eq!(a.mark_settled(10), Ok(vec![E::InvoiceSettled]));
        assert_eq!(
            (a.status, a.marks.names()),
            (Status::Settled, vec!["Marked"])
        );
        assert_eq!(
            a.mark_settled(20),
            Err(TransitionError::WrongStatus(Status::Settled))
        );
        // A later payment keeps it Settled and Marked (and counts as received).
        let ev = a.observe(&[chain(1, 500, 1, 30)], 40);
        assert_eq!(ev, vec![E::PaymentReceived]);
        assert_eq!(a.status, Status::Settled);
        assert!(a.marks.has(Marks::MARKED));
        assert_eq!(a.refundable_sat(), Ok(500));
        let mut b = inv(1000, 1, 0);
        b.observe(&[], 2_000);
        assert_eq!(b.status, Status::Expired);
        b.mark_invalid(2_001).unwrap();
        assert_eq!(b.mark_settled(2_002), Ok(vec![E::InvoiceSettled]));
        assert_eq!(b.derive(3_000).status, Status::Settled);
        let mut c = inv(1000, 1, 0);
        c.observe(&[chain(2, 1000, 0, 10)], 20);
        assert_eq!(c.status, Status::Processing);
        assert_eq!(c.mark_settled(30), Ok(vec![E::InvoiceSettled]));
        // Nothing was credited by the mark: only the (unconfirmed) payment, not yet refundable.
        assert_eq!(c.refundable_sat(), Ok(0));
    }

    /// (name, speed, tolerance, steps of (observed payments, now, expected status, marks, events)).
    #[allow(clippy::type_complexity)]
    #[test]
    fn transition_table() {
        let cases: Vec<(&str, u32, u16, Vec<(Vec<Payment>, u64, Status, u8, Vec<E>)>)> = vec![
            (
                "exact, then confirmed",
                1,
                0,
                vec![
                    (
                        vec![chain(1, 1000, 0, 10)],
                        20,
                        Status::Processing,
                        0,
                        vec![E::PaymentReceived, E::InvoiceProcessing],
                    ),
                    (
                        vec![chain(1, 1000, 1, 10)],
                        30,
                        Status::Settled,
                        0,
                        vec![E::InvoiceSettled],
                    ),
                    (vec![], 5_000, Status::Settled, 0, vec![]),
                ],
            ),
            (
                "policy 0 settles at once",
                0,
                0,
                vec![(
                    vec![chain(1, 1000, 0, 10)],
                    20,
                    Status::Settled,
                    0,
                    vec![E::PaymentReceived, E::InvoiceProcessing, E::InvoiceSettled],
                )],
            ),
            (
                "partial then top-up",
                1,
                0,
                vec![
                    (
                        vec![chain(1, 400, 0, 10)],
                        20,
                        Status::New,
                        1,
                        vec![E::PaymentReceived],
                    ),
                    (
                        vec![chain(2, 600, 0, 30)],
                        40,
                        Status::Processing,
                        0,
                        vec![E::PaymentReceived, E::InvoiceProcessing],
                    ),
                    (
                        vec![chain(1, 400, 1, 10)],
                        50,
                        Status::Processing,
                        0,
                        vec![],
                    ),
                    (
                        vec![chain(2, 600, 2, 30)],
                        60,
                        Status::Settled,
                        0,
                        vec![E::InvoiceSettled],
                    ),
                ],
            ),
            (
                "overpaid",
                1,
                0,
                vec![(
                    vec![chain(1, 1500, 1, 10)],
                    20,
                    Status::Settled,
                    2,
                    vec![E::PaymentReceived, E::InvoiceProcessing, E::InvoiceSettled],
                )],
            ),
            (
                "within tolerance (1 %)",
                1,
                100,
                vec![(
                    vec![chain(1, 990, 0, 10)],
                    20,
                    Status::Processing,
                    0,
                    vec![E::PaymentReceived, E::InvoiceProcessing],
                )],
            ),
            (
                "just below tolerance",
                1,
                100,
                vec![(
                    vec![chain(1, 989, 0, 10)],
                    20,
                    Status::New,
                    1,
                    vec![E::PaymentReceived],
                )],
            ),
            (
                "expired empty",
                1,
                0,
                vec![
                    (vec![], 999, Status::New, 0, vec![]),
                    (vec![], 1_000, Status::Expired, 0, vec![E::InvoiceExpired]),
                ],
            ),
            (
                "expired partial, then late",
                1,
                0,
                vec![
                    (
                        vec![chain(1, 300, 1, 10)],
                        20,
                        Status::New,
                        1,
                        vec![E::PaymentReceived],
                    ),
                    (vec![], 2_000, Status::Expired, 1, vec![E::InvoiceExpired]),
                    (
                        vec![chain(2, 700, 1, 1_500)],
                        2_000,
                        Status::Expired,
                        1 | 4,
                        vec![E::PaymentReceived],
                    ),
                ],
            ),
            (
                "paid on time, seen by the monitor after expiry",
                1,
                0,
                vec![
                    (vec![], 2_000, Status::Expired, 0, vec![E::InvoiceExpired]),
                    (
                        vec![chain(1, 1000, 0, 900)],
                        2_100,
                        Status::Processing,
                        0,
                        vec![E::PaymentReceived, E::InvoiceProcessing],
                    ),
                ],
            ),
            (
                "two payments add up to settled",
                2,
                0,
                vec![(
                    vec![chain(1, 500, 2, 10), chain(2, 500, 6, 11)],
                    20,
                    Status::Settled,
                    0,
                    vec![
                        E::PaymentReceived,
                        E::PaymentReceived,
                        E::InvoiceProcessing,
                        E::InvoiceSettled,
                    ],
                )],
            ),
            (
                "reorg before settlement falls back",
                6,
                0,
                vec![
                    (
                        vec![chain(1, 1000, 3, 10)],
                        20,
                        Status::Processing,
                        0,
                        vec![E::PaymentReceived, E::InvoiceProcessing],
                    ),
                    (
                        vec![Payment {
                            reorged: true,
                            ..chain(1, 1000, 0, 10)
                        }],
                        30,
                        Status::New,
                        0,
                        vec![],
                    ),
                ],
            ),
            (
                "a reorg after settlement keeps it settled",
                1,
                0,
                vec![
                    settled_by(vec![chain(1, 1000, 1, 10)], 20, 0),
                    (
                        vec![Payment {
                            reorged: true,
                            ..chain(1, 1000, 0, 10)
                        }],
                        30,
                        Status::Settled,
                        0,
                        vec![],
                    ),
                ],
            ),
            (
                "a reversal after settlement invalidates, for good",
                1,
                0,
                vec![
                    settled_by(vec![chain(1, 1000, 1, 10)], 20, 0),
                    (
                        vec![reversed(chain(1, 1000, 0, 10))],
                        30,
                        Status::Invalid,
                        16,
                        vec![E::InvoiceInvalid],
                    ),
                    // Confirmed after all and credited again: still invalid.
                    (vec![chain(1, 1000, 1, 10)], 40, Status::Invalid, 16, vec![]),
                ],
            ),
            (
                "a reversal while the payment that settled it is only reorged keeps it settled",
                1,
                0,
                vec![
                    settled_by(vec![chain(1, 1000, 1, 10), chain(2, 300, 1, 11)], 20, 2),
                    (
                        vec![
                            Payment {
                                reorged: true,
                                ..chain(1, 1000, 0, 10)
                            },
                            reversed(chain(2, 300, 0, 11)),
                        ],
                        30,
                        Status::Settled,
                        0,
                        vec![],
                    ),
                ],
            ),
            (
                "a reversal with the rest dropped from the mempool invalidates",
                1,
                0,
                vec![
                    settled_by(vec![chain(1, 1000, 1, 10), chain(2, 1000, 0, 11)], 20, 2),
                    (
                        vec![
                            reversed(chain(1, 1000, 0, 10)),
                            Payment {
                                reorged: true,
                                dropped: true,
                                ..chain(2, 1000, 0, 11)
                            },
                        ],
                        30,
                        Status::Invalid,
                        16,
                        vec![E::InvoiceInvalid],
                    ),
                ],
            ),
            // Review finding: a payment dropped before custody credited it (a 0-confirmation
            // settlement double-spent, a reorg's replacement) left the invoice `Settled` for
            // money the merchant never received; only reversals (credited first) counted.
            (
                "a payment that settled it at 0 confirmations, then dropped, invalidates",
                0,
                0,
                vec![
                    settled_by(vec![chain(1, 1000, 0, 10)], 20, 0),
                    (
                        vec![Payment {
                            reorged: true,
                            dropped: true,
                            ..chain(1, 1000, 0, 10)
                        }],
                        30,
                        Status::Invalid,
                        16,
                        vec![E::InvoiceInvalid],
                    ),
                ],
            ),
            (
                "half from a balance, half on chain at 0 confirmations, the chain half dropped",
                0,
                0,
                vec![
                    settled_by(
                        vec![
                            Payment::balance("b1".into(), 9, 500, 10),
                            chain(1, 500, 0, 11),
                        ],
                        20,
                        0,
                    ),
                    (
                        vec![Payment {
                            reorged: true,
                            dropped: true,
                            ..chain(1, 500, 0, 11)
                        }],
                        30,
                        Status::Invalid,
                        16 | 1,
                        vec![E::InvoiceInvalid],
                    ),
                ],
            ),
            (
                "a dropped payment whose replacement pays the invoice in time keeps it settled",
                0,
                0,
                vec![
                    settled_by(vec![chain(1, 1000, 0, 10)], 20, 0),
                    (
                        vec![
                            Payment {
                                reorged: true,
                                dropped: true,
                                ..chain(1, 1000, 0, 10)
                            },
                            chain(2, 1000, 0, 25),
                        ],
                        30,
                        Status::Settled,
                        0,
                        vec![E::PaymentReceived],
                    ),
                ],
            ),
            (
                "a payment settled at 1 confirmation, reorged and dropped uncredited, invalidates",
                1,
                0,
                vec![
                    settled_by(
                        vec![Payment {
                            credited: false,
                            ..chain(1, 1000, 1, 10)
                        }],
                        20,
                        0,
                    ),
                    (
                        vec![Payment {
                            reorged: true,
                            dropped: true,
                            credited: false,
                            ..chain(1, 1000, 0, 10)
                        }],
                        30,
                        Status::Invalid,
                        16,
                        vec![E::InvoiceInvalid],
                    ),
                ],
            ),
            (
                "a reversal of a late payment keeps it settled",
                1,
                0,
                vec![
                    settled_by(
                        vec![chain(1, 1000, 1, 10), chain(2, 300, 1, 2_000)],
                        2_100,
                        4,
                    ),
                    (
                        vec![reversed(chain(2, 300, 0, 2_000))],
                        2_200,
                        Status::Settled,
                        0,
                        vec![],
                    ),
                ],
            ),
            (
                "a reversal whose replacement pays the invoice keeps it settled",
                1,
                0,
                vec![
                    settled_by(vec![chain(1, 1000, 1, 10)], 20, 0),
                    (
                        vec![reversed(chain(1, 1000, 0, 10)), chain(2, 1000, 1, 25)],
                        30,
                        Status::Settled,
                        0,
                        vec![E::PaymentReceived],
                    ),
                ],
            ),
            (
                "a reversal of an overpayment's part that leaves it paid keeps it settled",
                1,
                0,
                vec![
                    settled_by(vec![chain(1, 1000, 1, 10), chain(2, 300, 1, 11)], 20, 2),
                    (
                        vec![reversed(chain(2, 300, 0, 11))],
                        30,
                        Status::Settled,
                        0,
                        vec![],
                    ),
                ],
            ),
            (
                "balance payment is final",
                6,
                0,
                vec![(
                    vec![Payment::balance("b".into(), 9, 1000, 10)],
                    10,
                    Status::Settled,
                    0,
                    vec![E::PaymentReceived, E::InvoiceProcessing, E::InvoiceSettled],
                )],
            ),
        ];
        for (name, speed, tol, steps) in cases {
            let mut i = inv(1000, speed, tol);
            for (n, (obs, now, status, marks, events)) in steps.into_iter().enumerate() {
                let got = i.observe(&obs, now);
                assert_eq!(
                    (i.status, i.marks, got),
                    (status, Marks(marks), events),
                    "{name}, step {n}"
                );
            }
        }
    }

    #[test]
    fn invalid_only_from_new_or_expired() {
        let mut i = inv(1000, 1, 0);
        assert_eq!(i.mark_invalid(10), Ok(vec![E::InvoiceInvalid]));
        assert_eq!(i.status, Status::Invalid);
        // A payment after it is late and changes nothing else.
        assert_eq!(
            i.observe(&[chain(1, 1000, 6, 20)], 30),
            vec![E::PaymentReceived]
        );
        assert_eq!((i.status, i.marks), (Status::Invalid, Marks::PAID_LATE));
        assert_eq!(i.refundable_sat(), Ok(1000));

        let mut p = inv(1000, 1, 0);
        p.observe(&[chain(1, 1000, 0, 10)], 20);
        assert_eq!(
            p.mark_invalid(30),
            Err(TransitionError::WrongStatus(Status::Processing))
        );
        assert_eq!(
            p.refundable_sat(),
            Err(TransitionError::WrongStatus(Status::Processing))
        );

        let mut e = inv(1000, 1, 0);
        e.observe(&[], 5_000);
        assert_eq!(e.mark_invalid(5_001), Ok(vec![E::InvoiceInvalid]));
    }

    #[test]
    fn quote_conversion_rounds_up() {
        // 12.50 USD (8 decimals) at 50,000.00 USD/BTC = 25,000 sat exactly.
        assert_eq!(quote_to_sat(1_250_000_000, 5_000_000_000_000), Some(25_000));
        // 1 unit at a huge rate: rounds up to 1 sat.
        assert_eq!(quote_to_sat(1, 5_000_000_000_000), Some(1));
        assert_eq!(quote_to_sat(1, 0), None);
        assert_eq!(quote_to_sat(u64::MAX, 1), None);
    }

    proptest::proptest! {
        /// Against a naive reference: the status after any sequence of payments equals the
        /// status computed from scratch; paid-on-time is the plain sum; settled never reverts;
        /// every new payment gives exactly one PaymentReceived.
        #[test]
        fn matches_reference(
            pays in proptest::collection::vec((1u64..800, 0u32..8, 0u64..1_500), 0..6),
            speed_i in 0usize..4, tol in 0u16..2_000, now in 0u64..2_000,
        ) {
            let speed = SPEED_POLICIES[speed_i];
            let mut i = inv(1000, speed, tol);
            let mut received = 0;
            let mut settled = false;
            // The monitor's clock only moves forward.
            let mut t = now;
            for (n, &(amount, conf, seen)) in pays.iter().enumerate() {
                t = t.max(seen);
                let ev = i.observe(&[chain(n as u8, amount, conf, seen)], t);
                received += ev.iter().filter(|e| **e == E::PaymentReceived).count();
                if settled {
                    proptest::prop_assert_eq!(i.status, Status::Settled);
                }
                settled |= i.status == Status::Settled;
            }
            proptest::prop_assert_eq!(received, pays.len());
            let paid: u64 = pays.iter().filter(|p| p.2 < 1_000).map(|p| p.0).sum();
            let threshold = 1000 - 1000 * u64::from(tol) / 10_000;
            proptest::prop_assert_eq!(i.derive(now).paid_sat, paid);
            proptest::prop_assert_eq!(i.marks.has(Marks::PAID_PARTIAL), paid > 0 && paid < threshold);
            proptest::prop_assert_eq!(i.marks.has(Marks::PAID_OVER), paid > 1000);
            proptest::prop_assert_eq!(i.marks.has(Marks::PAID_LATE), pays.iter().any(|p| p.2 >= 1_000));
            if !settled && paid < threshold {
                let want = if !pays.is_empty() && t >= 1_000 { Status::Expired } else { Status::New };
                proptest::prop_assert_eq!(i.status, want);
            }
        }
    }
}
