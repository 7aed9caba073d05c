//! A regtest `bitcoind` that `mediator serve` starts itself when no node is configured: found as
//! the project finds it everywhere (`BITCOIND_EXE`, then `PATH`, then the shared prebuilt copy and
//! the cache of `scripts/build-bitcoind.sh`), run with its data inside the data directory on free
//! loopback ports, and stopped (RPC `stop`, then a kill after a grace period) on shutdown.

use anyhow::{anyhow, bail, Context};
use bdk_bitcoind_rpc::bitcoincore_rpc::{Auth, Client, RpcApi};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where to look for `bitcoind`, in order. `None` when there is none.
pub fn find_bitcoind() -> Option<PathBuf> {
    if let Some(exe) = std::env::var_os("BITCOIND_EXE") {
        let p = PathBuf::from(exe);
        return p.is_file().then_some(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("bitcoind");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/mediator → the checkout's parent holds shared/.
        for up in exe.ancestors().skip(1).take(6) {
            candidates.push(up.join("shared/bin/bitcoind"));
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("../shared/bin/bitcoind"));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(cache) = cache {
        if let Ok(entries) = std::fs::read_dir(cache.join("mediator")) {
            let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            dirs.sort();
            for d in dirs.into_iter().rev() {
                if d.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("bitcoind-"))
                {
                    candidates.push(d.join("bin/bitcoind"));
                }
            }
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 for the managed node: nothing listens on it now, and no other
/// call in this process got it. Taken below Linux's ephemeral range (32768–60999), where a port
/// from `bind(:0)` would be and where any outgoing connection may take it as its local port
/// before the node binds it. In 20000..26000: the tests' own counter (`tests/common/ports.rs`)
/// takes 26000..32000, so a port a test hands to a `serve` child is never one the child takes
/// for its bitcoind.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    const LOW: u32 = 20_000;
    const SPAN: u32 = 6_000;
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (std::process::id().wrapping_mul(7_919) ^ nanos) % SPAN
    });
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in {LOW}..{}", LOW + SPAN)
}

/// A regtest node this process started.
#[derive(Debug)]
pub struct ManagedNode {
    child: Option<Child>,
    rpc_url: String,
    cookie: PathBuf,
    datadir: PathBuf,
}

impl ManagedNode {
    /// Starts `exe` on regtest with its data in `datadir`, RPC and P2P on free loopback ports,
    /// and waits until its RPC answers.
    pub fn start(exe: &Path, datadir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(datadir)
            .with_context(|| format!("creating {}", datadir.display()))?;
        let rpc_port = free_port()?;
        // Not listening for peers (-listen=0), but a port of its own all the same.
        let p2p_port = free_port()?;
        let log = std::fs::File::create(datadir.join("mediator-bitcoind.log"))?;
        let child = Command::new(exe)
            .arg("-regtest")
            .arg(format!("-datadir={}", datadir.display()))
            .arg(format!("-rpcport={rpc_port}"))
            .arg("-rpcbind=127.0.0.1")
            .arg("-rpcallowip=127.0.0.1")
            .arg(format!("-port={p2p_port}"))
            .arg("-listen=0")
            .arg("-server=1")
            .arg("-dnsseed=0")
            .arg("-fixedseeds=0")
            .arg("-printtoconsole=0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut node = Self {
            child: Some(child),
            rpc_url: format!("http://127.0.0.1:{rpc_port}"),
            cookie: datadir.join("regtest/.cookie"),
            datadir: datadir.to_owned(),
        };
        node.wait_ready(Duration::from_secs(60))?;
        // For operators and tests: where this node's RPC is (the cookie is beside it).
        std::fs::write(datadir.join("mediator-rpc-url"), &node.rpc_url)?;
        Ok(node)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "bitcoind exited during startup ({status}); see {}",
                        self.datadir.join("mediator-bitcoind.log").display()
                    );
                }
            }
            if self.cookie.is_file() {
                if let Ok(c) = self.client() {
                    if c.get_blockchain_info().is_ok() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("bitcoind did not answer RPC within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// RPC URL.
    pub fn rpc_url(&self) -> &str {
        &self.rpc_url
    }

    /// The node's RPC cookie file.
    pub fn cookie_file(&self) -> &Path {
        &self.cookie
    }

    /// A new RPC client.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.rpc_url, Auth::CookieFile(self.cookie.clone()))
            .map_err(|e| anyhow!("bitcoind rpc: {e}"))
    }

    /// Stops the node: RPC `stop`, then waits up to 30 s, then kills it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(c) = self.client() {
            let _ = c.stop();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill()?;
        child.wait()?;
        Ok(())
    }
}

impl Drop for ManagedNode {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::free_port;

    /// Regression: ports came from `bind(:0)`, inside the ephemeral range where an outgoing
    /// connection could take one before the node bound it, and two calls could return the same.
    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let port = free_port().unwrap();
            assert!((20_000..26_000).contains(&port), "{port}");
            assert!(seen.insert(port), "{port} twice");
            // Held while the next ones are chosen: they must skip it.
            std::mem::forget(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
        }
    }
}
