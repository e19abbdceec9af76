//! Shared helpers for the integration tests: private network namespaces and a
//! `vsnoop` process whose counters can be read.
//!
//! Every namespace is deleted on drop, also when a test panics, and every
//! process is ended by its own PID: tests never touch the root namespace.
#![allow(dead_code)]

pub mod guest;

pub mod frontend;

pub mod netem;

pub mod qmp;

pub mod sink;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short name (interface names are limited to 15 bytes).
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Fails the test (never skips) when a required tool is missing.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` is missing: run .ci/run (or install it)"
    );
}

/// A private network namespace, removed on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        require_tool("ip");
        let name = unique(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs a command inside the namespace and panics if it fails; returns stdout.
    pub fn exec(&self, argv: &[&str]) -> String {
        let mut cmd = self.command(argv[0]);
        cmd.args(&argv[1..]);
        run_ok(&mut cmd)
    }

    /// Runs a command inside the namespace, returning (success, stdout+stderr).
    pub fn try_exec(&self, argv: &[&str]) -> (bool, String) {
        let mut cmd = self.command(argv[0]);
        cmd.args(&argv[1..]);
        let out = cmd.output().expect("spawn ip netns exec");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Waits until `ifname` exists in the namespace.
    pub fn wait_for_link(&self, ifname: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.try_exec(&["ip", "link", "show", ifname]).0 {
            assert!(
                Instant::now() < deadline,
                "{ifname} did not appear in {}",
                self.name
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(&format!("vsnoop-{prefix}-")));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // VSNOOP_TEST_KEEP=1 keeps the logs, consoles and sockets of a
        // failed test for a post-mortem.
        if thread::panicking() && std::env::var_os("VSNOOP_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A running `vsnoop` daemon inside a namespace; its stderr goes to a log file.
pub struct Vsnoop {
    pub child: Child,
    pub log: PathBuf,
}

impl Vsnoop {
    /// Starts `vsnoop ARGS` inside `ns`, logging to `log`.
    pub fn spawn(ns: &Netns, args: &[&str], log: &Path) -> Vsnoop {
        let logfile = fs::File::create(log).expect("create vsnoop log");
        let child = ns
            .command(env!("CARGO_BIN_EXE_vsnoop"))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("spawn vsnoop");
        Vsnoop {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "vsnoop log never showed {needle:?}:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks for counters with SIGUSR1 and returns the per-queue-pair values
    /// (`vsnoop-stats queue=N key=value ...` lines), summed over queue pairs.
    pub fn stats(&mut self) -> HashMap<String, u64> {
        let before = self.log_text().matches("vsnoop-stats ").count();
        signal(self.child.id(), libc_sigusr1());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.log_text();
            if text.matches("vsnoop-stats-end").count() > 0
                && text.matches("vsnoop-stats ").count() > before
                && text.rfind("vsnoop-stats-end") > text.rfind("vsnoop-stats ")
            {
                return parse_stats(&text);
            }
            assert!(Instant::now() < deadline, "no stats after SIGUSR1:\n{text}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        // An exited (reaped) vsnoop's PID may belong to someone else now.
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.code();
        }
        signal(self.child.id(), 15);
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits for vsnoop to exit; kills it after `timeout`. Returns the exit
    /// status code (None when killed or ended by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vsnoop {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.terminate();
        }
    }
}

fn libc_sigusr1() -> i32 {
    10
}

/// Sends `sig` to one process we started (never a process group).
pub fn signal(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status();
}

/// Parses the last block of `vsnoop-stats` lines, summing over queue pairs.
pub fn parse_stats(text: &str) -> HashMap<String, u64> {
    let start = text.rfind("vsnoop-stats-begin").unwrap_or(0);
    let mut sums = HashMap::new();
    for line in text[start..].lines() {
        let Some(pos) = line.find("vsnoop-stats ") else {
            continue;
        };
        for field in line[pos + "vsnoop-stats ".len()..].split_whitespace() {
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            if key == "queue" {
                continue;
            }
            if let Ok(v) = value.parse::<u64>() {
                *sums.entry(key.to_string()).or_insert(0) += v;
            }
        }
    }
    sums
}
