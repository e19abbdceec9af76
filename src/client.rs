//! The client subcommands: talk to a running daemon's control socket, or
//! analyse a capture offline.
//!
//! Every control subcommand opens the socket, sends one request line and
//! prints the reply (`top` does so once per refresh). Replies are parsed with
//! the schema types of [`crate::export::control`].

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::attribution::snapshot::{DelaySummary, FlowSummary, Summary};
use crate::cli::{CaptureAction, Command, Switch};
use crate::export::capture::CaptureStatus;
use crate::export::control::{
    AckOffloadReply, CaptureReply, FlowsReply, OffloadFlowsReply, QueueCounters, Request,
    StatsReply,
};
use crate::offload::OffloadStats;

/// How long to wait for a reply (a snapshot of many flows takes a while).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Flows shown by `top`.
const TOP_FLOWS: usize = 20;

/// Runs one subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Stats { control, json } => {
            let mut client = ControlClient::connect(&control)?;
            if json {
                let value = client.request_value(&Request::Stats { limit: None })?;
                emit(&format!("{value}\n"))?;
            } else {
                // The summary shows no flows: do not ship them.
                let stats: StatsReply = client.request(&Request::Stats { limit: Some(0) })?;
                emit(&format_stats(&stats))?;
            }
        }
        Command::Flows {
            control,
            json,
            limit,
        } => {
            let mut client = ControlClient::connect(&control)?;
            let request = Request::Flows { limit: Some(limit) };
            if json {
                let mut value = client.request_value(&request)?;
                let flows = value.get_mut("flows").map(Value::take).unwrap_or_default();
                emit(&format!("{flows}\n"))?;
            } else {
                let reply: FlowsReply = client.request(&request)?;
                if reply.flows.is_empty() {
                    emit("no flows tracked\n")?;
                } else {
                    emit(&format_flows(&reply.flows))?;
                }
            }
        }
        Command::Top { control, interval } => top(&control, interval)?,
        Command::AckOffload {
            control,
            state: Some(state),
            ..
        } => {
            let mut client = ControlClient::connect(&control)?;
            let reply: AckOffloadReply = client.request(&Request::AckOffload {
                on: state == Switch::On,
            })?;
            emit(&format!("ack offload: {}\n", on_off(reply.ack_offload)))?;
        }
        Command::AckOffload {
            control,
            state: None,
            json,
            limit,
        } => {
            let mut client = ControlClient::connect(&control)?;
            let request = Request::OffloadFlows { limit: Some(limit) };
            if json {
                let value = client.request_value(&request)?;
                emit(&format!("{value}\n"))?;
            } else {
                let reply: OffloadFlowsReply = client.request(&request)?;
                emit(&format_offload_flows(&reply))?;
            }
        }
        Command::Capture { control, action } => {
            let request = match action {
                CaptureAction::Start { file, snaplen } => Request::CaptureStart {
                    // The daemon's working directory is not ours.
                    file: std::path::absolute(&file)
                        .with_context(|| format!("resolving {}", file.display()))?,
                    snaplen: Some(snaplen),
                },
                CaptureAction::Stop => Request::CaptureStop {},
                CaptureAction::Status => Request::CaptureStatus {},
            };
            let stopping = matches!(request, Request::CaptureStop {});
            let mut client = ControlClient::connect(&control)?;
            let reply: CaptureReply = client.request(&request)?;
            let line = match (reply.capture, stopping) {
                (Some(c), true) => format!("capture stopped: {}\n", describe_capture(&c)),
                (Some(c), false) => format!("capture: {}\n", describe_capture(&c)),
                (None, true) => "no capture was running\n".to_string(),
                (None, false) => "capture: off\n".to_string(),
            };
            emit(&line)?;
        }
        Command::Report {
            file,
            out,
            compression_k,
            compression_theta,
        } => crate::report::run(&file, &out, compression_k, compression_theta)?,
    }
    Ok(())
}

