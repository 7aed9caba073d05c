//! `mediator serve` configuration: built-in defaults, then a TOML file, then environment
//! variables, then command-line flags — each overriding the one before.
//!
//! ```toml
//! data_dir = "./mediator-data"
//! listen = "127.0.0.1:8080"
//! network = "regtest"              # regtest | testnet | signet | bitcoin
//! public_url = "https://pay.example.com"   # how customers reach the server [default: http://<listen>]
//!
//! [bitcoind]                       # leave out on regtest: serve starts its own node
//! rpc_url = "http://127.0.0.1:18443"
//! cookie_file = "/home/me/.bitcoin/regtest/.cookie"   # or rpc_user + rpc_password
//!
//! [custody]
//! deposit_confirmations = 1        # default 1 on regtest, 3 elsewhere
//! poll_interval_ms = 1000
//! withdrawal_fee_sat = 10000
//! min_withdrawal_sat = 10000
//! daily_limit_sat = 1000000000
//! approval_threshold_sat = 100000000   # of the account's running 24-hour total
//! hot_wallet_daily_limit_sat = 5000000000   # all accounts, 24 hours; past it: approval
//! deny_list = "deny.txt"
//! batch_interval_secs = 10
//! batch_max_requests = 100
//! fallback_fee_rate_sat_vb = 2
//! ```

use anyhow::{bail, Context};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The node to use instead of starting one.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BitcoindConfig {
    /// RPC URL.
    pub rpc_url: Option<String>,
    /// Cookie file (preferred).
    pub cookie_file: Option<PathBuf>,
    /// RPC user.
    pub rpc_user: Option<String>,
    /// RPC password.
    pub rpc_password: Option<String>,
}

/// Custody knobs (see the wallet crate).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CustodyKnobs {
    /// Confirmations before a deposit is credited.
    pub deposit_confirmations: Option<u32>,
    /// Custody loop period.
    pub poll_interval_ms: Option<u64>,
    /// Flat withdrawal fee.
    pub withdrawal_fee_sat: Option<u64>,
    /// Smallest withdrawal.
    pub min_withdrawal_sat: Option<u64>,
    /// 24-hour limit per account.
    pub daily_limit_sat: Option<u64>,
    /// Above this (the account's running 24-hour total), a withdrawal waits for approval.
    pub approval_threshold_sat: Option<u64>,
    /// Exchange-wide 24-hour total above which every withdrawal waits for approval.
    pub hot_wallet_daily_limit_sat: Option<u64>,
    /// File of denied addresses.
    pub deny_list: Option<PathBuf>,
    /// Batch every this many seconds...
    pub batch_interval_secs: Option<u64>,
    /// ...or this many requests.
    pub batch_max_requests: Option<usize>,
    /// Fee rate when the node has no estimate.
    pub fallback_fee_rate_sat_vb: Option<u32>,
}

/// The file's shape (every key optional).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Listen address.
    pub listen: Option<SocketAddr>,
    /// Network.
    pub network: Option<String>,
    /// The server's address as customers reach it (checkout links).
    pub public_url: Option<String>,
    /// External node.
    #[serde(default)]
    pub bitcoind: BitcoindConfig,
    /// Custody.
    #[serde(default)]
    pub custody: CustodyKnobs,
}

impl FileConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// The resolved configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// Data directory (journal, snapshots, SQLite, keys, the managed node).
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Bitcoin network.
    pub network: wallet::bitcoin::Network,
    /// The server's address as customers reach it, without a trailing slash: invoice checkout
    /// links are absolute under it.
    pub public_url: String,
    /// External node; `None` on regtest means: start one.
    pub bitcoind: Option<BitcoindConfig>,
    /// Custody knobs.
    pub custody: CustodyKnobs,
}

/// Parses a network name.
pub fn parse_network(s: &str) -> anyhow::Result<wallet::bitcoin::Network> {
    use wallet::bitcoin::Network;
    Ok(match s {
        "regtest" => Network::Regtest,
        "testnet" | "testnet3" => Network::Testnet,
        "testnet4" => Network::Testnet4,
        "signet" => Network::Signet,
        "bitcoin" | "mainnet" | "main" => Network::Bitcoin,
        other => bail!("unknown network {other:?} (regtest, testnet, testnet4, signet, bitcoin)"),
    })
}

