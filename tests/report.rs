//! `vsnoop report`, end to end with the built binary:
//!
//! - on a real capture: vsnoop runs with `--capture` in a private network
//!   namespace (10.77.0.0/24, removed afterwards), the test frontend plays
//!   the guest (10.77.0.2) and pings the tap address (10.77.0.1), and the
//!   namespace pings the guest back through a raw ICMP socket, so the
//!   capture holds both outside RTT and guest delay samples;
//! - on a hand-made capture with known timestamps (the encoding of
//!   `src/export/capture.rs`): ICMP both ways and two TCP flows whose ACK
//!   spacing is known, so the report's numbers are checked exactly (to the
//!   HDR histograms' 1 %);
//! - on files that are not vsnoop captures: one error line, exit status 1.
//!
//! Every SVG is checked to be well-formed XML with an `<svg>` root.
//!
//! Run: `cargo test --release --test report -- --test-threads=1` (as root;
//! `VSNOOP_REPORT_KEEP=DIR` keeps the captures and reports in DIR).

mod common;

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etherparse::{Icmpv4Type, PacketBuilder, SlicedPacket, TransportSlice};
use serde_json::Value;

use common::frontend::{Options, TestFrontend, F_MRG_RXBUF};
use common::{require_tool, Netns, TempDir, Vsnoop};

const T: Duration = Duration::from_secs(10);
const VSNOOP: &str = env!("CARGO_BIN_EXE_vsnoop");
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x01];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
/// Echo identifier of the guest's pings.
const GUEST_ECHO_ID: u16 = 0x4242;
/// Echo identifier of the namespace's pings to the guest.
const HOST_ECHO_ID: u16 = 0x5151;
const US: u64 = 1_000;
const MS: u64 = 1_000_000;
/// 2025-01-01 00:00:00 UTC, in ns.
const T0: u64 = 1_735_689_600 * 1_000_000_000;

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

fn report(file: &Path, out: &Path) -> Output {
    Command::new(VSNOOP)
        .arg("report")
        .arg(file)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .expect("run vsnoop report")
}

/// Runs the report, which must succeed; returns (summary.json, report.md, stderr).
fn report_ok(file: &Path, out: &Path) -> Result<(Value, String, String)> {
    let o = report(file, out);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    ensure!(
        o.status.success(),
        "vsnoop report failed ({}):\n{stderr}",
        o.status
    );
    ensure!(
        stderr.contains(&format!("report written to {}", out.display())),
        "no final line naming the output directory:\n{stderr}"
    );
    let json = fs::read_to_string(out.join("summary.json")).context("summary.json")?;
    let summary: Value = serde_json::from_str(&json).context("summary.json is not JSON")?;
    let md = fs::read_to_string(out.join("report.md")).context("report.md")?;
    keep_for_inspection(file, out)?;
    Ok((summary, md, stderr))
}

/// With VSNOOP_REPORT_KEEP=DIR, copies the capture and its report to
/// DIR/<capture name>/ to look at (the test directories are removed).
fn keep_for_inspection(file: &Path, out: &Path) -> Result<()> {
    let Some(keep) = std::env::var_os("VSNOOP_REPORT_KEEP") else {
        return Ok(());
    };
    let dest = Path::new(&keep).join(file.file_stem().context("capture name")?);
    fs::create_dir_all(&dest)?;
    fs::copy(file, dest.join(file.file_name().context("capture name")?))?;
    for entry in fs::read_dir(out)? {
        let entry = entry?;
        fs::copy(entry.path(), dest.join(entry.file_name()))?;
    }
    Ok(())
}

/// Runs the report, which must fail with one `vsnoop: error:` line.
fn report_err(file: &Path, out: &Path) -> Result<String> {
    let o = report(file, out);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    ensure!(
        o.status.code() == Some(1),
        "expected exit 1, got {}: {stderr}",
        o.status
    );
    ensure!(
        stderr.lines().count() == 1 && stderr.starts_with("vsnoop: error: "),
        "expected one error line, got:\n{stderr}"
    );
    ensure!(
        !out.exists(),
        "an output directory was made for a rejected file"
    );
    Ok(stderr)
}

/// Checks every plot named in `files` is a non-empty, well-formed SVG.
fn check_plots(dir: &Path, files: &[&str]) -> Result<()> {
    for f in files {
        let path = dir.join(f);
        let text = fs::read_to_string(&path).with_context(|| format!("{f} missing"))?;
        ensure!(!text.trim().is_empty(), "{f} is empty");
        check_svg(&text).with_context(|| format!("{f} is not valid SVG"))?;
    }
    Ok(())
}

