//! [`NodeLog`]: ldk-node's log records to the `log` facade (which `mediator serve`'s tracing
//! subscriber reads), as ldk-node's own facade writer does, with one filter per network.
//!
//! On regtest and signet bitcoind has no fee estimates (`estimatesmartfee` needs blocks with
//! transactions); ldk-node then falls back to 1 sat/vB and logs "Failed to retrieve fee rate
//! estimates" at ERROR every one or two seconds, burying real errors. There (and only there) that
//! one message is logged at DEBUG; every other record keeps its level. On mainnet and testnet it
//! stays an error (mainnet refuses to go on without estimates).

use ldk_node::bitcoin::Network;
use ldk_node::logger::{LogLevel, LogRecord, LogWriter};

/// The message ldk-node logs when bitcoind has no fee estimates.
const NO_FEE_ESTIMATES: &str = "Failed to retrieve fee rate estimates";

/// ldk-node's logger in the service (see the module docs).
pub(crate) struct NodeLog {
    quiet_fee_estimates: bool,
}

impl NodeLog {
    pub(crate) fn new(network: Network) -> Self {
        Self {
            quiet_fee_estimates: matches!(network, Network::Regtest | Network::Signet),
        }
    }

    /// The level a record is logged at.
    fn level(&self, level: LogLevel, message: &str) -> log::Level {
        if self.quiet_fee_estimates && message.starts_with(NO_FEE_ESTIMATES) {
            return log::Level::Debug;
        }
        match level {
            LogLevel::Gossip | LogLevel::Trace => log::Level::Trace,
            LogLevel::Debug => log::Level::Debug,
            LogLevel::Info => log::Level::Info,
            LogLevel::Warn => log::Level::Warn,
            LogLevel::Error => log::Level::Error,
        }
    }
}

impl LogWriter for NodeLog {
    fn log(&self, record: LogRecord<'_>) {
        // Formatted only when the message could be the filtered one (errors on regtest/signet).
        let text;
        let message: &str = if self.quiet_fee_estimates && record.level == LogLevel::Error {
            text = record.args.to_string();
            &text
        } else {
            ""
        };
        let level = self.level(record.level, message);
        if level > log::max_level() {
            return;
        }
        log::logger().log(
            &log::Record::builder()
                .level(level)
                .target(record.module_path)
                .module_path(Some(record.module_path))
                .line(Some(record.line))
                .args(record.args)
                .build(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On regtest and signet the fee-estimate message drops to DEBUG; every other error stays an
    /// error; on mainnet and testnet the message stays an error too.
    #[test]
    fn only_the_fee_estimate_error_is_lowered_and_only_on_regtest_and_signet() {
        let msg = "Failed to retrieve fee rate estimates: Failed to retrieve fee rate \
                   estimates. Falling back to default of 1 sat/vb.";
        for n in [Network::Regtest, Network::Signet] {
            let l = NodeLog::new(n);
            assert_eq!(l.level(LogLevel::Error, msg), log::Level::Debug, "{n}");
            assert_eq!(
                l.level(LogLevel::Error, "Failed to sync chain"),
                log::Level::Error
            );
            assert_eq!(l.level(LogLevel::Warn, "x"), log::Level::Warn);
            assert_eq!(l.level(LogLevel::Gossip, "x"), log::Level::Trace);
        }
        for n in [Network::Bitcoin, Network::Testnet] {
            assert_eq!(
                NodeLog::new(n).level(LogLevel::Error, msg),
                log::Level::Error,
                "{n}"
            );
        }
    }
}
