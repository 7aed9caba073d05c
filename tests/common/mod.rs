//! What the tests of the `mediator` binary share: start `mediator serve` (with its own regtest
//! bitcoind) on a free port and run its admin commands.
#![allow(dead_code)] // each test binary uses a part

pub mod greenfield;
pub mod ln;
pub mod merchant;
pub mod payer;
mod ports;

pub use ports::free_port;

use bdk_bitcoind_rpc::bitcoincore_rpc::Auth;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mediator");

/// `GET path` over a fresh connection, without a key: the whole response (status line, headers,
/// body).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

pub struct Server {
    pub child: Child,
    /// The public listener.
    pub addr: SocketAddr,
    /// The admin listener (`/mapi/v1/admin/*`, `/metrics`), what the admin commands talk to.
    pub admin_addr: SocketAddr,
    /// The Lightning node's peer-to-peer address (`--lightning-listen`).
    pub ln_addr: SocketAddr,
    pub dir: PathBuf,
    /// The node `serve` started, read once it serves (its pid file may be gone by the time the
    /// server is dropped: a test's temporary directory can be deleted first).
    node_pid: Option<u32>,
}

impl Server {
    pub fn start(dir: &Path, port: u16) -> Server {
        Self::start_with(dir, port, &[])
    }

    /// [`Server::start`] with more `serve` flags.
    pub fn start_with(dir: &Path, port: u16, extra: &[&str]) -> Server {
        let admin_port = free_port();
        let ln_port = free_port();
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--lightning-listen", &format!("127.0.0.1:{ln_port}")])
            .args(["--poll-interval-ms", "200", "--batch-interval-secs", "1"])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "warn")
            // The tests' webhook receivers listen on 127.0.0.1 (refused by default).
            .env("MEDIATOR_ALLOW_PRIVATE_WEBHOOKS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mediator serve");
        // Wait for the "serving on" line (after recovery, node start and wallet open).
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.contains("serving on") => break,
                Ok(_) => {}
                Err(_) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("mediator serve exited during start-up: {status}");
                    }
                    assert!(Instant::now() < deadline, "mediator serve did not start");
                }
            }
        }
        std::thread::spawn(move || while rx.recv().is_ok() {});
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            ln_addr: SocketAddr::from(([127, 0, 0, 1], ln_port)),
            dir: dir.to_owned(),
            node_pid: None,
        };
        server.node_pid = server.bitcoind_pid();
        server
    }

    /// An admin command through the binary, `--json`.
    pub fn admin(&self, args: &[&str]) -> Value {
        let out = Command::new(BIN)
            .args(args)
            .arg("--json")
            .args(["--server", &self.admin_addr.to_string()])
            .arg("--data-dir")
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mediator {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn rpc(&self) -> bdk_bitcoind_rpc::bitcoincore_rpc::Client {
        let url = std::fs::read_to_string(self.dir.join("bitcoind/mediator-rpc-url")).unwrap();
        let cookie = self.dir.join("bitcoind/regtest/.cookie");
        bdk_bitcoind_rpc::bitcoincore_rpc::Client::new(&url, Auth::CookieFile(cookie)).unwrap()
    }

    pub fn bitcoind_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("bitcoind/regtest/bitcoind.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }

    /// SIGKILL (no clean-up), and the node it had started is killed too (waited for, so the
    /// data directory can be used again at once).
    pub fn kill(mut self) {
        self.kill_both();
    }

    fn kill_both(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = self.node_pid {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A server a test drops without stopping it (a failed assertion, say) is killed with the node
/// it started, so no process outlives its test (and holds cargo's output pipe open).
impl Drop for Server {
    fn drop(&mut self) {
        self.kill_both();
    }
}
