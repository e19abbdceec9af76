//! DPDK as an independent vhost-user frontend.
//!
//! `dpdk-testpmd` with a `net_virtio_user` port is a virtio-net driver that
//! shares nothing with our code: it negotiates features, lays out the rings and
//! reads/writes packets exactly as DPDK's virtio PMD does for a real device.
//! Each test runs `vsnoop --socket SOCK --tap TAP` and testpmd inside a private
//! network namespace, drives testpmd over its interactive prompt (`start`,
//! `stop`, `quit`) and checks three independent counts against each other:
//!
//! * testpmd's forwarding statistics printed by `stop` (since `start`):
//!   `TX-packets` = packets the virtio PMD placed on the TX ring (those it could
//!   not place are `TX-dropped` and never reach vsnoop); `RX-packets` = packets
//!   taken from the RX ring;
//! * vsnoop's counters (SIGUSR1, summed over queue pairs, virtio naming):
//!   `tx_packets` = frames taken from the TX ring and written to the tap,
//!   `rx_packets` = frames read from the tap and delivered to the RX ring;
//! * the kernel's tap counters: `rx_packets` = frames vsnoop wrote into the tap,
//!   `tx_packets` = frames vsnoop read from the tap, `tx_dropped` = frames the
//!   kernel dropped because the tap queue was full.
//!
//! Frames are injected into (and captured from) the tap with a small AF_PACKET
//! helper in python3, inside the namespace. IPv6 is disabled in the namespace
//! so the kernel sends nothing of its own through the tap and counts are exact.
//! The tests fail (never skip) when dpdk-testpmd or python3 is missing. They
//! run one at a time (testpmd busy-polls a core).

mod common;

use common::{require_tool, unique, Netns, TempDir, Vsnoop};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// testpmd busy-polls one core; the machine has two. Run these tests serially.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// AF_PACKET frame injector / capturer, run with python3 inside the namespace.
///
/// `pktio.py send IFACE N SIZES` sends N IPv4/UDP frames (sizes cycle through
/// the comma-separated SIZES, UDP source port and IP id vary per frame, the
/// frame index is the first payload word), paced in bursts of 32.
/// `pktio.py echo IFACE N SIZES` does the same and counts the frames that come
/// back into the tap with source and destination MAC swapped (and frames of
/// ours that come back unswapped, as `bad`). Prints `sent=.. received=.. bad=..`.
const PKTIO: &str = r#"
import socket, struct, sys, time
mode, ifname, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sizes = [int(x) for x in sys.argv[4].split(",")]
SRC = bytes.fromhex("02000000a0a1")
DST = bytes.fromhex("02000000b0b2")
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4

def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def frame(i):
    size = sizes[i % len(sizes)]
    plen = size - 14 - 20 - 8
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + plen, i & 0xFFFF, 0, 64, 17, 0,
                     bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2]))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", 1024 + (i % 4096), 9, 8 + plen, 0)
    payload = struct.pack("!I", i) + bytes((i + k) & 0xFF for k in range(plen - 4))
    return DST + SRC + b"\x08\x00" + ip + udp + payload

tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
tx.bind((ifname, 0))
rx = None
if mode == "echo":
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
    rx.bind((ifname, 0))
    rx.setblocking(False)
seen, bad, badinfo = set(), 0, []

def drain():
    global bad
    while True:
        try:
            data, addr = rx.recvfrom(70000)
        except BlockingIOError:
            return
        if addr[2] == PACKET_OUTGOING or len(data) < 46 or data[12:14] != b"\x08\x00":
            continue
        if data[36:38] != b"\x00\x09":
            continue
        idx = struct.unpack("!I", data[42:46])[0]
        want = SRC + DST + frame(idx)[12:]
        if data == want:
            seen.add(idx)
        else:
            bad += 1
            if len(badinfo) < 5:
                diff = next((k for k in range(min(len(data), len(want))) if data[k] != want[k]), -1)
                badinfo.append("idx=%d len=%d want=%d first_diff=%d" % (idx, len(data), len(want), diff))

