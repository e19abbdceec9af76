//! The control socket: newline-delimited JSON over a unix socket.
//!
//! Each request is one JSON object on one line with a `"cmd"` field; each
//! reply is one JSON object on one line, `{"ok":true, ...}` or
//! `{"ok":false,"error":"..."}`. A malformed request gets an error reply and
//! the connection keeps serving. The types here are the wire schema (README,
//! section CONTROL SOCKET); `vsnoop stats|flows|top|...` parse replies with
//! them too.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use log::{debug, warn};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::attribution::snapshot::{DelaySummary, FlowSummary, Snapshot, TrafficShape};
use crate::export::capture::CaptureStatus;
use crate::state::Shared;

/// Longest request line accepted (bytes, newline excluded).
pub const MAX_LINE: usize = 64 * 1024;
/// Clients served at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 16;
/// Smallest and largest `snaplen` of `capture_start`.
pub const SNAPLEN_RANGE: std::ops::RangeInclusive<usize> = 64..=262_144;
/// `snaplen` when the request has none (whole frames).
pub const DEFAULT_SNAPLEN: usize = 262_144;
/// A client that sends nothing for this long is disconnected (frees its slot).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that does not read its reply for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon's version, as reported by `version` and `stats`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The whole snapshot ([`StatsReply`]); `limit` caps the flows array.
    Stats {
        /// At most this many flows (most packets first); all when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// The flows only ([`FlowsReply`]).
    Flows {
        /// At most this many flows (most packets first); all when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Switches the ACK offload ([`AckOffloadReply`]).
    AckOffload {
        /// New state.
        on: bool,
    },
    /// The ACK offload's flows ([`OffloadFlowsReply`]).
    OffloadFlows {
        /// At most this many flows (those owing the sender most bytes
        /// first, then the most recently seen); all when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Starts a capture, replacing a running one ([`CaptureReply`]).
    CaptureStart {
        /// Absolute path of the pcapng file to write (created or truncated).
        file: PathBuf,
        /// Bytes kept per frame (64..=262144, default 262144).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snaplen: Option<usize>,
    },
    /// Stops the running capture; replies with its final status, or null.
    CaptureStop {},
    /// The running capture, or null.
    CaptureStatus {},
    /// The daemon's version ([`VersionReply`]).
    Version {},
}

/// Counters of one queue pair.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueCounters {
    /// Queue pair index.
    pub queue: usize,
    /// Every counter of [`crate::metrics::QueueMetrics::snapshot`] by name.
    #[serde(flatten)]
    pub counters: BTreeMap<String, u64>,
}

impl QueueCounters {
    /// A counter's value (0 when the daemon does not report it).
    pub fn get(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

/// Reply to `stats`, and what `vsnoop stats --json` prints.
///
/// The attribution [`Snapshot`] is flattened in at top level, field by field,
/// except its `uptime_s`, which is `attribution_uptime_s` here so that
/// `uptime_s` is the daemon's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// Daemon version.
    pub version: String,
    /// TAP interface name.
    pub tap: String,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// A frontend (VMM) is connected now.
    pub connected: bool,
    /// Frontend connections served so far (the current one included).
    pub connections: u64,
    /// ACK offload switch.
    pub ack_offload: bool,
    /// ACK offload counters (README: ACK OFFLOAD).
    #[serde(default)]
    pub offload: crate::offload::OffloadStats,
    /// The running capture, or null.
    pub capture: Option<CaptureStatus>,
    /// Built with the `timing` feature (timestamps, attribution, capture).
    pub timing: bool,
    /// Counters per queue pair.
    pub queues: Vec<QueueCounters>,
    /// Seconds between the first and the latest frame the attribution saw.
    pub attribution_uptime_s: f64,
    /// Frames looked at by the attribution.
    pub packets: u64,
    /// Frames that were not IPv4/IPv6 TCP, UDP or ICMP echo.
    pub packets_other: u64,
    /// Flows tracked now.
    pub flows_tracked: u64,
    /// Flows forgotten after being idle.
    pub flows_evicted: u64,
    /// New flows not tracked because the flow table was full.
    pub flows_untracked: u64,
    /// Delay components over all flows.
    pub interface: DelaySummary,
    /// ACK compression and burstiness over all flows.
    pub interface_shape: TrafficShape,
    /// Flows, most packets first (empty without the `timing` feature).
    pub flows: Vec<FlowSummary>,
}

/// Reply to `flows`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowsReply {
    /// Flows, most packets first.
    pub flows: Vec<FlowSummary>,
}

/// Reply to `ack_offload`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AckOffloadReply {
    /// The state now.
    pub ack_offload: bool,
}

