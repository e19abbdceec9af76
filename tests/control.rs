//! The control socket, the client subcommands and the Prometheus endpoint,
//! end to end: vsnoop runs in a private network namespace with `--control`
//! and `--metrics` (on the namespace's own loopback), the test frontend
//! plays the guest (10.77.0.2) and pings the tap address (10.77.0.1), and the
//! built `vsnoop` binary is run as the client.
//!
//! Run: `cargo test --release --test control -- --test-threads=1` (as root).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use common::frontend::{Options, TestFrontend, F_MRG_RXBUF};
use common::guest::in_netns;
use common::{require_tool, signal, Netns, TempDir, Vsnoop};

const T: Duration = Duration::from_secs(10);
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x01];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
/// Echo identifier of the test pings (the flow's sport).
const ECHO_ID: u16 = 0x4242;
/// The metrics endpoint, on the namespace's loopback.
const METRICS: &str = "127.0.0.1:9400";
const VSNOOP: &str = env!("CARGO_BIN_EXE_vsnoop");

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

/// vsnoop with `--control` and `--metrics` in a namespace whose tap has
/// 10.77.0.1/24, a fixed MAC and a permanent neighbour entry for the guest
/// (no ARP, no IPv6: every frame on the rings is one the test sent or a
/// reply to it).
struct Daemon {
    // Field order is drop order: the daemon ends before its namespace.
    vs: Vsnoop,
    ns: Netns,
    _dir: TempDir,
    sock: PathBuf,
    ctl: PathBuf,
    tap: String,
}

impl Daemon {
    fn start() -> Daemon {
        let ns = Netns::new("vsc");
        ns.exec(&[
            "sh",
            "-c",
            "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 \
             /proc/sys/net/ipv6/conf/default/disable_ipv6; do \
             [ -e $f ] && echo 1 > $f; done; true",
        ]);
        let dir = TempDir::new("control");
        let sock = dir.join("vsnoop.sock");
        let ctl = dir.join("vsnoop.ctl");
        let tap = common::unique("vsc");
        let vs = Vsnoop::spawn(
            &ns,
            &[
                "--socket",
                sock.to_str().unwrap(),
                "--tap",
                &tap,
                "--control",
                ctl.to_str().unwrap(),
                "--metrics",
                METRICS,
            ],
            &dir.join("vsnoop.log"),
        );
        vs.wait_for_log("listening on", T);
        ns.wait_for_link(&tap, T);
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        ns.exec(&["ip", "link", "set", &tap, "address", &mac(HOST_MAC)]);
        ns.exec(&["ip", "link", "set", &tap, "up"]);
        ns.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", &tap]);
        ns.exec(&[
            "ip",
            "neigh",
            "replace",
            "10.77.0.2",
            "lladdr",
            &mac(GUEST_MAC),
            "dev",
            &tap,
            "nud",
            "permanent",
        ]);
        Daemon {
            vs,
            ns,
            _dir: dir,
            sock,
            ctl,
            tap,
        }
    }

    fn ctl(&self) -> &str {
        self.ctl.to_str().unwrap()
    }

