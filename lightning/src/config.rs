//! The node's configuration (`[lightning]` in `mediator.toml`, resolved by the binary).

use matching_engine::Amount;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use wallet::bitcoin::Network;

/// bitcoind's RPC as ldk-node takes it (host, port, user, password). `Debug` hides the password.
#[derive(Clone)]
pub struct ChainRpc {
    /// Host (an IP or name).
    pub host: String,
    /// Port.
    pub port: u16,
    /// RPC user (`__cookie__` with cookie authentication).
    pub user: String,
    /// RPC password.
    pub password: String,
}

impl std::fmt::Debug for ChainRpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainRpc")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ChainRpc {
    /// From an RPC URL (`http://host:port[/...]`) and a cookie file (`user:password`).
    pub fn from_cookie(url: &str, cookie_file: &Path) -> Result<Self, String> {
        let cookie = std::fs::read_to_string(cookie_file)
            .map_err(|e| format!("reading {}: {e}", cookie_file.display()))?;
        let (user, password) = cookie
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("{} is not a cookie file", cookie_file.display()))?;
        Self::from_url(url, user, password)
    }

    /// From an RPC URL (`http://host:port[/...]`) and a user and password.
    pub fn from_url(url: &str, user: &str, password: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("rpc url {url}: only http:// is supported"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("rpc url {url}: no port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("rpc url {url}: bad port"))?;
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }
}

/// Everything the service needs.
#[derive(Clone, Debug)]
pub struct LightningConfig {
    /// The chain.
    pub network: Network,
    /// ldk-node's data and `lightning.sqlite` (`<data-dir>/lightning`).
    pub data_dir: PathBuf,
    /// Where the seed file lives: the wallet's directory, beside `wallet.secret`.
    pub seed_dir: PathBuf,
    /// The peer-to-peer listening address.
    pub listen: SocketAddr,
    /// The chain source: the same bitcoind as custody.
    pub rpc: ChainRpc,
    /// Negotiate anchor channels (keeps an on-chain reserve per channel; ldk-node's default).
    pub anchor_channels: bool,
    /// Flat fee per withdrawal: held and charged to the account; also the routing fee's cap.
    pub withdrawal_fee: Amount,
    /// Smallest withdrawal (the invoice's amount).
    pub min_withdrawal: Amount,
    /// Largest withdrawal.
    pub max_withdrawal: Amount,
    /// Smallest deposit invoice.
    pub min_deposit: Amount,
    /// Largest deposit invoice.
    pub max_deposit: Amount,
    /// Deposit invoices' expiry, seconds.
    pub invoice_expiry_secs: u32,
    /// How long after the start a withdrawal the node has no record of waits for every ready
    /// channel to be usable (the peers reconnected) before it is sent again, or, with no
    /// channel usable, held in doubt without a send (see
    /// `LightningService::resolve_unrecorded`), seconds.
    pub reconnect_grace_secs: u64,
}

impl LightningConfig {
    /// Defaults for a data directory: `<data-dir>/lightning`, seed in `<data-dir>/wallet`.
    pub fn new(network: Network, data_dir: &Path, listen: SocketAddr, rpc: ChainRpc) -> Self {
        Self {
            network,
            data_dir: data_dir.join("lightning"),
            seed_dir: data_dir.join("wallet"),
            listen,
            rpc,
            anchor_channels: true,
            withdrawal_fee: Amount(10),
            min_withdrawal: Amount(1),
            max_withdrawal: Amount(4_000_000),
            min_deposit: Amount(1),
            max_deposit: Amount(4_000_000),
            invoice_expiry_secs: 3_600,
            reconnect_grace_secs: 600,
        }
    }
}
