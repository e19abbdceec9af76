//! Delay attribution against known injected delays, with a real guest.
//!
//! A busybox guest under QEMU (TCG) with its NIC served by vsnoop, in a
//! private network namespace (10.77.0.0/24 only, removed afterwards):
//!
//! - a 20 ms delay between the host stack and the tap (host -> guest
//!   direction, what `tc netem delay 20ms` on the tap would add; this
//!   machine's kernel has no sch_netem, so `tests/tools/tapnetem.py` adds it
//!   in user space) must show as ~20 ms of outside RTT, and outside + backend
//!   + guest must equal the round trip the client measures itself;
//! - QEMU stopped (SIGSTOP) for 100 ms while a request is in the guest's ring
//!   must show as ~100 ms of guest delay, not as outside or backend delay;
//! - vsnoop's host-side timestamps agree with tshark capturing on the tap, its
//!   capture opens in tshark with two nanosecond interfaces, and
//!   `vsnoop report` on it writes the plots.
//!
//! Run: `cargo test --release --test attribution -- --test-threads=1`.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::guest::{
    configure_host_tap, ensure_image, lock, wait_ping_guest, Backend, Guest, GuestConfig, GUEST_IP,
    HOST_IP,
};
use common::netem::TapNetem;
use common::{require_tool, signal, unique, Netns, TempDir, Vsnoop};
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
const ECHO_PORT: u16 = 7;

/// A TCP request/response client: `N` requests of 64 bytes to HOST:PORT,
/// each answered by the guest's echo server; prints the round trips it
/// measured (ms) as a JSON list. With STOP_AT >= 0, QEMU (PID) is stopped
/// just before request STOP_AT is sent and continued STOP_MS later.
const CLIENT: &str = r#"
import json, os, signal, socket, sys, time
host, port, n, think = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
stop_at, pid, stop_ms = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
s = socket.create_connection((host, port), timeout=20)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 64
rtts = []
for i in range(n):
    if think > 0:
        time.sleep(think)
    stopped = i == stop_at
    if stopped:
        os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic_ns()
    s.sendall(msg)
    if stopped:
        time.sleep(stop_ms / 1000.0)
        os.kill(pid, signal.SIGCONT)
    got = 0
    while got < len(msg):
        data = s.recv(4096)
        if not data:
            sys.exit("connection closed by the guest")
        got += len(data)
    rtts.append((time.monotonic_ns() - t0) / 1e6)
s.close()
print(json.dumps(rtts))
"#;

struct Rig {
    // Field order is drop order: guest, then vsnoop, then the namespace.
    guest: Guest,
    netem: Option<TapNetem>,
    vsnoop: Vsnoop,
    ns: Netns,
    dir: TempDir,
    tap: String,
    control: String,
    capture: String,
}

impl Rig {
    /// vsnoop (with --control and --capture) and a booted guest running a
    /// TCP echo server on port 7; with `delay_ms`, the host reaches the tap
    /// through tapnetem delaying host -> guest frames by that much.
    fn start(label: &str, delay_ms: Option<&str>) -> Rig {
        for tool in ["ip", "qemu-system-x86_64", "busybox", "python3", "tshark"] {
            require_tool(tool);
        }
        ensure_image();
        let ns = Netns::new("vsat");
        let dir = TempDir::new(label);
        let tap = unique("vat");
        let sock = dir.join("vhost.sock").display().to_string();
        let control = dir.join("control.sock").display().to_string();
        let capture = dir.join("run.pcapng").display().to_string();
        let vsnoop = Vsnoop::spawn(
            &ns,
            &[
                "--socket",
                &sock,
                "--tap",
                &tap,
                "--control",
                &control,
                "--capture",
                &capture,
                "--capture-snaplen",
                "256",
            ],
            &dir.join("vsnoop.log"),
        );
        vsnoop.wait_for_log("listening on", Duration::from_secs(20));
        ns.wait_for_link(&tap, Duration::from_secs(10));
        let netem = match delay_ms {
            Some(ms) => Some(TapNetem::start(&ns, &tap, &["--delay-ms", ms], &dir.path)),
            None => {
                configure_host_tap(&ns, &tap);
                None
            }
        };
        let cfg = GuestConfig::new(Backend::VhostUserClient {
            socket: sock.into(),
            reconnect: false,
        });
        let mut guest = Guest::boot(&ns, &cfg, &dir.path);
        guest.wait_booted(BOOT_TIMEOUT);
        wait_ping_guest(&ns, Duration::from_secs(30));
        guest.run_ok(
            &format!("nc -ll -p {ECHO_PORT} -e cat >/dev/null 2>&1 &"),
            CMD_TIMEOUT,
        );
        Rig {
            guest,
            netem,
            vsnoop,
            ns,
            dir,
            tap,
            control,
            capture,
        }
    }

