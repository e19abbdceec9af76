//! Real-guest tests: a busybox guest under `qemu-system-x86_64 -accel tcg` whose
//! virtio-net NIC is served by `vsnoop` over vhost-user, inside a private network
//! namespace (10.77.0.0/24 only; deleted afterwards, also on failure).
//!
//! The guest image comes from `scripts/build-guest.sh` (called automatically when
//! missing or stale). Missing tools fail the tests, they never skip. One QEMU runs
//! at a time (`guest::lock`). Run with:
//!
//! ```text
//! cargo test --release --test guest -- --test-threads=1 --nocapture
//! ```
//!
//! Guest interface: eth0 10.77.0.2/24 (MAC 52:54:00:77:00:02); host side: the tap
//! `vsnoop` creates, 10.77.0.1/24 (MAC 02:77:00:00:00:01).

mod common;

use common::guest::{
    configure_host_tap, ensure_image, iperf_mbits, lock, ping_rtt_ms, receive_from_guest,
    send_to_guest, wait_ping_guest, Backend, Guest, GuestConfig, Transfer, GUEST_IP, HOST_IP,
};
use common::{require_tool, unique, Netns, TempDir, Vsnoop};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const BLOB: usize = 32 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const XFER_TIMEOUT: Duration = Duration::from_secs(150);
const CMD_TIMEOUT: Duration = Duration::from_secs(30);

fn prerequisites() {
    for tool in [
        "ip",
        "qemu-system-x86_64",
        "busybox",
        "iperf3",
        "timeout",
        "ss",
    ] {
        require_tool(tool);
    }
    ensure_image();
}

/// Starts `vsnoop --socket SOCK --tap TAP [extra]` in `ns`, waits until it
/// listens and the tap exists, then gives the tap the host address.
fn start_vsnoop(ns: &Netns, dir: &TempDir, sock: &Path, tap: &str, run: u32) -> Vsnoop {
    let log = dir.join(&format!("vsnoop-{run}.log"));
    let sock = sock.to_str().unwrap();
    let vs = Vsnoop::spawn(ns, &["--socket", sock, "--tap", tap], &log);
    vs.wait_for_log("listening on", Duration::from_secs(20));
    ns.wait_for_link(tap, Duration::from_secs(10));
    configure_host_tap(ns, tap);
    vs
}

/// On a failing test, prints the tail of the vsnoop logs (the guest console is
/// already part of the harness's panic messages); on success, prints their
/// warnings and errors.
struct LogReport {
    logs: Vec<PathBuf>,
}

impl Drop for LogReport {
    fn drop(&mut self) {
        for log in &self.logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if thread::panicking() {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                eprintln!(
                    "--- {} (last {} lines):\n{}",
                    log.display(),
                    tail.len(),
                    tail.join("\n")
                );
            } else {
                for line in text
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                {
                    println!("{}: {line}", log.file_name().unwrap().to_string_lossy());
                }
            }
        }
    }
}

/// The guest kernel saw no broken rings or transmit timeouts.
fn guest_health(guest: &mut Guest, label: &str) {
    let out = guest.run_ok(
        "dmesg | grep -E 'is not a head|NETDEV WATCHDOG|virtio.*(error|broken|unexpected)|BUG|WARNING' || true",
        CMD_TIMEOUT,
    );
    assert!(
        out.trim().is_empty(),
        "[{label}] guest kernel complained:\n{out}"
    );
}

fn assert_vsnoop_alive(vs: &mut Vsnoop, context: &str) {
    if let Ok(Some(st)) = vs.child.try_wait() {
        panic!("{context}: vsnoop exited ({st}); log:\n{}", vs.log_text());
    }
}

/// Number of VMM connections vsnoop has accepted so far (per its log).
fn connections(vs: &Vsnoop) -> usize {
    vs.log_text().matches("frontend connected").count()
}

/// Pings both ways; returns the (host->guest, guest->host) average RTT in ms.
fn ping_both(ns: &Netns, guest: &mut Guest, label: &str) -> (f64, f64) {
    let waited = wait_ping_guest(ns, Duration::from_secs(30));
    let (ok, out) = ns.try_exec(&["busybox", "ping", "-c", "5", "-W", "2", GUEST_IP]);
    assert!(
        ok,
        "[{label}] ping host->guest failed:\n{out}\n{}",
        guest.diagnostics()
    );
    let host = ping_rtt_ms(&out).unwrap_or_else(|| panic!("no rtt in {out}"));
    let gout = guest.run_ok(&format!("ping -c 5 -W 2 {HOST_IP}"), CMD_TIMEOUT);
    let guest_rtt = ping_rtt_ms(&gout).unwrap_or_else(|| panic!("no rtt in {gout}"));
    println!(
        "[{label}] ping host->guest min/avg/max {:.2}/{:.2}/{:.2} ms, guest->host {:.2}/{:.2}/{:.2} ms \
         (first reply after {waited:.1?})",
        host.0, host.1, host.2, guest_rtt.0, guest_rtt.1, guest_rtt.2
    );
    (host.1, guest_rtt.1)
}