for i in range(n):
    tx.send(frame(i))
    if i % 32 == 31:
        time.sleep(0.002)
        if rx is not None:
            drain()
if rx is not None:
    deadline = time.time() + 10
    while len(seen) < n and time.time() < deadline:
        drain()
        time.sleep(0.01)
    time.sleep(0.2)
    drain()
print("sent=%d received=%d bad=%d bytes=%d" % (n, len(seen), bad, sum(sizes[i % len(sizes)] for i in range(n))))
for line in badinfo:
    print("bad frame:", line)
"#;

/// One test's world: namespace, scratch directory, vsnoop, and the tap name.
struct Setup {
    ns: Netns,
    tmp: TempDir,
    vsnoop: Vsnoop,
    tap: String,
    sock: PathBuf,
}

impl Setup {
    fn new(queues: usize) -> Setup {
        require_tool("dpdk-testpmd");
        require_tool("python3");
        require_tool("stdbuf");
        let ns = Netns::new("vsd");
        // No IPv6 (router/neighbour solicitations) on the tap: counts stay exact.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        let tmp = TempDir::new("dpdk");
        fs::write(tmp.join("pktio.py"), PKTIO).expect("write pktio.py");
        let tap = unique("vsdt");
        let sock = tmp.join("vhost.sock");
        let sock_s = sock.to_str().expect("utf-8 path").to_string();
        let queues_s = queues.to_string();
        let args = ["--socket", &sock_s, "--tap", &tap, "--queues", &queues_s];
        let vsnoop = Vsnoop::spawn(&ns, &args, &tmp.join("vsnoop.log"));
        vsnoop.wait_for_log("listening on", Duration::from_secs(20));
        ns.wait_for_link(&tap, Duration::from_secs(10));
        Setup {
            ns,
            tmp,
            vsnoop,
            tap,
            sock,
        }
    }

    /// Starts testpmd (interactive) with a virtio-user port on our socket and
    /// waits until it is connected and configured.
    fn testpmd(&mut self, devargs: &str, app_args: &[&str]) -> Testpmd {
        let vdev = format!("net_virtio_user0,path={},{devargs}", self.sock.display());
        let mut pmd = Testpmd::spawn(&self.ns, &self.tmp.path, &[&vdev], app_args);
        self.vsnoop
            .wait_for_log("frontend connected", Duration::from_secs(30));
        self.ns.exec(&["ip", "link", "set", &self.tap, "up"]);
        // Room for 64 KiB frames (tun's largest MTU) in the jumbo tests.
        self.ns
            .exec(&["ip", "link", "set", &self.tap, "mtu", "65521"]);
        // testpmd prints its prompt only after the port is configured and
        // started, i.e. after the whole vhost-user set-up has been sent.
        pmd.wait_for("testpmd> ", 0, Duration::from_secs(60));
        thread::sleep(Duration::from_millis(300));
        pmd
    }

