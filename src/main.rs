//! The `mediator` binary: `serve` runs everything; the admin commands talk to a running server;
//! `replay` times the order book on a feed; `journal` checks and repairs the engine's journal.
//!
//! Each subcommand lives in its own module and returns `anyhow::Result`; `main` only dispatches
//! and turns an error into a message on stderr and exit code 2.

mod admin;
mod bitcoind;
mod config;
mod custody;
mod datadir;
mod journal;
mod lightning;
mod proofs;
mod replay;
mod serve;

use clap::{Args, Parser, Subcommand};
use config::{
    BitcoindConfig, CheckoutKnobs, CustodyKnobs, FileConfig, LightningKnobs, ServeConfig,
    TrustedProxyKnobs,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// The allocator: mimalloc (the API's request path allocates per request; glibc's malloc was ~10%
/// of its CPU under load, `api/tests/load.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Mediator: a Bitcoin exchange and payment engine.
#[derive(Debug, Parser)]
#[command(name = "mediator", version, about)]
struct Cli {
    /// Data directory (journal, snapshots, SQLite, keys).
    #[arg(long, global = true, env = "MEDIATOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The running server's admin listener (`admin_listen`), for the admin commands.
    #[arg(
        long,
        global = true,
        env = "MEDIATOR_SERVER",
        default_value = "127.0.0.1:8081"
    )]
    server: SocketAddr,
    /// Admin commands: print the server's JSON answer (`journal verify`: its report as JSON).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the engine, custody and the HTTP API (regtest with its own bitcoind by default).
    Serve(Box<ServeArgs>),
    /// Replays a QuantCup order feed on a fresh book per round and prints ns/msg.
    Replay {
        /// FEED.csv [--rounds N]
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Accounts.
    Account {
        #[command(subcommand)]
        cmd: AccountCmd,
    },
    /// API keys.
    Apikey {
        #[command(subcommand)]
        cmd: ApikeyCmd,
    },
    /// The store dashboard's logins (`/dashboard`).
    Dashboard {
        #[command(subcommand)]
        cmd: DashboardCmd,
    },
    /// Prints an account's deposit address (a new one with --new).
    DepositAddress {
        /// Account id.
        account: u32,
        /// Make a new address (old ones keep working).
        #[arg(long)]
        new: bool,
    },
    /// Lists withdrawals.
    Withdrawals {
        /// Only this account's.
        #[arg(long)]
        account: Option<u32>,
    },
    /// Approves a withdrawal waiting for approval.
    Approve {
        /// Withdrawal id.
        id: u64,
    },
    /// Wallet assets against ledger liabilities.
    Reconcile {
        /// Also compare every credited deposit and completed withdrawal with the ledger and
        /// the chain (one ledger query per record), reporting each mismatch by id.
        #[arg(long)]
        records: bool,
    },
    /// Records an operator deposit of an asset (e.g. USD received by wire), idempotent by reference.
    Credit {
        /// Account id.
        account: u32,
        /// Asset symbol, e.g. USD.
        asset: String,
        /// Amount, a decimal, e.g. 1000.50.
        amount: String,
        /// External reference; the same reference credits once.
        #[arg(long)]
        reference: String,
    },
    /// The Lightning node: channels (liquidity) and balances.
    Ln {
        #[command(subcommand)]
        cmd: LnCmd,
    },
    /// Regtest helpers.
    Regtest {
        #[command(subcommand)]
        cmd: RegtestCmd,
    },
    /// Verifiable custody: liabilities proofs.
    Reserves {
        #[command(subcommand)]
        cmd: ReservesCmd,
    },
    /// The tamper-evident audit log, offline (`<data-dir>/api/audit.log`): verify, tail.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// The engine's journal, offline (`<data-dir>/journal`): verify, repair.
    Journal {
        #[command(subcommand)]
        cmd: JournalCmd,
    },
    /// One withdrawal: refuse it, or bump the fee of the batch paying it.
    Withdrawal {
        #[command(subcommand)]
        cmd: WithdrawalCmd,
    },
    /// Accounts: those flagged for review.
    Accounts {
        #[command(subcommand)]
        cmd: AccountsCmd,
    },
    /// Withdrawal batches, newest first (status, transactions, fees, refusals).
    Batches,
    /// One batch: abandon it when it can never confirm.
    Batch {
        #[command(subcommand)]
        cmd: BatchCmd,
    },
    /// Custody alarms not cleared (money that moved in one place and not the other).
    Alarms,
    /// One alarm: clear it once dealt with.
    Alarm {
        #[command(subcommand)]
        cmd: AlarmCmd,
    },
}