/// One connection to a daemon's control socket.
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to `path`; the error is one line saying what is wrong.
    pub fn connect(path: &Path) -> Result<ControlClient> {
        let shown = path.display();
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                bail!("no control socket at {shown} (is vsnoop running with --control {shown}?)")
            }
            Ok(meta) if !meta.file_type().is_socket() => {
                bail!("{shown} is not a socket (expected a vsnoop --control socket)")
            }
            _ => {}
        }
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused => anyhow!(
                "control socket {shown} refuses connections (vsnoop is not running; stale socket?)"
            ),
            io::ErrorKind::PermissionDenied => {
                anyhow!("no permission to use control socket {shown} (run as the daemon's user)")
            }
            _ => anyhow!("cannot connect to control socket {shown}: {e}"),
        })?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(ControlClient {
            path: path.to_path_buf(),
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends `request` and returns the reply object without its `ok` field;
    /// an `ok: false` reply becomes an error with the daemon's message.
    pub fn request_value(&mut self, request: &Request) -> Result<Value> {
        let shown = self.path.display();
        let mut line = serde_json::to_vec(request).context("encoding the request")?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .with_context(|| format!("sending to control socket {shown}"))?;
        let mut reply = String::new();
        let n = self
            .reader
            .read_line(&mut reply)
            .with_context(|| format!("reading from control socket {shown}"))?;
        if n == 0 {
            bail!("the daemon closed control socket {shown} without replying");
        }
        let mut value: Value = serde_json::from_str(&reply)
            .with_context(|| format!("the daemon's reply is not JSON: {}", reply.trim_end()))?;
        let Value::Object(map) = &mut value else {
            bail!(
                "the daemon's reply is not a JSON object: {}",
                reply.trim_end()
            );
        };
        match map.remove("ok") {
            Some(Value::Bool(true)) => Ok(value),
            Some(Value::Bool(false)) => {
                let error = map
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no message");
                bail!("the daemon refused: {error}")
            }
            _ => bail!(
                "the daemon's reply has no \"ok\" field: {}",
                reply.trim_end()
            ),
        }
    }

    /// Sends `request` and parses the reply as `T`.
    pub fn request<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T> {
        let value = self.request_value(request)?;
        serde_json::from_value(value)
            .context("unexpected reply from the daemon (version mismatch?)")
    }
}

/// Writes a reply to stdout. A reader that went away (`vsnoop stats --json
/// | head -c 100`) is not an error: there is nobody left to tell.
fn emit(text: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// `PATH (snaplen S, F frames, D dropped, X filtered, R rotations)`: every
/// field of the daemon's capture status.
fn describe_capture(c: &CaptureStatus) -> String {
    format!(
        "{} (snaplen {}, {} frames, {} dropped, {} filtered, {} rotations)",
        c.path.display(),
        c.snaplen,
        c.frames,
        c.dropped,
        c.filtered,
        c.rotations
    )
}

/// `1h02m03s`, `4m05s`, `6.2s`.
fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0);
    let whole = s as u64;
    match whole {
        0..=59 => format!("{s:.1}s"),
        60..=3599 => format!("{}m{:02}s", whole / 60, whole % 60),
        _ => format!("{}h{:02}m{:02}s", whole / 3600, whole / 60 % 60, whole % 60),
    }
}

/// Milliseconds to three significant digits (at least three decimals,
/// at most six: backend delays are sub-microsecond), `-` without samples.
fn ms(s: &Summary, v: f64) -> String {
    if s.count == 0 {
        return "-".into();
    }
    let decimals = if v > 0.0 && v < 1.0 {
        (2 - v.log10().floor() as i32).clamp(3, 6) as usize
    } else {
        3
    };
    format!("{v:.decimals$}")
}

/// Header line: daemon, frontend, switches.
fn format_header(s: &StatsReply) -> String {
    let frontend = if s.connected {
        format!("frontend connected (connection {})", s.connections)
    } else {
        format!("no frontend ({} connections served)", s.connections)
    };
    let capture = s
        .capture
        .as_ref()
        .map_or_else(|| "off".to_string(), describe_capture);
    format!(
        "vsnoop {} on tap {}, up {}, {frontend}\nack offload: {}   capture: {capture}\n",
        s.version,
        s.tap,
        format_duration(s.uptime_s),
        on_off(s.ack_offload)
    )
}

/// The interface delay components as a table.
fn format_delays(s: &StatsReply) -> String {
    if !s.timing {
        return "delay attribution: not available (built without the `timing` feature)\n".into();
    }
    let d: &DelaySummary = &s.interface;
    let rows = [
        ("outside_rtt", &d.outside_rtt_ms, "network and remote host"),
        (
            "backend_delay",
            &d.backend_delay_ms,
            "vsnoop, per round trip",
        ),
        (
            "guest_delay",
            &d.guest_delay_ms,
            "VM, guest stack, application",
        ),
        ("backend_rx", &d.backend_rx_ms, "every frame tap -> guest"),
        ("backend_tx", &d.backend_tx_ms, "every frame guest -> tap"),
    ];
    let mut out = format!(
        "attribution: {} frames ({} not attributed), {} flows tracked, {} evicted, {} untracked\n",
        s.packets, s.packets_other, s.flows_tracked, s.flows_evicted, s.flows_untracked
    );
    let _ = writeln!(
        out,
        "{:<14} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "delay (ms)", "samples", "p50", "p90", "p99", "max"
    );
    for (name, x, what) in rows {
        let _ = writeln!(
            out,
            "{name:<14} {:>9} {:>10} {:>10} {:>10} {:>10}  {what}",
            x.count,
            ms(x, x.p50),
            ms(x, x.p90),
            ms(x, x.p99),
            ms(x, x.max)
        );
    }
    out
}