    fn tap_counter(&self, name: &str) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/{name}", self.tap);
        self.ns
            .exec(&["cat", &path])
            .trim()
            .parse()
            .expect("tap counter")
    }

    fn tap_counters(&self) -> HashMap<&'static str, u64> {
        [
            "rx_packets",
            "rx_bytes",
            "tx_packets",
            "tx_bytes",
            "tx_dropped",
            "rx_dropped",
        ]
        .into_iter()
        .map(|k| (k, self.tap_counter(k)))
        .collect()
    }

    /// Runs the AF_PACKET helper; returns (sent, received, bad, bytes sent).
    fn pktio(&self, mode: &str, n: u64, sizes: &str) -> (u64, u64, u64, u64) {
        let script = self.tmp.join("pktio.py");
        let out = self.ns.exec(&[
            "python3",
            script.to_str().expect("utf-8 path"),
            mode,
            &self.tap,
            &n.to_string(),
            sizes,
        ]);
        if out.contains("bad frame") {
            eprintln!("pktio {mode}:\n{out}");
        }
        let field = |key: &str| -> u64 {
            out.split_whitespace()
                .find_map(|f| f.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("pktio output without {key}: {out}"))
        };
        (
            field("sent="),
            field("received="),
            field("bad="),
            field("bytes="),
        )
    }

    /// Polls vsnoop's counters until `key` reaches `want` (or 10 s pass) and
    /// returns the last snapshot.
    fn stats_until(&mut self, key: &str, want: u64) -> HashMap<String, u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.vsnoop.stats();
            let have = stats.get(key).copied().unwrap_or(0);
            if have >= want || Instant::now() > deadline {
                return stats;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Quits testpmd and checks that vsnoop exits cleanly on SIGTERM.
    fn finish(&mut self, mut pmd: Testpmd) {
        pmd.quit();
        let ctx = self.context(&pmd);
        assert_eq!(self.vsnoop.terminate(), Some(0), "vsnoop exit status{ctx}");
    }

    fn context(&self, pmd: &Testpmd) -> String {
        format!(
            "\n--- vsnoop log (tail) ---\n{}\n--- testpmd log (tail) ---\n{}",
            tail(&self.vsnoop.log_text(), 40),
            tail(&pmd.log_text(), 60)
        )
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Forwarding statistics printed by testpmd's `stop` (since `start`).
#[derive(Debug, Default, Clone, Copy)]
struct FwdStats {
    rx_packets: u64,
    tx_packets: u64,
    tx_dropped: u64,
}

/// An interactive `dpdk-testpmd` inside a namespace, driven over stdin; its
/// output (line-buffered through stdbuf) goes to a log file.
struct Testpmd {
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
    prefix: String,
}

impl Testpmd {
    fn spawn(ns: &Netns, dir: &Path, vdevs: &[&str], app_args: &[&str]) -> Testpmd {
        let prefix = unique("vsdp");
        let log = dir.join(format!("{prefix}.log"));
        let logfile = fs::File::create(&log).expect("create testpmd log");
        let mut cmd = ns.command("stdbuf");
        cmd.args(["-oL", "dpdk-testpmd", "--no-pci", "--no-huge", "-m", "1024"])
            .args(["--file-prefix", &prefix, "--lcores", "0@0,1@1"])
            .args(vdevs.iter().flat_map(|v| ["--vdev", v]))
            .args(["--", "-i", "--total-num-mbufs=32768"])
            .args(app_args)
            .stdin(Stdio::piped())
            .stdout(logfile.try_clone().expect("dup log"))
            .stderr(logfile);
        let mut child = cmd.spawn().expect("spawn dpdk-testpmd");
        let stdin = child.stdin.take();
        Testpmd {
            child,
            stdin,
            log,
            prefix,
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log, from byte `from` on, contains `needle`.
    fn wait_for(&mut self, needle: &str, from: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if text.get(from..).is_some_and(|t| t.contains(needle)) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("testpmd exited ({status:?}) before printing {needle:?}:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "testpmd never printed {needle:?}:\n{text}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends one command line and waits for the next prompt; returns the output.
    fn cmd(&mut self, line: &str) -> String {
        let from = self.log_text().len();
        let stdin = self.stdin.as_mut().expect("testpmd stdin");
        writeln!(stdin, "{line}").expect("write to testpmd");
        stdin.flush().expect("flush testpmd stdin");
        self.wait_for("testpmd> ", from, Duration::from_secs(30));
        self.log_text()[from..].to_string()
    }

    /// `start`, wait, `stop`: returns the forwarding statistics of the run.
    fn run_for(&mut self, duration: Duration) -> FwdStats {
        self.cmd("start");
        thread::sleep(duration);
        self.stop()
    }

    fn stop(&mut self) -> FwdStats {
        let out = self.cmd("stop");
        parse_fwd_stats(&out).unwrap_or_else(|| panic!("no forward statistics in:\n{out}"))
    }

    fn quit(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.quit();
        let _ = fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

/// Parses the "Accumulated forward statistics for all ports" block.
fn parse_fwd_stats(out: &str) -> Option<FwdStats> {
    let start = out.rfind("Accumulated forward statistics")?;
    let block = &out[start..];
    let value = |key: &str| -> Option<u64> {
        let pos = block.find(key)? + key.len();
        block[pos..].split_whitespace().next()?.parse().ok()
    };
    Some(FwdStats {
        rx_packets: value("RX-packets:")?,
        tx_packets: value("TX-packets:")?,
        tx_dropped: value("TX-dropped:")?,
    })
}

/// Sums of each counter per queue pair in the last `vsnoop-stats` block.
fn per_queue(log: &str, key: &str) -> Vec<u64> {
    let start = log.rfind("vsnoop-stats-begin").unwrap_or(0);
    let prefix = format!("{key}=");
    log[start..]
        .lines()
        .filter(|l| l.contains("vsnoop-stats queue="))
        .map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix(&prefix))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

fn get(stats: &HashMap<String, u64>, key: &str) -> u64 {
    *stats
        .get(key)
        .unwrap_or_else(|| panic!("vsnoop stats lack {key}: {stats:?}"))
}

/// Every drop counter of vsnoop (everything except the packet/byte counts and
/// the two non-drop events) must be zero.
fn assert_no_drops(stats: &HashMap<String, u64>, ctx: &str) {
    let drops: Vec<_> = stats
        .iter()
        .filter(|(k, v)| {
            (k.contains("drop") || k.contains("error") || k.contains("bad")) && **v > 0
        })
        .collect();
    assert!(drops.is_empty(), "vsnoop dropped frames: {drops:?}{ctx}");
}

/// txonly: testpmd transmits for a while; every frame it placed on the TX ring
/// is written to the tap, and the three counts agree exactly.
fn txonly_case(queues: usize, devargs: &str, extra: &[&str], frame_len: u64) {
    let _guard = serial();
    let mut s = Setup::new(queues);
    let mut args = vec!["--forward-mode=txonly"];
    args.extend_from_slice(extra);
    let mut pmd = s.testpmd(devargs, &args);
    let before_tap = s.tap_counters();
    let before = s.vsnoop.stats();
    let fwd = pmd.run_for(Duration::from_millis(1500));
    let ctx = s.context(&pmd);
    assert!(
        fwd.tx_packets > 1000,
        "testpmd sent almost nothing: {fwd:?}{ctx}"
    );
    let want = get(&before, "tx_packets") + fwd.tx_packets;
    let after = s.stats_until("tx_packets", want);
    let after_tap = s.tap_counters();
    let sent = get(&after, "tx_packets") - get(&before, "tx_packets");
    let bytes = get(&after, "tx_bytes") - get(&before, "tx_bytes");
    let tap_rx = after_tap["rx_packets"] - before_tap["rx_packets"];
    let tap_rx_bytes = after_tap["rx_bytes"] - before_tap["rx_bytes"];
    eprintln!("txonly {devargs}: testpmd {fwd:?}; vsnoop tx {sent} frames {bytes} B; tap rx {tap_rx} frames {tap_rx_bytes} B");
    assert_eq!(
        sent, fwd.tx_packets,
        "vsnoop tx_packets != testpmd TX-packets{ctx}"
    );
    assert_eq!(
        tap_rx, fwd.tx_packets,
        "tap rx_packets != testpmd TX-packets{ctx}"
    );
    assert_eq!(
        bytes,
        frame_len * sent,
        "vsnoop tx_bytes != {frame_len} B per frame{ctx}"
    );
    assert_eq!(
        tap_rx_bytes,
        frame_len * sent,
        "tap rx_bytes != {frame_len} B per frame{ctx}"
    );
    assert_no_drops(&after, &ctx);
    assert_every_pair_carried(&s, "tx_packets", queues, &ctx);
    s.finish(pmd);
}

/// With several queue pairs, each one must have carried traffic (`key`).
fn assert_every_pair_carried(s: &Setup, key: &str, queues: usize, ctx: &str) {
    if queues == 1 {
        return;
    }
    // The tap is multi-queue: the kernel spreads the flows by hash.
    let q = per_queue(&s.vsnoop.log_text(), key);
    eprintln!("{key} per queue pair: {q:?}");
    assert_eq!(
        q.len(),
        queues,
        "expected {queues} queue pairs in the stats{ctx}"
    );
    assert!(
        q.iter().all(|&n| n > 0),
        "a queue pair carried no traffic ({key}): {q:?}{ctx}"
    );
}

/// rxonly: N frames injected into the tap all reach testpmd.
fn rxonly_case(queues: usize, devargs: &str, extra: &[&str], n: u64, sizes: &str) {
    let _guard = serial();
    let mut s = Setup::new(queues);
    let mut args = vec!["--forward-mode=rxonly"];
    args.extend_from_slice(extra);
    let mut pmd = s.testpmd(devargs, &args);
    pmd.cmd("start");
    let before_tap = s.tap_counters();
    let before = s.vsnoop.stats();
    let (sent, _, _, sent_bytes) = s.pktio("send", n, sizes);
    let want = get(&before, "rx_packets") + sent;
    let after = s.stats_until("rx_packets", want);
    thread::sleep(Duration::from_millis(300));
    let fwd = pmd.stop();
    let after_tap = s.tap_counters();
    let ctx = s.context(&pmd);
    let delivered = get(&after, "rx_packets") - get(&before, "rx_packets");
    let tap_tx = after_tap["tx_packets"] - before_tap["tx_packets"];
    let tap_dropped = after_tap["tx_dropped"] - before_tap["tx_dropped"];
    eprintln!("rxonly {devargs}: injected {sent}; tap tx {tap_tx} dropped {tap_dropped}; vsnoop rx {delivered}; testpmd {fwd:?}");
    assert_eq!(
        tap_dropped, 0,
        "the kernel dropped frames at the tap queue{ctx}"
    );
    assert_eq!(tap_tx, sent, "tap tx_packets != injected{ctx}");
    assert_eq!(delivered, sent, "vsnoop rx_packets != injected{ctx}");
    assert_eq!(fwd.rx_packets, sent, "testpmd RX-packets != injected{ctx}");
    let tap_bytes = after_tap["tx_bytes"] - before_tap["tx_bytes"];
    let bytes = get(&after, "rx_bytes") - get(&before, "rx_bytes");
    assert_eq!(tap_bytes, sent_bytes, "tap tx_bytes != bytes injected{ctx}");
    assert_eq!(
        bytes, sent_bytes,
        "vsnoop rx_bytes != bytes injected (truncated frames?){ctx}"
    );
    assert_no_drops(&after, &ctx);
    // Only the pairs the frontend uses must carry traffic.
    let in_use = devargs
        .split(',')
        .find_map(|kv| kv.strip_prefix("queues="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    assert_every_pair_carried(&s, "rx_packets", in_use, &ctx);
    s.finish(pmd);
}

/// macswap: N frames injected into the tap come back out of it, each one
/// byte-identical except for the swapped MAC addresses.
fn macswap_case(queues: usize, devargs: &str, extra: &[&str], n: u64, sizes: &str) {
    let _guard = serial();
    let mut s = Setup::new(queues);
    let mut args = vec!["--forward-mode=macswap"];
    args.extend_from_slice(extra);
    let mut pmd = s.testpmd(devargs, &args);
    // A real driver (Linux virtio-net) stops its queue when the TX ring is
    // full and resumes on the used-ring update; it does not drop. testpmd's
    // retry mode does the same, for up to 200 ms, so a backend descheduled
    // for a moment on this 2-core machine costs time, not frames. A backend
    // that missed a kick still shows up as TX-dropped below.
    let mode = pmd.cmd("set fwd macswap retry");
    assert!(mode.contains("with retry"), "testpmd refused retry: {mode}");
    pmd.cmd("set burst tx delay 100 retry 2000");
    pmd.cmd("start");
    let before_tap = s.tap_counters();
    let before = s.vsnoop.stats();
    let (sent, received, bad, sent_bytes) = s.pktio("echo", n, sizes);
    let after = s.stats_until("tx_packets", get(&before, "tx_packets") + sent);
    let fwd = pmd.stop();
    let nic = pmd.cmd("show port stats 0");
    let bytes_in = get(&after, "rx_bytes") - get(&before, "rx_bytes");
    let bytes_out = get(&after, "tx_bytes") - get(&before, "tx_bytes");
    eprintln!(
        "vsnoop rx_bytes {bytes_in} tx_bytes {bytes_out}; testpmd:{}",
        tail(&nic, 9)
    );
    let after_tap = s.tap_counters();
    let ctx = s.context(&pmd);
    let to_guest = get(&after, "rx_packets") - get(&before, "rx_packets");
    let from_guest = get(&after, "tx_packets") - get(&before, "tx_packets");
    let tap_rx = after_tap["rx_packets"] - before_tap["rx_packets"];
    eprintln!("macswap {devargs}: injected {sent} echoed {received} bad {bad}; vsnoop rx {to_guest} tx {from_guest}; tap rx {tap_rx}; testpmd {fwd:?}");
    assert_eq!(
        bytes_in, sent_bytes,
        "vsnoop rx_bytes != bytes injected (truncated frames?){ctx}"
    );
    assert_eq!(
        bytes_out, sent_bytes,
        "vsnoop tx_bytes != bytes injected{ctx}"
    );
    assert_eq!(bad, 0, "frames came back unswapped or altered{ctx}");
    assert_eq!(received, sent, "not every frame came back swapped{ctx}");
    assert_eq!(to_guest, sent, "vsnoop rx_packets != injected{ctx}");
    assert_eq!(from_guest, sent, "vsnoop tx_packets != injected{ctx}");
    assert_eq!(tap_rx, sent, "tap rx_packets != injected{ctx}");
    assert_eq!(fwd.rx_packets, sent, "testpmd RX-packets{ctx}");
    assert_eq!(fwd.tx_packets, sent, "testpmd TX-packets{ctx}");
    assert_eq!(
        fwd.tx_dropped, 0,
        "testpmd could not place echoes on the TX ring{ctx}"
    );
    assert_no_drops(&after, &ctx);
    s.finish(pmd);
}

const MRG: &str = "queues=1,mrg_rxbuf=1";
const NO_MRG: &str = "queues=1,mrg_rxbuf=0";
const TWO_QUEUES: &str = "queues=2,mrg_rxbuf=1";
/// Sizes cycling from the minimum frame to a full 1500-byte MTU frame.
const MIXED: &str = "60,64,128,256,511,1000,1514";

#[test]
fn txonly_64_byte_frames_reach_the_tap() {
    txonly_case(1, MRG, &[], 64);
}

#[test]
fn txonly_multi_segment_1514_byte_frames_reach_the_tap() {
    // Each frame is a 3-mbuf chain: three descriptors per packet on the ring.
    txonly_case(1, MRG, &["--txpkts=64,450,1000"], 1514);
}

#[test]
fn txonly_without_mergeable_buffers() {
    txonly_case(1, NO_MRG, &["--txpkts=1000"], 1000);
}

#[test]
fn rxonly_counts_every_injected_frame() {
    rxonly_case(1, MRG, &[], 3000, "60");
}

#[test]
fn rxonly_mixed_sizes_with_mergeable_buffers() {
    rxonly_case(1, MRG, &[], 2000, MIXED);
}

#[test]
fn rxonly_mixed_sizes_without_mergeable_buffers() {
    rxonly_case(1, NO_MRG, &[], 2000, MIXED);
}

/// Jumbo frames up to 64 KiB (tap MTU 65521) spread over many 2 KiB
/// mergeable RX buffers (testpmd receives them as scattered mbuf chains).
/// This also catches a device that exposes the first buffers of a packet
/// before the rest (DPDK then drops or mis-assembles it).
#[test]
fn rxonly_64k_frames_with_mergeable_buffers() {
    let jumbo = ["--enable-scatter", "--max-pkt-len=9728"];
    rxonly_case(1, MRG, &jumbo, 300, "9000,65280,1514,32768");
}

/// The same frames looped back by testpmd: 64 KiB frames as TX chains too.
#[test]
fn macswap_64k_frames_with_mergeable_buffers() {
    let jumbo = ["--enable-scatter", "--max-pkt-len=9728"];
    macswap_case(1, MRG, &jumbo, 300, "9000,65280,1514,32768");
}

#[test]
fn macswap_returns_frames_with_swapped_macs() {
    macswap_case(1, MRG, &[], 2000, MIXED);
}

#[test]
fn macswap_without_mergeable_buffers() {
    macswap_case(1, NO_MRG, &[], 2000, MIXED);
}

#[test]
fn two_queue_pairs_txonly_uses_both_queues() {
    txonly_case(2, TWO_QUEUES, &["--rxq=2", "--txq=2"], 64);
}

#[test]
fn two_queue_pairs_rxonly_counts_every_injected_frame() {
    rxonly_case(2, TWO_QUEUES, &["--rxq=2", "--txq=2"], 3000, MIXED);
}

/// vsnoop offers two queue pairs but the frontend uses one: the unused tap
/// queue must be detached, or the kernel would steer about half the flows to
/// a queue nobody reads.
#[test]
fn two_queue_pairs_offered_one_used_loses_nothing() {
    rxonly_case(2, MRG, &[], 3000, MIXED);
}

#[test]
fn two_queue_pairs_macswap() {
    macswap_case(2, TWO_QUEUES, &["--rxq=2", "--txq=2"], 2000, MIXED);
}

/// `vsnoop stats --json` over the control socket `ctl`, from inside `ns`.
fn offload_stats(ns: &Netns, ctl: &Path) -> serde_json::Value {
    let out = ns.exec(&[
        env!("CARGO_BIN_EXE_vsnoop"),
        "stats",
        "--control",
        ctl.to_str().expect("utf-8 path"),
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
    json["offload"].clone()
}

/// The ACK offload against a receiver that keeps up: testpmd, in a second
/// namespace, forwards between vsnoop (its virtio-user port) and a net_tap
/// behind which the kernel's own TCP stack receives (`tcpsink`, built here
/// from the guest's source). The TCG guest of the other offload tests is
/// slow and often closes its window; this receiver reads at once, so nearly
/// every one of its ACKs moves its window a little, just behind the early
/// ACKs. The transfer must be hash-equal, early ACKs sent, and those small
/// window updates left to the next early ACK (rule 10,
/// `window_updates_deferred`) instead of rewritten and sent beside them.
#[test]
fn offload_with_a_fast_kernel_receiver() {
    let _guard = serial();
    require_tool("dpdk-testpmd");
    require_tool("gcc");
    let tmp = TempDir::new("fastrx");
    let sink_bin = tmp.join("tcpsink");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/guest/tcpsink.c");
    let gcc = std::process::Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&sink_bin)
        .arg(&src)
        .output()
        .expect("run gcc");
    assert!(
        gcc.status.success(),
        "gcc tcpsink.c: {}",
        String::from_utf8_lossy(&gcc.stderr)
    );
    // Sender side: vsnoop's tap. Receiver side: testpmd and its net_tap.
    let tx = Netns::new("vsdf");
    let rx = Netns::new("vsdr");
    for ns in [&tx, &rx] {
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    }
    let tap = unique("vsdt");
    let dt = unique("vsdr");
    let sock = tmp.join("vhost.sock");
    let ctl = tmp.join("control.sock");
    let (sock_s, ctl_s) = (sock.display().to_string(), ctl.display().to_string());
    let args = ["--socket", &sock_s, "--tap", &tap, "--control", &ctl_s];
    let mut vsnoop = Vsnoop::spawn(&tx, &args, &tmp.join("vsnoop.log"));
    vsnoop.wait_for_log("listening on", Duration::from_secs(20));
    tx.wait_for_link(&tap, Duration::from_secs(10));
    let virtio = format!("net_virtio_user0,path={sock_s},queues=1");
    let net_tap = format!("net_tap0,iface={dt}");
    let mut pmd = Testpmd::spawn(&rx, &tmp.path, &[&virtio, &net_tap], &["--forward-mode=io"]);
    vsnoop.wait_for_log("frontend connected", Duration::from_secs(30));
    pmd.wait_for("testpmd> ", 0, Duration::from_secs(60));
    rx.wait_for_link(&dt, Duration::from_secs(10));
    tx.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", &tap]);
    tx.exec(&["ip", "link", "set", &tap, "up"]);
    rx.exec(&["ip", "addr", "add", "10.77.0.2/24", "dev", &dt]);
    rx.exec(&["ip", "link", "set", &dt, "up"]);
    pmd.cmd("start");
    let sink_log = fs::File::create(tmp.join("tcpsink.log")).expect("create tcpsink log");
    let mut sink = rx
        .command(sink_bin.to_str().expect("utf-8 path"))
        .args(["-p", "5001"])
        .stdout(Stdio::null())
        .stderr(sink_log)
        .spawn()
        .expect("spawn tcpsink");
    let before = offload_stats(&tx, &ctl);
    let len = 64 << 20;
    let result = common::sink::send_with(
        &tx,
        "10.77.0.2",
        5001,
        len,
        &common::sink::SendOptions {
            timeout: Duration::from_secs(120),
            ..Default::default()
        },
    );
    let after = offload_stats(&tx, &ctl);
    let _ = sink.kill();
    let _ = sink.wait();
    let ctx = format!(
        "\n--- vsnoop log (tail) ---\n{}\n--- testpmd log (tail) ---\n{}",
        tail(&vsnoop.log_text(), 30),
        tail(&pmd.log_text(), 30)
    );
    let r = result.unwrap_or_else(|e| panic!("transfer of {len} bytes: {e}{ctx}"));
    let grew = |key: &str| after[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0);
    let (early, suppressed, deferred, rewritten) = (
        grew("early_acks"),
        grew("guest_acks_suppressed"),
        grew("window_updates_deferred"),
        grew("guest_acks_rewritten"),
    );
    eprintln!(
        "fast receiver: {len} bytes hash-equal at {:.0} MB/s; early ACKs {early}, guest ACKs \
         suppressed {suppressed} (window updates deferred {deferred}), rewritten {rewritten}",
        r.mbyte_per_s()
    );
    assert_eq!(
        grew("flows_offloaded"),
        1,
        "the flow was not offloaded{ctx}"
    );
    assert!(early > 0, "no early ACKs{ctx}");
    // Before rule 10 let small window updates wait, every one of them was
    // rewritten and sent (0 suppressed); `rewritten` still counts the ACKs
    // that pass with their TSecr raised (rule 9) and the updates that double
    // the window or find it nearly full.
    assert!(
        deferred > 0 && deferred <= suppressed,
        "window_updates_deferred {deferred} not in 1..={suppressed}{ctx}"
    );
    pmd.quit();
    assert_eq!(vsnoop.terminate(), Some(0), "vsnoop exit status{ctx}");
}