    /// Connects the test frontend (mergeable RX buffers, ring filled).
    fn connect(&self) -> Result<TestFrontend> {
        let before = self.vs.log_text().matches("frontend connected").count();
        let mut fe = TestFrontend::connect(
            &self.sock,
            Options {
                features: F_MRG_RXBUF,
                ..Options::default()
            },
        )?;
        fe.fill_rx(0, &[1536], false)?;
        let deadline = Instant::now() + T;
        while self.vs.log_text().matches("frontend connected").count() <= before {
            ensure!(
                Instant::now() < deadline,
                "vsnoop never logged the connection"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(fe)
    }

    /// `vsnoop stats --json` as a JSON object.
    fn stats(&self) -> Result<Value> {
        let out = cli_ok(&["stats", "--control", self.ctl(), "--json"])?;
        ensure!(
            out.lines().count() == 1,
            "stats --json printed more than one line:\n{out}"
        );
        let v: Value = serde_json::from_str(&out).context("stats --json is not JSON")?;
        ensure!(v.is_object(), "stats --json is not an object: {out}");
        Ok(v)
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.vs.child.try_wait() {
            panic!("vsnoop died: {status}\n{}", self.vs.log_text());
        }
        let log = self.vs.log_text();
        assert!(!log.contains("panicked"), "vsnoop panicked:\n{log}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- vsnoop log ({}) ----\n{}---- end ----",
                self.tap,
                self.vs.log_text()
            );
        }
    }
}

/// Runs the built `vsnoop` with `args` (outside the namespace: the control
/// socket is a file).
fn cli(args: &[&str]) -> Output {
    Command::new(VSNOOP)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vsnoop")
}

/// Runs `vsnoop ARGS`, which must succeed; returns stdout.
fn cli_ok(args: &[&str]) -> Result<String> {
    let out = cli(args);
    ensure!(
        out.status.success(),
        "vsnoop {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs `vsnoop ARGS`, which must fail with exactly one `vsnoop: error:`
/// line on stderr; returns that line.
fn cli_err(args: &[&str]) -> Result<String> {
    let out = cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "vsnoop {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        stderr.lines().count() == 1 && stderr.starts_with("vsnoop: error: "),
        "vsnoop {args:?}: expected one error line, got:\n{stderr}"
    );
    Ok(stderr.trim_end().to_string())
}

// ---------------------------------------------------------------------------
// Guest traffic: ICMP echo to the tap address
// ---------------------------------------------------------------------------

fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with an ICMP echo request from the guest to the tap.
fn echo_request(seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&ECHO_ID.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend((0..56u8).map(|i| i.wrapping_mul(3)));
    let c = inet_csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&HOST_IP);
    let c = inet_csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&HOST_MAC);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame
}

/// Is `f` the echo reply to `seq`?
fn is_echo_reply(f: &[u8], seq: u16) -> bool {
    f.len() >= 42
        && f[12..14] == [0x08, 0x00]
        && f[23] == 1
        && f[26..30] == HOST_IP
        && f[34] == 0
        && f[38..40] == ECHO_ID.to_be_bytes()
        && f[40..42] == seq.to_be_bytes()
}

/// Pings the tap address `count` times (sequence numbers from `first_seq`),
/// each reply awaited; then waits for the TX ring and drains RX.
/// Returns (frames sent, frames received).
fn ping(fe: &mut TestFrontend, first_seq: u16, count: u16) -> Result<(u64, u64)> {
    let mut received = 0;
    for seq in first_seq..first_seq + count {
        fe.send_frame(0, &echo_request(seq))?;
        loop {
            let p = fe
                .recv(0, T)
                .with_context(|| format!("no echo reply to seq {seq}"))?;
            received += 1;
            if is_echo_reply(&p.frame, seq) {
                break;
            }
        }
        // Spread the samples a little.
        thread::sleep(Duration::from_millis(5));
    }
    fe.flush_tx(0, T)?;
    while fe.recv(0, Duration::from_millis(200)).is_ok() {
        received += 1;
    }
    Ok((count as u64, received))
}

/// The test ping flow in a stats or flows JSON array.
fn find_flow(flows: &Value) -> Result<&Value> {
    flows
        .as_array()
        .context("flows is not an array")?
        .iter()
        .find(|f| f["proto"] == "icmp" && f["sport"] == ECHO_ID)
        .with_context(|| format!("no icmp flow with id {ECHO_ID} in {flows}"))
}

// ---------------------------------------------------------------------------
// Raw control socket
// ---------------------------------------------------------------------------

struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect control socket");
        s.set_read_timeout(Some(T)).unwrap();
        Raw {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write control socket");
    }

    fn reply(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read reply");
        assert!(n > 0, "control socket closed");
        assert!(line.ends_with('\n'), "reply without newline: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
    }

    /// Sends one line, returns the reply.
    fn ask(&mut self, line: &[u8]) -> Value {
        self.send(line);
        self.send(b"\n");
        self.reply()
    }
}