    /// Runs the request/response client in the namespace; returns its RTTs (ms).
    fn client(&self, n: usize, think_s: f64, stop: Option<(usize, u32)>) -> Vec<f64> {
        let script = self.dir.join("client.py");
        std::fs::write(&script, CLIENT).unwrap();
        let (stop_at, stop_ms) = match stop {
            Some((i, ms)) => (i as i64, ms),
            None => (-1, 0),
        };
        let args = [
            "python3".to_string(),
            script.display().to_string(),
            GUEST_IP.into(),
            ECHO_PORT.to_string(),
            n.to_string(),
            think_s.to_string(),
            stop_at.to_string(),
            self.guest.pid().to_string(),
            stop_ms.to_string(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = self.ns.try_exec(&argv);
        assert!(ok, "client failed: {out}\n{}", self.vsnoop.log_text());
        serde_json::from_str(out.trim().lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("client output {out:?}: {e}"))
    }

    /// `vsnoop stats --control SOCK --json`, parsed.
    fn stats(&self) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_vsnoop"))
            .args(["stats", "--control", &self.control, "--json"])
            .output()
            .expect("run vsnoop stats");
        assert!(
            out.status.success(),
            "vsnoop stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats --json is one JSON object")
    }
}

/// The flow in `stats` with `proto`, opened by `initiator`, with `port` at
/// either end (ICMP: the destination port is 0).
fn flow<'a>(stats: &'a Value, proto: &str, initiator: &str, port: u16) -> &'a Value {
    stats["flows"]
        .as_array()
        .expect("flows array")
        .iter()
        .find(|f| {
            f["proto"] == proto
                && f["initiator"] == initiator
                && (f["sport"] == port || f["dport"] == port)
        })
        .unwrap_or_else(|| {
            panic!("no {proto} flow from the {initiator} with port {port} in {stats:#}")
        })
}

fn ms(flow: &Value, component: &str, field: &str) -> f64 {
    flow[component][field]
        .as_f64()
        .unwrap_or_else(|| panic!("{component}.{field} missing in {flow:#}"))
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Starts tshark on `iface` inside `ns`, writing `file`; waits until it captures.
fn start_tshark(ns: &Netns, iface: &str, file: &Path, log: &Path) -> Child {
    let child = ns
        .command("tshark")
        .args(["-n", "-i", iface, "-w"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn tshark");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("Capturing on")
    {
        assert!(Instant::now() < deadline, "tshark did not start");
        thread::sleep(Duration::from_millis(50));
    }
    child
}

/// (interface id, epoch seconds with all digits, icmp type, (identifier,
/// sequence)) of every ICMP echo in a capture file.
fn icmp_times(file: &Path) -> Vec<(u32, String, u8, (u16, u16))> {
    let out = Command::new("tshark")
        .args(["-n", "-r"])
        .arg(file)
        .args([
            "-Y",
            "icmp.type == 0 || icmp.type == 8",
            "-T",
            "fields",
            "-e",
            "frame.interface_id",
            "-e",
            "frame.time_epoch",
            "-e",
            "icmp.type",
            "-e",
            "icmp.ident",
            "-e",
            "icmp.seq",
        ])
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "tshark -r {} failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.to_string(),
                f.get(2)?.parse().ok()?,
                (
                    f.get(3)?.split(',').next()?.parse().ok()?,
                    f.get(4)?.split(',').next()?.parse().ok()?,
                ),
            ))
        })
        .collect()
}

fn epoch_ns(text: &str) -> i128 {
    let (secs, frac) = text.split_once('.').unwrap_or((text, "0"));
    let mut frac = frac.to_string();
    frac.truncate(9);
    while frac.len() < 9 {
        frac.push('0');
    }
    secs.parse::<i128>().unwrap() * 1_000_000_000 + frac.parse::<i128>().unwrap()
}