/// The flow in summary.json with `proto` opened by `initiator`.
fn flow<'a>(summary: &'a Value, proto: &str, initiator: &str) -> Result<&'a Value> {
    summary["flows"]
        .as_array()
        .context("flows array")?
        .iter()
        .find(|f| f["proto"] == proto && f["initiator"] == initiator)
        .with_context(|| format!("no {proto} flow opened by the {initiator} in {summary:#}"))
}

fn num(v: &Value) -> Result<f64> {
    v.as_f64().with_context(|| format!("{v} is not a number"))
}

/// `got` is within the HDR histograms' 1 % of `want`.
fn near(got: &Value, want: f64) -> Result<()> {
    let g = num(got)?;
    ensure!((g - want).abs() <= want * 0.01, "{g} is not {want} (+-1 %)");
    Ok(())
}

/// The cells of the report.md table row whose first cell is `first`.
fn md_row(md: &str, first: &str) -> Result<Vec<String>> {
    let line = md
        .lines()
        .find(|l| l.starts_with(&format!("| {first} |")))
        .with_context(|| format!("no {first:?} row in report.md:\n{md}"))?;
    Ok(line
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect())
}

// ---------------------------------------------------------------------------
// A tiny XML well-formedness check
// ---------------------------------------------------------------------------

/// Well-formed XML (tags nest and match, attributes are quoted, every `&`
/// starts a reference) with one root element, `<svg>`.
fn check_svg(text: &str) -> Result<()> {
    let mut stack: Vec<&str> = Vec::new();
    let mut root = None;
    let mut rest = text;
    while let Some(lt) = rest.find('<') {
        let chars = &rest[..lt];
        ensure!(
            !stack.is_empty() || chars.trim().is_empty(),
            "text outside the root element"
        );
        check_references(chars)?;
        rest = &rest[lt..];
        let skip = |end: &str| -> Result<usize> {
            Ok(rest.find(end).with_context(|| format!("unclosed {end}"))? + end.len())
        };
        if rest.starts_with("<?") {
            rest = &rest[skip("?>")?..];
            continue;
        }
        if rest.starts_with("<!--") {
            rest = &rest[skip("-->")?..];
            continue;
        }
        if rest.starts_with("<!") {
            ensure!(root.is_none(), "declaration inside the document");
            rest = &rest[skip(">")?..];
            continue;
        }
        let len = tag_len(rest)?;
        let tag = &rest[1..len - 1];
        rest = &rest[len..];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().context("end tag without a start tag")?;
            ensure!(open == name.trim(), "<{open}> closed by </{name}>");
            continue;
        }
        let closed = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name = body.split_whitespace().next().context("empty tag")?;
        ensure!(
            name.chars()
                .all(|c| c.is_alphanumeric() || "-_:.".contains(c)),
            "bad element name {name:?}"
        );
        check_attributes(&body[name.len()..])?;
        if stack.is_empty() {
            ensure!(root.is_none(), "a second root element <{name}>");
            root = Some(name);
        }
        if !closed {
            stack.push(name);
        }
    }
    ensure!(rest.trim().is_empty(), "text after the root element");
    ensure!(stack.is_empty(), "unclosed elements {stack:?}");
    ensure!(root == Some("svg"), "root element is {root:?}, not svg");
    Ok(())
}

/// Length of the tag at the start of `s` (`<` to `>`, quotes respected).
fn tag_len(s: &str) -> Result<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices().skip(1) {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '<') => bail!("'<' inside a tag"),
            (None, '>') => return Ok(i + 1),
            _ => {}
        }
    }
    bail!("unterminated tag")
}

fn check_attributes(mut s: &str) -> Result<()> {
    loop {
        s = s.trim_start();
        if s.is_empty() {
            return Ok(());
        }
        let eq = s
            .find('=')
            .with_context(|| format!("attribute without value: {s:?}"))?;
        let name = s[..eq].trim();
        ensure!(
            !name.is_empty() && !name.contains(char::is_whitespace),
            "bad attribute name {name:?}"
        );
        s = s[eq + 1..].trim_start();
        let q = s.chars().next().context("attribute value missing")?;
        ensure!(q == '"' || q == '\'', "unquoted attribute value in {s:?}");
        let end = s[1..].find(q).context("unterminated attribute value")? + 1;
        check_references(&s[1..end])?;
        s = &s[end + 1..];
    }
}