impl ServeConfig {
    /// Merges defaults, `file`, then `over` (environment and flags, already merged by clap).
    pub fn resolve(file: FileConfig, over: FileConfig) -> anyhow::Result<Self> {
        let network = over
            .network
            .or(file.network)
            .unwrap_or_else(|| "regtest".into());
        let network = parse_network(&network)?;
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        let b = BitcoindConfig {
            rpc_url: pick(&over.bitcoind.rpc_url, &file.bitcoind.rpc_url),
            cookie_file: over.bitcoind.cookie_file.or(file.bitcoind.cookie_file),
            rpc_user: pick(&over.bitcoind.rpc_user, &file.bitcoind.rpc_user),
            rpc_password: pick(&over.bitcoind.rpc_password, &file.bitcoind.rpc_password),
        };
        let bitcoind = if b == BitcoindConfig::default() {
            if network != wallet::bitcoin::Network::Regtest {
                bail!("on {network} a node must be configured (bitcoind.rpc_url and a cookie file or user and password)");
            }
            None
        } else {
            if b.rpc_url.is_none() {
                bail!("bitcoind.rpc_url is required when a node is configured");
            }
            if b.cookie_file.is_none() && (b.rpc_user.is_none() || b.rpc_password.is_none()) {
                bail!("bitcoind needs a cookie file, or both rpc_user and rpc_password");
            }
            Some(b)
        };
        let c = over.custody;
        let f = file.custody;
        let listen = over
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let public_url = match over.public_url.or(file.public_url) {
            Some(u) => {
                let u = u.trim_end_matches('/').to_owned();
                let rest = u
                    .strip_prefix("https://")
                    .or_else(|| u.strip_prefix("http://"));
                if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                    bail!("public_url must be an http:// or https:// URL, got {u:?}");
                }
                u
            }
            None => format!("http://{listen}"),
        };
        Ok(Self {
            data_dir: over
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| "./mediator-data".into()),
            listen,
            network,
            public_url,
            bitcoind,
            custody: CustodyKnobs {
                deposit_confirmations: c.deposit_confirmations.or(f.deposit_confirmations),
                poll_interval_ms: c.poll_interval_ms.or(f.poll_interval_ms),
                withdrawal_fee_sat: c.withdrawal_fee_sat.or(f.withdrawal_fee_sat),
                min_withdrawal_sat: c.min_withdrawal_sat.or(f.min_withdrawal_sat),
                daily_limit_sat: c.daily_limit_sat.or(f.daily_limit_sat),
                approval_threshold_sat: c.approval_threshold_sat.or(f.approval_threshold_sat),
                hot_wallet_daily_limit_sat: c
                    .hot_wallet_daily_limit_sat
                    .or(f.hot_wallet_daily_limit_sat),
                deny_list: c.deny_list.or(f.deny_list),
                batch_interval_secs: c.batch_interval_secs.or(f.batch_interval_secs),
                batch_max_requests: c.batch_max_requests.or(f.batch_max_requests),
                fallback_fee_rate_sat_vb: c.fallback_fee_rate_sat_vb.or(f.fallback_fee_rate_sat_vb),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_env_override_the_file_which_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\n[custody]\npoll_interval_ms = 50\nbatch_max_requests = 7\n",
        )
        .unwrap();
        let over = FileConfig {
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            custody: CustodyKnobs {
                poll_interval_ms: Some(20),
                ..CustodyKnobs::default()
            },
            ..FileConfig::default()
        };
        let c = ServeConfig::resolve(file, over).unwrap();
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.custody.poll_interval_ms, Some(20));
        assert_eq!(c.custody.batch_max_requests, Some(7));
        assert_eq!(c.network, wallet::bitcoin::Network::Regtest);
        assert!(
            c.bitcoind.is_none(),
            "regtest without a node configured starts its own"
        );
        let d = ServeConfig::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        assert_eq!(d.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(d.public_url, "http://127.0.0.1:8080");
        let shop = FileConfig {
            public_url: Some("https://pay.example.com/".into()),
            ..FileConfig::default()
        };
        let s = ServeConfig::resolve(shop, FileConfig::default()).unwrap();
        assert_eq!(s.public_url, "https://pay.example.com");
        assert_eq!(d.data_dir, PathBuf::from("./mediator-data"));
    }

    #[test]
    fn bad_configurations_are_clear_errors() {
        let mainnet = FileConfig {
            network: Some("bitcoin".into()),
            ..FileConfig::default()
        };
        let e = ServeConfig::resolve(mainnet, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("node must be configured"), "{e}");
        let no_auth = FileConfig {
            bitcoind: BitcoindConfig {
                rpc_url: Some("http://127.0.0.1:1".into()),
                ..BitcoindConfig::default()
            },
            ..FileConfig::default()
        };
        let e = ServeConfig::resolve(no_auth, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cookie"), "{e}");
        assert!(parse_network("moon").is_err());
        for bad in ["pay.example.com", "ftp://x", "https://", "http://a b"] {
            let f = FileConfig {
                public_url: Some(bad.into()),
                ..FileConfig::default()
            };
            let e = ServeConfig::resolve(f, FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("public_url"), "{bad}: {e}");
        }
        assert!(toml::from_str::<FileConfig>("listen = 5\n").is_err());
        assert!(toml::from_str::<FileConfig>("unknown_key = 1\n").is_err());
    }
}