/// 20 ms added between the host and the tap: the guest's pings and the
/// host's TCP requests show it as outside RTT, the components add up to
/// what the client measures, the host-side timestamps agree with tshark, and
/// the capture feeds `vsnoop report`.
#[test]
fn injected_delay_is_outside_rtt_and_the_components_add_up() {
    let _lock = lock();
    let mut rig = Rig::start("delay", Some("20"));
    let tshark_file = rig.dir.join("tap.pcapng");
    let mut tshark = start_tshark(&rig.ns, &rig.tap, &tshark_file, &rig.dir.join("tshark.log"));
    rig.guest.run_ok(
        &format!("ping -c 20 -i 0.1 -W 2 {HOST_IP} >/dev/null"),
        CMD_TIMEOUT,
    );
    let rtts = rig.client(60, 0.0, None);
    println!("tapnetem: {:?}", rig.netem.as_ref().unwrap().counters());
    signal(tshark.id(), 2);
    let _ = tshark.wait();
    let stats = rig.stats();

    // The reference: the guest's echo round trips as the kernel saw them on
    // the tap (tshark): 20 ms plus tapnetem's own latency.
    let on_tap = icmp_times(&tshark_file);
    let tap_rtts: Vec<f64> = on_tap
        .iter()
        .filter(|r| r.2 == 8)
        .filter_map(|(_, t, _, seq)| {
            let reply = on_tap.iter().find(|r| r.2 == 0 && r.3 == *seq)?;
            Some((epoch_ns(&reply.1) - epoch_ns(t)) as f64 / 1e6)
        })
        .collect();
    assert!(
        tap_rtts.len() >= 15,
        "echo pairs on the tap: {}",
        tap_rtts.len()
    );
    let injected = median(&tap_rtts);
    assert!(
        (20.0..22.0).contains(&injected),
        "the rig added {injected} ms, not ~20 ms"
    );

    // ICMP echo from the guest: outside RTT is the injected delay.
    let icmp = flow(&stats, "icmp", "guest", 0);
    assert!(ms(icmp, "outside_rtt_ms", "count") >= 15.0, "{icmp:#}");
    let outside = ms(icmp, "outside_rtt_ms", "p50");
    assert!(
        (outside - injected).abs() <= 0.5_f64.max(0.02 * injected),
        "icmp outside RTT p50 {outside} ms, the tap saw {injected:.3} ms: {icmp:#}"
    );

    // TCP request/response from the host: the same 20 ms outside, and
    // outside + backend + guest = what the client measured.
    let tcp = flow(&stats, "tcp", "remote", ECHO_PORT);
    assert_eq!(tcp["method"], "tcp-timestamps", "{tcp:#}");
    for component in ["outside_rtt_ms", "backend_delay_ms", "guest_delay_ms"] {
        assert!(ms(tcp, component, "count") >= 40.0, "{component}: {tcp:#}");
    }
    // The remote end's share also holds the client's turnaround (Python).
    let outside = ms(tcp, "outside_rtt_ms", "p50");
    assert!(
        outside >= injected - 0.5 && outside <= injected + 1.0,
        "tcp outside RTT p50 {outside} ms, the tap saw {injected:.3} ms for ICMP: {tcp:#}"
    );
    let sum = outside + ms(tcp, "backend_delay_ms", "p50") + ms(tcp, "guest_delay_ms", "p50");
    let client = median(&rtts);
    assert!(
        (sum - client).abs() <= (0.05 * client).max(1.0),
        "outside + backend + guest = {sum:.3} ms, client measured {client:.3} ms (median of {}): {tcp:#}",
        rtts.len()
    );
    println!(
        "delay 20 ms (tap saw {injected:.3} ms): icmp outside p50 {:.3} ms; tcp outside {outside:.3} + backend {:.3} + guest {:.3} = {sum:.3} ms; client median {client:.3} ms",
        ms(icmp, "outside_rtt_ms", "p50"),
        ms(tcp, "backend_delay_ms", "p50"),
        ms(tcp, "guest_delay_ms", "p50"),
    );

    // Flush the capture (SIGUSR1) and compare host-side times with tshark's.
    rig.vsnoop.stats();
    let capture = Path::new(&rig.capture).to_path_buf();
    let ours = icmp_times(&capture);
    let interfaces: std::collections::HashSet<u32> = ours.iter().map(|r| r.0).collect();
    assert_eq!(
        interfaces.len(),
        2,
        "capture must have records on both interfaces"
    );
    assert!(
        ours.iter().any(|r| !r.1.ends_with("000")),
        "timestamps are not nanosecond-resolution: {:?}",
        &ours[..ours.len().min(4)]
    );
    let theirs: HashMap<(u8, (u16, u16)), i128> = icmp_times(&tshark_file)
        .into_iter()
        .map(|(_, t, ty, seq)| ((ty, seq), epoch_ns(&t)))
        .collect();
    let mut diffs: Vec<f64> = ours
        .iter()
        .filter(|r| r.0 == 0)
        .filter_map(|(_, t, ty, seq)| {
            let tshark_ns = theirs.get(&(*ty, *seq))?;
            Some((epoch_ns(t) - tshark_ns).abs() as f64 / 1e6)
        })
        .collect();
    assert!(
        diffs.len() >= 30,
        "too few frames matched with tshark: {}",
        diffs.len()
    );
    diffs.sort_by(f64::total_cmp);
    let (p50, max) = (diffs[diffs.len() / 2], diffs[diffs.len() - 1]);
    println!(
        "host-side timestamps vs tshark on the tap: median |diff| {p50:.3} ms, max {max:.3} ms"
    );
    assert!(p50 < 1.0, "median |vsnoop - tshark| {p50} ms");
    assert!(max < 10.0, "max |vsnoop - tshark| {max} ms");

    // The capture feeds the offline report.
    let out_dir = rig.dir.join("report");
    let out = Command::new(env!("CARGO_BIN_EXE_vsnoop"))
        .arg("report")
        .arg(&capture)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("run vsnoop report");
    assert!(
        out.status.success(),
        "vsnoop report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for plot in [
        "delay-cdf.svg",
        "ack-interarrival-remote.svg",
        "ack-interarrival-guest.svg",
    ] {
        let text =
            std::fs::read_to_string(out_dir.join(plot)).unwrap_or_else(|e| panic!("{plot}: {e}"));
        assert!(
            text.contains("<svg") && text.trim_end().ends_with("</svg>"),
            "{plot} is not SVG"
        );
    }
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .expect("summary.json");
    let offline = ms(flow(&summary, "icmp", "guest", 0), "outside_rtt_ms", "p50");
    assert!(
        (offline - ms(icmp, "outside_rtt_ms", "p50")).abs() <= 0.25,
        "offline report: icmp outside p50 {offline} ms, live {}",
        ms(icmp, "outside_rtt_ms", "p50")
    );
    rig.guest.quit();
}

