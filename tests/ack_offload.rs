//! ACK offload with a real guest (issue 3, `../shared/docs/ack-offload.md`).
//!
//! A busybox guest under `qemu-system-x86_64 -accel tcg` whose NIC is served by
//! `vsnoop --ack-offload on --control SOCK`, inside a private network namespace
//! (10.77.0.0/24 only, removed afterwards, also on failure). The remote TCP
//! sender is the namespace's own stack (a thread that entered the namespace);
//! the receiver is the guest's `tcpsink` (`tests/tools/guest/tcpsink.c`, port
//! 5001), which reads every byte and answers with the length and SHA-256, so
//! every transfer is checked end to end.
//!
//! Two kinds of assertions:
//! - data integrity and "nothing hangs" (hashes, replies, the guest and the
//!   sender's own counters): checked at once, they fail the test immediately;
//! - the offload's own counters (`vsnoop stats --json`, object `offload`):
//!   collected by [`EngineChecks`] and reported together at the end of each
//!   test, after all data checks ran, so a missing or wrong counter never
//!   hides a data problem.
//!
//! Run: `cargo test --release --test ack_offload -- --test-threads=1` (root).
//! One QEMU at a time (`guest::lock`); timeouts are generous (TCG guest on a
//! shared 2-core machine) and nothing asserts on timing.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::guest::{
    configure_host_tap, download_to_guest, ensure_image, host_bridge, join_bridge, lock, qmp_args,
    receive_from_guest, wait_ping_guest, Backend, Guest, GuestConfig, GuestLock, GUEST_IP,
};
use common::netem::TapNetem;
use common::qmp::Qmp;
use common::sink::{self, Abort, SendOptions, SinkResult};
use common::{require_tool, unique, Netns, TempDir, Vsnoop};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
const XFER_TIMEOUT: Duration = Duration::from_secs(240);
/// How long state may take to be freed after a flow ends ("a few seconds",
/// with room for a slow TCG guest on a busy machine).
const FREE_TIMEOUT: Duration = Duration::from_secs(20);
const SINK_PORT: u16 = common::guest::SINK_PORT;

// ------------------------------------------------------------------------------------------
// Rig: namespace + vsnoop (offload on, control socket) + booted guest
// ------------------------------------------------------------------------------------------

#[derive(Default)]
struct RigOptions {
    /// tapnetem arguments; None: the host uses vsnoop's tap directly.
    netem: Option<Vec<&'static str>>,
    /// Kernel command line additions (vsnoop.sysctl=..., vsnoop.sinkargs=...).
    append: String,
    /// QEMU reconnects to the backend (for restarting vsnoop under the guest).
    reconnect: bool,
    /// QEMU serves QMP on `qmp.sock` in the scratch directory ([`Rig::qmp`]).
    qmp: bool,
    /// The host address lives on a hub bridge with vsnoop's tap as a port
    /// ([`Rig::bridge`]), so a second vsnoop's tap can join it.
    bridge: bool,
    /// Queue pairs (vsnoop `--queues`, QEMU `queues=`, one guest vCPU
    /// each); 0 means 1.
    queues: u16,
    /// Appended to QEMU's `-device virtio-net-pci,...` (e.g. `mrg_rxbuf=off`).
    device_opts: &'static str,
    /// More vsnoop arguments (e.g. `--offload-max-flows 4`).
    vsnoop_args: Vec<&'static str>,
}

/// Field order is drop order: QEMU first, then tapnetem, vsnoop, the namespace,
/// the scratch directory and last the guest lock.
struct Rig {
    guest: Guest,
    netem: Option<TapNetem>,
    vsnoop: Vsnoop,
    ns: Netns,
    dir: TempDir,
    _lock: GuestLock,
    label: String,
    tap: String,
    sock: PathBuf,
    /// Control socket of the current vsnoop (one per run: `control-N.sock`).
    control: PathBuf,
    /// Logs of every vsnoop run so far.
    logs: Vec<PathBuf>,
    run: u32,
    /// QEMU's QMP socket (with `RigOptions::qmp`).
    qmp: Option<PathBuf>,
    /// The host-side bridge (with `RigOptions::bridge`).
    bridge: Option<String>,
    /// What QEMU was started with (a migration destination starts alike).
    cfg: GuestConfig,
    /// vsnoop's arguments beyond the socket, tap, control socket and
    /// offload switch (a restarted or second vsnoop gets them too).
    vsnoop_extra: Vec<String>,
}

fn prerequisites() {
    for tool in [
        "ip",
        "qemu-system-x86_64",
        "busybox",
        "nstat",
        "ss",
        "python3",
    ] {
        require_tool(tool);
    }
    ensure_image();
}

impl Rig {
    fn start(label: &str, opts: RigOptions) -> Rig {
        prerequisites();
        let lock = lock();
        let ns = Netns::new("vsak");
        let dir = TempDir::new(&format!("ack-{label}"));
        let tap = unique("vak");
        let sock = dir.join("vhost.sock");
        let run = 1;
        let queues = opts.queues.max(1);
        let mut vsnoop_extra = vec!["--queues".to_string(), queues.to_string()];
        vsnoop_extra.extend(opts.vsnoop_args.iter().map(|a| a.to_string()));
        let (vsnoop, control, log) = spawn_vsnoop(&ns, &dir, &sock, &tap, run, &vsnoop_extra);
        let mut bridge = None;
        let netem = match &opts.netem {
            Some(args) => Some(TapNetem::start(&ns, &tap, args, &dir.path)),
            None if opts.bridge => {
                bridge = Some(host_bridge(&ns, &tap));
                None
            }
            None => {
                configure_host_tap(&ns, &tap);
                None
            }
        };
        let mut cfg = GuestConfig::new(Backend::VhostUserClient {
            socket: sock.clone(),
            reconnect: opts.reconnect,
        });
        cfg.append = opts.append.clone();
        cfg.queues = queues;
        cfg.device_opts = opts.device_opts.to_string();
        let qmp = opts.qmp.then(|| dir.join("qmp.sock"));
        if let Some(path) = &qmp {
            cfg.extra_args = qmp_args(path).to_vec();
        }
        let guest = Guest::boot(&ns, &cfg, &dir.path);
        let mut rig = Rig {
            guest,
            netem,
            vsnoop,
            ns,
            dir,
            _lock: lock,
            label: label.to_string(),
            tap,
            sock,
            control,
            logs: vec![log],
            run,
            qmp,
            bridge,
            cfg,
            vsnoop_extra,
        };
        let boot = rig.guest.wait_booted(BOOT_TIMEOUT);
        println!("[{label}] guest booted in {boot:.1?}");
        rig.vsnoop
            .wait_for_log("frontend connected", Duration::from_secs(30));
        wait_ping_guest(&rig.ns, Duration::from_secs(60));
        // The sink is up (started by /init) before the first transfer.
        let listening = rig.guest.run_ok("netstat -ltn", CMD_TIMEOUT);
        assert!(
            listening.contains(&format!(":{SINK_PORT} ")),
            "[{label}] tcpsink is not listening in the guest:\n{listening}\n{}",
            rig.guest.diagnostics()
        );
        rig
    }

    /// [`Rig::start`] and the counter checks of the test `label`.
    fn start_checked(label: &str, opts: RigOptions) -> (Rig, EngineChecks) {
        (Rig::start(label, opts), EngineChecks::new(label))
    }

    /// The end of a test: the guest is healthy and every counter check
    /// passed.
    fn finish(mut self, checks: EngineChecks) {
        self.guest_health();
        checks.finish();
    }

    /// [`Rig::start`] with QEMU's QMP socket, connected.
    fn with_qmp(label: &str, opts: RigOptions) -> (Rig, Qmp) {
        let mut rig = Rig::start(label, RigOptions { qmp: true, ..opts });
        let path = rig.qmp.clone().expect("QMP socket path");
        match Qmp::connect(&path, Duration::from_secs(30)) {
            Ok(q) => (rig, q),
            Err(e) => panic!("[{label}] QMP: {e}\n{}", rig.guest.diagnostics()),
        }
    }

    /// The output of `vsnoop SUBCOMMAND --control SOCK` with `extra` arguments.
    fn run_client(&self, subcommand: &str, extra: &[&str]) -> Vec<u8> {
        let out = Command::new(env!("CARGO_BIN_EXE_vsnoop"))
            .arg(subcommand)
            .arg("--control")
            .arg(&self.control)
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("run vsnoop {subcommand}: {e}"));
        assert!(
            out.status.success(),
            "[{}] vsnoop {subcommand} failed: {}",
            self.label,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `vsnoop SUBCOMMAND --control SOCK --json`, parsed.
    fn client_json(&self, subcommand: &str) -> Value {
        let out = self.run_client(subcommand, &["--json"]);
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "{subcommand} --json is not JSON ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        })
    }

    /// `vsnoop stats --control SOCK`, the readable form.
    fn stats_text(&self) -> String {
        String::from_utf8_lossy(&self.run_client("stats", &[])).into_owned()
    }

    /// `vsnoop stats --control SOCK --json`, parsed.
    fn stats(&self) -> Value {
        self.client_json("stats")
    }

    /// The offload's entry for the sink's flow (guest port [`SINK_PORT`])
    /// in `vsnoop ack-offload --control SOCK --json`, once `pred` holds for
    /// it (within 30 s); panics with the listing otherwise.
    fn wait_offload_flow(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let list = self.client_json("ack-offload");
            let found = list["flows"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|f| f["guest_port"] == json!(SINK_PORT) && pred(f));
            if let Some(f) = found {
                let text = self.run_client("ack-offload", &[]);
                println!(
                    "[{}] {what}:\n{}",
                    self.label,
                    String::from_utf8_lossy(&text)
                );
                return f.clone();
            }
            assert!(
                Instant::now() < deadline,
                "[{}] vsnoop ack-offload never listed the sink's flow as {what}: {list}",
                self.label
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops vsnoop (SIGTERM) and starts a new one on the same sockets and tap.
    fn restart_vsnoop(&mut self) {
        let code = self.vsnoop.terminate();
        println!("[{}] vsnoop stopped (exit {code:?})", self.label);
        self.run += 1;
        let (vsnoop, control, log) = spawn_vsnoop(
            &self.ns,
            &self.dir,
            &self.sock,
            &self.tap,
            self.run,
            &self.vsnoop_extra,
        );
        self.vsnoop = vsnoop;
        self.control = control;
        self.logs.push(log);
        configure_host_tap(&self.ns, &self.tap);
        self.vsnoop
            .wait_for_log("frontend connected", Duration::from_secs(60));
    }

    fn send(&self, len: usize, opts: &SendOptions) -> Result<SinkResult, String> {
        sink::send_with(&self.ns, GUEST_IP, SINK_PORT, len, opts)
    }

    /// Starts a transfer of `len` bytes (sent as `opts` say) on its own
    /// thread and returns once `under_way` bytes are written (panics if it
    /// never gets there within `opts.timeout`); the counter keeps counting.
    fn send_under_way(
        &self,
        len: usize,
        under_way: usize,
        opts: SendOptions,
    ) -> (
        thread::JoinHandle<Result<SinkResult, String>>,
        Arc<AtomicU64>,
    ) {
        let progress = Arc::new(AtomicU64::new(0));
        let timeout = opts.timeout;
        let handle = sink::spawn_send(
            &self.ns,
            GUEST_IP,
            SINK_PORT,
            len,
            &SendOptions {
                progress: Some(Arc::clone(&progress)),
                ..opts
            },
        );
        let deadline = Instant::now() + timeout;
        while progress.load(Ordering::Relaxed) < under_way as u64 {
            assert!(
                Instant::now() < deadline && !handle.is_finished(),
                "[{}] the transfer never got going",
                self.label
            );
            thread::sleep(Duration::from_millis(10));
        }
        (handle, progress)
    }

    /// Stops QEMU (SIGSTOP) at a moment when the guest owes early-ACKed
    /// bytes, while the transfer `handle` runs: stops, and if the stop caught
    /// nothing in flight (the guest's window was closed, or its ACKs had just
    /// caught up), continues it and tries again, up to 30 times. Returns the
    /// owed bytes and the number of stops; QEMU stays stopped. Panics with
    /// the transfer's progress when no stop caught anything.
    fn stop_guest_owing(
        &mut self,
        handle: &thread::JoinHandle<Result<SinkResult, String>>,
        progress: &AtomicU64,
    ) -> (u64, u32) {
        let qemu = self.guest.pid();
        let mut owed = 0;
        let mut attempts = 0;
        while attempts < 30 && !handle.is_finished() {
            attempts += 1;
            // SIGSTOP. The gauge is updated every 20 ms: read it once the
            // stop has taken effect, when the guest can no longer acknowledge.
            common::signal(qemu, 19);
            thread::sleep(Duration::from_millis(100));
            let until = Instant::now() + Duration::from_millis(500);
            while owed == 0 && Instant::now() < until {
                owed = off(&self.stats(), "owed_bytes").unwrap_or(0);
                thread::sleep(Duration::from_millis(25));
            }
            if owed > 0 {
                return (owed, attempts);
            }
            common::signal(qemu, 18); // SIGCONT
            thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "[{}] no stop of the guest caught early-ACKed bytes it owed \
             ({attempts} stops, {} bytes written, transfer finished: {})\n{}",
            self.label,
            progress.load(Ordering::Relaxed),
            handle.is_finished(),
            self.guest.diagnostics()
        );
    }

    /// A complete transfer that must arrive intact; panics with diagnostics.
    fn send_ok(&mut self, what: &str, len: usize, opts: &SendOptions) -> SinkResult {
        let result = self.send(len, opts);
        self.intact(what, result)
    }

    /// Waits for a transfer started on its own thread ([`Rig::send_under_way`],
    /// `sink::spawn_send`); it must arrive intact.
    fn join_ok(
        &mut self,
        what: &str,
        handle: thread::JoinHandle<Result<SinkResult, String>>,
    ) -> SinkResult {
        let result = handle.join().expect("sender thread");
        self.intact(what, result)
    }

    /// Reports a transfer that arrived intact; panics with diagnostics otherwise.
    fn intact(&mut self, what: &str, result: Result<SinkResult, String>) -> SinkResult {
        match result {
            Ok(r) => {
                println!(
                    "[{}] {what}: {} bytes hash-equal in {:.2?} ({:.1} MB/s)",
                    self.label,
                    r.len,
                    r.elapsed,
                    r.mbyte_per_s()
                );
                r
            }
            Err(e) => {
                let diag = self.guest.diagnostics();
                panic!("[{}] {what}: transfer failed: {e}\n{diag}", self.label)
            }
        }
    }

    /// The guest kernel saw no broken rings or transmit timeouts.
    fn guest_health(&mut self) {
        let out = self.guest.run_ok(
            "dmesg | grep -E 'is not a head|NETDEV WATCHDOG|virtio.*(error|broken|unexpected)|BUG|WARNING' || true",
            CMD_TIMEOUT,
        );
        assert!(
            out.trim().is_empty(),
            "[{}] guest kernel complained:\n{out}",
            self.label
        );
        self.guest.assert_alive(&self.label);
        if let Ok(Some(st)) = self.vsnoop.child.try_wait() {
            panic!(
                "[{}] vsnoop exited ({st}):\n{}",
                self.label,
                self.vsnoop.log_text()
            );
        }
    }

    /// The guest's TcpExt counters (/proc/net/netstat), by name.
    fn guest_tcpext(&mut self) -> HashMap<String, u64> {
        let text = self.guest.run_ok("cat /proc/net/netstat", CMD_TIMEOUT);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
        let mut map = HashMap::new();
        if lines.len() >= 2 {
            for (k, v) in lines[0]
                .split_whitespace()
                .skip(1)
                .zip(lines[1].split_whitespace().skip(1))
            {
                if let Ok(v) = v.parse() {
                    map.insert(k.to_string(), v);
                }
            }
        }
        map
    }

    fn host_nstat(&self) -> HashMap<String, u64> {
        sink::nstat(
            &self.ns,
            &[
                "TcpRetransSegs",
                "TcpExtPAWSEstabRejected",
                "TcpExtTCPSACKReneging",
                "TcpExtTCPLossProbes",
                "TcpExtTCPTimeouts",
            ],
        )
    }
}

impl Drop for Rig {
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
                    .filter(|l| !l.contains("not implemented yet"))
                {
                    println!("{}: {line}", log.file_name().unwrap().to_string_lossy());
                }
            }
        }
    }
}