/// Reply to `offload_flows`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OffloadFlowsReply {
    /// ACK offload switch.
    pub ack_offload: bool,
    /// Flows in the offload's table now (all of them, also past `limit`).
    pub flows_tracked: u64,
    /// The flows, those owing the sender most bytes first.
    pub flows: Vec<crate::offload::OffloadFlow>,
}

/// Reply to `capture_start`, `capture_stop` and `capture_status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaptureReply {
    /// The capture started, stopped (final counters) or running; null when
    /// there is none.
    pub capture: Option<CaptureStatus>,
}

/// Reply to `version`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionReply {
    /// Daemon version.
    pub version: String,
}

/// `{"ok":true, ...body}` on the wire.
#[derive(Serialize)]
struct Success<T> {
    ok: bool,
    #[serde(flatten)]
    body: T,
}

/// `{"ok":false,"error":...}` on the wire.
#[derive(Serialize)]
struct Failed<'a> {
    ok: bool,
    error: &'a str,
}

/// The serialized reply line (without the newline) to a request.
fn reply_ok<T: Serialize>(body: T) -> Vec<u8> {
    serde_json::to_vec(&Success { ok: true, body })
        .unwrap_or_else(|e| reply_error(&format!("cannot encode the reply: {e}")))
}

fn reply_error(error: &str) -> Vec<u8> {
    // Serializing a bool and a string cannot fail.
    serde_json::to_vec(&Failed { ok: false, error }).unwrap_or_default()
}

/// Parses one request line; the error is the message for the client.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| format!("request is not JSON: {e}"))?;
    let Value::Object(map) = &value else {
        return Err("request must be a JSON object with a \"cmd\" field".into());
    };
    match map.get("cmd") {
        None => return Err("request has no \"cmd\" field".into()),
        Some(Value::String(_)) => {}
        Some(_) => return Err("\"cmd\" must be a string".into()),
    }
    serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))
}

/// Collects the `stats` reply.
pub fn stats(shared: &Shared, limit: Option<usize>) -> StatsReply {
    let snapshot = shared
        .attribution
        .as_ref()
        .map(|a| a.snapshot())
        .unwrap_or_default();
    // No `..`: a new Snapshot field must be added to the schema here too.
    let Snapshot {
        uptime_s: attribution_uptime_s,
        packets,
        packets_other,
        flows_tracked,
        flows_evicted,
        flows_untracked,
        interface,
        interface_shape,
        mut flows,
    } = snapshot;
    if let Some(limit) = limit {
        flows.truncate(limit);
    }
    StatsReply {
        version: VERSION.into(),
        tap: shared.tap.clone(),
        uptime_s: shared.started.elapsed().as_secs_f64(),
        connected: shared.connected.load(Ordering::Relaxed),
        connections: shared.connections.load(Ordering::Relaxed),
        ack_offload: shared.ack_offload(),
        offload: shared.offload.stats(),
        capture: shared.capture.status(),
        timing: shared.attribution.is_some(),
        queues: shared
            .queues
            .iter()
            .enumerate()
            .map(|(queue, m)| QueueCounters {
                queue,
                counters: m
                    .snapshot()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            })
            .collect(),
        attribution_uptime_s,
        packets,
        packets_other,
        flows_tracked,
        flows_evicted,
        flows_untracked,
        interface,
        interface_shape,
        flows,
    }
}