fn check_references(s: &str) -> Result<()> {
    for (i, _) in s.match_indices('&') {
        let rest = &s[i + 1..];
        let end = rest
            .find(';')
            .with_context(|| format!("bare '&' in {s:?}"))?;
        let name = &rest[..end];
        let ok = ["amp", "lt", "gt", "quot", "apos"].contains(&name)
            || name
                .strip_prefix('#')
                .is_some_and(|n| n.parse::<u32>().is_ok() || n.starts_with('x'));
        ensure!(ok, "bad reference &{name};");
    }
    Ok(())
}

#[test]
fn the_svg_check_catches_broken_files() {
    assert!(check_svg(
        "<?xml version=\"1.0\"?>\n<svg a=\"1\"><g><text>a &amp; b</text></g><rect x='1'/></svg>\n"
    )
    .is_ok());
    for bad in [
        "",
        "<svg>",
        "<html></html>",
        "<svg><g></svg></g>",
        "<svg a=1></svg>",
        "<svg>a & b</svg>",
        "<svg></svg><svg></svg>",
        "<svg></svg> trailing",
    ] {
        assert!(check_svg(bad).is_err(), "{bad:?} passed");
    }
}

// ---------------------------------------------------------------------------
// Hand-made captures (src/export/capture.rs encoding, little endian)
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Pcapng(Vec<u8>);

impl Pcapng {
    fn vsnoop() -> Pcapng {
        let mut p = Pcapng::default();
        p.shb();
        p.idb("host");
        p.idb("guest");
        p
    }

    fn block(&mut self, type_: u32, body: &[u8]) {
        let total = (12 + body.len()) as u32;
        self.0.extend_from_slice(&type_.to_le_bytes());
        self.0.extend_from_slice(&total.to_le_bytes());
        self.0.extend_from_slice(body);
        self.0.extend_from_slice(&total.to_le_bytes());
    }

    fn option(body: &mut Vec<u8>, code: u16, value: &[u8]) {
        body.extend_from_slice(&code.to_le_bytes());
        body.extend_from_slice(&(value.len() as u16).to_le_bytes());
        body.extend_from_slice(value);
        body.resize(body.len().div_ceil(4) * 4, 0);
    }

    fn shb(&mut self) {
        let mut body = 0x1a2b_3c4du32.to_le_bytes().to_vec();
        body.extend_from_slice(&[1, 0, 0, 0]);
        body.extend_from_slice(&[0xff; 8]);
        self.block(0x0a0d_0d0a, &body);
    }

    fn idb(&mut self, name: &str) {
        let mut body = vec![1, 0, 0, 0];
        body.extend_from_slice(&262_144u32.to_le_bytes());
        Self::option(&mut body, 2, name.as_bytes());
        Self::option(&mut body, 9, &[9]);
        body.extend_from_slice(&[0; 4]);
        self.block(1, &body);
    }