/// Starts `vsnoop --socket SOCK --tap TAP --control control-N.sock --ack-offload on`,
/// waits until it listens and the tap exists. Returns it, its control socket and log.
fn spawn_vsnoop(
    ns: &Netns,
    dir: &TempDir,
    sock: &std::path::Path,
    tap: &str,
    run: u32,
    extra: &[String],
) -> (Vsnoop, PathBuf, PathBuf) {
    let control = dir.join(&format!("control-{run}.sock"));
    let log = dir.join(&format!("vsnoop-{run}.log"));
    let mut args = vec![
        "--socket",
        sock.to_str().unwrap(),
        "--tap",
        tap,
        "--control",
        control.to_str().unwrap(),
        "--ack-offload",
        // VSNOOP_TEST_OFFLOAD=off: the same tests with the offload off
        // (a baseline when something fails: is it the offload?).
        if std::env::var("VSNOOP_TEST_OFFLOAD").as_deref() == Ok("off") {
            "off"
        } else {
            "on"
        },
    ];
    args.extend(extra.iter().map(String::as_str));
    let vs = Vsnoop::spawn(ns, &args, &log);
    vs.wait_for_log("listening on", Duration::from_secs(20));
    ns.wait_for_link(tap, Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        assert!(
            Instant::now() < deadline,
            "control socket {} never appeared:\n{}",
            control.display(),
            vs.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    (vs, control, log)
}

// ------------------------------------------------------------------------------------------
// Offload counters
// ------------------------------------------------------------------------------------------

/// `offload.<key>` as a number.
fn off(stats: &Value, key: &str) -> Option<u64> {
    stats.get("offload")?.get(key)?.as_u64()
}

/// `offload.<map>.<reason>` (map: `offline` or `passthrough`); a reason that
/// never happened may be absent from the map (then 0) once the map exists.
fn off_reason(stats: &Value, map: &str, reason: &str) -> Option<u64> {
    let m = stats.get("offload")?.get(map)?.as_object()?;
    Some(m.get(reason).and_then(Value::as_u64).unwrap_or(0))
}

fn print_offload(label: &str, what: &str, stats: &Value) {
    match stats.get("offload") {
        Some(o) => println!("[{label}] {what}: offload {o}"),
        None => println!("[{label}] {what}: no `offload` object in stats --json"),
    }
}

/// Assertions on the offload's counters, reported together at the end.
struct EngineChecks {
    label: String,
    failures: Vec<String>,
}

impl EngineChecks {
    fn new(label: &str) -> EngineChecks {
        EngineChecks {
            label: label.to_string(),
            failures: Vec::new(),
        }
    }

    /// `offload.key`, recording a failure when it is missing.
    fn get(&mut self, stats: &Value, key: &str) -> u64 {
        match off(stats, key) {
            Some(v) => v,
            None => {
                self.fail(format!("stats --json has no offload.{key}"));
                0
            }
        }
    }

    /// `offload.map.reason`, recording a failure when the map is missing.
    fn reason(&mut self, stats: &Value, map: &str, reason: &str) -> u64 {
        match off_reason(stats, map, reason) {
            Some(v) => v,
            None => {
                self.fail(format!("stats --json has no offload.{map} object"));
                0
            }
        }
    }

    /// Early ACKs were sent and, unless `flows` is None, exactly that many
    /// flows were offloaded (counters since vsnoop started).
    fn offloaded(&mut self, stats: &Value, flows: Option<u64>) {
        let early = self.get(stats, "early_acks");
        self.check(early > 0, format!("early_acks is {early}"));
        if let Some(n) = flows {
            let offloaded = self.get(stats, "flows_offloaded");
            self.check(
                offloaded == n,
                format!("flows_offloaded is {offloaded}, not {n}"),
            );
        }
    }

    fn check(&mut self, ok: bool, msg: String) {
        if !ok {
            self.fail(msg);
        }
    }

    fn fail(&mut self, msg: String) {
        if !self.failures.contains(&msg) {
            println!("[{}] OFFLOAD CHECK FAILED: {msg}", self.label);
            self.failures.push(msg);
        }
    }

    /// Polls `offload.flows_tracked` until it is 0 (state freed).
    fn wait_flows_freed(&mut self, rig: &Rig, what: &str) {
        let start = Instant::now();
        loop {
            let stats = rig.stats();
            let Some(tracked) = off(&stats, "flows_tracked") else {
                self.fail(format!("{what}: stats --json has no offload.flows_tracked"));
                return;
            };
            if tracked == 0 {
                println!(
                    "[{}] {what}: flows_tracked 0 after {:.1?}",
                    self.label,
                    start.elapsed()
                );
                return;
            }
            if start.elapsed() > FREE_TIMEOUT {
                print_offload(&self.label, what, &stats);
                self.fail(format!(
                    "{what}: offload.flows_tracked still {tracked} after {FREE_TIMEOUT:?}"
                ));
                return;
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Panics with every recorded failure.
    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "[{}] {} ACK-offload counter check(s) failed (data integrity checks all passed):\n  - {}",
            self.label,
            self.failures.len(),
            self.failures.join("\n  - ")
        );
    }
}

/// Rule 6 checked in a vsnoop capture: every frame of the guest's side of
/// the flow on guest port `port` that went to the tap (interface 0) has
/// `ack + (window << scale)` at or below the largest edge the guest itself
/// advertised (interface 1) up to that moment.
#[derive(Debug, Default)]
struct EdgeCheck {
    /// The guest's window scale (from its SYN-ACK).
    scale: u32,
    /// Frames the guest wrote (interface 1).
    guest_acks: usize,
    /// Frames to the tap checked (interface 0).
    checked: usize,
    /// Of those, frames the guest never wrote (early ACKs).
    early: usize,
    /// Of those, frames with a zero window.
    zero_windows: usize,
    /// (time, ack, window, guest edge) of every frame past the guest's edge.
    past_edge: Vec<(String, u32, u32, u32)>,
}

impl EdgeCheck {
    fn of_capture(file: &Path, port: u16) -> EdgeCheck {
        let rows = capture_rows(
            file,
            &format!("tcp.srcport == {port}"),
            &[
                "frame.interface_id",
                "frame.packet_id",
                "tcp.flags.syn",
                "tcp.ack_raw",
                "tcp.window_size_value",
                "tcp.options.wscale.shift",
            ],
        );
        let num = |v: &str| v.parse::<u64>().ok();
        let guest_ids: HashSet<&str> = rows
            .iter()
            .filter(|r| r[1] == "1")
            .map(|r| r[2].as_str())
            .collect();
        let mut c = EdgeCheck::default();
        let mut edge: Option<u32> = None;
        for r in &rows {
            let (Some(ack), Some(win)) = (num(&r[4]), num(&r[5])) else {
                continue;
            };
            let syn = r[3] == "1";
            // A SYN-ACK's window is never scaled; its scale applies after it.
            let scale = if syn { 0 } else { c.scale };
            let this = (ack as u32).wrapping_add((win as u32) << scale);
            if syn {
                c.scale = r.get(6).and_then(|v| num(v)).unwrap_or(0) as u32;
            }
            if r[1] == "1" {
                c.guest_acks += 1;
                edge = Some(match edge {
                    Some(e) if (this.wrapping_sub(e) as i32) <= 0 => e,
                    _ => this,
                });
                continue;
            }
            c.checked += 1;
            c.early += usize::from(!guest_ids.contains(r[2].as_str()));
            c.zero_windows += usize::from(win == 0);
            match edge {
                Some(e) if (this.wrapping_sub(e) as i32) <= 0 => {}
                _ => c
                    .past_edge
                    .push((r[0].clone(), ack as u32, win as u32, edge.unwrap_or(0))),
            }
        }
        c
    }
}

/// The sender's retransmissions in a vsnoop capture, where frames cross the
/// tap (interface 0) on the flow to guest port `port`: each data frame from
/// the sender that repeats bytes it sent before, with how long before it an
/// ACK toward the sender (early, rewritten or passed) had covered its first
/// byte. A sender retransmits only what it holds unacknowledged, so a
/// retransmission of bytes acknowledged well before means the sender did not
/// take our ACK; one of bytes nobody acknowledged is the sender's own repair
/// of data the offload did not vouch for (offline, past the guest's edge).
#[derive(Default)]
struct SenderRetransmissions {
    /// Data frames from the sender.
    data_frames: usize,
    /// Frames toward the sender.
    acks: usize,
    /// Every retransmission, in time order.
    found: Vec<Retransmission>,
}

struct Retransmission {
    /// Milliseconds since the first frame of the capture.
    at_ms: f64,
    /// Sequence number relative to the sender's SYN.
    rel_seq: u32,
    /// Payload bytes.
    len: u32,
    /// Milliseconds between the first ACK toward the sender that covered
    /// the first byte and this frame; `None` if none did.
    acked_ms_before: Option<f64>,
}

impl Retransmission {
    /// "seq 2361+148 at 27.693 ms, acknowledged 0.020 ms before".
    fn describe(&self) -> String {
        let acked = match self.acked_ms_before {
            Some(ms) => format!("acknowledged {ms:.3} ms before"),
            None => "never acknowledged before".to_string(),
        };
        format!(
            "seq {}+{} at {:.3} ms, {acked}",
            self.rel_seq, self.len, self.at_ms
        )
    }
}

impl SenderRetransmissions {
    fn of_capture(file: &Path, port: u16) -> SenderRetransmissions {
        let rows = capture_rows(
            file,
            &format!("frame.interface_id == 0 && tcp.port == {port}"),
            &[
                "tcp.srcport",
                "tcp.seq_raw",
                "tcp.len",
                "tcp.ack_raw",
                "tcp.flags.syn",
            ],
        );
        let num = |v: &str| v.parse::<u64>().unwrap_or(0) as u32;
        let after = |a: u32, b: u32| (a.wrapping_sub(b) as i32) > 0;
        let start = rows.first().map_or(0, |r| epoch_ns(&r[0]));
        let mut c = SenderRetransmissions::default();
        let guest_port = port.to_string();
        let mut isn = 0;
        // The highest sequence the sender reached, and every advance of
        // the ACK toward it with its time.
        let mut sent_end: Option<u32> = None;
        let mut ack_advances: Vec<(u64, u32)> = Vec::new();
        for r in &rows {
            let t = epoch_ns(&r[0]);
            let (seq, len) = (num(&r[2]), num(&r[3]));
            if r[1] == guest_port {
                c.acks += 1;
                let ack = num(&r[4]);
                if ack_advances.last().map_or(true, |&(_, a)| after(ack, a)) {
                    ack_advances.push((t, ack));
                }
                continue;
            }
            if r[5] == "1" {
                // A new connection (the test may make several in a row).
                isn = seq;
                sent_end = None;
                ack_advances.clear();
                continue;
            }
            if len == 0 {
                continue;
            }
            c.data_frames += 1;
            let end = seq.wrapping_add(len);
            match sent_end {
                Some(e) if !after(e, seq) => sent_end = Some(end),
                Some(e) => {
                    let covered = ack_advances.iter().find(|&&(_, a)| after(a, seq));
                    c.found.push(Retransmission {
                        at_ms: t.saturating_sub(start) as f64 / 1e6,
                        rel_seq: seq.wrapping_sub(isn),
                        len,
                        acked_ms_before: covered.map(|&(ta, _)| t.saturating_sub(ta) as f64 / 1e6),
                    });
                    if after(end, e) {
                        sent_end = Some(end);
                    }
                }
                None => sent_end = Some(end),
            }
        }
        c
    }
}

/// The rows of `tshark -r FILE -Y FILTER` with the fields `frame.time_epoch`
/// and then `fields` (empty where a frame has no such field), in time order:
/// the capture writer's order is not.
fn capture_rows(file: &Path, filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-n", "-r"]).arg(file);
    cmd.args(["-Y", filter, "-T", "fields", "-e", "frame.time_epoch"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().expect("run tshark");
    assert!(
        out.status.success(),
        "tshark -r {} failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows: Vec<Vec<String>> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .filter(|r: &Vec<String>| r.len() > fields.len())
        .collect();
    rows.sort_by_key(|r| epoch_ns(&r[0]));
    rows
}

/// `frame.time_epoch` ("SECS.FRACTION") in whole nanoseconds: an f64 of
/// epoch seconds keeps only ~0.2 us.
fn epoch_ns(v: &str) -> u64 {
    let (secs, frac) = v.split_once('.').unwrap_or((v, "0"));
    let nanos = format!("{frac:0<9}");
    secs.parse::<u64>().unwrap_or(0) * 1_000_000_000 + nanos[..9].parse::<u64>().unwrap_or(0)
}

fn delta(after: &HashMap<String, u64>, before: &HashMap<String, u64>, key: &str) -> u64 {
    after
        .get(key)
        .copied()
        .unwrap_or(0)
        .saturating_sub(before.get(key).copied().unwrap_or(0))
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

/// 32 MiB host -> guest with the offload on: hash-equal; early ACKs sent,
/// guest ACKs suppressed, the flow offloaded.
#[test]
fn bulk_host_to_guest() {
    let label = "bulk";
    let (mut rig, mut checks) = Rig::start_checked(label, RigOptions::default());
    let before = rig.stats();
    print_offload(label, "before", &before);
    checks.check(
        before
            .get("offload")
            .and_then(|o| o.get("enabled"))
            .and_then(Value::as_bool)
            == Some(true),
        "offload.enabled is not true with --ack-offload on".into(),
    );
    let nst0 = rig.host_nstat();
    rig.send_ok("32 MiB", 32 * MIB, &sink_opts());
    let nst1 = rig.host_nstat();
    let after = rig.stats();
    print_offload(label, "after", &after);
    println!(
        "[{label}] sender TcpRetransSegs +{}",
        delta(&nst1, &nst0, "TcpRetransSegs")
    );
    let early = checks.get(&after, "early_acks") - off(&before, "early_acks").unwrap_or(0);
    let bytes = checks.get(&after, "early_acked_bytes");
    // Lagging guest ACKs are suppressed when they bring nothing new (or only
    // a little more window, which the next early ACK carries:
    // window_updates_deferred), and rewritten (to E) when they carry news.
    // This slow guest often closes its window (the flow is then offline and
    // its updates go out), so how many are deferred varies; a receiver that
    // keeps up is `dpdk::offload_with_a_fast_kernel_receiver`.
    let suppressed = checks.get(&after, "guest_acks_suppressed");
    let rewritten = checks.get(&after, "guest_acks_rewritten");
    let deferred = checks.get(&after, "window_updates_deferred");
    println!("[{label}] early ACKs {early}, guest ACKs suppressed {suppressed} (window updates deferred {deferred}), rewritten {rewritten}");
    checks.check(
        deferred <= suppressed,
        format!("window_updates_deferred {deferred} above guest_acks_suppressed {suppressed}"),
    );
    let offloaded = checks.get(&after, "flows_offloaded");
    checks.check(early > 0, format!("early_acks did not grow ({early})"));
    checks.check(bytes > 0, format!("early_acked_bytes is {bytes}"));
    checks.check(
        suppressed + rewritten > 0,
        format!("guest_acks_suppressed {suppressed} + guest_acks_rewritten {rewritten} is 0"),
    );
    checks.check(offloaded >= 1, format!("flows_offloaded is {offloaded}"));
    // The readable `vsnoop stats` shows the same counters (nothing moves now).
    let text = rig.stats_text();
    println!("[{label}] vsnoop stats:\n{text}");
    let again = rig.stats();
    let line = format!(
        "early ACKs {} for {} bytes ({} with ECE); guest ACKs {} suppressed ({} window updates deferred), {} rewritten",
        checks.get(&again, "early_acks"),
        checks.get(&again, "early_acked_bytes"),
        checks.get(&again, "ece_acks"),
        checks.get(&again, "guest_acks_suppressed"),
        checks.get(&again, "window_updates_deferred"),
        checks.get(&again, "guest_acks_rewritten")
    );
    checks.check(
        text.contains(&line),
        format!("`vsnoop stats` lacks {line:?}"),
    );
    rig.finish(checks);
}

/// IPv6 through a real guest: the host's tap and the guest's eth0 get
/// addresses in fd77::/64 (no duplicate address detection), and a transfer
/// to the guest's sink over IPv6 is offloaded as over IPv4: hash-equal,
/// early ACKs counted, the guest's ACKs acted on, the sender's PAWS rejects
/// 0 (its retransmissions are printed).
#[test]
fn ipv6_host_to_guest() {
    let label = "ipv6";
    let (mut rig, mut checks) = Rig::start_checked(label, RigOptions::default());
    rig.ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd77::1/64",
        "dev",
        &rig.tap,
        "nodad",
    ]);
    rig.guest.run_ok(
        "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad && ip -6 addr add fd77::2/64 dev eth0",
        CMD_TIMEOUT,
    );
    // Neighbour discovery through vsnoop before the transfer's handshake.
    let start = Instant::now();
    while !rig
        .ns
        .try_exec(&["busybox", "ping", "-6", "-c", "1", "-W", "1", "fd77::2"])
        .0
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "[{label}] the guest never answered a ping over IPv6\n{}",
            rig.guest.diagnostics()
        );
    }
    let before = rig.stats();
    let nst0 = rig.host_nstat();
    let result = sink::send_with(&rig.ns, "[fd77::2]", SINK_PORT, 32 * MIB, &sink_opts());
    rig.intact("32 MiB over IPv6", result);
    let nst1 = rig.host_nstat();
    let after = rig.stats();
    print_offload(label, "after", &after);
    let grew =
        |key: &str, c: &mut EngineChecks| c.get(&after, key) - off(&before, key).unwrap_or(0);
    let early = grew("early_acks", &mut checks);
    let offloaded = grew("flows_offloaded", &mut checks);
    let acted_on =
        grew("guest_acks_suppressed", &mut checks) + grew("guest_acks_rewritten", &mut checks);
    checks.check(early > 0, format!("no early ACKs over IPv6 ({early})"));
    checks.check(
        offloaded == 1,
        format!("flows_offloaded grew by {offloaded}, not 1"),
    );
    checks.check(
        acted_on > 0,
        "no guest ACK suppressed or rewritten over IPv6".to_string(),
    );
    let paws = delta(&nst1, &nst0, "TcpExtPAWSEstabRejected");
    checks.check(paws == 0, format!("sender PAWS rejects +{paws}"));
    println!(
        "[{label}] sender TcpRetransSegs +{}",
        delta(&nst1, &nst0, "TcpRetransSegs")
    );
    rig.finish(checks);
}

/// Through tapnetem (loss 1 %, reorder 5 %, duplicate 1 %, host -> guest):
/// hash-equal; the flow goes offline on holes and back online (early ACKs
/// keep growing in a later transfer through the same impairments).
#[test]
fn netem_loss_reorder_duplicate() {
    let label = "netem";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            // Reordered frames skip the delay (netem semantics), so reordering
            // needs a delay to overtake.
            netem: Some(vec![
                "--delay-ms",
                "2",
                "--loss",
                "1",
                "--reorder",
                "5",
                "--duplicate",
                "1",
            ]),
            ..RigOptions::default()
        },
    );
    let nst0 = rig.host_nstat();
    rig.send_ok("transfer 1 (16 MiB)", 16 * MIB, &sink_opts());
    let s1 = rig.stats();
    print_offload(label, "after transfer 1", &s1);
    let hole1 = checks.reason(&s1, "offline", "hole");
    let early1 = checks.get(&s1, "early_acks");
    checks.check(
        hole1 > 0,
        format!("offline.hole is {hole1} after loss/reordering"),
    );
    checks.check(
        early1 > 0,
        format!("early_acks is {early1} after transfer 1"),
    );

    rig.send_ok("transfer 2 (16 MiB)", 16 * MIB, &sink_opts());
    let s2 = rig.stats();
    print_offload(label, "after transfer 2", &s2);
    let early2 = checks.get(&s2, "early_acks");
    let hole2 = checks.reason(&s2, "offline", "hole");
    checks.check(
        early2 > early1,
        format!(
            "early_acks did not grow after going offline ({early1} -> {early2}): never back online"
        ),
    );
    checks.check(
        hole2 >= hole1,
        format!("offline.hole went backwards ({hole1} -> {hole2})"),
    );
    let nst1 = rig.host_nstat();
    println!(
        "[{label}] sender TcpRetransSegs +{}",
        delta(&nst1, &nst0, "TcpRetransSegs")
    );
    let netem = rig.netem.as_ref().unwrap().counters();
    println!("[{label}] tapnetem {netem:?}");
    for key in ["dropped", "reordered", "duplicated"] {
        assert!(
            netem.get(key).copied().unwrap_or(0) > 0,
            "[{label}] tapnetem {key} is 0: the impairment did not happen ({netem:?})"
        );
    }
    rig.finish(checks);
}

/// Without mergeable RX buffers (`mrg_rxbuf=off`) a Linux guest that
/// negotiated TSO posts "big packet" chains: a header descriptor and one
/// descriptor per page, 64 KiB per chain. vsnoop writes each 64 KiB GSO
/// frame into one such chain, the offload keeps its custody copy across the
/// chain's pages and acknowledges it early: hash-equal, early ACKs counted.
#[test]
fn big_packet_chains_without_mergeable_buffers() {
    let label = "no-mrg";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            device_opts: "mrg_rxbuf=off",
            ..RigOptions::default()
        },
    );
    let log = rig.vsnoop.log_text();
    assert!(
        log.contains("mergeable false"),
        "[{label}] the guest negotiated mergeable buffers anyway:\n{log}"
    );
    rig.send_ok("32 MiB", 32 * MIB, &sink_opts());
    let s = rig.stats();
    print_offload(label, "after", &s);
    checks.offloaded(&s, Some(1));
    let q = &s["queues"][0];
    println!(
        "[{label}] rx {} packets, rx_bounced {}, rx_no_buffer {}",
        q["rx_packets"], q["rx_bounced"], q["rx_no_buffer"]
    );
    rig.finish(checks);
}

