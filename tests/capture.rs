//! `--capture-filter` and `--capture-max-mb` / `--capture-files` end to end:
//! vsnoop runs in a private network namespace (10.77.0.0/24 on its tap,
//! removed afterwards), the test drives the guest side through
//! `common::frontend` and the host side with an AF_PACKET socket on the tap,
//! and tshark reads the files vsnoop wrote.
//!
//! Run: `cargo test --release --test capture -- --test-threads=1` (as root).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etherparse::PacketBuilder;
use serde_json::Value;

use common::frontend::*;
use common::{require_tool, Netns, TempDir, Vsnoop};

const T: Duration = Duration::from_secs(10);
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x01];
/// A MAC nobody in the namespace owns: the kernel ignores guest frames sent
/// to it, so the only frames on the tap are the test's.
const OTHER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x99];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const REMOTE_IP: [u8; 4] = [10, 77, 0, 99];

/// Namespace, daemon (with a control socket), packet socket on the tap and a
/// connected test frontend with RX buffers posted.
struct Env {
    fe: Option<TestFrontend>,
    port: Option<PacketPort>,
    vs: Vsnoop,
    ns: Netns,
    _dir: TempDir,
    control: PathBuf,
    ok: bool,
}

impl Env {
    fn start(extra: &[&str]) -> Result<Env> {
        let ns = quiet_netns("vsc");
        let dir = TempDir::new("capture");
        let sock = dir.join("vsnoop.sock");
        let control = dir.join("vsnoop.ctl");
        let tap = common::unique("vsc");
        let sock_s = sock.to_str().unwrap().to_string();
        let control_s = control.to_str().unwrap().to_string();
        let mut args = vec!["--socket", &sock_s, "--tap", &tap, "--control", &control_s];
        args.extend_from_slice(extra);
        let vs = Vsnoop::spawn(&ns, &args, &dir.join("vsnoop.log"));
        let mut env = Env {
            fe: None,
            port: None,
            vs,
            ns,
            _dir: dir,
            control,
            ok: false,
        };
        env.vs.wait_for_log("listening on", T);
        env.ns.wait_for_link(&tap, T);
        env.ns.exec(&["ip", "link", "set", &tap, "up"]);
        env.ns
            .exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", &tap]);
        env.port = Some(PacketPort::open(&env.ns.name, &tap)?);
        let mut fe = TestFrontend::connect(
            &sock,
            Options {
                features: F_MRG_RXBUF,
                ..Options::default()
            },
        )?;
        env.vs.wait_for_log("frontend connected", T);
        fe.fill_rx(0, &[1536], false)?;
        env.fe = Some(fe);
        Ok(env)
    }

    fn fe(&mut self) -> &mut TestFrontend {
        self.fe.as_mut().unwrap()
    }

    fn port(&self) -> &PacketPort {
        self.port.as_ref().unwrap()
    }

    /// Guest -> tap: sends `frame` on TX queue 0.
    fn send_from_guest(&mut self, frame: &[u8]) -> Result<()> {
        self.fe().send_frame(0, frame)?;
        Ok(())
    }

    /// Tap -> guest: injects `frame` on the tap and reads it from the RX ring.
    fn send_to_guest(&mut self, frame: &[u8]) -> Result<()> {
        self.port().send(frame)?;
        let got = self
            .fe()
            .recv(0, T)
            .context("frame never reached the guest")?;
        ensure!(got.frame == frame, "the guest received another frame");
        Ok(())
    }

    /// One request on the control socket; returns the reply.
    fn control(&self, request: &str) -> Result<Value> {
        let mut stream = UnixStream::connect(&self.control)
            .with_context(|| format!("connect {}", self.control.display()))?;
        stream.set_read_timeout(Some(T))?;
        stream.write_all(request.as_bytes())?;
        stream.write_all(b"\n")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        let reply: Value = serde_json::from_str(&line).with_context(|| format!("{line:?}"))?;
        ensure!(reply["ok"] == true, "control request failed: {line}");
        Ok(reply)
    }