    fn epb(&mut self, interface: u32, ts: u64, frame: &[u8], flags: u32, id: u64) {
        let mut body = interface.to_le_bytes().to_vec();
        body.extend_from_slice(&((ts >> 32) as u32).to_le_bytes());
        body.extend_from_slice(&(ts as u32).to_le_bytes());
        body.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        body.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        body.extend_from_slice(frame);
        body.resize(body.len().div_ceil(4) * 4, 0);
        Self::option(&mut body, 2, &flags.to_le_bytes());
        Self::option(&mut body, 5, &id.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
        self.block(6, &body);
    }

    /// Toward the guest: host inbound at `host_in`, guest outbound at `ring`.
    fn rx(&mut self, id: &mut u64, frame: &[u8], host_in: u64, ring: u64) {
        *id += 1;
        self.epb(0, host_in, frame, 1, *id);
        self.epb(1, ring, frame, 2, *id);
    }

    /// From the guest: guest inbound at `pop`, host outbound at `host_out`.
    fn tx(&mut self, id: &mut u64, frame: &[u8], pop: u64, host_out: u64) {
        *id += 1;
        self.epb(1, pop, frame, 1, *id);
        self.epb(0, host_out, frame, 2, *id);
    }
}

fn icmp(from_guest: bool, request: bool, id: u16, seq: u16) -> Vec<u8> {
    let (src, dst) = if from_guest {
        (GUEST_IP, HOST_IP)
    } else {
        (HOST_IP, GUEST_IP)
    };
    let b = PacketBuilder::ethernet2(GUEST_MAC, HOST_MAC).ipv4(src, dst, 64);
    let b = if request {
        b.icmpv4_echo_request(id, seq)
    } else {
        b.icmpv4_echo_reply(id, seq)
    };
    let mut out = Vec::new();
    b.write(&mut out, &[0x5a; 56]).unwrap();
    out
}

/// A TCP segment between the guest (port `gport`) and the remote end
/// (port 5201), ACK flag set.
fn tcp(from_guest: bool, gport: u16, seq: u32, ack: u32, payload: usize) -> Vec<u8> {
    let (src, dst, sport, dport) = if from_guest {
        (GUEST_IP, HOST_IP, gport, 5201)
    } else {
        (HOST_IP, GUEST_IP, 5201, gport)
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, HOST_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, seq, 64000)
        .ack(ack)
        .write(&mut out, &vec![0x33; payload])
        .unwrap();
    out
}

/// The hand-made capture and what the report must find in it:
///
/// - 10 pings from the guest: outside RTT 20 ms (backend 50 us out, 30 us back);
/// - 10 pings from the remote end: guest delay 5 ms, backend 30 + 40 us;
/// - TCP upload (guest port 40000): 40 segments 1 ms apart, each ACKed by the
///   remote 10 ms after it left the tap (outside RTT 10 ms); the remote ACKs
///   reach the ring four at a time, 10 us apart: every group of four is a
///   compression event of 3 ratios (xi = 0.01), then a ratio of ~4 ends it;
/// - TCP download (guest port 40001): 20 segments 2 ms apart, each ACKed by
///   the guest 100 us after it reached the ring, evenly (xi = 1);
/// - a record whose partner is missing, and a last block cut short.
fn known_capture() -> Vec<u8> {
    let mut p = Pcapng::vsnoop();
    let mut id = 0;
    for i in 0..10u16 {
        let t = T0 + u64::from(i) * 100 * MS;
        p.tx(&mut id, &icmp(true, true, 7, i), t, t + 50 * US);
        let back = t + 50 * US + 20 * MS;
        p.rx(&mut id, &icmp(false, false, 7, i), back, back + 30 * US);
        let t = t + 50 * MS;
        p.rx(&mut id, &icmp(false, true, 9, i), t, t + 30 * US);
        let pop = t + 30 * US + 5 * MS;
        p.tx(&mut id, &icmp(true, false, 9, i), pop, pop + 40 * US);
    }
    // Upload: all segments first, then the ACKs (ids need not be in time order).
    let up = T0 + 2_000 * MS;
    let host_in = |i: u64| up + i * MS + 20 * US + 10 * MS;
    for i in 0..40u32 {
        let t = up + u64::from(i) * MS;
        p.tx(
            &mut id,
            &tcp(true, 40000, 1 + i * 100, 1, 100),
            t,
            t + 20 * US,
        );
    }
    for i in 0..40u64 {
        let (group, j) = (i / 4, i % 4);
        let ring = host_in(4 * group + 3) + 30 * US + j * 10 * US;
        let ack = tcp(false, 40000, 1, 1 + (i as u32 + 1) * 100, 0);
        p.rx(&mut id, &ack, host_in(i), ring);
    }
    // Download.
    let down = T0 + 3_000 * MS;
    for i in 0..20u32 {
        let t = down + u64::from(i) * 2 * MS;
        p.rx(
            &mut id,
            &tcp(false, 40001, 1 + i * 1000, 1, 1000),
            t,
            t + 30 * US,
        );
        let pop = t + 130 * US;
        let ack = tcp(true, 40001, 1, 1 + (i + 1) * 1000, 0);
        p.tx(&mut id, &ack, pop, pop + 20 * US);
    }
    // A frame whose second record never made it, then one cut by a crash.
    p.epb(0, down + 100 * MS, &icmp(false, true, 9, 99), 1, 10_000);
    p.epb(0, down + 101 * MS, &icmp(false, true, 9, 100), 1, 10_001);
    p.0.truncate(p.0.len() - 30);
    p.0
}

#[test]
fn report_numbers_match_a_capture_with_known_timestamps() -> Result<()> {
    let dir = TempDir::new("rep-known");
    let file = dir.join("known.pcapng");
    fs::write(&file, known_capture())?;
    let out = dir.join("out");
    let (summary, md, stderr) = report_ok(&file, &out)?;
    ensure!(
        stderr.contains("warning") && stderr.contains("incomplete block"),
        "{stderr}"
    );

    let c = &summary["capture"];
    ensure!(c["frames"] == 40 + 80 + 40, "{c}");
    ensure!(c["unpaired_records"] == 1, "{c}");
    ensure!(c["first_record_ns"] == T0, "{c}");
    ensure!(c["warning"].is_string(), "{c}");
    ensure!(c["snaplen"] == 262_144 && !md.contains("cut to"), "{c}");

    let i = &summary["interface"];
    ensure!(i["outside_rtt_ms"]["count"] == 50, "{i}");
    near(&i["outside_rtt_ms"]["p50"], 10.0)?;
    near(&i["outside_rtt_ms"]["max"], 20.0)?;
    ensure!(i["guest_delay_ms"]["count"] == 30, "{i}");
    near(&i["guest_delay_ms"]["p50"], 0.1)?;
    near(&i["guest_delay_ms"]["max"], 5.0)?;

    let ping = flow(&summary, "icmp", "guest")?;
    ensure!(
        ping["sport"] == 7 && ping["outside_rtt_ms"]["count"] == 10,
        "{ping}"
    );
    near(&ping["outside_rtt_ms"]["p50"], 20.0)?;
    let pinged = flow(&summary, "icmp", "remote")?;
    near(&pinged["guest_delay_ms"]["p50"], 5.0)?;
    near(&pinged["backend_delay_ms"]["p50"], 0.070)?;

    // Every data segment carries an ACK too: the first of each flow counts
    // as one more advancing ACK (and gives no ratio).
    let remote = &summary["interface_shape"]["remote_acks"];
    ensure!(remote["acks"] == 41 && remote["ratios"] == 39, "{remote}");
    ensure!(
        remote["events"] == 10 && remote["acks_in_events"] == 30,
        "{remote}"
    );
    near(&remote["fraction_in_events"], 30.0 / 39.0)?;
    near(&remote["spacing_ratio"]["p50"], 0.01)?;
    let guest = &summary["interface_shape"]["guest_acks"];
    ensure!(guest["acks"] == 21 && guest["ratios"] == 19, "{guest}");
    ensure!(
        guest["events"] == 0 && guest["ks_distance"] == 0.0,
        "{guest}"
    );
    near(&guest["spacing_ratio"]["p50"], 1.0)?;

    let row = md_row(&md, "outside RTT")?;
    ensure!(row[1] == "50", "{row:?}");
    near(&Value::from(row[2].parse::<f64>()?), 10.0)?;
    near(&Value::from(row[6].parse::<f64>()?), 20.0)?;
    let row = md_row(&md, "remote ACKs")?;
    ensure!(
        row[1..6] == ["host_in -> ring", "41", "39", "0.769", "10"],
        "{row:?}"
    );
    ensure!(md.contains("icmp 10.77.0.2 -> 10.77.0.1 id 7"), "{md}");
    ensure!(md.contains("tcp 10.77.0.2:40000 -> 10.77.0.1:5201"), "{md}");
    ensure!(md.contains("2025-01-01 00:00:00.000 UTC"), "{md}");
    ensure!(
        md.contains("skipped: 1 records without their partner"),
        "{md}"
    );

    let flows = summary["flows"].as_array().context("flows")?;
    ensure!(flows.len() == 4, "{} flows", flows.len());
    let mut plots = vec![
        "delay-cdf.svg".to_string(),
        "ack-interarrival-remote.svg".into(),
        "ack-interarrival-guest.svg".into(),
        "spacing-ratio-cdf.svg".into(),
    ];
    plots.extend(flows.iter().map(|f| format!("flow-{}-series.svg", f["id"])));
    check_plots(&out, &plots.iter().map(String::as_str).collect::<Vec<_>>())?;
    for p in &plots {
        ensure!(md.contains(p.as_str()), "report.md does not mention {p}");
    }
    Ok(())
}

#[test]
fn files_that_are_not_vsnoop_captures_are_refused() -> Result<()> {
    let dir = TempDir::new("rep-bad");
    let out = dir.join("out");
    let garbage = dir.join("garbage.pcapng");
    fs::write(&garbage, b"this is not a capture file at all")?;
    let e = report_err(&garbage, &out)?;
    ensure!(e.contains("not a vsnoop capture: not a pcapng file"), "{e}");

    // A one-interface pcapng, as a plain packet capture tool writes.
    let mut p = Pcapng::default();
    p.shb();
    p.idb("eth0");
    p.epb(0, T0, &icmp(true, true, 1, 1), 0, 1);
    let other = dir.join("other.pcapng");
    fs::write(&other, &p.0)?;
    let e = report_err(&other, &out)?;
    ensure!(
        e.contains("expected two interfaces named host and guest"),
        "{e}"
    );

    let e = report_err(&dir.join("missing.pcapng"), &out)?;
    ensure!(e.contains("cannot open"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------------------
// A real capture: pings both ways through vsnoop
// ---------------------------------------------------------------------------

/// vsnoop with `--capture` in a namespace whose tap has 10.77.0.1/24, a
/// fixed MAC and a permanent neighbour entry for the guest (no ARP, no IPv6).
struct Rig {
    // Field order is drop order: the daemon ends before its namespace.
    vs: Vsnoop,
    ns: Netns,
    dir: TempDir,
    tap: String,
}

impl Rig {
    fn start(capture: &Path) -> Rig {
        require_tool("ip");
        let ns = Netns::new("vsr");
        ns.exec(&[
            "sh",
            "-c",
            "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 \
             /proc/sys/net/ipv6/conf/default/disable_ipv6; do \
             [ -e $f ] && echo 1 > $f; done; true",
        ]);
        let dir = TempDir::new("rep-real");
        let tap = common::unique("vsr");
        let sock = dir.join("vsnoop.sock");
        let vs = Vsnoop::spawn(
            &ns,
            &[
                "--socket",
                sock.to_str().unwrap(),
                "--tap",
                &tap,
                "--capture",
                capture.to_str().unwrap(),
                // Shorter than the pings: the report must use original lengths.
                "--capture-snaplen",
                "64",
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
        Rig { vs, ns, dir, tap }
    }

    fn connect(&self) -> Result<TestFrontend> {
        let mut fe = TestFrontend::connect(
            &self.dir.join("vsnoop.sock"),
            Options {
                features: F_MRG_RXBUF,
                ..Options::default()
            },
        )?;
        fe.fill_rx(0, &[1536], false)?;
        self.vs.wait_for_log("frontend connected", T);
        Ok(fe)
    }
}

impl Drop for Rig {
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

/// Receives frames on the guest's RX ring until one satisfies `want`.
fn recv_until(fe: &mut TestFrontend, what: &str, want: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>> {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "no {what} reached the guest");
        let p = fe
            .recv(0, left)
            .with_context(|| format!("waiting for {what}"))?;
        if want(&p.frame) {
            return Ok(p.frame);
        }
    }
}

/// (type, id, seq, payload) of an ICMPv4 echo frame.
fn echo_fields(frame: &[u8]) -> Option<(&'static str, u16, u16, Vec<u8>)> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
        return None;
    };
    match icmp.icmp_type() {
        Icmpv4Type::EchoRequest(h) => Some(("request", h.id, h.seq, icmp.payload().to_vec())),
        Icmpv4Type::EchoReply(h) => Some(("reply", h.id, h.seq, icmp.payload().to_vec())),
        _ => None,
    }
}

fn guest_echo(request: bool, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GUEST_MAC, HOST_MAC).ipv4(GUEST_IP, HOST_IP, 64);
    let b = if request {
        b.icmpv4_echo_request(id, seq)
    } else {
        b.icmpv4_echo_reply(id, seq)
    };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// A raw ICMP socket opened inside the namespace (it stays there).
fn raw_icmp_socket(ns: &Netns) -> Result<OwnedFd> {
    let path = format!("/var/run/netns/{}", ns.name);
    thread::spawn(move || -> Result<OwnedFd> {
        let nsf = fs::File::open(&path).with_context(|| format!("open {path}"))?;
        // SAFETY: setns changes only this short-lived thread's namespace.
        if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        ensure!(
            fd >= 0,
            "socket(AF_INET, SOCK_RAW): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("socket thread panicked"))?
}

/// Sends an ICMP echo request from the namespace to the guest.
fn ping_guest(sock: &OwnedFd, seq: u16) -> Result<()> {
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2([0; 6], [0; 6])
        .ipv4(HOST_IP, GUEST_IP, 64)
        .icmpv4_echo_request(HOST_ECHO_ID, seq)
        .write(&mut icmp, &[0x77; 200])?;
    let icmp = &icmp[14 + 20..]; // the kernel adds the IP header
                                 // SAFETY: zeroed sockaddr_in is valid; the fields are set below.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as libc::sa_family_t;
    to.sin_addr.s_addr = u32::from_ne_bytes(GUEST_IP);
    // SAFETY: buffer and address are valid for the given lengths.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            icmp.as_ptr().cast(),
            icmp.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    ensure!(
        n == icmp.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

#[test]
fn report_on_a_real_capture_of_pings_both_ways() -> Result<()> {
    let capdir = TempDir::new("rep-cap");
    let capture = capdir.join("vsnoop.pcapng");
    let rig = Rig::start(&capture);
    let mut fe = rig.connect()?;
    const PINGS: u16 = 20;
    for seq in 0..PINGS {
        fe.send_frame(0, &guest_echo(true, GUEST_ECHO_ID, seq, &[0x42; 200]))?;
        recv_until(&mut fe, "echo reply", |f| {
            echo_fields(f)
                .is_some_and(|(t, id, s, _)| t == "reply" && id == GUEST_ECHO_ID && s == seq)
        })?;
        thread::sleep(Duration::from_millis(5));
    }
    let sock = raw_icmp_socket(&rig.ns)?;
    for seq in 0..PINGS {
        ping_guest(&sock, seq)?;
        let request = recv_until(&mut fe, "echo request", |f| {
            echo_fields(f)
                .is_some_and(|(t, id, s, _)| t == "request" && id == HOST_ECHO_ID && s == seq)
        })?;
        let (_, _, _, payload) = echo_fields(&request).context("request")?;
        // The guest takes a while to answer: guest delay.
        thread::sleep(Duration::from_millis(2));
        fe.send_frame(0, &guest_echo(false, HOST_ECHO_ID, seq, &payload))?;
        thread::sleep(Duration::from_millis(5));
    }
    fe.flush_tx(0, T)?;
    drop(fe);
    let mut rig = rig;
    ensure!(rig.vs.terminate() == Some(0), "vsnoop did not exit cleanly");

    let out = capdir.join("report");
    let (summary, md, _) = report_ok(&capture, &out)?;
    let c = &summary["capture"];
    ensure!(num(&c["frames"])? >= f64::from(4 * PINGS), "{c}");
    ensure!(c["unpaired_records"] == 0 && c["warning"].is_null(), "{c}");
    ensure!(c["snaplen"] == 64, "{c}");
    ensure!(md.contains("cut to 64 bytes"), "{md}");
    let out_ping = flow(&summary, "icmp", "guest")?;
    ensure!(out_ping["sport"] == GUEST_ECHO_ID, "{out_ping}");
    ensure!(out_ping["outside_rtt_ms"]["count"] == PINGS, "{out_ping}");
    ensure!(num(&out_ping["outside_rtt_ms"]["p50"])? > 0.0, "{out_ping}");
    // Original lengths, not the 64 bytes captured: 14 + 20 + 8 + 200.
    ensure!(
        out_ping["bytes_from_guest"] == u64::from(PINGS) * 242,
        "{out_ping}"
    );
    let in_ping = flow(&summary, "icmp", "remote")?;
    ensure!(in_ping["guest_delay_ms"]["count"] == PINGS, "{in_ping}");
    ensure!(num(&in_ping["guest_delay_ms"]["p50"])? >= 2.0, "{in_ping}");
    ensure!(
        md.contains(&format!("icmp 10.77.0.2 -> 10.77.0.1 id {GUEST_ECHO_ID}")),
        "{md}"
    );
    ensure!(md.contains("icmp 10.77.0.1 -> 10.77.0.2"), "{md}");
    let mut plots = vec!["delay-cdf.svg".to_string()];
    for f in [out_ping, in_ping] {
        plots.push(format!("flow-{}-series.svg", f["id"]));
    }
    check_plots(&out, &plots.iter().map(String::as_str).collect::<Vec<_>>())?;
    // No TCP in this capture: the ACK plots are skipped, and said to be.
    ensure!(
        md.contains("`ack-interarrival-remote.svg` not drawn"),
        "{md}"
    );
    ensure!(!out.join("ack-interarrival-remote.svg").exists());
    Ok(())
}