/// A guest without receive checksum offload (`guest_csum=off` and the
/// features that depend on it): the tap then hands over frames whose
/// checksum nobody has checked (no DATA_VALID, no NEEDS_CSUM), and rule 4
/// makes vsnoop verify each segment's TCP checksum itself before it
/// acknowledges it early. Every segment is good: hash-equal, early ACKs
/// counted, no `bad_checksum` offline transition.
#[test]
fn guest_without_checksum_offload_gets_verified_segments() {
    let label = "no-csum";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            device_opts: "guest_csum=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off",
            ..RigOptions::default()
        },
    );
    rig.send_ok("16 MiB", 16 * MIB, &sink_opts());
    let s = rig.stats();
    print_offload(label, "after", &s);
    let early = checks.get(&s, "early_acks");
    let bad = checks.reason(&s, "offline", "bad_checksum");
    let verified = checks.get(&s, "checksums_verified");
    checks.check(early > 0, format!("early_acks is {early}"));
    checks.check(
        verified >= early,
        format!("checksums_verified is {verified} for {early} early ACKs: who checked the rest?"),
    );
    checks.check(
        bad == 0,
        format!("offline.bad_checksum is {bad} for good segments"),
    );
    // Without TSO toward the guest the tap hands over single segments.
    // Rule 12: one early ACK per flow per RX batch (or per 64 KB of it), not
    // one per segment: 0.036 per frame measured (one per two segments gave
    // 0.496, one per segment 0.999).
    let frames: u64 = (0..)
        .map_while(|i| s["queues"].get(i))
        .map(|q| q["rx_packets"].as_u64().unwrap_or(0))
        .sum();
    println!("[{label}] {early} early ACKs for {frames} frames from the tap");
    checks.check(
        early * 4 <= frames,
        format!("{early} early ACKs for {frames} single segments: not one per batch (rule 12)"),
    );
    rig.finish(checks);
}

