//! Headless Chromium for page tests, driven through ChromeDriver's WebDriver HTTP API.
//!
//! The WebDriver client is a few lines of blocking HTTP/1.1 over `std::net::TcpStream` (one
//! request per connection): no HTTP client crate needed. Call it from a blocking thread
//! (`tokio::task::spawn_blocking`) when the page's server runs on the same tokio runtime.
//!
//! Chromium and ChromeDriver come from Debian (`scripts/install-browser.sh`). When they are
//! missing a test fails with that advice, unless `MEDIATOR_SKIP_BROWSER=1` is set.

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Ports come from the including test crate's `free_port` (`tests/common/ports.rs`): one
// counter per process, shared with the servers the test starts.
use super::free_port;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether browser tests should run: `false` (with a printed note) when `MEDIATOR_SKIP_BROWSER=1`.
///
/// # Panics
/// When Chromium or ChromeDriver is not installed and the skip variable is not set.
pub fn required() -> bool {
    if std::env::var("MEDIATOR_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("note: MEDIATOR_SKIP_BROWSER=1: browser test skipped");
        return false;
    }
    for path in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(path).exists(),
            "{path} is not installed: run scripts/install-browser.sh (Debian's chromium and \
             chromium-driver), or set MEDIATOR_SKIP_BROWSER=1 to skip browser tests"
        );
    }
    true
}

/// Where screenshots go: `$MEDIATOR_ARTIFACTS` if set, else the test target's temp dir.
pub fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("MEDIATOR_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&dir).expect("create the artifacts dir");
    dir
}

/// A ChromeDriver process with one headless Chromium session; both end on drop.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts ChromeDriver on a free port and opens a headless session, window `width`×`height`.
    pub fn start(width: u32, height: u32) -> Result<Browser> {
        // Not `bind(:0)` and drop: another socket could take that port before ChromeDriver binds it.
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chromedriver")?;
        let profile = tempfile::tempdir()?;
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match browser.http("GET", "/status", None) {
                Ok(v) if v["value"]["ready"] == json!(true) => break,
                _ if Instant::now() > deadline => bail!("chromedriver did not become ready"),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        // The flags this machine needs: no sandbox as root, and no background network
        // traffic (the network is closed, so Chromium would stall on it).
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let reply = browser.http("POST", "/session", Some(&caps))?;
        browser.session = reply["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id in {reply}"))?
            .to_owned();
        Ok(browser)
    }

    /// One WebDriver command; an error reply becomes an `Err`.
    fn http(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        )?;
        // ChromeDriver keeps the connection open despite `Connection: close`: read the head,
        // then exactly the body its Content-Length (or chunked encoding) announces.
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let split = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                bail!("connection closed before the HTTP head ended");
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let mut payload = raw[split + 4..].to_vec();
        let length = head.lines().find_map(|l| {
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse::<usize>().ok())
        });
        let chunked = head.contains("transfer-encoding: chunked");
        loop {
            let complete = match length {
                Some(len) => payload.len() >= len,
                None if chunked => payload.ends_with(b"0\r\n\r\n"),
                None => false,
            };
            if complete {
                break;
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            payload.extend_from_slice(&buf[..n]);
        }
        if let Some(len) = length {
            payload.truncate(len);
        } else if chunked {
            payload = dechunk(&payload)?;
        }
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line: {head}"))?;
        let value: Value = serde_json::from_slice(&payload)
            .with_context(|| format!("WebDriver reply to {method} {path}"))?;
        if status != 200 {
            bail!("WebDriver {method} {path}: HTTP {status}: {value}");
        }
        Ok(value)
    }

    fn command(&self, method: &str, what: &str, body: Option<&Value>) -> Result<Value> {
        let path = format!("/session/{}{what}", self.session);
        Ok(self.http(method, &path, body)?["value"].take())
    }

    /// Loads `url` (returns when the document has loaded).
    pub fn goto(&self, url: &str) -> Result<()> {
        self.command("POST", "/url", Some(&json!({ "url": url })))
            .map(drop)
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub fn eval(&self, script: &str) -> Result<Value> {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": []})),
        )
    }

    /// Polls `script` until it returns `true`, for up to 10 s; on timeout the error carries
    /// `describe`'s value.
    pub fn wait_for(&self, what: &str, script: &str, describe: &str) -> Result<()> {
        self.wait_for_within(Duration::from_secs(10), what, script, describe)
    }

    /// [`Browser::wait_for`] with its own deadline (a real server behind a real chain).
    pub fn wait_for_within(
        &self,
        limit: Duration,
        what: &str,
        script: &str,
        describe: &str,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.eval(script)? == json!(true) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "timed out waiting for {what}; page: {}",
            self.eval(describe)?
        )
    }

    /// Resizes the window (the viewport follows in headless mode).
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        self.command(
            "POST",
            "/window/rect",
            Some(&json!({"width": width, "height": height})),
        )
        .map(drop)
    }

    /// Saves a PNG screenshot of the viewport to `artifacts_dir()/name`, prints and returns the path.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let b64 = self.command("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD.decode(
            b64.as_str()
                .ok_or_else(|| anyhow!("screenshot is not a string"))?,
        )?;
        let path = artifacts_dir().join(name);
        std::fs::write(&path, png)?;
        println!("screenshot: {}", path.display());
        Ok(path)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.http("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or_else(|| anyhow!("short chunk"))?);
        data = data.get(size + 2..).ok_or_else(|| anyhow!("short chunk"))?;
    }
}