    /// Polls the capture status until frames + filtered reach `frames`.
    fn wait_capture(&self, frames: u64) -> Result<Value> {
        let deadline = Instant::now() + T;
        loop {
            let status = self.control(r#"{"cmd":"capture_status"}"#)?["capture"].clone();
            let seen = status["frames"].as_u64().context("frames")?
                + status["filtered"].as_u64().context("filtered")?
                + status["dropped"].as_u64().context("dropped")?;
            if seen >= frames {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "capture saw {seen} of {frames} frames: {status}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes the frontend and ends vsnoop with SIGTERM (which flushes the
    /// capture).
    fn stop(&mut self) -> Result<()> {
        self.fe = None;
        self.port = None;
        ensure!(
            self.vs.terminate() == Some(0),
            "vsnoop did not exit cleanly"
        );
        let log = self.vs.log_text();
        ensure!(!log.contains("panicked"), "vsnoop panicked:\n{log}");
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !self.ok {
            let log = self.vs.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- vsnoop log (last 40 lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            eprintln!("---- end of vsnoop log ----");
        }
    }
}

/// A new namespace without IPv6 chatter (router solicitations, MLD) on its taps.
fn quiet_netns(prefix: &str) -> Netns {
    let ns = Netns::new(prefix);
    ns.exec(&[
        "sh",
        "-c",
        "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 \
         /proc/sys/net/ipv6/conf/default/disable_ipv6; do \
         [ -e $f ] && echo 1 > $f; done; true",
    ]);
    ns
}

fn udp(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
    let payload = vec![0x5a; len.saturating_sub(14 + 20 + 8)];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(40000, 9)
        .write(&mut out, &payload)
        .unwrap();
    out
}

fn ping(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(0x77, seq)
        .write(&mut out, &[0xab; 56])
        .unwrap();
    out
}

/// `tshark -r FILE -T fields -E separator=, -e FIELD...`, one Vec per record.
fn tshark(file: &Path, fields: &[&str]) -> Result<Vec<Vec<String>>> {
    let mut cmd = std::process::Command::new("tshark");
    cmd.arg("-r").arg(file);
    cmd.args(["-T", "fields", "-E", "separator=,"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "tshark cannot read {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect())
}

#[test]
fn capture_filter_keeps_only_matching_frames() -> Result<()> {
    require_tool("tshark");
    let capdir = TempDir::new("capfilter");
    let file = capdir.join("filtered.pcapng");
    let file_s = file.to_str().unwrap().to_string();
    let mut env = Env::start(&["--capture", &file_s, "--capture-filter", "proto icmp"])?;
    // Interleaved ICMP echo and UDP, both ways.
    let rounds = 20u16;
    for seq in 0..rounds {
        env.send_from_guest(&ping(OTHER_MAC, GUEST_MAC, GUEST_IP, REMOTE_IP, seq))?;
        env.send_from_guest(&udp(OTHER_MAC, GUEST_MAC, GUEST_IP, REMOTE_IP, 200))?;
        env.send_to_guest(&ping(GUEST_MAC, HOST_MAC, HOST_IP, GUEST_IP, seq))?;
        env.send_to_guest(&udp(GUEST_MAC, HOST_MAC, HOST_IP, GUEST_IP, 300))?;
    }
    env.fe().flush_tx(0, T)?;
    let icmp = 2 * u64::from(rounds);
    let status = env.wait_capture(4 * u64::from(rounds))?;
    ensure!(
        status["frames"] == icmp && status["dropped"] == 0,
        "capture status {status}: expected {icmp} frames recorded"
    );
    ensure!(
        status["filtered"].as_u64() >= Some(icmp),
        "capture status {status}: expected at least {icmp} frames filtered out"
    );
    eprintln!("capture status: {status}");
    env.stop()?;

    let records = tshark(
        &file,
        &[
            "frame.packet_id",
            "frame.interface_name",
            "frame.protocols",
            "icmp.type",
        ],
    )?;
    let mut ids = BTreeSet::new();
    let mut interfaces = BTreeSet::new();
    for r in &records {
        ensure!(r.len() == 4, "unexpected tshark line {r:?}");
        ensure!(
            r[2].contains(":icmp") && !r[2].contains("udp"),
            "a frame that is not ICMP in the capture: {r:?}"
        );
        ensure!(r[3] == "8", "not an echo request: {r:?}");
        ids.insert(r[0].parse::<u64>()?);
        interfaces.insert(r[1].clone());
    }
    ensure!(
        records.len() as u64 == 2 * icmp && ids.len() as u64 == icmp,
        "{} records / {} packet ids in the capture, {icmp} ICMP frames sent",
        records.len(),
        ids.len()
    );
    ensure!(
        interfaces == BTreeSet::from(["guest".to_string(), "host".to_string()]),
        "interfaces {interfaces:?}"
    );
    // Nothing UDP, by tshark's own dissection.
    let out = std::process::Command::new("tshark")
        .arg("-r")
        .arg(&file)
        .args(["-Y", "udp"])
        .output()?;
    ensure!(
        out.status.success() && out.stdout.is_empty(),
        "UDP frames in the capture"
    );
    env.ok = true;
    Ok(())
}

#[test]
fn capture_rotation_keeps_three_complete_files() -> Result<()> {
    require_tool("tshark");
    let capdir = TempDir::new("caprot");
    let file = capdir.join("rot.pcapng");
    let file_s = file.to_str().unwrap().to_string();
    let mut env = Env::start(&[
        "--capture",
        &file_s,
        "--capture-max-mb",
        "1",
        "--capture-files",
        "3",
    ])?;
    // Two records of ~1.6 kB per frame: ~330 frames per 1 MiB file, so
    // 2000 frames make 6 files, 5 rotations.
    let frames = 2000u64;
    let frame = udp(OTHER_MAC, GUEST_MAC, GUEST_IP, REMOTE_IP, 1514);
    for _ in 0..frames {
        env.send_from_guest(&frame)?;
    }
    env.fe().flush_tx(0, T)?;
    let status = env.wait_capture(frames)?;
    ensure!(
        status["frames"] == frames && status["dropped"] == 0 && status["filtered"] == 0,
        "capture status {status}"
    );
    let rotations = status["rotations"].as_u64().context("rotations")?;
    ensure!(rotations >= 4, "only {rotations} rotations: {status}");
    env.stop()?;
    let log = env.vs.log_text();
    ensure!(
        log.matches("new file started").count() as u64 == rotations,
        "every rotation is logged:\n{log}"
    );

    let mut names: Vec<String> = std::fs::read_dir(&capdir.path)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    ensure!(
        names == ["rot.1.pcapng", "rot.2.pcapng", "rot.pcapng"],
        "files left: {names:?}"
    );
    // Oldest first: ids must follow on from one file to the next.
    let mut previous_max: Option<u64> = None;
    for name in ["rot.2.pcapng", "rot.1.pcapng", "rot.pcapng"] {
        let path = capdir.join(name);
        let size = std::fs::metadata(&path)?.len();
        ensure!(size <= 1 << 20, "{name} is {size} bytes, over 1 MiB");
        let records = tshark(
            &path,
            &[
                "frame.packet_id",
                "frame.interface_id",
                "frame.interface_name",
            ],
        )?;
        ensure!(!records.is_empty(), "{name} has no packets");
        let mut ids = BTreeSet::new();
        let mut interfaces = BTreeSet::new();
        for r in &records {
            ensure!(r.len() == 3, "{name}: unexpected tshark line {r:?}");
            ids.insert(r[0].parse::<u64>()?);
            interfaces.insert((r[1].clone(), r[2].clone()));
        }
        ensure!(
            interfaces
                == BTreeSet::from([
                    ("0".to_string(), "host".to_string()),
                    ("1".to_string(), "guest".to_string())
                ]),
            "{name}: interfaces {interfaces:?}"
        );
        // Both records of every frame are in the same file.
        ensure!(
            records.len() == 2 * ids.len(),
            "{name}: {} records for {} ids",
            records.len(),
            ids.len()
        );
        let (min, max) = (*ids.first().unwrap(), *ids.last().unwrap());
        ensure!(
            max - min + 1 == ids.len() as u64,
            "{name}: ids {min}..={max} have gaps"
        );
        if let Some(prev) = previous_max {
            ensure!(
                min == prev + 1,
                "{name} starts at id {min}, previous file ended at {prev}"
            );
        }
        previous_max = Some(max);
        eprintln!("{name}: {size} bytes, ids {min}..={max}");
    }
    ensure!(
        previous_max == Some(frames),
        "last id {previous_max:?}, {frames} frames sent"
    );
    env.ok = true;
    Ok(())
}

#[test]
fn bad_capture_filter_is_one_error_line() -> Result<()> {
    let ns = quiet_netns("vsc");
    let dir = TempDir::new("capbad");
    let sock = dir.join("vsnoop.sock");
    let out = ns
        .command(env!("CARGO_BIN_EXE_vsnoop"))
        .args(["--socket", sock.to_str().unwrap(), "--tap", "vscbad0"])
        .args(["--capture", "/tmp/never.pcapng"])
        .args(["--capture-filter", "proto icmp, port 99999"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "exit {:?}: {stderr}",
        out.status
    );
    let lines: Vec<&str> = stderr.lines().collect();
    if lines.len() != 1
        || lines[0]
            != "vsnoop: error: --capture-filter: term 2 \"port 99999\": \"99999\" is not a port number (0 to 65535)"
    {
        bail!("unexpected error output: {stderr:?}");
    }
    ensure!(!sock.exists(), "vsnoop got as far as the socket");
    Ok(())
}