/// Jumbo frames: MTU 9000 on the guest's eth0 (`vsnoop.mtu=9000`) and on
/// the host's tap, so the host's segments carry 8948 bytes each and the
/// guest's own frames are up to 9000 bytes. Both directions hash-equal,
/// the transfer toward the guest offloaded.
#[test]
fn jumbo_mtu_9000_both_ways() {
    let label = "jumbo";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            append: "vsnoop.mtu=9000".into(),
            ..RigOptions::default()
        },
    );
    rig.ns.exec(&["ip", "link", "set", &rig.tap, "mtu", "9000"]);
    let mtu = rig.guest.run_ok("cat /sys/class/net/eth0/mtu", CMD_TIMEOUT);
    assert_eq!(mtu.trim(), "9000", "[{label}] guest MTU");
    rig.send_ok("16 MiB toward the guest", 16 * MIB, &sink_opts());
    let t = receive_from_guest(&rig.ns, &mut rig.guest, 5002, 16 * MIB, XFER_TIMEOUT);
    assert_eq!(t.bytes, 16 * MIB, "[{label}] byte count from the guest");
    assert_eq!(
        t.sender_sha256, t.receiver_sha256,
        "[{label}] sha256 of the guest's stream differs"
    );
    println!(
        "[{label}] from the guest: {} bytes in {:.2?}",
        t.bytes, t.elapsed
    );
    let s = rig.stats();
    print_offload(label, "after", &s);
    checks.offloaded(&s, None);
    let q = &s["queues"][0];
    for key in [
        "rx_drop_frame_too_large",
        "tx_drop_too_large",
        "rx_tap_read_errors",
    ] {
        checks.check(q[key] == 0, format!("{key} is {}", q[key]));
    }
    rig.finish(checks);
}

/// A full flow table (rule 14) with real stacks: vsnoop tracks at most 4
/// flows (`--offload-max-flows 4`) and 8 transfers start at once. Flows
/// that find the table full pass through; every transfer is hash-equal,
/// at most 4 are offloaded, and `table_full` counts the rest.
#[test]
fn full_flow_table_passes_new_flows_through() {
    let label = "table-full";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            vsnoop_args: vec!["--offload-max-flows", "4"],
            ..RigOptions::default()
        },
    );
    let handles: Vec<_> = (0..8)
        .map(|_| sink::spawn_send(&rig.ns, GUEST_IP, SINK_PORT, 2 * MIB, &sink_opts()))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        rig.join_ok(&format!("transfer {i} (2 MiB)"), h);
    }
    let s = rig.stats();
    print_offload(label, "after", &s);
    let offloaded = checks.get(&s, "flows_offloaded");
    let full = checks.reason(&s, "passthrough", "table_full");
    let tracked = checks.get(&s, "flows_tracked");
    checks.check(
        (1..=4).contains(&offloaded),
        format!("flows_offloaded is {offloaded} with a table of 4"),
    );
    checks.check(
        full >= 4,
        format!("passthrough.table_full is {full} for 8 flows"),
    );
    checks.check(tracked <= 4, format!("flows_tracked is {tracked} > 4"));
    rig.finish(checks);
}

/// The guest resets the device mid-transfer: its virtio-net driver is
/// unbound and bound again (`/sys/bus/virtio/drivers/virtio_net`), so QEMU
/// stops the rings, the driver frees the RX buffers it had not processed
/// (data vsnoop may have acknowledged early) and posts new ones. The TCP
/// connection lives on in the guest's stack; the transfer must complete
/// hash-equal, whatever the discarded buffers held (custody re-delivers
/// what the sender was told had arrived).
#[test]
fn driver_rebind_mid_transfer() {
    let label = "rebind";
    let (mut rig, mut checks) = Rig::start_checked(label, RigOptions::default());
    let (handle, progress) = rig.send_under_way(24 * MIB, 2 * MIB, paced(10));
    let before = rig.stats();
    print_offload(label, "before the rebind", &before);
    let out = rig.guest.run_ok(
        "d=$(basename $(readlink /sys/class/net/eth0/device)) && \
         echo $d > /sys/bus/virtio/drivers/virtio_net/unbind && sleep 1 && \
         echo $d > /sys/bus/virtio/drivers/virtio_net/bind && sleep 1 && \
         ip addr add 10.77.0.2/24 dev eth0 && ip link set eth0 up && echo rebound $d",
        CMD_TIMEOUT,
    );
    assert!(out.contains("rebound"), "[{label}] rebind: {out}");
    println!(
        "[{label}] driver rebound at {} bytes written",
        progress.load(Ordering::Relaxed)
    );
    rig.join_ok("transfer across the rebind", handle);
    let after = rig.stats();
    print_offload(label, "after", &after);
    checks.offloaded(&after, Some(1));
    println!(
        "[{label}] re-delivered {} bytes in {} attempts, resets {}",
        checks.get(&after, "redelivered_bytes"),
        checks.get(&after, "redeliveries"),
        checks.get(&after, "resets")
    );
    rig.send_ok("4 MiB after the rebind", 4 * MIB, &sink_opts());
    rig.finish(checks);
}

/// vsnoop's custody dies with the process, so on SIGTERM it stops early
/// ACKs and waits (`--shutdown-drain-ms`) for the guest to acknowledge what
/// was acknowledged on its behalf. Here the guest cannot (QEMU stopped) when
/// the signal comes, with early-ACKed bytes in its ring; vsnoop keeps
/// running until QEMU continues and the guest has confirmed them, then
/// exits 0. A second vsnoop takes over and the transfer completes
/// hash-equal.
#[test]
fn shutdown_waits_for_the_guest_to_confirm_early_acked_bytes() {
    let label = "shutdown";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            reconnect: true,
            vsnoop_args: vec!["--shutdown-drain-ms", "20000"],
            ..RigOptions::default()
        },
    );
    let qemu = rig.guest.pid();
    // Paced below what the guest reads, so its window stays open and a stop
    // catches segments in flight: they land in posted RX buffers, are
    // acknowledged early, and stay owed while the guest cannot run. (Unpaced,
    // the guest's window is often closed at the stop and the transfer may end
    // before a stop catches anything.)
    let (handle, progress) = rig.send_under_way(64 * MIB, 2 * MIB, paced(5));
    let (owed, attempts) = rig.stop_guest_owing(&handle, &progress);
    println!(
        "[{label}] QEMU stopped at attempt {attempts}, {} bytes written",
        progress.load(Ordering::Relaxed)
    );
    println!("[{label}] QEMU stopped with {owed} bytes owed");
    common::signal(rig.vsnoop.child.id(), 15);
    rig.vsnoop
        .wait_for_log("shutdown: waiting up to", Duration::from_secs(10));
    thread::sleep(Duration::from_millis(500));
    let still_running = rig.vsnoop.child.try_wait().ok().flatten().is_none();
    common::signal(qemu, 18); // SIGCONT
    let code = rig.vsnoop.wait_exit(Duration::from_secs(30));
    let log = rig.vsnoop.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("shutdown:")).collect();
    println!("[{label}] {lines:#?}");
    checks.check(
        still_running,
        "vsnoop exited while the stopped guest still owed bytes".to_string(),
    );
    checks.check(
        code == Some(0)
            && lines
                .iter()
                .any(|l| l.contains("acknowledged every early-ACKed byte")),
        format!("vsnoop exit {code:?} without a completed drain: {lines:?}"),
    );
    rig.restart_vsnoop();
    rig.join_ok("64 MiB across the shutdown", handle);
    rig.finish(checks);
}

/// The custody budget runs out (`--custody-budget-mb 1`) with four
/// parallel transfers toward a guest that keeps stopping (QEMU in a 20 ms
/// run / 60 ms stop cycle, so early-ACKed bytes pile up; 1024 RX
/// descriptors, so the ring can hold more than the budget): flows that find
/// no budget go offline (`custody_budget`) instead of being acknowledged
/// without a copy, custody never exceeds the budget, and every transfer is
/// hash-equal.
#[test]
fn custody_budget_exhausted() {
    let label = "budget";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            vsnoop_args: vec!["--custody-budget-mb", "1"],
            device_opts: "rx_queue_size=1024",
            // 1 MiB receive buffers from the start: wider windows to fill
            // while the guest is stopped.
            append: "vsnoop.sysctl=net.ipv4.tcp_rmem=4096:1048576:8388608".into(),
            ..RigOptions::default()
        },
    );
    let qemu = rig.guest.pid();
    let mut peak = 0;
    let mut short = 0;
    let mut round = 0;
    // How far custody grows depends on how open the guest's windows are at
    // each stop: a round may end without running out, so up to three.
    while short == 0 && round < 3 {
        round += 1;
        let handles: Vec<_> = (0..4)
            .map(|_| sink::spawn_send(&rig.ns, GUEST_IP, SINK_PORT, 16 * MIB, &sink_opts()))
            .collect();
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end && handles.iter().any(|h| !h.is_finished()) {
            thread::sleep(Duration::from_millis(20));
            common::signal(qemu, 19); // SIGSTOP
            thread::sleep(Duration::from_millis(60));
            peak = peak.max(off(&rig.stats(), "custody_bytes").unwrap_or(0));
            common::signal(qemu, 18); // SIGCONT
        }
        common::signal(qemu, 18);
        for (i, h) in handles.into_iter().enumerate() {
            rig.join_ok(&format!("round {round}, transfer {i} (16 MiB)"), h);
        }
        let s = rig.stats();
        print_offload(label, "after", &s);
        short = checks.reason(&s, "offline", "custody_budget");
        println!(
            "[{label}] round {round}: custody peak seen {peak} bytes, offline.custody_budget {short}"
        );
    }
    checks.check(
        short > 0,
        format!("no flow ever ran out of custody budget in {round} rounds"),
    );
    checks.check(
        peak <= 1 << 20,
        format!("custody held {peak} bytes, over the 1 MiB budget"),
    );
    rig.finish(checks);
}

/// A download the guest starts (its SYN first: the flow is learned the
/// other way round, with the guest as the initiator): 16 MiB from a
/// one-shot HTTP server on the host side, fetched by the guest's busybox
/// `wget`, offloaded and hash-equal.
#[test]
fn guest_initiated_download() {
    let label = "download";
    let (mut rig, mut checks) = Rig::start_checked(label, RigOptions::default());
    let t = download_to_guest(&rig.ns, &mut rig.guest, 5003, 16 * MIB, XFER_TIMEOUT);
    println!(
        "[{label}] {} bytes in {:.2?} ({:.0} Mbit/s)",
        t.bytes,
        t.elapsed,
        t.mbit_per_s()
    );
    assert_eq!(t.bytes, 16 * MIB, "[{label}] byte count in the guest");
    assert_eq!(
        t.sender_sha256, t.receiver_sha256,
        "[{label}] sha256 of the download differs"
    );
    let s = rig.stats();
    print_offload(label, "after", &s);
    checks.offloaded(&s, Some(1));
    rig.finish(checks);
}

/// Two queue pairs with a real two-vCPU guest (vsnoop `--queues 2`, QEMU
/// `queues=2,mq=on`): the guest enables both pairs, the tap spreads the
/// host's flows over its two queues by flow hash, and the offload engine,
/// shared by both workers, offloads every flow. Rounds of four parallel
/// transfers run until both queue pairs have carried data toward the guest
/// (each round misses one with probability 1/8); every transfer is
/// hash-equal.
#[test]
fn multiqueue_flows_on_both_queue_pairs() {
    let label = "mq";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            queues: 2,
            ..RigOptions::default()
        },
    );
    let queues = rig
        .guest
        .run_ok("ls /sys/class/net/eth0/queues", CMD_TIMEOUT);
    assert!(
        queues.contains("rx-1") && queues.contains("tx-1"),
        "[{label}] the guest did not enable the second queue pair: {queues}"
    );
    let rx_of = |s: &Value, i: usize| s["queues"][i]["rx_packets"].as_u64().unwrap_or(0);
    let before = rig.stats();
    let mut transfers = 0u64;
    for round in 1..=5 {
        let handles: Vec<_> = (0..4)
            .map(|_| sink::spawn_send(&rig.ns, GUEST_IP, SINK_PORT, 8 * MIB, &sink_opts()))
            .collect();
        for h in handles {
            rig.join_ok(&format!("round {round}, 8 MiB"), h);
            transfers += 1;
        }
        let s = rig.stats();
        if (0..2).all(|i| rx_of(&s, i) > rx_of(&before, i) + 100) {
            break;
        }
    }
    let after = rig.stats();
    print_offload(label, "after", &after);
    for i in 0..2 {
        let q = &after["queues"][i];
        println!(
            "[{label}] queue pair {i}: rx {} packets, tx {}, offload frames sent {}",
            q["rx_packets"], q["tx_packets"], q["offload_frames_sent"]
        );
        checks.check(
            rx_of(&after, i) > rx_of(&before, i) + 100,
            format!("queue pair {i} carried no data toward the guest in {transfers} transfers"),
        );
    }
    checks.offloaded(&after, Some(transfers));
    rig.finish(checks);
}