/// `name N, name N` of the non-zero counts of a by-reason map, `-` if none.
fn nonzero(by_reason: &std::collections::BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = by_reason
        .iter()
        .filter(|(_, v)| **v != 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// The ACK offload counters (README: ACK OFFLOAD), a few lines.
fn format_offload(o: &OffloadStats) -> String {
    let mut out = format!(
        "ack offload: {} flows tracked, {} offloaded, {} passed through ({})\n",
        o.flows_tracked,
        o.flows_offloaded,
        o.flows_passthrough,
        nonzero(&o.passthrough)
    );
    let _ = writeln!(
        out,
        "  early ACKs {} for {} bytes ({} with ECE); guest ACKs {} suppressed ({} window updates deferred), {} rewritten",
        o.early_acks,
        o.early_acked_bytes,
        o.ece_acks,
        o.guest_acks_suppressed,
        o.window_updates_deferred,
        o.guest_acks_rewritten
    );
    let _ = writeln!(
        out,
        "  custody {} bytes held, {} owed by the guest; re-delivered {} bytes in {} attempts ({} frames dropped), {} resets",
        o.custody_bytes,
        o.owed_bytes,
        o.redelivered_bytes,
        o.redeliveries,
        o.redelivery_dropped,
        o.resets
    );
    let _ = writeln!(
        out,
        "  offline ({}), back online {}",
        nonzero(&o.offline),
        o.back_online
    );
    if o.draining || o.drains > 0 {
        let _ = writeln!(
            out,
            "  migration: {}; {} drains started, {} completed",
            if o.draining {
                "draining (no new early ACKs)"
            } else {
                "not migrating"
            },
            o.drains,
            o.drains_completed
        );
    }
    out
}

/// `vsnoop ack-offload` without on|off: the switch and the flow table.
fn format_offload_flows(reply: &OffloadFlowsReply) -> String {
    let mut out = format!(
        "ack offload: {}, {} flows tracked{}\n",
        on_off(reply.ack_offload),
        reply.flows_tracked,
        if (reply.flows.len() as u64) < reply.flows_tracked {
            format!(" ({} shown)", reply.flows.len())
        } else {
            String::new()
        }
    );
    if reply.flows.is_empty() {
        return out;
    }
    let rows: Vec<[String; 7]> = reply
        .flows
        .iter()
        .map(|f| {
            [
                endpoint(&f.guest, f.guest_port),
                endpoint(&f.remote, f.remote_port),
                f.mode.clone(),
                f.reason.clone().unwrap_or_else(|| "-".into()),
                f.owed_bytes.to_string(),
                f.custody_bytes.to_string(),
                format!("{:.1}", f.idle_s),
            ]
        })
        .collect();
    let header = [
        "GUEST", "REMOTE", "MODE", "REASON", "OWED", "CUSTODY", "IDLE_S",
    ];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].len())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let mut line = |cells: &[&str]| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // Text columns left-aligned, numbers right-aligned.
                if i < 4 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&header);
    for r in &rows {
        line(&r.each_ref().map(String::as_str));
    }
    out
}

/// Counters in the order of the README table (packets first).
const MAIN_COUNTERS: [&str; 4] = ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"];