/// QEMU stopped for 100 ms while a request waits in the guest's ring: the
/// delay is the guest's, not the network's or vsnoop's.
#[test]
fn a_stopped_vm_shows_as_guest_delay() {
    const STOP_MS: u32 = 100;
    let _lock = lock();
    let mut rig = Rig::start("sigstop", None);
    let rtts = rig.client(12, 0.0, Some((8, STOP_MS)));
    let stats = rig.stats();
    let tcp = flow(&stats, "tcp", "remote", ECHO_PORT);
    let guest_max = ms(tcp, "guest_delay_ms", "max");
    let guest_p50 = ms(tcp, "guest_delay_ms", "p50");
    let stopped_rtt = rtts[8];
    println!(
        "SIGSTOP {STOP_MS} ms: guest delay max {guest_max:.3} ms (p50 {guest_p50:.3}), client RTT of that request {stopped_rtt:.3} ms, others median {:.3} ms; outside max {:.3}, backend max {:.3}",
        median(&rtts),
        ms(tcp, "outside_rtt_ms", "max"),
        ms(tcp, "backend_delay_ms", "max"),
    );
    assert!(
        guest_max >= f64::from(STOP_MS) * 0.98,
        "guest delay max {guest_max} ms < {STOP_MS} ms: {tcp:#}"
    );
    // The stopped request's round trip is the guest delay plus the usual
    // small outside and backend parts.
    assert!(
        (stopped_rtt - guest_max).abs() <= (0.02 * stopped_rtt).max(2.0 + guest_p50),
        "client saw {stopped_rtt} ms, guest delay max {guest_max} ms: {tcp:#}"
    );
    assert!(ms(tcp, "outside_rtt_ms", "p50") < 5.0, "{tcp:#}");
    assert!(ms(tcp, "backend_delay_ms", "max") < 20.0, "{tcp:#}");
    rig.guest.quit();
}