/// ECN (rule 11) with real stacks: the sender asks for ECN (its namespace's
/// `net.ipv4.tcp_ecn=1`; the guest accepts, Linux's default), and tapnetem
/// marks 2 % of the ECN-capable frames toward the guest CE, as an AQM
/// router would. The flow is offloaded (classic ECN is allowed), early ACKs
/// echo the marks with ECE (`ece_acks`), the sender sees them
/// (TcpExtTCPDeliveredCE grows) and the transfer is hash-equal.
#[test]
fn ecn_ce_marks_are_echoed() {
    let label = "ecn";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            netem: Some(vec!["--ce", "2"]),
            ..RigOptions::default()
        },
    );
    rig.ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_ecn=1"]);
    let nst0 = sink::nstat(&rig.ns, &["TcpExtTCPDeliveredCE"]);
    let r = rig.send_ok("16 MiB with CE marks", 16 * MIB, &sink_opts());
    let nst1 = sink::nstat(&rig.ns, &["TcpExtTCPDeliveredCE"]);
    let s = rig.stats();
    print_offload(label, "after", &s);
    let netem = rig.netem.as_ref().unwrap().counters();
    println!("[{label}] tapnetem {netem:?}");
    assert_eq!(
        r.negotiated.map(|n| n.ecn),
        Some(true),
        "[{label}] the connection did not negotiate ECN"
    );
    let marked = netem.get("ce_marked").copied().unwrap_or(0);
    assert!(
        marked > 0,
        "[{label}] tapnetem marked nothing CE ({netem:?})"
    );
    let offloaded = checks.get(&s, "flows_offloaded");
    let early = checks.get(&s, "early_acks");
    let ece = checks.get(&s, "ece_acks");
    checks.check(offloaded == 1, format!("flows_offloaded is {offloaded}"));
    checks.check(
        ece > 0 && ece <= early,
        format!("ece_acks is {ece} of {early} early ACKs after {marked} CE marks"),
    );
    let seen = delta(&nst1, &nst0, "TcpExtTCPDeliveredCE");
    checks.check(
        seen > 0,
        "the sender's TcpExtTCPDeliveredCE did not grow: no ECE reached it".to_string(),
    );
    println!("[{label}] {marked} CE marks, {ece} of {early} early ACKs with ECE, sender TCPDeliveredCE +{seen}");
    rig.finish(checks);
}

/// A guest that drops data the backend already acknowledged: tcpsink with a
/// tiny SO_RCVBUF (`-r 2048`) reading one byte per read() (`-c 1`), fed many
/// tiny segments: TCP_NODELAY 64-byte writes, and a host route with MTU 200
/// and `gso_max_segs 1` on the tap, so every segment reaches the guest on its
/// own with at most 148 bytes of payload. Each such segment costs the guest a
/// whole receive buffer of memory, so it overruns its SO_RCVBUF and drops
/// in-window data (TcpExt TCPRcvQDrop / RcvPruned / OfoPruned; without the
/// offload the sender retransmits it). The transfer must complete
/// hash-equal, the drops must be re-delivered (counted), and vsnoop's
/// capture must show no sender retransmission of bytes nobody had
/// acknowledged: custody, not the sender, repaired the drops.
#[test]
fn guest_drops_early_acked_data() {
    let label = "drops";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            append: "vsnoop.sinkargs=-r,2048,-c,1".into(),
            ..RigOptions::default()
        },
    );
    let route = format!("{GUEST_IP}/32");
    rig.ns.exec(&[
        "ip", "route", "replace", &route, "dev", &rig.tap, "mtu", "lock", "200",
    ]);
    rig.ns
        .exec(&["ip", "link", "set", "dev", &rig.tap, "gso_max_segs", "1"]);
    let sink_ps = rig.guest.run_ok("ps | grep '[t]cpsink'", CMD_TIMEOUT);
    assert!(
        sink_ps.contains("-r 2048 -c 1"),
        "[{label}] vsnoop.sinkargs did not reach tcpsink: {sink_ps}"
    );
    let opts = SendOptions {
        write_chunk: 64,
        nodelay: true,
        ..sink_opts()
    };
    // The guest drops in 10 of 10 runs here (2-14 segments), fewer on a busy
    // machine: up to three transfers, until one made it drop.
    let cap = rig.dir.join("drops.pcapng");
    let cap_arg = cap.to_str().expect("UTF-8 path");
    rig.run_client("capture", &["start", cap_arg, "--snaplen", "128"]);
    let mut round = 0;
    let (s0, s1, nst0, nst1, dropped) = loop {
        round += 1;
        let g0 = rig.guest_tcpext();
        let nst0 = rig.host_nstat();
        let s0 = rig.stats();
        rig.send_ok("256 KiB in 64-byte writes", 256 * 1024, &opts);
        let s1 = rig.stats();
        let nst1 = rig.host_nstat();
        let g1 = rig.guest_tcpext();
        print_offload(label, "after", &s1);
        let guest_drops: Vec<String> = [
            "PruneCalled",
            "RcvPruned",
            "OfoPruned",
            "TCPRcvQDrop",
            "TCPZeroWindowDrop",
            "TCPBacklogDrop",
            "TCPRcvCollapsed",
        ]
        .iter()
        .map(|k| format!("{k}+{}", delta(&g1, &g0, k)))
        .collect();
        println!(
            "[{label}] transfer {round}: guest TcpExt: {}",
            guest_drops.join(" ")
        );
        // Overlapping counters (one drop may count in two): only "any" matters.
        let dropped: u64 = ["TCPRcvQDrop", "RcvPruned", "OfoPruned"]
            .iter()
            .map(|k| delta(&g1, &g0, k))
            .sum();
        if dropped > 0 || round == 3 {
            break (s0, s1, nst0, nst1, dropped);
        }
    };
    assert!(
        dropped > 0,
        "[{label}] the guest dropped nothing in {round} transfers: the test did not test anything"
    );
    let stopped = String::from_utf8_lossy(&rig.run_client("capture", &["stop"])).into_owned();
    let retransmissions = SenderRetransmissions::of_capture(&cap, SINK_PORT);
    let retransmitted: Vec<String> = retransmissions
        .found
        .iter()
        .map(Retransmission::describe)
        .collect();
    println!(
        "[{label}] capture: {} data frames from the sender, {} frames to it; retransmitted: [{}]",
        retransmissions.data_frames,
        retransmissions.acks,
        retransmitted.join("; ")
    );
    let retrans = delta(&nst1, &nst0, "TcpRetransSegs");
    let mut more = |k: &str| checks.get(&s1, k).saturating_sub(off(&s0, k).unwrap_or(0));
    let redelivered = more("redelivered_bytes");
    let redeliveries = more("redeliveries");
    let early = more("early_acked_bytes");
    println!(
        "[{label}] guest drop counters +{dropped}; redelivered_bytes +{redelivered}, redeliveries \
         +{redeliveries}, early_acked_bytes +{early}; sender TcpRetransSegs +{retrans} \
         (loss probes +{}, timeouts +{})",
        delta(&nst1, &nst0, "TcpExtTCPLossProbes"),
        delta(&nst1, &nst0, "TcpExtTCPTimeouts"),
    );
    checks.check(
        redeliveries > 0 && redelivered > 0,
        format!("the guest's drop counters grew by {dropped} and nothing was re-delivered"),
    );
    // The drops were custody's to repair: no byte the sender retransmitted
    // may be one nobody had acknowledged (the sender's own repair of a drop,
    // every one of them with the offload off). A loss probe of a byte
    // acknowledged early is allowed: the sender's probe timer (2 srtt +
    // 2 ms, with srtt in microseconds) fired while the early ACK was on its
    // way, so the probe crossed it in the tap (0.003-0.02 ms after it here,
    // about one run in five on a loaded machine).
    checks.check(
        stopped.contains(" 0 dropped,"),
        format!("the capture lost frames ({stopped}): the retransmission check needs every frame"),
    );
    let needed: Vec<&Retransmission> = retransmissions
        .found
        .iter()
        .filter(|r| r.acked_ms_before.is_none())
        .collect();
    checks.check(
        retransmissions.data_frames > 0 && retransmissions.acks > 0,
        format!(
            "the capture holds {} data frames and {} ACKs of the flow",
            retransmissions.data_frames, retransmissions.acks
        ),
    );
    checks.check(
        needed.is_empty(),
        format!(
            "the sender retransmitted {} segments nobody had acknowledged (early_acked_bytes \
             +{early}): the sender, not custody, repaired drops; first: {}",
            needed.len(),
            needed.first().map(|r| r.describe()).unwrap_or_default()
        ),
    );
    let resets = checks.get(&s1, "resets");
    checks.check(
        resets == 0,
        format!("offload.resets is {resets}: custody gave up"),
    );
    rig.finish(checks);
}

/// The guest's vCPU waits for the CPU (QEMU stopped with SIGSTOP) while
/// early-ACKed data sits in its ring: for 3 s at once, stopped when it owes
/// bytes (custody times out and re-delivers), then in a 20 ms run / 80 ms
/// stop cycle; then short transfers on connections that idled 300 ms after
/// the handshake, under a 10 ms run / 190 ms stop cycle (how connections
/// were reset before: the custody timer ran from the handshake and D-SACKs
/// of our own re-deliveries counted as failures). The data in the ring is the guest's own, it was only
/// not looked at: every transfer completes hash-equal and custody never gives
/// up (no RST), however long the wait.
#[test]
fn descheduled_guest() {
    let label = "descheduled";
    let (mut rig, mut checks) = Rig::start_checked(label, RigOptions::default());
    let s0 = rig.stats();
    let qemu = rig.guest.pid();
    // Paced, so the guest's window is open when it stops (see
    // `stop_guest_owing`): only bytes already acknowledged early can time out.
    let (handle, progress) = rig.send_under_way(16 * MIB, 2 * MIB, paced(5));
    let (owed, attempts) = rig.stop_guest_owing(&handle, &progress);
    println!("[{label}] QEMU stopped for 3 s at attempt {attempts} with {owed} bytes owed");
    thread::sleep(Duration::from_secs(3));
    common::signal(qemu, 18); // SIGCONT
    let cycle_end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < cycle_end && !handle.is_finished() {
        thread::sleep(Duration::from_millis(20));
        common::signal(qemu, 19);
        thread::sleep(Duration::from_millis(80));
        common::signal(qemu, 18);
    }
    common::signal(qemu, 18);
    let r = handle.join().expect("sender thread");
    match r {
        Ok(r) => println!(
            "[{label}] 16 MiB hash-equal in {:.2?} across the stops",
            r.elapsed
        ),
        Err(e) => {
            let diag = rig.guest.diagnostics();
            panic!("[{label}] transfer across the stops failed: {e}\n{diag}")
        }
    }

    let cycling = Arc::new(AtomicBool::new(true));
    let stopper = {
        let cycling = Arc::clone(&cycling);
        thread::spawn(move || {
            while cycling.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(10));
                common::signal(qemu, 19);
                thread::sleep(Duration::from_millis(190));
                common::signal(qemu, 18);
            }
            common::signal(qemu, 18);
        })
    };
    let idle = SendOptions {
        idle_after_connect: Some(Duration::from_millis(300)),
        timeout: XFER_TIMEOUT,
        ..sink_opts()
    };
    let results: Vec<_> = (0..6).map(|_| rig.send(256 * 1024, &idle)).collect();
    cycling.store(false, Ordering::Relaxed);
    stopper.join().expect("stopper thread");
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(r) => println!(
                "[{label}] idle connection {i}: 256 KiB hash-equal in {:.2?}",
                r.elapsed
            ),
            Err(e) => checks.fail(format!("idle connection {i} under the stop cycle: {e}")),
        }
    }
    let s1 = rig.stats();
    print_offload(label, "after", &s1);
    let early = checks.get(&s1, "early_acks") - off(&s0, "early_acks").unwrap_or(0);
    let timeouts = checks.reason(&s1, "offline", "redelivery_timeout");
    let resets = checks.get(&s1, "resets");
    println!("[{label}] early ACKs +{early}, custody timeouts {timeouts}, resets {resets}");
    checks.check(early > 0, "no early ACKs".into());
    checks.check(
        timeouts > 0,
        "custody never timed out during a 3 s stop (the test did not exercise it)".into(),
    );
    checks.check(
        resets == 0,
        format!("offload.resets is {resets}: custody gave up on a guest that was only descheduled"),
    );
    checks.wait_flows_freed(&rig, "after the transfer");
    rig.finish(checks);
}