/// Counters per queue pair: the four main ones, then every non-zero other.
fn format_queues(queues: &[QueueCounters]) -> String {
    let mut out = String::new();
    for q in queues {
        let _ = writeln!(
            out,
            "queue {}: rx {} packets {} bytes, tx {} packets {} bytes",
            q.queue,
            q.get("rx_packets"),
            q.get("rx_bytes"),
            q.get("tx_packets"),
            q.get("tx_bytes")
        );
        let others: Vec<String> = q
            .counters
            .iter()
            .filter(|(k, v)| **v != 0 && !MAIN_COUNTERS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if others.is_empty() {
            out.push_str("  no drops, no backpressure\n");
        } else {
            let _ = writeln!(out, "  {}", others.join(" "));
        }
    }
    out
}

/// The readable `vsnoop stats` output.
fn format_stats(s: &StatsReply) -> String {
    let mut out = format_header(s);
    out.push('\n');
    out.push_str(&format_delays(s));
    out.push('\n');
    out.push_str(&format_offload(&s.offload));
    out.push('\n');
    out.push_str(&format_queues(&s.queues));
    out
}

/// `addr:port`, IPv6 in brackets.
fn endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// The flows as an aligned table (delays in ms).
fn format_flows(flows: &[FlowSummary]) -> String {
    let header = [
        "PROTO",
        "FLOW",
        "INITIATOR",
        "METHOD",
        "PKTS_TO_GUEST",
        "PKTS_FROM_GUEST",
        "OUTSIDE_P50",
        "OUTSIDE_P99",
        "BACKEND_P50",
        "BACKEND_P99",
        "GUEST_P50",
        "GUEST_P99",
    ];
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| {
            let d = &f.delays;
            let (o, b, g) = (&d.outside_rtt_ms, &d.backend_delay_ms, &d.guest_delay_ms);
            vec![
                f.proto.clone(),
                format!(
                    "{} -> {}",
                    endpoint(&f.src, f.sport),
                    endpoint(&f.dst, f.dport)
                ),
                f.initiator.clone(),
                f.method.clone(),
                f.packets_to_guest.to_string(),
                f.packets_from_guest.to_string(),
                ms(o, o.p50),
                ms(o, o.p99),
                ms(b, b.p50),
                ms(b, b.p99),
                ms(g, g.p50),
                ms(g, g.p99),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Text columns left-aligned, numbers right-aligned.
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if i < 4 {
                let _ = write!(s, "{cell:<w$}");
            } else {
                let _ = write!(s, "{cell:>w$}");
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut header.iter().copied());
    for row in &rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out.push_str("(delays in ms; - = no samples)\n");
    out
}

/// Packet and byte totals over all queue pairs, for rates.
#[derive(Clone, Copy, Default)]
struct Totals {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
    drops: u64,
}

impl Totals {
    fn of(queues: &[QueueCounters]) -> Totals {
        let mut t = Totals::default();
        for q in queues {
            t.rx_packets += q.get("rx_packets");
            t.rx_bytes += q.get("rx_bytes");
            t.tx_packets += q.get("tx_packets");
            t.tx_bytes += q.get("tx_bytes");
            t.drops += q
                .counters
                .iter()
                .filter(|(k, _)| k.contains("_drop_") || k.as_str() == "bad_head_index")
                .map(|(_, v)| *v)
                .sum::<u64>();
        }
        t
    }
}

/// Leaves the alternate screen and shows the cursor again, however `top`
/// ends.
struct Screen;

impl Screen {
    fn enter() -> Screen {
        print!("\x1b[?1049h\x1b[?25l");
        let _ = io::stdout().flush();
        Screen
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = io::stdout().flush();
    }
}

/// The live view.
fn top(control: &Path, interval: f64) -> Result<()> {
    if !(0.1..=3600.0).contains(&interval) {
        bail!("--interval must be between 0.1 and 3600 seconds");
    }
    let interval = Duration::from_secs_f64(interval);
    let fetch = || -> Result<StatsReply> {
        ControlClient::connect(control)?.request(&Request::Stats {
            limit: Some(TOP_FLOWS),
        })
    };
    // Fail before touching the terminal if the daemon is not there.
    let mut stats = fetch()?;
    let quit = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, quit.clone()).context("installing signal handlers")?;
    }
    // `q` then Enter also quits (the terminal stays in line mode).
    let q = quit.clone();
    let _ = thread::Builder::new()
        .name("vsnoop-top-stdin".into())
        .spawn(move || {
            for line in io::stdin().lock().lines() {
                match line {
                    Ok(l) if l.trim() == "q" => q.store(true, Ordering::Relaxed),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
    let screen = Screen::enter();
    let mut previous: Option<(Instant, Totals)> = None;
    loop {
        let now = Instant::now();
        let totals = Totals::of(&stats.queues);
        let frame = format_top(&stats, totals, previous.map(|(t, p)| (now - t, p)));
        print!("\x1b[H\x1b[2J{frame}");
        let _ = io::stdout().flush();
        previous = Some((now, totals));
        while now.elapsed() < interval {
            if quit.load(Ordering::Relaxed) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50).min(interval));
        }
        if quit.load(Ordering::Relaxed) {
            return Ok(());
        }
        stats = match fetch() {
            Ok(s) => s,
            Err(e) => {
                drop(screen);
                return Err(e.context(format!("lost the daemon on {}", control.display())));
            }
        };
    }
}

/// One screen of `top`.
fn format_top(s: &StatsReply, now: Totals, delta: Option<(Duration, Totals)>) -> String {
    let mut out = format_header(s);
    match delta {
        Some((dt, before)) if !dt.is_zero() => {
            let secs = dt.as_secs_f64();
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
            let _ = writeln!(
                out,
                "rx {:.0} pkt/s {:.2} Mbit/s   tx {:.0} pkt/s {:.2} Mbit/s   drops {:.0}/s   ({} queue pairs)",
                rate(now.rx_packets, before.rx_packets),
                rate(now.rx_bytes, before.rx_bytes) * 8.0 / 1e6,
                rate(now.tx_packets, before.tx_packets),
                rate(now.tx_bytes, before.tx_bytes) * 8.0 / 1e6,
                rate(now.drops, before.drops),
                s.queues.len()
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "rx - pkt/s   tx - pkt/s   (rates from the next refresh)"
            );
        }
    }
    out.push('\n');
    out.push_str(&format_delays(s));
    out.push('\n');
    out.push_str(&format_offload(&s.offload));
    out.push('\n');
    if s.flows.is_empty() {
        out.push_str("no flows tracked\n");
    } else {
        let _ = writeln!(out, "top {} flows by packets:", s.flows.len());
        out.push_str(&format_flows(&s.flows));
    }
    out.push_str("\nCtrl-C (or q, Enter) to quit\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::OffloadFlow;

    fn flow() -> FlowSummary {
        let mut f = FlowSummary {
            proto: "icmp".into(),
            src: "10.77.0.2".into(),
            dst: "10.77.0.1".into(),
            sport: 0x4242,
            initiator: "guest".into(),
            method: "icmp-echo".into(),
            packets_to_guest: 3,
            packets_from_guest: 3,
            ..Default::default()
        };
        f.delays.outside_rtt_ms = Summary {
            count: 3,
            p50: 0.0421,
            p99: 0.1,
            max: 0.1,
            ..Default::default()
        };
        f
    }

    #[test]
    fn flow_table_is_aligned() {
        let mut v6 = flow();
        v6.proto = "tcp".into();
        v6.src = "fd00::1".into();
        v6.dst = "fd00::2222".into();
        v6.sport = 443;
        v6.dport = 50000;
        let table = format_flows(&[flow(), v6]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("PROTO  FLOW"), "{table}");
        assert!(
            lines[1].contains("10.77.0.2:16962 -> 10.77.0.1:0"),
            "{table}"
        );
        assert!(
            lines[2].contains("[fd00::1]:443 -> [fd00::2222]:50000"),
            "{table}"
        );
        assert!(lines[1].contains(" 0.0421 "), "{table}");
        assert!(lines[1].ends_with(" -"), "{table}");
        // Columns line up: the METHOD column starts at the same offset.
        let col = |l: &str, s: &str| l.find(s).unwrap();
        assert_eq!(col(lines[0], "METHOD"), col(lines[1], "icmp-echo"));
        assert_eq!(col(lines[0], "METHOD"), col(lines[2], "icmp-echo"));
        assert_eq!(lines[0].find("GUEST_P99").unwrap() + 9, lines[0].len());
    }

    #[test]
    fn stats_summary_and_top_screen() {
        let mut q = QueueCounters {
            queue: 0,
            ..Default::default()
        };
        for c in MAIN_COUNTERS {
            q.counters.insert(c.into(), 10);
        }
        q.counters.insert("rx_drop_bad_chain".into(), 2);
        q.counters.insert("tx_drop_bad_gso".into(), 0);
        let s = StatsReply {
            version: "0.1.0".into(),
            tap: "t0".into(),
            uptime_s: 3725.0,
            connected: true,
            connections: 1,
            timing: true,
            queues: vec![q],
            flows: vec![flow()],
            ..Default::default()
        };
        let mut s = s;
        s.offload.early_acks = 7;
        s.offload.early_acked_bytes = 10_136;
        s.offload.owed_bytes = 1448;
        s.offload.offline.insert("zero_window".into(), 2);
        s.offload.offline.insert("hole".into(), 0);
        let text = format_stats(&s);
        assert!(
            text.contains("early ACKs 7 for 10136 bytes (0 with ECE)"),
            "{text}"
        );
        assert!(text.contains("1448 owed by the guest"), "{text}");
        assert!(text.contains("offline (zero_window 2)"), "{text}");
        assert!(text.contains("passed through (-)"), "{text}");
        assert!(!text.contains("migration:"), "{text}");
        s.offload.draining = true;
        s.offload.drains = 1;
        let text = format_stats(&s);
        assert!(
            text.contains("migration: draining (no new early ACKs); 1 drains started, 0 completed"),
            "{text}"
        );
        assert!(text.contains("up 1h02m05s"), "{text}");
        assert!(text.contains("queue 0: rx 10 packets 10 bytes"), "{text}");
        assert!(text.contains("rx_drop_bad_chain=2"), "{text}");
        assert!(!text.contains("tx_drop_bad_gso"), "{text}");
        assert!(text.contains("outside_rtt"), "{text}");
        let before = Totals::of(&s.queues);
        let mut later = s.clone();
        later.queues[0].counters.insert("rx_packets".into(), 30);
        let screen = format_top(
            &later,
            Totals::of(&later.queues),
            Some((Duration::from_secs(2), before)),
        );
        assert!(screen.contains("rx 10 pkt/s"), "{screen}");
        assert!(screen.contains("10.77.0.2:16962"), "{screen}");
        assert_eq!(format_duration(5.25), "5.2s");
        assert_eq!(format_duration(65.0), "1m05s");
        let one = Summary {
            count: 1,
            ..Default::default()
        };
        assert_eq!(ms(&one, 0.000421), "0.000421");
        assert_eq!(ms(&one, 0.00000042), "0.000000");
        assert_eq!(ms(&one, 0.25), "0.250");
        assert_eq!(ms(&one, 12.5), "12.500");
        assert_eq!(ms(&Summary::default(), 1.0), "-");
    }

    #[test]
    fn offload_flow_table_is_aligned() {
        let flow = |guest: &str, mode: &str, reason: Option<&str>, owed: u64| OffloadFlow {
            guest: guest.into(),
            guest_port: 5001,
            remote: "10.77.0.1".into(),
            remote_port: 40312,
            mode: mode.into(),
            reason: reason.map(Into::into),
            owed_bytes: owed,
            custody_bytes: owed + 1448,
            idle_s: 0.25,
        };
        let reply = OffloadFlowsReply {
            ack_offload: true,
            flows_tracked: 3,
            flows: vec![
                flow("10.77.0.2", "active", None, 65160),
                flow("fd77::2", "pass_through", Some("mid_stream"), 0),
            ],
        };
        let text = format_offload_flows(&reply);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ack offload: on, 3 flows tracked (2 shown)");
        assert!(lines[1].starts_with("GUEST "), "{text}");
        assert!(lines[2].starts_with("10.77.0.2:5001 "), "{text}");
        assert!(lines[3].starts_with("[fd77::2]:5001 "), "{text}");
        assert!(lines[3].contains(" pass_through  mid_stream "), "{text}");
        assert!(lines[2].contains(" active        - "), "{text}");
        // Right-aligned numbers end in the same column.
        let end = |l: &str, s: &str| l.find(s).unwrap() + s.len();
        assert_eq!(end(lines[1], "CUSTODY"), end(lines[2], "66608"));
        assert_eq!(end(lines[1], "CUSTODY"), end(lines[3], " 1448"));
        assert!(
            lines[2].ends_with(" 0.2") || lines[2].ends_with(" 0.3"),
            "{text}"
        );
        let none = OffloadFlowsReply::default();
        assert_eq!(
            format_offload_flows(&none),
            "ack offload: off, 0 flows tracked\n"
        );
    }

    #[test]
    fn missing_socket_is_one_clear_line() {
        let e = ControlClient::connect(Path::new("/nonexistent/vsnoop.ctl"))
            .err()
            .unwrap();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("no control socket at /nonexistent/vsnoop.ctl"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
        let e = ControlClient::connect(Path::new("/")).err().unwrap();
        assert!(format!("{e:#}").contains("is not a socket"));
    }

    #[test]
    fn capture_line_has_every_status_field() {
        let c = CaptureStatus {
            path: "/tmp/cap.pcapng".into(),
            snaplen: 128,
            frames: 10,
            dropped: 1,
            filtered: 7,
            rotations: 2,
        };
        assert_eq!(
            describe_capture(&c),
            "/tmp/cap.pcapng (snaplen 128, 10 frames, 1 dropped, 7 filtered, 2 rotations)"
        );
    }
}