#[derive(Debug, Subcommand)]
enum ReservesCmd {
    /// Checks an inclusion proof file (from GET /mapi/v1/reserves/my-proof), offline.
    VerifyInclusion {
        /// The proof (JSON).
        file: PathBuf,
        /// Your account id (the `uid` of GET /api/v3/account): the proof must be for it.
        #[arg(long)]
        account: u32,
        /// Also check that this proof-of-reserves document publishes the proof's root.
        #[arg(long)]
        against: Option<PathBuf>,
    },
    /// Publishes a liabilities proof over every balance now (running server).
    PublishLiabilities,
    /// Publishes a BIP-127 proof of reserves over the custody wallet's UTXOs at the tip, with
    /// a fresh liabilities proof (running server); --json prints the document.
    Prove {
        /// A note after the signed message (which names the block, the liabilities roots and
        /// totals, and the audit head), at most 1,024 bytes.
        #[arg(long)]
        message: Option<String>,
    },
    /// Checks a proof-of-reserves document (GET /mapi/v1/reserves/latest): the commitment,
    /// every signature, the single output, reserves >= BTC liabilities; with --rpc, every UTXO
    /// unspent at the stated block through your node.
    Verify {
        /// The document (JSON).
        file: PathBuf,
        /// Refuse a proof for another network (bitcoin, testnet, signet, regtest).
        #[arg(long)]
        network: Option<String>,
        /// Your bitcoind's RPC URL.
        #[arg(long, requires = "cookie")]
        rpc: Option<String>,
        /// Its cookie file.
        #[arg(long, requires = "rpc")]
        cookie: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Re-walks the whole chain; fails when `serve` would refuse to start.
    Verify {
        /// Proof-of-reserves documents whose audit head must be a line of the log.
        #[arg(long = "proof")]
        proofs: Vec<PathBuf>,
    },
    /// Prints the last entries (--json: as stored, one per line).
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
}

#[derive(Debug, Subcommand)]
enum JournalCmd {
    /// Checks every segment and snapshot; changes nothing. Fails when `serve` would refuse.
    Verify,
    /// Cuts a damaged journal at the damage `verify` reported; keeps a backup; logs it.
    Repair {
        /// SEGMENT:OFFSET as `verify` prints it (SEGMENT: first seq or file name).
        #[arg(long)]
        truncate_at: String,
        /// Required: the records after the cut are lost unless a snapshot holds them.
        #[arg(long)]
        confirm_data_loss: bool,
    },
}

#[derive(Debug, Subcommand)]
enum WithdrawalCmd {
    /// Refuses a withdrawal not batched yet: the hold is given back with the reason.
    Reject {
        id: u64,
        #[arg(long)]
        reason: String,
    },
    /// Replaces the transaction of the batch paying the withdrawal with one paying this fee
    /// rate (sat/vB), within the batch's flat fees.
    Bump {
        id: u64,
        #[arg(long)]
        fee_rate: u64,
    },
}

#[derive(Debug, Subcommand)]
enum BatchCmd {
    /// Abandons a batch in flight that can never confirm (the node refuses every version for
    /// missing inputs: one was double-spent): its withdrawals go out in the next batch, which
    /// spends the abandoned one's unspent inputs.
    Abandon { id: u64 },
}

#[derive(Debug, Subcommand)]
enum AlarmCmd {
    /// Clears an alarm an operator dealt with (it is raised again if the cause remains).
    Clear { id: u64 },
}

#[derive(Debug, Subcommand)]
enum AccountsCmd {
    /// Accounts flagged for review (a credited deposit left the chain); they cannot withdraw.
    Flagged,
}

#[derive(Debug, Subcommand)]
enum AccountCmd {
    /// Opens a new account.
    Create,
    /// Clears an account's flag after review: it may withdraw again.
    ClearFlag { id: u32 },
    /// Writes off what the account owes custody (a reversed deposit its balance did not
    /// cover): the exchange bears it, and the account's flag can then be cleared.
    WriteOffDebt { id: u32 },
}

#[derive(Debug, Subcommand)]
enum ApikeyCmd {
    /// Creates an API key for an account.
    Create {
        /// Account id.
        #[arg(long)]
        account: u32,
        /// Comma-separated: read, trade, transfer, withdraw, keys, merchant, admin (trade keeps
        /// funds in the account; transfer and withdraw move them out; keys manages keys), and
        /// BTCPay's store permissions for shop plugins (btcpay.store.canviewinvoices, ...).
        #[arg(long, default_value = "read,trade")]
        permissions: String,
        /// A label.
        #[arg(long)]
        label: Option<String>,
    },
    /// Revokes any account's API key (e.g. one its owner reported stolen): its requests and
    /// user data streams stop at once.
    Revoke {
        /// The key's id (`apiKey`).
        #[arg(long)]
        api_key: String,
    },
}

#[derive(Debug, Subcommand)]
enum DashboardCmd {
    /// Sets a store's dashboard password, read from the first line of stdin (12 to 128
    /// characters); logs out the store's sessions.
    Password {
        /// The store's account id.
        #[arg(long)]
        account: u32,
    },
    /// Prints a one-time login link for a store's dashboard (valid 15 minutes, single use).
    Link {
        /// The store's account id.
        #[arg(long)]
        account: u32,
    },
}

#[derive(Debug, Subcommand)]
enum LnCmd {
    /// Opens a channel from the node's on-chain funds (outbound liquidity).
    OpenChannel {
        /// The peer: NODEID@HOST:PORT.
        peer: String,
        /// Channel size in satoshis.
        amount_sat: u64,
    },
    /// Lists the channels.
    Channels,
    /// The node's on-chain and channel balances.
    Balance,
    /// Closes a channel cooperatively.
    Close {
        /// The channel id `ln channels` prints.
        channel_id: String,
    },
    /// A new on-chain address of the node (to fund channels).
    Address,
}

#[derive(Debug, Subcommand)]
enum RegtestCmd {
    /// Mines N blocks.
    Mine {
        /// Blocks.
        blocks: u32,
    },
    /// Mines coins to the account's deposit address (and matures them).
    Fund {
        /// Account id.
        account: u32,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Start even though the audit log's chain is broken (`mediator audit verify` shows where);
    /// the override is itself logged. Never from the configuration file.
    #[arg(long)]
    audit_override: bool,
    /// A TOML configuration file (see README); environment and flags override it.
    #[arg(long, env = "MEDIATOR_CONFIG")]
    config: Option<PathBuf>,
    /// The Lightning node's peer-to-peer address (`[lightning] listen`) [default: 127.0.0.1:9735].
    #[arg(long, env = "MEDIATOR_LIGHTNING_LISTEN")]
    lightning_listen: Option<SocketAddr>,
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "MEDIATOR_LISTEN")]
    listen: Option<SocketAddr>,
    /// The admin listener: /mapi/v1/admin/* and /metrics [default: 127.0.0.1:8081].
    #[arg(long, env = "MEDIATOR_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Who may embed the checkout and point-of-sale pages: CSP frame-ancestors sources
    /// [default: 'self'].
    #[arg(long, env = "MEDIATOR_FRAME_ANCESTORS")]
    frame_ancestors: Option<String>,
    /// Behind a reverse proxy: the header it sets to the client address (x-forwarded-for,
    /// x-real-ip); needs --trusted-proxies.
    #[arg(long, env = "MEDIATOR_TRUSTED_PROXY_HEADER")]
    trusted_proxy_header: Option<String>,
    /// The reverse proxy's own addresses, comma-separated: only their header is believed.
    #[arg(long, env = "MEDIATOR_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Option<Vec<std::net::IpAddr>>,
    /// How customers reach this server, for invoice checkout links [default: http://<listen>].
    #[arg(long, env = "MEDIATOR_PUBLIC_URL")]
    public_url: Option<String>,
    /// regtest, testnet, testnet4, signet or bitcoin [default: regtest].
    #[arg(long, env = "MEDIATOR_NETWORK")]
    network: Option<String>,
    /// An existing node's RPC URL (otherwise, on regtest, serve starts its own).
    #[arg(long, env = "MEDIATOR_BITCOIND_RPC_URL")]
    bitcoind_rpc_url: Option<String>,
    /// The node's cookie file.
    #[arg(long, env = "MEDIATOR_BITCOIND_COOKIE")]
    bitcoind_cookie: Option<PathBuf>,
    /// The node's RPC user.
    #[arg(long, env = "MEDIATOR_BITCOIND_RPC_USER")]
    bitcoind_rpc_user: Option<String>,
    /// The node's RPC password.
    #[arg(long, env = "MEDIATOR_BITCOIND_RPC_PASSWORD", hide_env_values = true)]
    bitcoind_rpc_password: Option<String>,
    /// Confirmations before a deposit is credited [default: 1 on regtest, 3 elsewhere].
    #[arg(long, env = "MEDIATOR_DEPOSIT_CONFIRMATIONS")]
    deposit_confirmations: Option<u32>,
    /// Custody loop period in milliseconds [default: 1000 on regtest, 5000 elsewhere].
    #[arg(long, env = "MEDIATOR_POLL_INTERVAL_MS")]
    poll_interval_ms: Option<u64>,
    /// Withdrawal batch period in seconds [default: 5 on regtest, 60 elsewhere].
    #[arg(long, env = "MEDIATOR_BATCH_INTERVAL_SECS")]
    batch_interval_secs: Option<u64>,
    /// Connection and stream limits.
    #[command(flatten)]
    limits: config::LimitKnobs,
    /// Merchant payments: webhook targets, redeliveries, the reference price.
    #[command(flatten)]
    merchant: config::MerchantKnobs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mediator: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| "./mediator-data".into());
    let (server, json) = (cli.server, cli.json);
    let admin = || admin::Admin::new(server, &data_dir, json);
    match cli.command {
        Cmd::Serve(a) => {
            let a = *a;
            let file = match &a.config {
                Some(p) => FileConfig::load(p)?,
                None => FileConfig::default(),
            };
            let over = FileConfig {
                data_dir: cli.data_dir,
                listen: a.listen,
                admin_listen: a.admin_listen,
                checkout: CheckoutKnobs {
                    frame_ancestors: a.frame_ancestors,
                },
                trusted_proxy: TrustedProxyKnobs {
                    header: a.trusted_proxy_header,
                    addresses: a.trusted_proxies,
                },
                network: a.network,
                public_url: a.public_url,
                bitcoind: BitcoindConfig {
                    rpc_url: a.bitcoind_rpc_url,
                    cookie_file: a.bitcoind_cookie,
                    rpc_user: a.bitcoind_rpc_user,
                    rpc_password: a.bitcoind_rpc_password,
                },
                custody: CustodyKnobs {
                    deposit_confirmations: a.deposit_confirmations,
                    poll_interval_ms: a.poll_interval_ms,
                    batch_interval_secs: a.batch_interval_secs,
                    ..CustodyKnobs::default()
                },
                limits: a.limits,
                merchant: a.merchant,
                lightning: LightningKnobs {
                    listen: a.lightning_listen,
                    ..LightningKnobs::default()
                },
            };
            let mut cfg = ServeConfig::resolve(file, over)?;
            cfg.audit_override = a.audit_override;
            serve::run(cfg)
        }
        Cmd::Replay { args } => replay::run(&args),
        Cmd::Account {
            cmd: AccountCmd::Create,
        } => admin::account_create(&admin()?),
        Cmd::Account {
            cmd: AccountCmd::ClearFlag { id },
        } => admin::clear_flag(&admin()?, id),
        Cmd::Account {
            cmd: AccountCmd::WriteOffDebt { id },
        } => admin::write_off_debt(&admin()?, id),
        Cmd::Withdrawal {
            cmd: WithdrawalCmd::Reject { id, reason },
        } => admin::reject(&admin()?, id, &reason),
        Cmd::Withdrawal {
            cmd: WithdrawalCmd::Bump { id, fee_rate },
        } => admin::bump(&admin()?, id, fee_rate),
        Cmd::Accounts {
            cmd: AccountsCmd::Flagged,
        } => admin::flagged(&admin()?),
        Cmd::Batches => admin::batches(&admin()?),
        Cmd::Batch {
            cmd: BatchCmd::Abandon { id },
        } => admin::abandon_batch(&admin()?, id),
        Cmd::Alarms => admin::alarms(&admin()?),
        Cmd::Alarm {
            cmd: AlarmCmd::Clear { id },
        } => admin::clear_alarm(&admin()?, id),
        Cmd::Apikey {
            cmd:
                ApikeyCmd::Create {
                    account,
                    permissions,
                    label,
                },
        } => admin::apikey_create(&admin()?, account, &permissions, label.as_deref()),
        Cmd::Apikey {
            cmd: ApikeyCmd::Revoke { api_key },
        } => admin::apikey_revoke(&admin()?, &api_key),
        Cmd::Dashboard {
            cmd: DashboardCmd::Password { account },
        } => admin::dashboard_password(&admin()?, account),
        Cmd::Dashboard {
            cmd: DashboardCmd::Link { account },
        } => admin::dashboard_link(&admin()?, account),
        Cmd::DepositAddress { account, new } => admin::deposit_address(&admin()?, account, new),
        Cmd::Withdrawals { account } => admin::withdrawals(&admin()?, account),
        Cmd::Approve { id } => admin::approve(&admin()?, id),
        Cmd::Reconcile { records } => admin::reconcile(&admin()?, records),
        Cmd::Credit {
            account,
            asset,
            amount,
            reference,
        } => admin::credit(&admin()?, account, &asset, &amount, &reference),
        Cmd::Ln {
            cmd: LnCmd::OpenChannel { peer, amount_sat },
        } => lightning::open_channel(&admin()?, &peer, amount_sat),
        Cmd::Ln {
            cmd: LnCmd::Channels,
        } => lightning::channels(&admin()?),
        Cmd::Ln {
            cmd: LnCmd::Balance,
        } => lightning::balance(&admin()?),
        Cmd::Ln {
            cmd: LnCmd::Close { channel_id },
        } => lightning::close(&admin()?, &channel_id),
        Cmd::Ln {
            cmd: LnCmd::Address,
        } => lightning::address(&admin()?),
        Cmd::Regtest {
            cmd: RegtestCmd::Mine { blocks },
        } => admin::regtest_mine(&admin()?, blocks),
        Cmd::Regtest {
            cmd: RegtestCmd::Fund { account },
        } => admin::regtest_fund(&admin()?, account),
        Cmd::Reserves {
            cmd:
                ReservesCmd::VerifyInclusion {
                    file,
                    account,
                    against,
                },
        } => proofs::verify_inclusion(&file, account, against.as_deref(), json),
        Cmd::Reserves {
            cmd: ReservesCmd::Prove { message },
        } => proofs::prove(&admin()?, message.as_deref()),
        Cmd::Reserves {
            cmd:
                ReservesCmd::Verify {
                    file,
                    network,
                    rpc,
                    cookie,
                },
        } => proofs::verify_reserves(
            &file,
            network.as_deref(),
            rpc.as_deref().zip(cookie.as_deref()),
            json,
        ),
        Cmd::Reserves {
            cmd: ReservesCmd::PublishLiabilities,
        } => proofs::publish_liabilities(&admin()?),
        Cmd::Audit {
            cmd: AuditCmd::Verify { proofs: docs },
        } => proofs::audit_verify(&data_dir, &docs, json),
        Cmd::Audit {
            cmd: AuditCmd::Tail { lines },
        } => proofs::audit_tail(&data_dir, lines, json),
        Cmd::Journal {
            cmd: JournalCmd::Verify,
        } => journal::verify(&data_dir, json),
        Cmd::Journal {
            cmd:
                JournalCmd::Repair {
                    truncate_at,
                    confirm_data_loss,
                },
        } => journal::repair(&data_dir, &truncate_at, confirm_data_loss),
    }
}