/// The guest application stops reading for 3 s after 256 KiB: the guest
/// advertises a zero window; the transfer completes hash-equal, the flow
/// went offline with reason zero_window, and vsnoop's own capture shows no
/// ACK toward the sender advertising past the guest's edge (rule 6: the
/// host interface holds what went to the tap, the guest interface what the
/// guest wrote).
#[test]
fn zero_window() {
    let label = "zero-window";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            append: "vsnoop.sinkargs=-r,131072,-P,262144:3000".into(),
            ..RigOptions::default()
        },
    );
    let g0 = rig.guest_tcpext();
    let cap = rig.dir.join("zero-window.pcapng");
    let cap_arg = cap.to_str().expect("UTF-8 path");
    rig.run_client("capture", &["start", cap_arg, "--snaplen", "128"]);
    rig.send_ok("4 MiB with a 3 s pause", 4 * MIB, &sink_opts());
    // "capture stopped: FILE (snaplen 128, N frames, M dropped, ...)"
    let stopped = String::from_utf8_lossy(&rig.run_client("capture", &["stop"])).into_owned();
    let g1 = rig.guest_tcpext();
    let zw = delta(&g1, &g0, "TCPToZeroWindowAdv");
    println!(
        "[{label}] guest TCPToZeroWindowAdv +{zw}, TCPFromZeroWindowAdv +{}, TCPWantZeroWindowAdv +{}",
        delta(&g1, &g0, "TCPFromZeroWindowAdv"),
        delta(&g1, &g0, "TCPWantZeroWindowAdv")
    );
    assert!(
        zw > 0,
        "[{label}] the guest never advertised a zero window: the test did not test anything"
    );
    let s = rig.stats();
    print_offload(label, "after", &s);
    let offline_zw = checks.reason(&s, "offline", "zero_window");
    checks.check(
        offline_zw > 0,
        format!("offline.zero_window is {offline_zw} after a zero-window episode"),
    );
    let retracted = checks.reason(&s, "offline", "window_retracted");
    println!("[{label}] offline.window_retracted {retracted}");
    // Rule 6 on the wire: no ACK toward the sender (early, rewritten or
    // passed) advertises a right edge beyond the largest the guest wrote.
    let lossless = stopped.contains(" 0 dropped,");
    checks.check(
        lossless,
        format!("the capture lost frames ({stopped}): the edge check needs every guest ACK"),
    );
    let edges = EdgeCheck::of_capture(&cap, SINK_PORT);
    println!(
        "[{label}] capture: {} ACKs to the sender checked against {} guest ACKs \
         (window scale {}), {} of them early ACKs, {} with a zero window",
        edges.checked, edges.guest_acks, edges.scale, edges.early, edges.zero_windows
    );
    checks.check(
        edges.early > 0 && edges.guest_acks > 0,
        format!("the capture holds no early ACK or no guest ACK: {edges:?}"),
    );
    checks.check(
        edges.past_edge.is_empty(),
        format!(
            "{} ACKs to the sender advertised past the guest's edge, first: {:?}",
            edges.past_edge.len(),
            edges.past_edge.first()
        ),
    );
    // The transfer also works after the pause, offloaded again.
    let early0 = off(&s, "early_acks").unwrap_or(0);
    rig.guest.restart_sink("");
    rig.send_ok("4 MiB after the pause", 4 * MIB, &sink_opts());
    let s2 = rig.stats();
    let early1 = checks.get(&s2, "early_acks");
    checks.check(
        early1 > early0,
        format!("early_acks did not grow in a normal transfer after the zero window ({early0} -> {early1})"),
    );
    rig.finish(checks);
}

/// Guest TCP options on and off (timestamps, window scaling, SACK, the
/// largest window scale): every transfer completes hash-equal and the
/// sender's PAWS-rejected counter stays 0. One boot: the first combination
/// comes from the kernel command line (`vsnoop.sysctl=`), the others from
/// `sysctl -w` (they apply to new connections).
#[test]
fn guest_tcp_options() {
    let label = "tcp-options";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            // ':' in a value becomes a space.
            append: "vsnoop.sysctl=net.ipv4.tcp_timestamps=0,net.ipv4.tcp_sack=0,\
                     net.ipv4.tcp_rmem=4096:131072:2097152"
                .into(),
            ..RigOptions::default()
        },
    );
    let boot = rig.guest.run_ok(
        "sysctl -n net.ipv4.tcp_timestamps net.ipv4.tcp_sack net.ipv4.tcp_window_scaling",
        CMD_TIMEOUT,
    );
    let boot: Vec<&str> = boot.split_whitespace().collect();
    assert_eq!(
        boot,
        ["0", "0", "1"],
        "[{label}] vsnoop.sysctl= was not applied at boot"
    );
    let boot_rmem = rig.guest.run_ok("sysctl -n net.ipv4.tcp_rmem", CMD_TIMEOUT);
    let boot_rmem = boot_rmem.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(
        boot_rmem, "4096 131072 2097152",
        "[{label}] vsnoop.sysctl= did not set tcp_rmem at boot"
    );

    /// Guest sysctls and what the handshake must then negotiate.
    struct Combo {
        name: &'static str,
        settings: Vec<(&'static str, String)>,
        ts: bool,
        sack: bool,
        ws: bool,
        /// The window scale the guest must announce, where it matters.
        scale: Option<u8>,
    }
    let combo = |name, ts: bool, sack: bool, ws: bool, rmem: &str| Combo {
        name,
        settings: vec![
            ("net.ipv4.tcp_timestamps", u8::from(ts).to_string()),
            ("net.ipv4.tcp_sack", u8::from(sack).to_string()),
            ("net.ipv4.tcp_window_scaling", u8::from(ws).to_string()),
            ("net.ipv4.tcp_rmem", rmem.to_string()),
        ],
        ts,
        sack,
        ws,
        scale: None,
    };
    let rmem = boot_rmem.as_str();
    let combos = vec![
        Combo {
            settings: Vec::new(), // as booted
            ..combo("ts off, sack off (boot)", false, false, true, rmem)
        },
        combo("all on", true, true, true, rmem),
        combo("timestamps off", false, true, true, rmem),
        combo("window scaling off", true, true, false, rmem),
        combo("sack off", true, false, true, rmem),
        Combo {
            scale: Some(14),
            ..combo(
                "window scale 14",
                true,
                true,
                true,
                "4096 131072 1073741824",
            )
        },
        combo(
            "everything off (Reno, no options)",
            false,
            false,
            false,
            rmem,
        ),
    ];
    for Combo {
        name,
        settings,
        ts,
        sack,
        ws,
        scale,
    } in combos
    {
        if !settings.is_empty() {
            let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let values = rig.guest.sysctl(&pairs);
            println!("[{label}] {name}: guest sysctl {values:?}");
        }
        let nst0 = rig.host_nstat();
        let s0 = rig.stats();
        let r = rig.send_ok(name, 8 * MIB, &sink_opts());
        let neg = r
            .negotiated
            .unwrap_or_else(|| panic!("[{label}] {name}: no TCP_INFO from the sender"));
        println!("[{label}] {name}: negotiated {neg:?}");
        assert_eq!(
            neg.timestamps, ts,
            "[{label}] {name}: timestamps negotiated"
        );
        assert_eq!(neg.sack, sack, "[{label}] {name}: SACK negotiated");
        assert_eq!(
            neg.wscale.is_some(),
            ws,
            "[{label}] {name}: window scaling negotiated"
        );
        if let (Some(want), Some((got, _))) = (scale, neg.wscale) {
            assert_eq!(got, want, "[{label}] {name}: the guest's window scale");
        }
        let nst1 = rig.host_nstat();
        let paws = delta(&nst1, &nst0, "TcpExtPAWSEstabRejected");
        println!(
            "[{label}] {name}: sender PAWSEstabRejected +{paws}, TcpRetransSegs +{}",
            delta(&nst1, &nst0, "TcpRetransSegs")
        );
        assert_eq!(
            paws, 0,
            "[{label}] {name}: the sender rejected segments by PAWS"
        );
        let s1 = rig.stats();
        let e0 = off(&s0, "early_acks").unwrap_or(0);
        let e1 = checks.get(&s1, "early_acks");
        checks.check(
            e1 > e0,
            format!("{name}: early_acks did not grow ({e0} -> {e1})"),
        );
    }
    print_offload(label, "after all", &rig.stats());
    rig.finish(checks);
}

/// Remote RST and remote FIN in the middle of a transfer, and the guest
/// closing its socket with data in flight: the state is freed
/// (flows_tracked returns to 0), nothing hangs, and a new transfer works.
#[test]
fn rst_fin_and_guest_close_mid_transfer() {
    let label = "rst-fin-close";
    let (mut rig, mut checks) = Rig::start_checked(label, RigOptions::default());

    // Remote RST after 2 of 8 MiB.
    let r = rig
        .send(
            8 * MIB,
            &SendOptions {
                abort_after: Some((2 * MIB, Abort::Reset)),
                ..sink_opts()
            },
        )
        .unwrap_or_else(|e| panic!("[{label}] RST transfer: {e}"));
    println!("[{label}] RST after {} bytes", r.sent);
    checks.wait_flows_freed(&rig, "after remote RST");
    rig.send_ok("after RST", 4 * MIB, &sink_opts());

    // Remote FIN after 2 of 8 MiB: the sink must have read exactly the 2 MiB.
    let r = rig
        .send(
            8 * MIB,
            &SendOptions {
                abort_after: Some((2 * MIB, Abort::Fin)),
                ..sink_opts()
            },
        )
        .unwrap_or_else(|e| panic!("[{label}] FIN transfer: {e}"));
    assert_eq!(
        r.reply,
        format!("ERR {} {}", 2 * MIB, 8 * MIB),
        "[{label}] the sink's view of a transfer ended by FIN"
    );
    println!(
        "[{label}] FIN after {} bytes: sink said {:?}",
        r.sent, r.reply
    );
    checks.wait_flows_freed(&rig, "after remote FIN");
    rig.send_ok("after FIN", 4 * MIB, &sink_opts());

    // Guest close() with data in flight: a slow reader, killed mid-transfer.
    rig.guest.restart_sink("-c 4096 -d 20");
    let (handle, progress) = rig.send_under_way(
        16 * MIB,
        MIB,
        SendOptions {
            timeout: Duration::from_secs(120),
            ..sink_opts()
        },
    );
    rig.guest.stop_sink();
    let r = handle.join().expect("sender thread");
    println!(
        "[{label}] guest closed after {} bytes were written: sender saw {r:?}",
        progress.load(Ordering::Relaxed)
    );
    assert!(
        r.is_err(),
        "[{label}] the transfer 'completed' although the guest application was killed: {r:?}"
    );
    checks.wait_flows_freed(&rig, "after guest close");
    rig.guest.restart_sink("");
    rig.send_ok("after guest close", 4 * MIB, &sink_opts());
    checks.wait_flows_freed(&rig, "after the last transfer");
    print_offload(label, "after", &rig.stats());
    rig.finish(checks);
}