/// Runs one request; returns the reply line (without the newline).
pub fn handle(shared: &Shared, request: Request) -> Vec<u8> {
    match request {
        Request::Stats { limit } => reply_ok(stats(shared, limit)),
        Request::Flows { limit } => {
            let mut flows = shared
                .attribution
                .as_ref()
                .map(|a| a.snapshot().flows)
                .unwrap_or_default();
            if let Some(limit) = limit {
                flows.truncate(limit);
            }
            reply_ok(FlowsReply { flows })
        }
        Request::AckOffload { on } => {
            shared.set_ack_offload(on);
            debug!("control: ack offload {}", if on { "on" } else { "off" });
            reply_ok(AckOffloadReply {
                ack_offload: shared.ack_offload(),
            })
        }
        Request::OffloadFlows { limit } => {
            let (flows_tracked, flows) = shared.offload.flow_list(limit.unwrap_or(usize::MAX));
            reply_ok(OffloadFlowsReply {
                ack_offload: shared.ack_offload(),
                flows_tracked,
                flows,
            })
        }
        Request::CaptureStart { file, snaplen } => {
            let snaplen = snaplen.unwrap_or(DEFAULT_SNAPLEN);
            if !SNAPLEN_RANGE.contains(&snaplen) {
                return reply_error(&format!(
                    "snaplen {snaplen} is out of range ({}..={})",
                    SNAPLEN_RANGE.start(),
                    SNAPLEN_RANGE.end()
                ));
            }
            if !file.is_absolute() {
                return reply_error(&format!(
                    "capture file {} must be an absolute path",
                    file.display()
                ));
            }
            if shared.attribution.is_none() {
                // Without timestamps the capture hook is not installed.
                return reply_error("built without the `timing` feature: no capture");
            }
            match shared.capture.start(&file, snaplen) {
                Ok(status) => reply_ok(CaptureReply {
                    capture: Some(status),
                }),
                Err(e) => reply_error(&format!("{:#}", anyhow::Error::from(e))),
            }
        }
        Request::CaptureStop {} => reply_ok(CaptureReply {
            capture: shared.capture.stop(),
        }),
        Request::CaptureStatus {} => reply_ok(CaptureReply {
            capture: shared.capture.status(),
        }),
        Request::Version {} => reply_ok(VersionReply {
            version: VERSION.into(),
        }),
    }
}

/// Parses and runs one request line.
fn handle_line(shared: &Shared, line: &[u8]) -> Vec<u8> {
    match parse_request(line) {
        Ok(request) => handle(shared, request),
        Err(error) => reply_error(&error),
    }
}

/// Outcome of [`read_line_limited`].
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line (maybe the last one, without a newline) is in the buffer.
    Complete,
    /// The line was longer than the limit and was discarded.
    TooLong,
    /// End of stream.
    Eof,
}

/// Reads one `\n`-terminated line into `buf` (newline removed), keeping at
/// most `max` bytes in memory: a longer line is read to its end and dropped.
fn read_line_limited<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(match (too_long, buf.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::Eof,
                (false, false) => Line::Complete,
            });
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

/// Serves one client until it disconnects, times out or fails.
fn serve_client(stream: UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let mut line = Vec::new();
    loop {
        let reply = match read_line_limited(&mut reader, &mut line, MAX_LINE)? {
            Line::Eof => return Ok(()),
            Line::TooLong => reply_error(&format!("request line longer than {MAX_LINE} bytes")),
            Line::Complete if line.trim_ascii().is_empty() => continue,
            Line::Complete => handle_line(shared, &line),
        };
        writer.write_all(&reply)?;
        writer.write_all(b"\n")?;
        writer.flush()?;
    }
}