fn assert_error(reply: &Value, what: &str) {
    assert_eq!(reply["ok"], false, "{what}: {reply}");
    let e = reply["error"].as_str().unwrap_or_default();
    assert!(!e.is_empty(), "{what}: error without message: {reply}");
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// Sends `request` to the metrics endpoint inside the namespace and returns
/// (status code, headers, body).
fn http(ns: &Netns, request: &'static [u8]) -> Result<(u16, String, String)> {
    in_netns(ns, move || -> Result<(u16, String, String)> {
        let mut s = TcpStream::connect(METRICS).context("connect to the metrics endpoint")?;
        s.set_read_timeout(Some(T))?;
        s.write_all(request)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8(raw).context("response is not UTF-8")?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("no end of headers in {text:?}"))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        Ok((code, head.to_string(), body.to_string()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("HTTP thread panicked"))?
}

/// Checks the exposition's syntax: `# HELP/TYPE/UNIT` lines, samples
/// `name{labels} value`, histogram buckets cumulative and ending at `+Inf`
/// = `_count`, and `# EOF` last.
fn check_openmetrics(body: &str) -> Result<()> {
    ensure!(
        body.ends_with("# EOF\n"),
        "exposition does not end with # EOF"
    );
    let mut last_bucket: Option<(String, f64, u64)> = None;
    let mut inf: std::collections::HashMap<String, u64> = Default::default();
    for line in body.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let kind = rest.split(' ').next().unwrap_or_default();
            ensure!(
                ["HELP", "TYPE", "UNIT"].contains(&kind),
                "bad comment {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            ensure!(series.ends_with('}'), "unclosed labels in {line:?}");
        }
        if name.ends_with("_bucket") {
            let le = series
                .split("le=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .with_context(|| format!("bucket without le in {line:?}"))?;
            let key = series.replace(&format!("le=\"{le}\""), "");
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            if let Some((k, b, c)) = &last_bucket {
                if *k == key {
                    ensure!(bound > *b, "bucket bounds not increasing at {line:?}");
                    ensure!(value as u64 >= *c, "buckets not cumulative at {line:?}");
                }
            }
            if le == "+Inf" {
                inf.insert(name.trim_end_matches("_bucket").to_string(), value as u64);
            }
            last_bucket = Some((key, bound, value as u64));
        }
        if let Some(base) = name.strip_suffix("_count") {
            if let Some(n) = inf.get(base) {
                ensure!(
                    *n == value as u64,
                    "{base}: +Inf bucket {n} != count {value}"
                );
            }
        }
    }
    Ok(())
}

/// The value of the sample line starting with `prefix` (name and labels).
fn sample(body: &str, prefix: &str) -> Result<f64> {
    let line = body
        .lines()
        .find(|l| l.starts_with(prefix))
        .with_context(|| format!("no sample {prefix} in\n{body}"))?;
    Ok(line.rsplit_once(' ').unwrap().1.parse()?)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn stats_and_flows_show_the_ping_flow() -> Result<()> {
    let mut d = Daemon::start();
    let mut fe = d.connect()?;
    let (sent, received) = ping(&mut fe, 1, 10)?;

    let stats = d.stats()?;
    assert_eq!(stats["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(stats["tap"], d.tap.as_str());
    assert_eq!(stats["connected"], true);
    assert_eq!(stats["connections"], 1);
    assert_eq!(stats["ack_offload"], true, "the offload is on by default");
    assert_eq!(stats["capture"], Value::Null);
    assert_eq!(stats["timing"], true);
    assert!(stats["uptime_s"].as_f64().unwrap() > 0.0);
    let q = &stats["queues"][0];
    assert_eq!(q["queue"], 0, "{q}");
    assert_eq!(q["tx_packets"], sent, "{q}");
    assert_eq!(q["rx_packets"], received, "{q}");
    assert!(q["rx_bytes"].as_u64().unwrap() >= received * 98, "{q}");
    assert_eq!(q["tx_drop_bad_chain"], 0, "{q}");
    assert_eq!(stats["packets"], sent + received, "{stats}");

    let flow = find_flow(&stats["flows"])?;
    assert_eq!(flow["src"], "10.77.0.2", "{flow}");
    assert_eq!(flow["dst"], "10.77.0.1", "{flow}");
    assert_eq!(flow["dport"], 0, "{flow}");
    assert_eq!(flow["initiator"], "guest", "{flow}");
    assert_eq!(flow["method"], "icmp-echo", "{flow}");
    assert_eq!(flow["packets_from_guest"], sent, "{flow}");
    assert_eq!(flow["packets_to_guest"], sent, "{flow}");
    let rtt = &flow["outside_rtt_ms"];
    let count = rtt["count"].as_u64().unwrap();
    assert!(count > 0 && count <= sent, "{rtt}");
    let p50 = rtt["p50"].as_f64().unwrap();
    let max = rtt["max"].as_f64().unwrap();
    assert!(p50 > 0.0 && max >= p50 && max < 1000.0, "{rtt}");
    for key in ["p90", "p99"] {
        assert!(rtt[key].as_f64().is_some(), "{rtt}");
    }
    for component in ["backend_delay_ms", "guest_delay_ms"] {
        assert!(flow[component]["count"].is_u64(), "{flow}");
    }
    let iface = &stats["interface"]["outside_rtt_ms"];
    assert!(iface["count"].as_u64().unwrap() >= count, "{iface}");

    // The readable forms.
    let table = cli_ok(&["flows", "--control", d.ctl()])?;
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("PROTO") && header.contains("OUTSIDE_P50"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("icmp"))
        .with_context(|| format!("no icmp row in\n{table}"))?;
    assert!(
        row.contains(&format!("10.77.0.2:{ECHO_ID} -> 10.77.0.1:0")),
        "{table}"
    );
    assert!(
        row.contains("guest") && row.contains("icmp-echo"),
        "{table}"
    );
    let flows_json: Value = serde_json::from_str(&cli_ok(&[
        "flows",
        "--control",
        d.ctl(),
        "--json",
        "--limit",
        "5",
    ])?)?;
    find_flow(&flows_json)?;
    let summary = cli_ok(&["stats", "--control", d.ctl()])?;
    for needle in [
        "outside_rtt",
        "backend_delay",
        "guest_delay",
        &format!("queue 0: rx {received} packets"),
        "ack offload: on",
        "capture: off",
        "frontend connected",
    ] {
        assert!(
            summary.contains(needle),
            "{needle:?} missing from\n{summary}"
        );
    }

    // A reader that went away (`vsnoop stats --json | head -c 100`) is not
    // an error: no panic, no message, exit status 0.
    for args in [&["stats", "--json"][..], &["flows"], &["stats"]] {
        let out = Command::new(VSNOOP)
            .args(args)
            .args(["--control", d.ctl()])
            .stdin(Stdio::null())
            .stdout(closed_pipe()?)
            .stderr(Stdio::piped())
            .output()?;
        ensure!(
            out.status.success() && out.stderr.is_empty(),
            "vsnoop {args:?} into a closed pipe: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    d.assert_alive();
    Ok(())
}

/// The write end of a pipe whose read end is already closed.
fn closed_pipe() -> Result<Stdio> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    ensure!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0,
        "pipe2: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Ok(Stdio::from(write))
}

#[test]
fn malformed_requests_get_errors_and_the_socket_keeps_serving() -> Result<()> {
    let mut d = Daemon::start();
    let mut raw = Raw::connect(&d.ctl);
    let long = vec![b'x'; 70 * 1024];
    let cases: Vec<(&str, &[u8])> = vec![
        ("garbage", b"hello there"),
        ("binary", b"\xff\xfe\x00\x01"),
        ("empty object", b"{}"),
        ("array", b"[1]"),
        ("tagged array", b"[\"stats\"]"),
        ("number", b"42"),
        ("unknown cmd", br#"{"cmd":"reboot"}"#),
        ("cmd not a string", br#"{"cmd":7}"#),
        ("wrong type", br#"{"cmd":"ack_offload","on":"yes"}"#),
        ("missing argument", br#"{"cmd":"ack_offload"}"#),
        ("negative limit", br#"{"cmd":"flows","limit":-3}"#),
        (
            "bad snaplen",
            br#"{"cmd":"capture_start","file":"/tmp/x.pcapng","snaplen":1}"#,
        ),
        (
            "relative file",
            br#"{"cmd":"capture_start","file":"x.pcapng"}"#,
        ),
        ("unknown field", br#"{"cmd":"stats","limt":1}"#),
        ("over-long line", &long),
        ("unterminated JSON", br#"{"cmd":"stats""#),
    ];
    for (what, line) in &cases {
        let reply = raw.ask(line);
        assert_error(&reply, what);
        // The same connection still serves.
        let ok = raw.ask(br#"{"cmd":"version"}"#);
        assert_eq!(ok["ok"], true, "after {what}: {ok}");
    }
    // Two requests in one write, and one request in pieces.
    raw.send(b"{\"cmd\":\"version\"}\n{\"cmd\":\"capture_status\"}\n");
    assert_eq!(raw.reply()["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        raw.reply(),
        serde_json::json!({"ok": true, "capture": null})
    );
    raw.send(b"{\"cmd\":");
    thread::sleep(Duration::from_millis(100));
    let stats = raw.ask(b"\"stats\"}");
    assert_eq!(stats["ok"], true);
    assert!(
        stats["queues"].is_array() && stats["flows"].is_array(),
        "{stats}"
    );
    // Blank lines are not requests.
    raw.send(b"\n  \n");
    assert_eq!(raw.ask(br#"{"cmd":"version"}"#)["ok"], true);
    drop(raw);

    // A new connection works, and so does the client.
    let mut again = Raw::connect(&d.ctl);
    assert_eq!(again.ask(br#"{"cmd":"stats","limit":0}"#)["ok"], true);
    drop(again);
    d.stats()?;

    // Clients beyond the cap are told so; the slots come back.
    let held: Vec<Raw> = (0..16).map(|_| Raw::connect(&d.ctl)).collect();
    thread::sleep(Duration::from_millis(200));
    let mut extra = Raw::connect(&d.ctl);
    let reply = extra.reply();
    assert_error(&reply, "client 17");
    assert!(
        reply["error"].as_str().unwrap().contains("too many"),
        "{reply}"
    );
    drop(held);
    drop(extra);
    let deadline = Instant::now() + T;
    loop {
        let mut c = Raw::connect(&d.ctl);
        c.send(b"{\"cmd\":\"version\"}\n");
        if c.reply()["ok"] == true {
            break;
        }
        ensure!(Instant::now() < deadline, "client slots never freed");
        thread::sleep(Duration::from_millis(50));
    }
    d.assert_alive();
    Ok(())
}

#[test]
fn ack_offload_and_capture_through_the_cli() -> Result<()> {
    require_tool("tshark");
    let mut d = Daemon::start();
    let mut fe = d.connect()?;

    // On by default: off, then on again.
    let out = cli_ok(&["ack-offload", "--control", d.ctl(), "off"])?;
    assert!(out.contains("ack offload: off"), "{out}");
    assert_eq!(d.stats()?["ack_offload"], false);
    let out = cli_ok(&["ack-offload", "--control", d.ctl(), "on"])?;
    assert!(out.contains("ack offload: on"), "{out}");
    assert_eq!(d.stats()?["ack_offload"], true);
    // Without on|off: the switch and the (empty) flow table, text and JSON.
    let out = cli_ok(&["ack-offload", "--control", d.ctl()])?;
    assert_eq!(out, "ack offload: on, 0 flows tracked\n");
    let out = cli_ok(&[
        "ack-offload",
        "--control",
        d.ctl(),
        "--json",
        "--limit",
        "5",
    ])?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(list["ack_offload"], true, "{out}");
    assert_eq!(list["flows_tracked"], 0, "{out}");
    assert_eq!(list["flows"], serde_json::json!([]), "{out}");
    // A switch and a listing option together: the parser's usage error.
    let out = cli(&["ack-offload", "--control", d.ctl(), "on", "--json"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("cannot be used with"),
        "{e}"
    );

    // A relative path is resolved against the client's directory.
    let capdir = TempDir::new("ctlcap");
    let out = Command::new(VSNOOP)
        .current_dir(&capdir.path)
        .args(["capture", "--control", d.ctl(), "start", "run.pcapng"])
        .args(["--snaplen", "128"])
        .output()?;
    ensure!(out.status.success(), "capture start: {out:?}");
    let file = capdir.join("run.pcapng");
    let file_s = file.to_str().unwrap();
    assert!(file.exists(), "{} was not created", file.display());
    let status = cli_ok(&["capture", "--control", d.ctl(), "status"])?;
    assert!(
        status.contains(file_s) && status.contains("snaplen 128"),
        "{status}"
    );
    assert!(
        status.contains(" dropped, 0 filtered, 0 rotations)"),
        "{status}"
    );
    let capture = d.stats()?["capture"].clone();
    assert_eq!(capture["path"], file_s, "{capture}");
    assert_eq!(capture["snaplen"], 128, "{capture}");

    let (sent, received) = ping(&mut fe, 100, 5)?;
    let stopped = cli_ok(&["capture", "--control", d.ctl(), "stop"])?;
    assert!(stopped.starts_with("capture stopped:"), "{stopped}");
    let frames = sent + received;
    assert!(
        stopped.contains(&format!("{frames} frames")),
        "expected {frames} frames: {stopped}"
    );
    assert!(
        stopped.contains(" filtered, ") && stopped.contains(" rotations)"),
        "{stopped}"
    );
    assert_eq!(d.stats()?["capture"], Value::Null);
    let out = cli_ok(&["capture", "--control", d.ctl(), "stop"])?;
    assert!(out.contains("no capture was running"), "{out}");
    let out = cli_ok(&["capture", "--control", d.ctl(), "status"])?;
    assert!(out.contains("capture: off"), "{out}");

    let out = Command::new("tshark")
        .args(["-r", file_s, "-T", "fields", "-e", "frame.interface_id"])
        .args(["-e", "icmp.type"])
        .output()?;
    ensure!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    assert_eq!(text.lines().count() as u64, 2 * frames, "{text}");
    let requests = text.lines().filter(|l| l.ends_with("\t8")).count() as u64;
    assert_eq!(requests, 2 * sent, "{text}");

    // An unwritable file is the daemon's error, reported by the client.
    let e = cli_err(&[
        "capture",
        "--control",
        d.ctl(),
        "start",
        "/nonexistent/dir/x.pcapng",
    ])?;
    assert!(e.contains("cannot create capture file"), "{e}");
    let e = cli_err(&[
        "capture",
        "--control",
        d.ctl(),
        "start",
        "/tmp/x.pcapng",
        "--snaplen",
        "8",
    ])?;
    assert!(e.contains("snaplen"), "{e}");
    d.assert_alive();
    Ok(())
}

#[test]
fn metrics_endpoint_serves_openmetrics() -> Result<()> {
    let mut d = Daemon::start();
    let mut fe = d.connect()?;
    let (sent, _) = ping(&mut fe, 200, 8)?;
    cli_ok(&["ack-offload", "--control", d.ctl(), "on"])?;

    let (code, head, body) = http(
        &d.ns,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    )?;
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    check_openmetrics(&body)?;
    let tap = &d.tap;
    let labels = format!("{{queue=\"0\",tap=\"{tap}\"}}");
    assert_eq!(
        sample(&body, &format!("vsnoop_queue_tx_packets_total{labels}"))?,
        sent as f64
    );
    assert!(sample(&body, &format!("vsnoop_queue_rx_packets_total{labels}"))? >= sent as f64);
    assert_eq!(
        sample(
            &body,
            &format!("vsnoop_queue_tx_drop_bad_chain_total{labels}")
        )?,
        0.0
    );
    let t = format!("tap=\"{tap}\"");
    assert_eq!(
        sample(&body, &format!("vsnoop_ack_offload_enabled{{{t}}}"))?,
        1.0
    );
    assert_eq!(
        sample(&body, &format!("vsnoop_frontend_connected{{{t}}}"))?,
        1.0
    );
    assert!(
        sample(&body, &format!("vsnoop_attribution_packets_total{{{t}}}"))? >= 2.0 * sent as f64
    );
    assert!(sample(&body, &format!("vsnoop_attribution_flows_tracked{{{t}}}"))? >= 1.0);
    sample(&body, &format!("vsnoop_capture_frames_total{{{t}}}"))?;
    let rtt = sample(&body, &format!("vsnoop_outside_rtt_seconds_count{{{t}}}"))?;
    assert!(rtt >= 1.0 && rtt <= sent as f64, "{body}");
    assert_eq!(
        sample(
            &body,
            &format!("vsnoop_outside_rtt_seconds_bucket{{le=\"+Inf\",{t}}}")
        )?,
        rtt
    );
    assert_eq!(
        sample(
            &body,
            &format!("vsnoop_outside_rtt_seconds_bucket{{le=\"10.0\",{t}}}")
        )?,
        rtt,
        "a loopback ping took more than 10 s?"
    );
    assert!(sample(&body, &format!("vsnoop_outside_rtt_seconds_sum{{{t}}}"))? > 0.0);
    for family in ["backend_delay", "guest_delay", "backend_rx", "backend_tx"] {
        sample(
            &body,
            &format!("vsnoop_{family}_seconds_bucket{{le=\"+Inf\",{t}}}"),
        )?;
    }
    assert_eq!(
        sample(&body, &format!("vsnoop_backend_rx_seconds_count{{{t}}}"))?,
        sample(&body, &format!("vsnoop_queue_rx_packets_total{labels}"))?
    );

    // Wrong path, wrong method, garbage: answered, and the server goes on.
    let (code, _, _) = http(&d.ns, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")?;
    assert_eq!(code, 404);
    let (code, head, _) = http(&d.ns, b"DELETE /metrics HTTP/1.1\r\n\r\n")?;
    assert_eq!(code, 405, "{head}");
    let (code, _, _) = http(&d.ns, b"\x00\x01\x02 garbage\r\n\r\n")?;
    assert_eq!(code, 400);
    // A client that sends nothing does not block others.
    let ns_name = d.ns.name.clone();
    let idle = in_netns(&d.ns, || TcpStream::connect(METRICS))
        .join()
        .unwrap()?;
    let (code, _, body) = http(&d.ns, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")?;
    assert_eq!(code, 200, "{ns_name}");
    check_openmetrics(&body)?;
    drop(idle);
    d.assert_alive();
    Ok(())
}

#[test]
fn top_refreshes_and_ends_cleanly() -> Result<()> {
    let mut d = Daemon::start();
    let mut fe = d.connect()?;
    ping(&mut fe, 300, 3)?;

    let ctl = d.ctl().to_string();
    let spawn_top = || {
        Command::new(VSNOOP)
            .args(["top", "--control", &ctl, "--interval", "0.2"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vsnoop top")
    };
    let wait = |child: &mut std::process::Child| -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + T;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("vsnoop top did not end");
            }
            thread::sleep(Duration::from_millis(20));
        }
    };

    // Ctrl-C: exit 0, terminal restored.
    let mut top = spawn_top();
    thread::sleep(Duration::from_millis(1200));
    assert!(top.try_wait()?.is_none(), "top ended early");
    signal(top.id(), 2);
    let status = wait(&mut top)?;
    let out = top.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success(),
        "top exited with {status}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\x1b[2J"), "no screen clear: {stdout:?}");
    assert!(stdout.contains(&format!("on tap {}", d.tap)), "{stdout}");
    assert!(stdout.contains("pkt/s"), "{stdout}");
    assert!(stdout.contains("outside_rtt"), "{stdout}");
    assert!(stdout.contains(&format!("10.77.0.2:{ECHO_ID}")), "{stdout}");
    assert!(
        stdout.ends_with("\x1b[?25h\x1b[?1049l"),
        "terminal not restored: {stdout:?}"
    );

    // The daemon goes away: one clear error, terminal restored.
    let mut top = spawn_top();
    thread::sleep(Duration::from_millis(600));
    d.assert_alive();
    drop(fe);
    assert_eq!(d.vs.terminate(), Some(0));
    let status = wait(&mut top)?;
    let out = top.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !status.success(),
        "top did not fail when the daemon went away"
    );
    assert!(
        stderr.lines().count() == 1 && stderr.contains("lost the daemon"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\x1b[?25h\x1b[?1049l"));
    Ok(())
}

#[test]
fn client_errors_are_one_clear_line() -> Result<()> {
    let e = cli_err(&["stats", "--control", "/nonexistent"])?;
    assert!(e.contains("no control socket at /nonexistent"), "{e}");
    let e = cli_err(&["flows", "--control", "/nonexistent/x.ctl", "--json"])?;
    assert!(e.contains("no control socket"), "{e}");
    let e = cli_err(&["top", "--control", "/nonexistent"])?;
    assert!(e.contains("no control socket"), "{e}");

    let dir = TempDir::new("ctlerr");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"x")?;
    let e = cli_err(&["stats", "--control", file.to_str().unwrap()])?;
    assert!(e.contains("is not a socket"), "{e}");
    // A socket nobody serves (left behind by a crashed daemon).
    let stale = dir.join("stale.ctl");
    drop(UnixListener::bind(&stale)?);
    let e = cli_err(&["ack-offload", "--control", stale.to_str().unwrap(), "on"])?;
    assert!(e.contains("refuses connections"), "{e}");
    let e = cli_err(&[
        "top",
        "--control",
        stale.to_str().unwrap(),
        "--interval",
        "0",
    ])?;
    assert!(e.contains("--interval"), "{e}");

    // The daemon refuses a --control path that is not a socket.
    let ns = Netns::new("vsc");
    let tap = common::unique("vsc");
    let mut vs = Vsnoop::spawn(
        &ns,
        &[
            "--socket",
            dir.join("vsnoop.sock").to_str().unwrap(),
            "--tap",
            &tap,
            "--control",
            file.to_str().unwrap(),
        ],
        &dir.join("vsnoop.log"),
    );
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = vs.child.try_wait()? {
            break s;
        }
        ensure!(Instant::now() < deadline, "vsnoop did not refuse the path");
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    let log = vs.log_text();
    assert!(log.contains("exists and is not a socket"), "{log}");
    Ok(())
}