fn check_transfer(label: &str, dir: &str, t: &Transfer) {
    println!(
        "[{label}] {dir}: {} bytes in {:.2?} ({:.0} Mbit/s) sha256 {}",
        t.bytes,
        t.elapsed,
        t.mbit_per_s(),
        t.receiver_sha256
    );
    assert_eq!(t.bytes, BLOB, "[{label}] {dir}: byte count");
    assert_eq!(
        t.sender_sha256, t.receiver_sha256,
        "[{label}] {dir}: sha256 differs"
    );
}

/// 32 MiB host->guest and guest->host, hashes compared.
fn hash_both(ns: &Netns, guest: &mut Guest, label: &str) {
    let t = send_to_guest(ns, guest, 5001, BLOB, XFER_TIMEOUT);
    check_transfer(label, "host->guest", &t);
    let t = receive_from_guest(ns, guest, 5002, BLOB, XFER_TIMEOUT);
    check_transfer(label, "guest->host", &t);
}

/// A child process inside the namespace, killed by PID on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// iperf3 both ways (host client -> guest server, guest client -> host server);
/// returns (host->guest, guest->host) Mbit/s.
fn iperf_both(ns: &Netns, guest: &mut Guest, label: &str) -> (f64, f64) {
    let (ok, out) = ns.try_exec(&[
        "timeout", "60", "iperf3", "-c", GUEST_IP, "-t", "5", "-f", "m",
    ]);
    assert!(
        ok,
        "[{label}] iperf3 host->guest failed:\n{out}\n{}",
        guest.diagnostics()
    );
    let h2g = iperf_mbits(&out).unwrap_or_else(|| panic!("no iperf3 figure in {out}"));

    let server = Reaped(
        ns.command("iperf3")
            .args(["-s", "-1", "-B", HOST_IP, "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn iperf3 server"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns
        .try_exec(&["ss", "-Hltn", "sport = :5201"])
        .1
        .contains("5201")
    {
        assert!(
            Instant::now() < deadline,
            "host iperf3 server did not start"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let gout = guest.run_ok(
        &format!("iperf3 -c {HOST_IP} -t 5 -f m"),
        Duration::from_secs(60),
    );
    drop(server);
    let g2h = iperf_mbits(&gout).unwrap_or_else(|| panic!("no iperf3 figure in {gout}"));
    println!("[{label}] iperf3 host->guest {h2g:.0} Mbit/s, guest->host {g2h:.0} Mbit/s");
    assert!(h2g > 0.0 && g2h > 0.0, "[{label}] zero throughput");
    (h2g, g2h)
}

fn print_stats(label: &str, stats: &HashMap<String, u64>) {
    let mut keys: Vec<_> = stats.keys().collect();
    keys.sort();
    let line: Vec<String> = keys.iter().map(|k| format!("{k}={}", stats[*k])).collect();
    println!("[{label}] vsnoop stats: {}", line.join(" "));
}

/// Counters moved both ways and, when `require_no_drops`, no drop or error
/// counter moved since `baseline` (a snapshot taken before the traffic; empty
/// for a fresh vsnoop).
fn check_stats(
    vs: &mut Vsnoop,
    label: &str,
    require_no_drops: bool,
    baseline: &HashMap<String, u64>,
) -> HashMap<String, u64> {
    let stats = vs.stats();
    print_stats(label, &stats);
    let delta = |k: &str| {
        stats
            .get(k)
            .copied()
            .unwrap_or(0)
            .saturating_sub(baseline.get(k).copied().unwrap_or(0))
    };
    for key in ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"] {
        assert!(
            delta(key) > 0,
            "[{label}] stats {key} did not move; now {stats:?}, before {baseline:?}"
        );
    }
    // Drop and error counters (rx_no_buffer only means the guest was slow to refill).
    let bad = |k: &str| k.contains("drop") || k.contains("error") || k.starts_with("bad_");
    let drops: Vec<_> = stats
        .keys()
        .filter(|k| bad(k) && delta(k) > 0)
        .map(|k| (k.clone(), delta(k)))
        .collect();
    if require_no_drops {
        assert!(
            drops.is_empty(),
            "[{label}] drop/error counters moved in normal traffic: {drops:?}"
        );
    } else if !drops.is_empty() {
        println!("[{label}] note: drop/error counters after bulk traffic: {drops:?}");
    }
    stats
}

fn vhost_guest(ns: &Netns, dir: &TempDir, backend: Backend) -> Guest {
    let cfg = GuestConfig::new(backend);
    Guest::boot(ns, &cfg, &dir.path)
}

/// Harness and image check with QEMU's own tap backend (no vsnoop): the
/// reference figures the vhost-user tests can be compared with.
#[test]
fn qemu_tap_baseline() {
    prerequisites();
    let _lock = lock();
    let label = "qemu-tap";
    let ns = Netns::new("vsgt");
    let dir = TempDir::new("guest-tap");
    let tap = unique("vsgq");
    let mut guest = Guest::boot(
        &ns,
        &GuestConfig::new(Backend::Tap {
            ifname: tap.clone(),
        }),
        &dir.path,
    );
    ns.wait_for_link(&tap, Duration::from_secs(20));
    configure_host_tap(&ns, &tap);
    let boot = guest.wait_booted(BOOT_TIMEOUT);
    println!("[{label}] booted in {boot:.1?}");
    ping_both(&ns, &mut guest, label);
    hash_both(&ns, &mut guest, label);
    iperf_both(&ns, &mut guest, label);
    guest_health(&mut guest, label);
    guest.assert_alive(label);
}

/// vsnoop as the vhost-user server, QEMU connecting with reconnect=1: ping,
/// hashed transfers, iperf3 and counters; then the backend is restarted under
/// the running guest and traffic must flow again.
#[test]
fn vhost_user_traffic_and_backend_restart() {
    prerequisites();
    let _lock = lock();
    let label = "vhost-user";
    let ns = Netns::new("vsgv");
    let dir = TempDir::new("guest-vu");
    let sock = dir.join("vsnoop.sock");
    let tap = unique("vsgv");
    let _report = LogReport {
        logs: vec![dir.join("vsnoop-1.log"), dir.join("vsnoop-2.log")],
    };
    let mut vs = start_vsnoop(&ns, &dir, &sock, &tap, 1);
    let backend = Backend::VhostUserClient {
        socket: sock.clone(),
        reconnect: true,
    };
    let mut guest = vhost_guest(&ns, &dir, backend);
    let boot = guest.wait_booted(BOOT_TIMEOUT);
    println!("[{label}] booted in {boot:.1?}");
    vs.wait_for_log("frontend connected", Duration::from_secs(10));

    ping_both(&ns, &mut guest, label);
    hash_both(&ns, &mut guest, label);
    check_stats(&mut vs, label, true, &HashMap::new());
    iperf_both(&ns, &mut guest, label);
    check_stats(
        &mut vs,
        &format!("{label} after iperf3"),
        false,
        &HashMap::new(),
    );
    assert_vsnoop_alive(&mut vs, label);
    guest_health(&mut guest, label);

    // Backend restart under a running guest.
    let label = "backend-restart";
    let code = vs.terminate();
    println!("[{label}] vsnoop exit code after SIGTERM: {code:?}");
    guest.assert_alive("after stopping vsnoop");
    let mut vs = start_vsnoop(&ns, &dir, &sock, &tap, 2);
    vs.wait_for_log("frontend connected", Duration::from_secs(30));
    ping_both(&ns, &mut guest, label);
    let t = send_to_guest(&ns, &mut guest, 5003, BLOB, XFER_TIMEOUT);
    check_transfer(label, "host->guest", &t);
    let t = receive_from_guest(&ns, &mut guest, 5004, BLOB, XFER_TIMEOUT);
    check_transfer(label, "guest->host", &t);
    check_stats(&mut vs, label, true, &HashMap::new());
    assert_vsnoop_alive(&mut vs, label);
    guest_health(&mut guest, label);
    guest.assert_alive(label);
}

/// QEMU goes away and a new QEMU connects to the same running vsnoop.
#[test]
fn vhost_user_qemu_restart() {
    prerequisites();
    let _lock = lock();
    let ns = Netns::new("vsgr");
    let dir = TempDir::new("guest-qr");
    let sock = dir.join("vsnoop.sock");
    let tap = unique("vsgr");
    let _report = LogReport {
        logs: vec![dir.join("vsnoop-1.log")],
    };
    let mut vs = start_vsnoop(&ns, &dir, &sock, &tap, 1);
    let backend = Backend::VhostUserClient {
        socket: sock.clone(),
        reconnect: false,
    };

    let label = "qemu-1";
    let mut guest = vhost_guest(&ns, &dir, backend.clone());
    let boot = guest.wait_booted(BOOT_TIMEOUT);
    println!("[{label}] booted in {boot:.1?}");
    ping_both(&ns, &mut guest, label);
    let st = guest.quit();
    println!("[{label}] QEMU stopped: {st}");
    drop(guest);
    thread::sleep(Duration::from_millis(500));
    assert_vsnoop_alive(&mut vs, "after QEMU quit");

    let label = "qemu-2";
    let mut guest = vhost_guest(&ns, &dir, backend);
    let boot = guest.wait_booted(BOOT_TIMEOUT);
    println!("[{label}] booted in {boot:.1?}");
    assert_eq!(
        connections(&vs),
        2,
        "second QEMU not seen as a new connection:\n{}",
        vs.log_text()
    );
    ping_both(&ns, &mut guest, label);
    hash_both(&ns, &mut guest, label);
    check_stats(&mut vs, label, true, &HashMap::new());
    assert_vsnoop_alive(&mut vs, label);
    guest_health(&mut guest, label);
    guest.assert_alive(label);
}

/// QEMU is the vhost-user server (`server=on,wait=off`), `vsnoop --client`
/// connects; then vsnoop is restarted and connects again.
#[test]
fn vhost_user_client_mode() {
    prerequisites();
    let _lock = lock();
    let label = "client-mode";
    let ns = Netns::new("vsgc");
    let dir = TempDir::new("guest-cl");
    let sock: PathBuf = dir.join("qemu.sock");
    let tap = unique("vsgc");
    let mut guest = vhost_guest(
        &ns,
        &dir,
        Backend::VhostUserServer {
            socket: sock.clone(),
        },
    );
    guest.wait_for_path(&sock, Duration::from_secs(30));
    let log = dir.join("vsnoop-client.log");
    let mut report = LogReport {
        logs: vec![log.clone()],
    };
    let mut vs = Vsnoop::spawn(
        &ns,
        &[
            "--client",
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            &tap,
        ],
        &log,
    );
    ns.wait_for_link(&tap, Duration::from_secs(20));
    configure_host_tap(&ns, &tap);
    let boot = guest.wait_booted(BOOT_TIMEOUT);
    println!("[{label}] booted in {boot:.1?}");
    ping_both(&ns, &mut guest, label);
    hash_both(&ns, &mut guest, label);
    check_stats(&mut vs, label, true, &HashMap::new());
    assert_vsnoop_alive(&mut vs, label);

    // QEMU keeps listening: a restarted `vsnoop --client` attaches again.
    let label = "client-restart";
    let code = vs.terminate();
    println!("[{label}] vsnoop exit code after SIGTERM: {code:?}");
    guest.assert_alive("after stopping vsnoop --client");
    let log2 = dir.join("vsnoop-client-2.log");
    report.logs.push(log2.clone());
    let mut vs = Vsnoop::spawn(
        &ns,
        &[
            "--client",
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            &tap,
        ],
        &log2,
    );
    ns.wait_for_link(&tap, Duration::from_secs(20));
    configure_host_tap(&ns, &tap);
    vs.wait_for_log("frontend connected", Duration::from_secs(30));
    // vsnoop attaches at once, before the tap is up: what the guest sends in
    // that window fails to reach the tap (tx_drop_tap_write). Count from here.
    wait_ping_guest(&ns, Duration::from_secs(30));
    let baseline = vs.stats();
    print_stats(&format!("{label} baseline"), &baseline);
    ping_both(&ns, &mut guest, label);
    let t = send_to_guest(&ns, &mut guest, 5003, BLOB, XFER_TIMEOUT);
    check_transfer(label, "host->guest", &t);
    let t = receive_from_guest(&ns, &mut guest, 5004, BLOB, XFER_TIMEOUT);
    check_transfer(label, "guest->host", &t);
    check_stats(&mut vs, label, true, &baseline);
    assert_vsnoop_alive(&mut vs, label);
    guest_health(&mut guest, label);
    guest.assert_alive(label);
}