/// vsnoop restarted in the middle of a transfer (QEMU reconnect=1): the flow
/// keeps working (hash-equal), it is never offloaded (first seen mid-stream),
/// and a new flow afterwards is.
#[test]
fn backend_restart_mid_flow() {
    let label = "restart";
    let (mut rig, mut checks) = Rig::start_checked(
        label,
        RigOptions {
            reconnect: true,
            ..RigOptions::default()
        },
    );
    let progress = Arc::new(AtomicU64::new(0));
    let total = 24 * MIB;
    let handle = sink::spawn_send(
        &rig.ns,
        GUEST_IP,
        SINK_PORT,
        total,
        &SendOptions {
            progress: Some(Arc::clone(&progress)),
            ..paced(10)
        },
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress.load(Ordering::Relaxed) < 2 * MIB as u64 {
        assert!(
            Instant::now() < deadline && !handle.is_finished(),
            "[{label}] the transfer never got going"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let s1 = rig.stats();
    print_offload(label, "first vsnoop, mid-flow", &s1);
    rig.wait_offload_flow("offloaded on the first vsnoop", |f| {
        f["mode"] == "active" || f["mode"] == "offline"
    });
    rig.restart_vsnoop();
    let at = progress.load(Ordering::Relaxed);
    println!("[{label}] vsnoop restarted; {at} of {total} bytes written so far");
    // On SIGTERM the first vsnoop waited for the guest to confirm what it
    // had acknowledged early (its custody dies with it).
    let first_log = std::fs::read_to_string(&rig.logs[0]).unwrap_or_default();
    let shutdown: Vec<&str> = first_log
        .lines()
        .filter(|l| l.contains("shutdown:"))
        .collect();
    println!("[{label}] first vsnoop: {shutdown:#?}");
    checks.check(
        shutdown
            .iter()
            .any(|l| l.contains("nothing acknowledged early") || l.contains("acknowledged every")),
        format!("the first vsnoop did not drain before exiting: {shutdown:?}"),
    );
    assert!(
        (at as usize) < total,
        "[{label}] the transfer finished before the restart: make it slower"
    );
    // The operator's view of the same thing: the flow, passed through.
    let f = rig.wait_offload_flow("passed through on the second vsnoop", |f| {
        f["mode"] == "pass_through"
    });
    checks.check(
        f["reason"] == "mid_stream" && f["owed_bytes"] == 0,
        format!("the restarted vsnoop lists the flow as {f}"),
    );
    rig.join_ok("transfer across the restart", handle);
    let s2 = rig.stats();
    print_offload(label, "second vsnoop, after the flow", &s2);
    let mid = checks.reason(&s2, "passthrough", "mid_stream");
    checks.check(mid > 0, format!("passthrough.mid_stream is {mid}"));
    let offloaded = checks.get(&s2, "flows_offloaded");
    checks.check(
        offloaded == 0,
        format!("flows_offloaded is {offloaded}: a flow first seen mid-stream was offloaded"),
    );
    let early = checks.get(&s2, "early_acks");
    checks.check(
        early == 0,
        format!("early_acks is {early} for a mid-stream flow"),
    );
    // A new flow through the new backend is offloaded.
    rig.send_ok("new flow after the restart", 8 * MIB, &sink_opts());
    let s3 = rig.stats();
    print_offload(label, "second vsnoop, after a new flow", &s3);
    let offloaded = checks.get(&s3, "flows_offloaded");
    checks.check(
        offloaded >= 1,
        format!("flows_offloaded is {offloaded} after a new flow"),
    );
    rig.finish(checks);
}

/// Guest -> host bulk transfer with the offload on works as before (the
/// offload only acts on data toward the guest).
#[test]
fn guest_to_host_unchanged() {
    let label = "guest-to-host";
    let mut rig = Rig::start(label, RigOptions::default());
    let s0 = rig.stats();
    let t = receive_from_guest(&rig.ns, &mut rig.guest, 5002, 32 * MIB, XFER_TIMEOUT);
    println!(
        "[{label}] {} bytes in {:.2?} ({:.0} Mbit/s)",
        t.bytes,
        t.elapsed,
        t.mbit_per_s()
    );
    assert_eq!(t.bytes, 32 * MIB, "[{label}] byte count");
    assert_eq!(
        t.sender_sha256, t.receiver_sha256,
        "[{label}] sha256 differs"
    );
    let s1 = rig.stats();
    print_offload(label, "after", &s1);
    // With the engine in place, nothing toward the guest carried data here.
    if let (Some(a), Some(b)) = (off(&s0, "early_acked_bytes"), off(&s1, "early_acked_bytes")) {
        assert_eq!(
            a, b,
            "[{label}] early-ACKed bytes in a guest -> host transfer"
        );
    }
    rig.guest_health();
}

/// `offload.draining`.
fn draining(stats: &Value) -> Option<bool> {
    stats.get("offload")?.get("draining")?.as_bool()
}

impl Rig {
    /// Polls `vsnoop stats --json` until `done` holds; panics after `timeout`
    /// with the last stats, QEMU's state and vsnoop's log.
    fn wait_stats(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats();
            if done(&stats) {
                return stats;
            }
            if Instant::now() > deadline {
                let log = self.vsnoop.log_text();
                let diag = self.guest.diagnostics();
                panic!(
                    "[{}] {what}: not seen within {timeout:?}; last offload stats {}\n--- vsnoop log:\n{log}\n{diag}",
                    self.label,
                    stats.get("offload").unwrap_or(&Value::Null)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A QMP command that must succeed; panics with QEMU's error, vsnoop's
    /// log and QEMU's diagnostics.
    fn qmp_ok(&mut self, qmp: &mut Qmp, command: &str, arguments: Value) -> Value {
        qmp.execute(command, arguments).unwrap_or_else(|e| {
            panic!(
                "[{}] QMP {command} failed: {e}\n--- vsnoop log:\n{}\n{}",
                self.label,
                self.vsnoop.log_text(),
                self.guest.diagnostics()
            )
        })
    }

    /// `query-migrate`: the status and the whole reply.
    fn migration_status(&mut self, qmp: &mut Qmp) -> (String, Value) {
        let info = self.qmp_ok(qmp, "query-migrate", json!({}));
        let status = info
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        (status, info)
    }
}

/// Live migration start and cancel with a real QEMU (rule 15). vsnoop
/// offers dirty logging (LOG_SHMFD), so QEMU migrates: `migrate` (to
/// `cat > /dev/null`, throttled so it is still running when cancelled) must
/// set VHOST_F_LOG_ALL, and the offload drains (no new early ACKs; data
/// still hash-equal); `migrate_cancel` clears it, the guest keeps working
/// and early ACKs resume. QEMU refusing the migration fails the test.
#[test]
fn migration_start_and_cancel() {
    let label = "migrate";
    let (mut rig, mut qmp) = Rig::with_qmp(
        label,
        RigOptions {
            ..RigOptions::default()
        },
    );
    let mut checks = EngineChecks::new(label);
    let s0 = rig.stats();
    print_offload(label, "before", &s0);
    assert_eq!(
        draining(&s0),
        Some(false),
        "[{label}] offload.draining is not false before the migration"
    );
    rig.send_ok("4 MiB before the migration", 4 * MIB, &sink_opts());
    let s1 = rig.stats();
    let early = |s: &Value| off(s, "early_acks").unwrap_or(0);
    checks.check(
        early(&s1) > early(&s0),
        format!("no early ACKs before the migration ({})", early(&s1)),
    );

    // Throttled: a 256 MB guest takes minutes at 1 MiB/s, far longer than
    // the checks below.
    rig.qmp_ok(
        &mut qmp,
        "migrate-set-parameters",
        json!({ "max-bandwidth": 1_048_576 }),
    );
    let started = Instant::now();
    // Fails if QEMU refuses, e.g. "vhost-user backend lacks
    // VHOST_USER_PROTOCOL_F_LOG_SHMFD feature".
    rig.qmp_ok(
        &mut qmp,
        "migrate",
        json!({ "uri": "exec:cat > /dev/null" }),
    );
    let s2 = rig.wait_stats(
        "offload.draining true and drains 1 after `migrate`",
        Duration::from_secs(60),
        |s| draining(s) == Some(true) && off(s, "drains") == Some(1),
    );
    println!(
        "[{label}] draining {:.1?} after `migrate`",
        started.elapsed()
    );
    print_offload(label, "draining", &s2);
    let (status, info) = rig.migration_status(&mut qmp);
    assert!(
        status == "active" || status == "setup",
        "[{label}] migration is {status:?}, not active: {info}\n--- vsnoop log:\n{}\n{}",
        rig.vsnoop.log_text(),
        rig.guest.diagnostics()
    );
    // QEMU acked VHOST_F_LOG_ALL (bit 26) in SET_FEATURES.
    let log = rig.vsnoop.log_text();
    let log_all_acked = log
        .lines()
        .filter_map(|l| l.split("features acked 0x").nth(1))
        .filter_map(|rest| rest.split(':').next())
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .any(|f| f & (1 << 26) != 0);
    assert!(
        log_all_acked,
        "[{label}] no SET_FEATURES with VHOST_F_LOG_ALL in vsnoop's log:\n{log}"
    );

    // Draining: data still arrives intact, but no new early ACKs.
    rig.send_ok("2 MiB during the migration", 2 * MIB, &sink_opts());
    let s3 = rig.stats();
    checks.check(
        early(&s3) == early(&s2),
        format!(
            "early ACKs while draining: {} -> {}",
            early(&s2),
            early(&s3)
        ),
    );
    // Once the guest acknowledged what was early-ACKed before the
    // migration, the drain is complete (the timer notices within 20 ms).
    let drained = rig.wait_stats(
        "drains_completed 1 and owed_bytes 0 while the migration runs",
        Duration::from_secs(30),
        |s| off(s, "drains_completed") == Some(1) && off(s, "owed_bytes") == Some(0),
    );
    checks.check(
        draining(&drained) == Some(true),
        "the drain completed, but offload.draining is no longer true".to_string(),
    );
    rig.vsnoop
        .wait_for_log("migration drain complete after", Duration::from_secs(10));
    let (status, info) = rig.migration_status(&mut qmp);
    assert_eq!(
        status, "active",
        "[{label}] migration not active before the cancel (raise the throttle?): {info}"
    );
    println!(
        "[{label}] migration {status} after {:.1?}, ram {}",
        started.elapsed(),
        info.get("ram").unwrap_or(&Value::Null)
    );

    rig.qmp_ok(&mut qmp, "migrate_cancel", json!({}));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, info) = rig.migration_status(&mut qmp);
        if status == "cancelled" {
            break;
        }
        assert!(
            Instant::now() < deadline && status != "failed" && status != "completed",
            "[{label}] after migrate_cancel the migration is {status:?}: {info}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let s4 = rig.wait_stats(
        "offload.draining false after `migrate_cancel`",
        Duration::from_secs(60),
        |s| draining(s) == Some(false),
    );
    print_offload(label, "after the cancel", &s4);
    checks.check(
        off(&s4, "drains") == Some(1),
        format!("drains is {:?} after one migration", off(&s4, "drains")),
    );
    rig.vsnoop
        .wait_for_log("VHOST_F_LOG_ALL cleared", Duration::from_secs(10));

    // The guest still works and early ACKs resume.
    rig.send_ok("4 MiB after the cancel", 4 * MIB, &sink_opts());
    let s5 = rig.stats();
    checks.check(
        early(&s5) > early(&s4),
        format!(
            "early ACKs did not resume after the cancel: {} -> {}",
            early(&s4),
            early(&s5)
        ),
    );
    let events: Vec<String> = qmp
        .events
        .iter()
        .filter_map(|e| e.get("event").and_then(Value::as_str).map(str::to_string))
        .collect();
    println!("[{label}] QMP events: {events:?}");
    let stderr = rig.guest.stderr_text();
    println!("[{label}] QEMU stderr: {:?}", stderr.trim());
    // What reached vsnoop (the requests only with RUST_LOG=debug):
    // SET_FEATURES 2, SET_LOG_BASE 6, SET_VRING_ADDR 9.
    for line in rig.vsnoop.log_text().lines().filter(|l| {
        l.contains("features acked")
            || l.contains("VHOST_F_LOG_ALL")
            || ["request 2 ", "request 6 ", "request 9 "]
                .iter()
                .any(|r| l.contains(r))
    }) {
        println!("[{label}] vsnoop: {line}");
    }
    rig.finish(checks);
}

/// A live migration that completes, to a second QEMU served by a second
/// vsnoop on another tap, while a transfer toward the guest is under way
/// (rule 15 end to end, and vsnoop's dirty logging: every byte it wrote
/// into guest memory during the migration must reach the destination).
/// Both taps are ports of one hub bridge that carries the host address, as
/// two hosts' bridges on one network would be. The source drains; at the
/// switchover both VMs' memories are identical page by page; the transfer
/// completes hash-equal on the destination, whose vsnoop sees the flow
/// mid-stream and never offloads it; a new flow there is offloaded. The
/// device has two queue pairs (a two-vCPU guest), so QEMU drives two vhost
/// devices on each connection: memory regions and the dirty log arrive
/// twice.
#[test]
fn migration_completes_mid_transfer() {
    let label = "migrate-to";
    let (mut rig, mut qmp) = Rig::with_qmp(
        label,
        RigOptions {
            queues: 2,
            bridge: true,
            ..RigOptions::default()
        },
    );
    let mut checks = EngineChecks::new(label);
    let early = |s: &Value| off(s, "early_acks").unwrap_or(0);
    rig.send_ok("4 MiB before the migration", 4 * MIB, &sink_opts());
    let s0 = rig.stats();
    checks.check(
        early(&s0) > 0,
        format!("no early ACKs before the migration ({})", early(&s0)),
    );

    // The destination: its own vsnoop and tap on the bridge, and a QEMU
    // started alike, waiting for the guest's state.
    let dst_sock = rig.dir.join("vhost-dst.sock");
    let dst_tap = unique("vak");
    let (dst_vsnoop, dst_control, dst_log) =
        spawn_vsnoop(&rig.ns, &rig.dir, &dst_sock, &dst_tap, 2, &rig.vsnoop_extra);
    rig.logs.push(dst_log);
    let incoming = rig.dir.join("migrate.sock");
    let mut dst_cfg = rig.cfg.clone();
    dst_cfg.backend = Backend::VhostUserClient {
        socket: dst_sock,
        reconnect: false,
    };
    // -S: the destination stays paused after the migration until `cont`, so
    // its memory can be compared with the source's first.
    let dst_qmp_path = rig.dir.join("qmp-dst.sock");
    dst_cfg.extra_args = incoming_args(&dst_qmp_path, &incoming);
    let mut dst_guest = Guest::boot(&rig.ns, &dst_cfg, &rig.dir.path);
    dst_vsnoop.wait_for_log("frontend connected", Duration::from_secs(60));
    dst_guest.wait_for_path(&incoming, Duration::from_secs(60));

    // Paced (at most 64 KiB every 4 ms), so it runs through the whole migration.
    let total = 160 * MIB;
    let (handle, progress) = rig.send_under_way(
        total,
        4 * MIB,
        SendOptions {
            timeout: Duration::from_secs(90),
            ..paced(4)
        },
    );
    // One pass, then stop and copy the rest: with QEMU 7.2 under TCG a
    // migration that iterates again after a dirty sync loses pages the
    // guest itself writes (reproduced with QEMU's own tap backend and no
    // vsnoop: `qemu_tcg_iterative_migration_keeps_every_page`). A downtime
    // limit beyond the whole RAM's copy time makes QEMU stop the guest at
    // its first check after the first bandwidth measurement.
    let started = Instant::now();
    let params = json!({ "max-bandwidth": 1u64 << 30, "downtime-limit": 10_000 });
    let info = migrate(&mut qmp, &incoming, params).unwrap_or_else(|e| {
        panic!(
            "[{label}] {e}\n--- vsnoop log:\n{}\n--- source:\n{}\n--- destination:\n{}",
            rig.vsnoop.log_text(),
            rig.guest.diagnostics(),
            dst_guest.diagnostics()
        )
    });
    let at = progress.load(Ordering::Relaxed);
    println!(
        "[{label}] migration completed after {:.1?} (downtime {} ms, ram {}); {at} of {total} bytes written",
        started.elapsed(),
        info.get("downtime").unwrap_or(&Value::Null),
        info.get("ram").unwrap_or(&Value::Null)
    );
    assert!(
        (at as usize) < total,
        "[{label}] the transfer finished before the migration completed: make it slower"
    );

    // Every page the source holds now (its rings stopped, vsnoop's last
    // writes dirty-logged) must have reached the destination, byte for byte.
    let mut dst_qmp = match Qmp::connect(&dst_qmp_path, Duration::from_secs(30)) {
        Ok(q) => q,
        Err(e) => panic!(
            "[{label}] destination QMP: {e}\n{}",
            dst_guest.diagnostics()
        ),
    };
    wait_run_state(&mut dst_qmp, "paused", Duration::from_secs(60));
    let differ = differing_pages(&mut qmp, &mut dst_qmp, &rig.dir, rig.cfg.mem_mb);
    assert!(
        differ.is_empty(),
        "[{label}] {} guest pages differ between source and destination after the migration (first: {:x?})",
        differ.len(),
        &differ[..differ.len().min(20)]
    );
    println!(
        "[{label}] source and destination memory identical ({} MiB)",
        rig.cfg.mem_mb
    );
    // The guest's new port joins the network at the switchover (before
    // that, the destination's tap would have queued copies of the source's
    // traffic, the handshake included).
    join_bridge(&rig.ns, rig.bridge.as_deref().expect("bridge"), &dst_tap);
    if let Err(e) = dst_qmp.execute("cont", json!({})) {
        panic!(
            "[{label}] destination `cont`: {e}\n{}",
            dst_guest.diagnostics()
        );
    }

    // The source drained. QEMU stops the guest when its copy is done, not
    // when the drain is: bytes the guest had not acknowledged yet may still
    // be in custody. They were in guest memory (rule 3), which arrived
    // intact, so the destination's guest has them and acknowledges them.
    let src = rig.stats();
    print_offload(label, "source after the migration", &src);
    checks.check(
        draining(&src) == Some(true) && off(&src, "drains") == Some(1),
        format!(
            "source: draining {:?}, drains {:?}",
            draining(&src),
            off(&src, "drains")
        ),
    );
    // Custody also holds bytes that arrived while draining and were never
    // early-ACKed; only the owed ones (E - Gack, as of the source's last
    // timer tick) were acknowledged to the sender on the guest's behalf.
    println!(
        "[{label}] the source stopped with {} bytes early-ACKed and not yet confirmed by the guest (drain completed: {}), {} bytes in custody (in guest memory)",
        off(&src, "owed_bytes").unwrap_or(0),
        off(&src, "drains_completed") == Some(1),
        off(&src, "custody_bytes").unwrap_or(0)
    );
    for l in rig
        .vsnoop
        .log_text()
        .lines()
        .filter(|l| l.contains("drain complete") || l.contains("stopped while draining"))
    {
        println!("[{label}] source: {l}");
    }

    // The guest runs on the destination now; the source QEMU (paused after
    // the migration) and its vsnoop go away, as on the source host.
    let mut src_guest = std::mem::replace(&mut rig.guest, dst_guest);
    let src_vsnoop = std::mem::replace(&mut rig.vsnoop, dst_vsnoop);
    rig.control = dst_control;
    src_guest.assert_alive(&format!("[{label}] source QEMU after the migration"));
    drop(src_guest);
    drop(src_vsnoop);
    rig.join_ok("transfer across the migration", handle);
    let dst = rig.stats();
    print_offload(label, "destination after the transfer", &dst);
    let mid = checks.reason(&dst, "passthrough", "mid_stream");
    checks.check(
        mid > 0,
        format!("destination: passthrough.mid_stream is {mid}"),
    );
    checks.check(
        early(&dst) == 0,
        format!(
            "destination: {} early ACKs for a mid-stream flow",
            early(&dst)
        ),
    );
    rig.send_ok(
        "4 MiB on a new flow after the migration",
        4 * MIB,
        &sink_opts(),
    );
    let dst2 = rig.stats();
    print_offload(label, "destination after a new flow", &dst2);
    let offloaded = checks.get(&dst2, "flows_offloaded");
    checks.check(
        early(&dst2) > 0 && offloaded >= 1,
        format!(
            "destination: a new flow was not offloaded (early ACKs {}, flows_offloaded {offloaded})",
            early(&dst2)
        ),
    );
    rig.finish(checks);
}

/// QEMU arguments of a migration destination: paused after the migration
/// (`-S`, until `cont`), QMP on `qmp`, the guest's state arriving on the
/// unix socket `incoming`.
fn incoming_args(qmp: &std::path::Path, incoming: &std::path::Path) -> Vec<String> {
    let mut args = vec!["-S".to_string()];
    args.extend(qmp_args(qmp));
    args.extend(["-incoming".into(), format!("unix:{}", incoming.display())]);
    args
}

/// Migrates the VM behind `qmp` to the destination listening on `incoming`
/// with migration parameters `params`; returns `query-migrate`'s reply once
/// the migration completed, or why it did not (QEMU's error, failed or
/// cancelled, or still running after 180 s).
fn migrate(qmp: &mut Qmp, incoming: &std::path::Path, params: Value) -> Result<Value, String> {
    qmp.execute("migrate-set-parameters", params)?;
    qmp.execute(
        "migrate",
        json!({ "uri": format!("unix:{}", incoming.display()) }),
    )?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(info),
            Some(s @ ("failed" | "cancelled")) => return Err(format!("migration {s}: {info}")),
            _ if Instant::now() > deadline => {
                return Err(format!("migration still running: {info}"))
            }
            _ => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Polls `query-status` until the VM is in `state` (panics after `timeout`).
fn wait_run_state(qmp: &mut Qmp, state: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = qmp.execute("query-status", json!({}));
        if let Ok(s) = &status {
            if s.get("status").and_then(Value::as_str) == Some(state) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the VM never reached {state:?}: {status:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Guest-physical addresses of the 4 KiB pages whose contents differ
/// between two stopped VMs (`pmemsave` of the first `mem_mb` MiB of each
/// into `dir`, removed afterwards).
fn differing_pages(a: &mut Qmp, b: &mut Qmp, dir: &TempDir, mem_mb: u32) -> Vec<u64> {
    let size = u64::from(mem_mb) << 20;
    let mut images = Vec::new();
    for (qmp, name) in [(a, "a.mem"), (b, "b.mem")] {
        let path = dir.join(name);
        let file = path.display().to_string();
        if let Err(e) = qmp.execute(
            "pmemsave",
            json!({ "val": 0, "size": size, "filename": file }),
        ) {
            panic!("pmemsave {file}: {e}");
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {file}: {e}"));
        assert_eq!(bytes.len() as u64, size, "pmemsave wrote a short {file}");
        let _ = std::fs::remove_file(&path);
        images.push(bytes);
    }
    images[0]
        .chunks(4096)
        .zip(images[1].chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64 * 4096)
        .collect()
}

fn sink_opts() -> SendOptions {
    SendOptions {
        timeout: XFER_TIMEOUT,
        ..SendOptions::default()
    }
}

/// [`sink_opts`] paced: 64 KiB writes with `pause_ms` between them, so an
/// event the test causes lands mid-flow.
fn paced(pause_ms: u64) -> SendOptions {
    SendOptions {
        write_chunk: 64 * 1024,
        write_pause: Some(Duration::from_millis(pause_ms)),
        ..sink_opts()
    }
}

/// Not a vsnoop test: the reproduction of the QEMU 7.2 TCG problem that
/// makes [`migration_completes_mid_transfer`] complete in one pass. The
/// same guest, transfer and migration with QEMU's own tap backend on both
/// sides (no vsnoop anywhere), but migrating iteratively (downtime limit
/// 50 ms, 64 MiB/s). When QEMU syncs the dirty bitmap while the guest runs
/// and then iterates once more (`dirty-sync-count` 4 or more), pages the
/// guest writes after that sync are not sent again: the destination's
/// memory differs from the source's (descriptor tables, socket buffers) and
/// the guest hangs or corrupts the stream. Whether QEMU iterates depends on
/// timing: here about half the runs fail, more with a busy host. Ignored:
/// it fails on QEMU 7.2; run it with `--ignored` to check another QEMU.
#[test]
#[ignore = "fails on QEMU 7.2 under TCG (an upstream bug, no vsnoop involved)"]
fn qemu_tcg_iterative_migration_keeps_every_page() {
    let label = "qemu-tcg-migrate";
    prerequisites();
    let _lock = lock();
    let ns = Netns::new("vsxt");
    let dir = TempDir::new("qemu-tcg-migrate");
    let (src_tap, dst_tap) = (unique("xta"), unique("xtb"));
    let (src_qmp, dst_qmp) = (dir.join("qmp-src.sock"), dir.join("qmp-dst.sock"));
    let incoming = dir.join("migrate.sock");
    let mut cfg = GuestConfig::new(Backend::Tap {
        ifname: src_tap.clone(),
    });
    cfg.extra_args = qmp_args(&src_qmp).to_vec();
    let mut src = Guest::boot(&ns, &cfg, &dir.path);
    ns.wait_for_link(&src_tap, Duration::from_secs(30));
    let bridge = host_bridge(&ns, &src_tap);
    src.wait_booted(BOOT_TIMEOUT);
    wait_ping_guest(&ns, Duration::from_secs(60));
    let mut dst_cfg = cfg.clone();
    dst_cfg.backend = Backend::Tap {
        ifname: dst_tap.clone(),
    };
    dst_cfg.extra_args = incoming_args(&dst_qmp, &incoming);
    let dst = Guest::boot(&ns, &dst_cfg, &dir.path);
    ns.wait_for_link(&dst_tap, Duration::from_secs(30));
    join_bridge(&ns, &bridge, &dst_tap);
    let connect = |p: &std::path::Path| {
        Qmp::connect(p, Duration::from_secs(30)).unwrap_or_else(|e| panic!("[{label}] QMP: {e}"))
    };
    let (mut qmp, mut dq) = (connect(&src_qmp), connect(&dst_qmp));
    let progress = Arc::new(AtomicU64::new(0));
    let handle = sink::spawn_send(
        &ns,
        GUEST_IP,
        SINK_PORT,
        160 * MIB,
        &SendOptions {
            timeout: Duration::from_secs(90),
            progress: Some(Arc::clone(&progress)),
            ..paced(4)
        },
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Relaxed) < 4 * MIB as u64 {
        assert!(Instant::now() < deadline, "[{label}] no transfer");
        thread::sleep(Duration::from_millis(10));
    }
    let params = json!({ "max-bandwidth": 64u64 << 20, "downtime-limit": 50 });
    let info = migrate(&mut qmp, &incoming, params).unwrap_or_else(|e| panic!("[{label}] {e}"));
    println!(
        "[{label}] completed: downtime {} ms, dirty syncs {}",
        info["downtime"], info["ram"]["dirty-sync-count"]
    );
    wait_run_state(&mut dq, "paused", Duration::from_secs(60));
    let differ = differing_pages(&mut qmp, &mut dq, &dir, cfg.mem_mb);
    let _ = dq.execute("cont", json!({}));
    drop(src);
    let sent = handle.join().expect("sender thread");
    drop(dst);
    assert!(
        differ.is_empty(),
        "[{label}] {} pages differ between source and destination (first: {:x?}); transfer: {:?}",
        differ.len(),
        &differ[..differ.len().min(20)],
        sent.map(|r| r.len)
    );
    assert!(sent.is_ok(), "[{label}] transfer failed: {sent:?}");
}
