//! Unit types for money and prices. Integers only; arithmetic is checked.
//!
//! * [`Price`] is a price in **ticks** of its market.
//! * [`Qty`] is a quantity in **lots** of its market's base asset.
//! * [`Amount`] is an amount of one asset in that asset's smallest unit
//!   (satoshis for BTC, 1e-8 USD for USD in the default configuration).
//!
//! A market converts between them: `base = qty * lot_size` and
//! `quote = price * qty * tick_size` (see [`crate::config::MarketConfig`]).

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! unit {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(
            Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
        )]
        pub struct $name(pub u64);

        impl $name {
            /// Zero.
            pub const ZERO: Self = Self(0);
            /// The largest representable value.
            pub const MAX: Self = Self(u64::MAX);
            /// Checked addition: `None` on overflow.
            #[inline]
            #[must_use]
            pub fn checked_add(self, rhs: Self) -> Option<Self> {
                self.0.checked_add(rhs.0).map(Self)
            }
            /// Checked subtraction: `None` when `rhs > self`.
            #[inline]
            #[must_use]
            pub fn checked_sub(self, rhs: Self) -> Option<Self> {
                self.0.checked_sub(rhs.0).map(Self)
            }
            /// True when zero.
            #[inline]
            pub fn is_zero(self) -> bool {
                self.0 == 0
            }
            /// The smaller of two values.
            #[inline]
            #[must_use]
            pub fn min(self, rhs: Self) -> Self {
                if self.0 <= rhs.0 { self } else { rhs }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

unit!(
    /// A price in ticks of a market (see [`crate::config::MarketConfig::tick_size`]).
    Price
);
unit!(
    /// A quantity in lots of a market's base asset (see [`crate::config::MarketConfig::lot_size`]).
    Qty
);
unit!(
    /// An amount of one asset in its smallest unit (satoshis for BTC).
    Amount
);

macro_rules! id {
    ($(#[$m:meta])* $name:ident($inner:ty)) => {
        $(#[$m])*
        #[derive(
            Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
        )]
        pub struct $name(pub $inner);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id!(
    /// An account. Account 0 is the exchange's fee account.
    AccountId(u32)
);
id!(
    /// An asset, an index into [`crate::config::EngineConfig::assets`].
    AssetId(u16)
);
id!(
    /// A market, an index into [`crate::config::EngineConfig::markets`].
    MarketId(u16)
);
id!(
    /// An order, assigned by the engine, increasing, never reused.
    OrderId(u64)
);
id!(
    /// An order list (OCO), assigned by the engine, increasing, never reused.
    ListId(u64)
);
id!(
    /// A trade, assigned by the engine, increasing per engine.
    TradeId(u64)
);
id!(
    /// A withdrawal, chosen by the caller (the custody service), unique.
    WithdrawalId(u64)
);

/// Time in nanoseconds since the Unix epoch. The engine never reads a clock: time is passed in with
/// every command by the sequencer and journaled with it.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> u64 {
        self.0 / 1_000_000
    }
    /// From milliseconds since the Unix epoch (saturating).
    pub fn from_millis(ms: u64) -> Self {
        Self(ms.saturating_mul(1_000_000))
    }
}

/// Buy or sell.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Side {
    /// A buy order (bid).
    Buy,
    /// A sell order (ask).
    Sell,
}

impl Side {
    /// The other side.
    #[inline]
    pub fn opposite(self) -> Self {
        match self {
            Side::Buy => Side::Sell,
            Side::Sell => Side::Buy,
        }
    }
}

/// A client-chosen order id: 1 to 36 bytes of `[A-Za-z0-9._:/-]`, stored inline (no heap).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientOrderId {
    len: u8,
    bytes: [u8; 36],
}

impl Serialize for ClientOrderId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ClientOrderId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ClientOrderId::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A client order id that is empty, too long, or has a character outside `[A-Za-z0-9._:/-]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid client order id {0:?}: 1 to 36 characters of A-Z a-z 0-9 . _ : / -")]
#[non_exhaustive]
pub struct ClientOrderIdError(pub String);

impl ClientOrderId {
    /// The largest length in bytes.
    pub const MAX_LEN: usize = 36;

    /// Parses and validates a client order id.
    pub fn new(s: &str) -> Result<Self, ClientOrderIdError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= Self::MAX_LEN
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"._:/-".contains(c));
        if !ok {
            return Err(ClientOrderIdError(s.to_owned()));
        }
        let mut bytes = [0u8; 36];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Self {
            len: b.len() as u8,
            bytes,
        })
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        // Validated as ASCII on construction; a snapshot can only hold what `new` accepted.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

impl fmt::Debug for ClientOrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientOrderId({:?})", self.as_str())
    }
}

impl fmt::Display for ClientOrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An idempotency key for credits and transfers: 36 bytes, enough for a Bitcoin outpoint
/// (32-byte txid and 4-byte output index) or a SHA-256 of an external reference.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(pub [u8; 36]);

impl Serialize for IdempotencyKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IdempotencyKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("36 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                v.try_into()
                    .map(IdempotencyKey)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

impl IdempotencyKey {
    /// The key of a Bitcoin outpoint: txid bytes (as stored in the transaction) then the output
    /// index in little-endian.
    pub fn outpoint(txid: [u8; 32], vout: u32) -> Self {
        let mut k = [0u8; 36];
        k[..32].copy_from_slice(&txid);
        k[32..].copy_from_slice(&vout.to_le_bytes());
        Self(k)
    }

    /// The key of an external reference string: its SHA-256, with a trailing 0xFFFF_FFFF marker so
    /// that it cannot equal an outpoint key of a real output index.
    pub fn reference(reference: &str) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(reference.as_bytes());
        let mut k = [0xFFu8; 36];
        k[..32].copy_from_slice(&digest);
        Self(k)
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_order_id_validation() {
        assert_eq!(
            ClientOrderId::new("abc-1.2_3:4/5").unwrap().as_str(),
            "abc-1.2_3:4/5"
        );
        assert!(ClientOrderId::new("").is_err());
        assert!(ClientOrderId::new("has space").is_err());
        assert!(ClientOrderId::new(&"x".repeat(37)).is_err());
        assert!(ClientOrderId::new(&"x".repeat(36)).is_ok());
    }

    #[test]
    fn unit_arithmetic_is_checked() {
        assert_eq!(Amount(5).checked_sub(Amount(6)), None);
        assert_eq!(Amount::MAX.checked_add(Amount(1)), None);
        assert_eq!(Qty(2).checked_add(Qty(3)), Some(Qty(5)));
    }

    #[test]
    fn reference_key_never_equals_outpoint_key() {
        let r = IdempotencyKey::reference("wire-1");
        let o = IdempotencyKey::outpoint(r.0[..32].try_into().unwrap(), 7);
        assert_ne!(r, o);
    }
}