/// Frees a client slot when the client's thread ends (also on a panic).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts serving the control API on `path`: binds it now (errors are the
/// caller's), serves from background threads.
///
/// The socket is made owner-only (0600): a client can make the daemon
/// create files (`capture_start`).
pub fn start(path: &Path, shared: Arc<Shared>) -> Result<()> {
    let listener = crate::daemon::bind_server_socket(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    let active = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("vsnoop-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        // E.g. out of file descriptors: do not spin.
                        warn!("control socket: accept failed: {e}");
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::Relaxed);
                    refuse(stream);
                    continue;
                }
                let slot = Slot(active.clone());
                let shared = shared.clone();
                let spawned = thread::Builder::new()
                    .name("vsnoop-control-client".into())
                    .spawn(move || {
                        let _slot = slot;
                        if let Err(e) = serve_client(stream, &shared) {
                            debug!("control client: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    warn!("control socket: cannot start a client thread: {e}");
                }
            }
        })
        .context("starting the control socket thread")?;
    Ok(())
}

/// Tells a client over the limit why it is closed.
fn refuse(mut stream: UnixStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let mut line = reply_error(&format!("too many control clients (at most {MAX_CLIENTS})"));
    line.push(b'\n');
    let _ = stream.write_all(&line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::time::Instant;

    use crate::export::capture::CaptureSlot;
    use crate::metrics::QueueMetrics;

    fn shared() -> Shared {
        let q = Arc::new(QueueMetrics::default());
        QueueMetrics::add(&q.rx_packets, 7);
        Shared {
            started: Instant::now(),
            tap: "t0".into(),
            queues: vec![q, Arc::new(QueueMetrics::default())],
            attribution: None,
            capture: Arc::new(CaptureSlot::new()),
            offload: Arc::new(crate::offload::OffloadPort::new(
                crate::offload::OffloadConfig {
                    enabled: false,
                    ..Default::default()
                },
                1,
            )),
            connections: AtomicU64::new(2),
            connected: AtomicBool::new(true),
        }
    }

    fn reply(shared: &Shared, line: &str) -> Value {
        serde_json::from_slice(&handle_line(shared, line.as_bytes())).unwrap()
    }

    #[test]
    fn parses_every_command() {
        let ok = |s: &str| parse_request(s.as_bytes()).unwrap();
        assert_eq!(ok(r#"{"cmd":"stats"}"#), Request::Stats { limit: None });
        assert_eq!(
            ok(r#"{"cmd":"flows","limit":3}"#),
            Request::Flows { limit: Some(3) }
        );
        assert_eq!(
            ok(r#"{"cmd":"ack_offload","on":true}"#),
            Request::AckOffload { on: true }
        );
        assert_eq!(
            ok(r#"{"cmd":"offload_flows","limit":2}"#),
            Request::OffloadFlows { limit: Some(2) }
        );
        assert_eq!(
            ok(r#"{"cmd":"offload_flows"}"#),
            Request::OffloadFlows { limit: None }
        );
        assert_eq!(
            ok(r#"{"cmd":"capture_start","file":"/tmp/x","snaplen":128}"#),
            Request::CaptureStart {
                file: "/tmp/x".into(),
                snaplen: Some(128)
            }
        );
        assert_eq!(ok(r#"{"cmd":"capture_stop"}"#), Request::CaptureStop {});
        assert_eq!(
            ok(r#" {"cmd":"capture_status"} "#),
            Request::CaptureStatus {}
        );
        assert_eq!(ok(r#"{"cmd":"version"}"#), Request::Version {});
        // What the client sends parses back to the same request.
        let r = Request::CaptureStart {
            file: "/a b".into(),
            snaplen: None,
        };
        assert_eq!(ok(&serde_json::to_string(&r).unwrap()), r);
    }

    #[test]
    fn rejects_malformed_requests_with_a_message() {
        for (line, needle) in [
            ("garbage", "not JSON"),
            ("", "not JSON"),
            ("[1]", "JSON object"),
            (r#"["version"]"#, "JSON object"),
            ("42", "JSON object"),
            ("{}", "no \"cmd\""),
            (r#"{"cmd":1}"#, "must be a string"),
            (r#"{"cmd":"reboot"}"#, "unknown variant"),
            (r#"{"cmd":"ack_offload"}"#, "missing field `on`"),
            (r#"{"cmd":"ack_offload","on":"yes"}"#, "invalid type"),
            (r#"{"cmd":"flows","limit":-1}"#, "invalid value"),
            (r#"{"cmd":"capture_start","file":7}"#, "invalid type"),
            (r#"{"cmd":"stats","bogus":1}"#, "unknown field"),
            (r#"{"cmd":"version","x":null}"#, "unknown field"),
        ] {
            let e = parse_request(line.as_bytes()).unwrap_err();
            assert!(e.contains(needle), "{line:?}: {e}");
        }
    }

    #[test]
    fn replies_ok_or_error() {
        let s = shared();
        let v = reply(&s, r#"{"cmd":"version"}"#);
        assert_eq!(v["ok"], true);
        assert_eq!(v["version"], VERSION);
        let v = reply(&s, "nonsense");
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("not JSON"));
        let v = reply(&s, r#"{"cmd":"ack_offload","on":true}"#);
        assert_eq!(v["ack_offload"], true);
        assert!(s.ack_offload());
        let v = reply(&s, r#"{"cmd":"capture_start","file":"rel.pcapng"}"#);
        assert!(v["error"].as_str().unwrap().contains("absolute"), "{v}");
        let v = reply(&s, r#"{"cmd":"capture_start","file":"/x","snaplen":10}"#);
        assert!(v["error"].as_str().unwrap().contains("out of range"), "{v}");
        let v = reply(&s, r#"{"cmd":"capture_status"}"#);
        assert_eq!(v, serde_json::json!({"ok": true, "capture": null}));
    }

    #[test]
    fn stats_reply_has_the_documented_shape() {
        let s = shared();
        let v = reply(&s, r#"{"cmd":"stats"}"#);
        assert_eq!(v["ok"], true);
        for key in [
            "version",
            "tap",
            "uptime_s",
            "connected",
            "connections",
            "ack_offload",
            "capture",
            "timing",
            "queues",
            "attribution_uptime_s",
            "packets",
            "flows_tracked",
            "interface",
            "flows",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert_eq!(v["timing"], false);
        assert_eq!(v["flows"], serde_json::json!([]));
        assert_eq!(v["queues"][0]["queue"], 0);
        assert_eq!(v["queues"][0]["rx_packets"], 7);
        assert_eq!(v["queues"][1]["queue"], 1);
        assert_eq!(v["interface"]["outside_rtt_ms"]["count"], 0);
        // The client parses the same object back.
        let parsed: StatsReply = serde_json::from_value(v).unwrap();
        assert_eq!(parsed.queues[0].get("rx_packets"), 7);
        assert_eq!(
            parsed.queues[0].counters.len(),
            s.queues[0].snapshot().len()
        );
        assert_eq!(parsed.connections, 2);
    }

    #[test]
    fn long_lines_are_discarded_and_reading_goes_on() {
        let mut input = Vec::new();
        input.extend_from_slice(b"short\n");
        input.extend(std::iter::repeat(b'x').take(100));
        input.extend_from_slice(b"\nnext\nlast");
        // A tiny buffer makes lines span several fill_buf calls.
        let mut r = BufReader::with_capacity(7, Cursor::new(input));
        let mut buf = Vec::new();
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 10).unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"short");
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 10).unwrap(),
            Line::TooLong
        );
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 10).unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"next");
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 10).unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"last");
        assert_eq!(read_line_limited(&mut r, &mut buf, 10).unwrap(), Line::Eof);
        // Exactly at the limit is fine.
        let mut r = Cursor::new(b"0123456789\n".to_vec());
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 10).unwrap(),
            Line::Complete
        );
    }
}
