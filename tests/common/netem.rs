//! A user-space netem between the host stack and vsnoop's tap
//! (`tests/tools/tapnetem.py`): this machine's kernel has no `sch_netem`.
//!
//! Topology inside the test's namespace:
//!
//! ```text
//! vsnoop's tap --- bridge --- tap A  [tapnetem]  tap B (10.77.0.1, HOST_MAC)
//! ```
//!
//! Frames from the host stack toward the guest (B -> A) get the impairments,
//! like `tc qdisc add dev TAP root netem ...` on the tap would give them.

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::guest::{HOST_IP, HOST_MAC};
use super::{require_tool, signal, unique, Netns};

/// A running tapnetem; stopped (by PID) on drop.
pub struct TapNetem {
    child: Child,
    log: std::path::PathBuf,
}

impl TapNetem {
    /// Bridges `tap` (vsnoop's) to a new tap pair through tapnetem started
    /// with `args` (e.g. `["--delay-ms", "20"]`), and gives the host side the
    /// host address. Call instead of `configure_host_tap`.
    pub fn start(ns: &Netns, tap: &str, args: &[&str], dir: &Path) -> TapNetem {
        require_tool("python3");
        let (bridge, a, b) = (unique("vbr"), unique("vna"), unique("vnb"));
        let log = dir.join(format!("{a}.log"));
        let child = ns
            .command("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/tools/tapnetem.py"
            ))
            .args(["--a", &a, "--b", &b])
            .args(args)
            .stdout(fs::File::create(&log).expect("create tapnetem log"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tapnetem.py");
        let netem = TapNetem { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !netem.output().contains("READY") {
            assert!(
                Instant::now() < deadline,
                "tapnetem did not start: {}",
                netem.output()
            );
            thread::sleep(Duration::from_millis(50));
        }
        ns.exec(&["ip", "link", "add", &bridge, "type", "bridge"]);
        for port in [tap, a.as_str()] {
            ns.exec(&["ip", "link", "set", port, "master", &bridge]);
            ns.exec(&["ip", "link", "set", port, "up"]);
        }
        ns.exec(&["ip", "link", "set", &bridge, "up"]);
        ns.exec(&["ip", "link", "set", &b, "address", HOST_MAC]);
        ns.exec(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", &b]);
        ns.exec(&["ip", "link", "set", &b, "up"]);
        netem
    }

    /// What tapnetem printed so far (READY, counter lines).
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks for the counters (SIGUSR1) and returns them by name.
    pub fn counters(&self) -> std::collections::HashMap<String, u64> {
        let before = self.output().matches("tapnetem ").count();
        signal(self.child.id(), 10);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.output();
            if text.matches("tapnetem ").count() > before && text.ends_with('\n') {
                let line = text
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("tapnetem "))
                    .unwrap();
                return line
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "no counters from tapnetem: {text}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TapNetem {
    fn drop(&mut self) {
        signal(self.child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(None) = self.child.try_wait() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}
