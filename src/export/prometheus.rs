//! Prometheus / OpenMetrics text endpoint: `GET /metrics` on a tiny HTTP/1.1
//! server (one short-lived thread per request, `Connection: close`).
//!
//! Everything is read from [`Shared`] at scrape time by one
//! [`Collector`]: the per-queue counters, the switches, the capture and the
//! attribution, whose delay components become histograms (seconds) with
//! fixed buckets filled from the HDR histograms. Metric families are listed
//! in the README, section METRICS.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use log::{debug, warn};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelValue, LabelValueEncoder, MetricEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::state::Shared;

/// The response's content type (OpenMetrics text 1.0.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Upper bounds of the delay histogram buckets, in nanoseconds (1 us to
/// 10 s in 1-2.5-5 steps); `+Inf` follows.
pub const BUCKETS_NS: [u64; 22] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// Requests served at once; more are closed without an answer.
const MAX_CLIENTS: usize = 8;
/// A request head larger than this is refused.
const MAX_HEAD: usize = 8 * 1024;
/// Slow clients are dropped after this long without progress.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts serving `GET /metrics` on `addr`: binds now (errors are the
/// caller's), serves from background threads.
pub fn start(addr: SocketAddr, shared: Arc<Shared>) -> Result<()> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("listening for metrics on {addr}"))?;
    let registry = Arc::new(registry(shared));
    let active = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("vsnoop-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("metrics: accept failed: {e}");
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::Relaxed);
                    continue; // dropping the stream closes it
                }
                let slot = Slot(active.clone());
                let registry = registry.clone();
                let spawned = thread::Builder::new()
                    .name("vsnoop-metrics-client".into())
                    .spawn(move || {
                        let _slot = slot;
                        if let Err(e) = serve(stream, &registry) {
                            debug!("metrics client: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    warn!("metrics: cannot start a client thread: {e}");
                }
            }
        })
        .context("starting the metrics thread")?;
    Ok(())
}

/// Frees a client slot when the client's thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A registry whose only member reads `shared` at every scrape.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(VsnoopCollector { shared }));
    registry
}

/// The whole exposition (ends with `# EOF`).
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// Serves one request.
fn serve(mut stream: TcpStream, registry: &Registry) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let response = respond(&head, registry);
    stream.write_all(&response)?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads the request head (up to the empty line, end of stream or
/// [`MAX_HEAD`] bytes); the body, if any, is ignored.
fn read_head(stream: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while head.len() <= MAX_HEAD {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(head)
}

/// The full HTTP response to a request head.
fn respond(head: &[u8], registry: &Registry) -> Vec<u8> {
    let complete =
        head.windows(2).any(|w| w == b"\n\n") || head.windows(4).any(|w| w == b"\r\n\r\n");
    if head.len() > MAX_HEAD && !complete {
        return simple(
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        );
    }
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(first) = std::str::from_utf8(first) else {
        return simple(400, "Bad Request", "bad request\n");
    };
    let parts: Vec<&str> = first.split_whitespace().collect();
    let (method, target) = match parts.as_slice() {
        [m, t] => (*m, *t),
        [m, t, v] if v.starts_with("HTTP/1.") => (*m, *t),
        _ => return simple(400, "Bad Request", "bad request\n"),
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
    {
        return simple(400, "Bad Request", "bad request\n");
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if path != "/metrics" {
        return simple(404, "Not Found", "not found: try /metrics\n");
    }
    if method != "GET" && method != "HEAD" {
        return simple(405, "Method Not Allowed", "use GET\n");
    }
    match render(registry) {
        Ok(body) => response(200, "OK", CONTENT_TYPE, body.as_bytes(), method == "HEAD"),
        Err(_) => simple(500, "Internal Server Error", "encoding failed\n"),
    }
}

fn simple(code: u16, reason: &str, body: &str) -> Vec<u8> {
    response(
        code,
        reason,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        false,
    )
}

fn response(code: u16, reason: &str, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    )
    .into_bytes();
    if code == 405 {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// Cumulative bucket counts of `h` (values in ns) at each bound of
/// `bounds_ns` (values <= bound, to the histogram's 2-digit precision),
/// then the total count, and the sum of all values in ns.
pub fn cumulative_buckets(h: Option<&Histogram<u64>>, bounds_ns: &[u64]) -> (Vec<u64>, u64, f64) {
    let Some(h) = h.filter(|h| !h.is_empty()) else {
        return (vec![0; bounds_ns.len()], 0, 0.0);
    };
    let count = h.len();
    let mut cumulative = Vec::with_capacity(bounds_ns.len());
    let mut previous = 0;
    for &bound in bounds_ns {
        // count_between counts whole HDR buckets, and clamps bounds beyond
        // the histogram's range; keep the series monotonic and <= count.
        let c = h.count_between(0, bound).clamp(previous, count);
        cumulative.push(c);
        previous = c;
    }
    // HDR keeps no exact sum: the mean is over bucket midpoints.
    (cumulative, count, h.mean() * count as f64)
}

/// `(upper bound in seconds, count in this bucket)` pairs as
/// [`MetricEncoder::encode_histogram`] wants them (it accumulates them
/// itself), with the `+Inf` bucket last (`f64::MAX`), plus the count and
/// the sum in seconds.
pub fn encoder_buckets(h: Option<&Histogram<u64>>) -> (Vec<(f64, u64)>, u64, f64) {
    let (cumulative, count, sum_ns) = cumulative_buckets(h, &BUCKETS_NS);
    let mut buckets = Vec::with_capacity(BUCKETS_NS.len() + 1);
    let mut previous = 0;
    for (&bound, &c) in BUCKETS_NS.iter().zip(&cumulative) {
        buckets.push((bound as f64 / 1e9, c - previous));
        previous = c;
    }
    buckets.push((f64::MAX, count - previous));
    (buckets, count, sum_ns / 1e9)
}

/// A label value escaped for the text format (the encoder writes values
/// verbatim, and interface names may contain `"` or `\`).
#[derive(Clone, Copy)]
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        use fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Reads [`Shared`] at every scrape.
struct VsnoopCollector {
    shared: Arc<Shared>,
}

impl fmt::Debug for VsnoopCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VsnoopCollector")
            .field("tap", &self.shared.tap)
            .finish()
    }
}

/// Values of one scrape taken from the attribution.
struct AttributionValues {
    packets: u64,
    packets_other: u64,
    flows_tracked: u64,
    flows_evicted: u64,
    flows_untracked: u64,
    /// (component name, histogram in ns) of the interface.
    delays: Vec<(&'static str, Option<Histogram<u64>>)>,
}

/// The interface delay histograms, in export order.
const DELAY_FAMILIES: [(&str, &str); 5] = [
    (
        "vsnoop_outside_rtt",
        "Outside round trip: guest packet written to the tap until the remote answer is read from it",
    ),
    (
        "vsnoop_backend_delay",
        "vsnoop's share of a round trip through the guest (request host_in->ring plus answer pop->host_out)",
    ),
    (
        "vsnoop_guest_delay",
        "Remote packet in the guest's RX ring until the guest's answer leaves its TX ring",
    ),
    (
        "vsnoop_backend_rx",
        "Every frame toward the guest: read from the tap until published in the RX used ring",
    ),
    (
        "vsnoop_backend_tx",
        "Every frame from the guest: taken from the TX avail ring until written to the tap",
    ),
];

fn counter(m: &mut MetricEncoder, v: u64) -> fmt::Result {
    m.encode_counter::<(), _, u64>(&v, None)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &[(&str, Escaped)],
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    m.encode_family(&labels)?.encode_gauge(&v)
}

fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &[(&str, Escaped)],
    v: u64,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    counter(&mut m.encode_family(&labels)?, v)
}

impl VsnoopCollector {
    /// ACK offload counters and gauges (README: ACK OFFLOAD).
    fn encode_offload(&self, enc: &mut DescriptorEncoder, tap: &[(&str, Escaped)]) -> fmt::Result {
        let o = self.shared.offload.stats();
        let counters: [(&str, &str, u64); 16] = [
            (
                "early_acks",
                "Early ACKs sent on the guest's behalf",
                o.early_acks,
            ),
            (
                "early_acked_bytes",
                "Bytes acknowledged early",
                o.early_acked_bytes,
            ),
            (
                "ece_acks",
                "Early ACKs that carried ECE (a CE mark echoed)",
                o.ece_acks,
            ),
            (
                "checksums_verified",
                "Segments whose TCP checksum the offload verified itself",
                o.checksums_verified,
            ),
            (
                "guest_acks_suppressed",
                "Guest ACKs the sender no longer needed, not sent",
                o.guest_acks_suppressed,
            ),
            (
                "guest_acks_rewritten",
                "Guest packets with ack/window/TSecr/SACK rewritten",
                o.guest_acks_rewritten,
            ),
            (
                "window_updates_deferred",
                "Suppressed guest ACKs whose small window growth the next early ACK carried",
                o.window_updates_deferred,
            ),
            (
                "redeliveries",
                "Custody re-delivery attempts",
                o.redeliveries,
            ),
            (
                "redelivered_bytes",
                "Custody bytes re-delivered to the guest",
                o.redelivered_bytes,
            ),
            (
                "redelivery_dropped",
                "Re-delivery frames dropped for lack of guest buffers",
                o.redelivery_dropped,
            ),
            (
                "resets",
                "Flows reset after repeated failed re-deliveries",
                o.resets,
            ),
            (
                "flows_offloaded",
                "Flows offloaded after a complete handshake",
                o.flows_offloaded,
            ),
            (
                "flows_passthrough",
                "Flows never offloaded",
                o.flows_passthrough,
            ),
            (
                "back_online",
                "Offline flows that came back online",
                o.back_online,
            ),
            ("drains", "Migration drains (VHOST_F_LOG_ALL set)", o.drains),
            (
                "drains_completed",
                "Migration drains completed (the guest confirmed every early-ACKed byte)",
                o.drains_completed,
            ),
        ];
        for (name, help, v) in counters {
            counter_family(enc, &format!("vsnoop_ack_offload_{name}"), help, tap, v)?;
        }
        for (family, help, by_reason) in [
            (
                "vsnoop_ack_offload_offline",
                "Flows taken offline, by reason",
                &o.offline,
            ),
            (
                "vsnoop_ack_offload_passthrough_flows",
                "Flows passed through, by reason",
                &o.passthrough,
            ),
        ] {
            let mut m = enc.encode_descriptor(family, help, None, MetricType::Counter)?;
            for (reason, v) in by_reason {
                let labels = [("reason", Escaped(reason)), tap[0]];
                counter(&mut m.encode_family(&labels)?, *v)?;
            }
        }
        gauge(
            enc,
            "vsnoop_ack_offload_flows_tracked",
            "Flows in the offload table",
            tap,
            o.flows_tracked as i64,
        )?;
        gauge(
            enc,
            "vsnoop_ack_offload_custody_bytes",
            "Bytes held in custody",
            tap,
            o.custody_bytes as i64,
        )?;
        gauge(
            enc,
            "vsnoop_ack_offload_owed_bytes",
            "Bytes acknowledged to senders and not yet acknowledged by the guest",
            tap,
            o.owed_bytes as i64,
        )?;
        gauge(
            enc,
            "vsnoop_ack_offload_draining",
            "1 while a migration drain is on",
            tap,
            i64::from(o.draining),
        )
    }

    fn attribution(&self) -> Option<AttributionValues> {
        let hook = self.shared.attribution.as_ref()?;
        Some(hook.with(|a| {
            let s = a.counters();
            let d = a.delays();
            // Cloned under the lock, converted to buckets after it.
            let h = |dist: &crate::attribution::shape::Dist| dist.histogram().cloned();
            AttributionValues {
                packets: s.packets,
                packets_other: s.packets_other,
                flows_tracked: s.flows_tracked,
                flows_evicted: s.flows_evicted,
                flows_untracked: s.flows_untracked,
                delays: vec![
                    ("outside_rtt", h(&d.outside)),
                    ("backend_delay", h(&d.backend)),
                    ("guest_delay", h(&d.guest)),
                    ("backend_rx", h(&d.backend_rx)),
                    ("backend_tx", h(&d.backend_tx)),
                ],
            }
        }))
    }
}

impl Collector for VsnoopCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let shared = &self.shared;
        let tap = [("tap", Escaped(&shared.tap))];

        let mut m = enc.encode_descriptor(
            "vsnoop_build",
            "vsnoop version and build features",
            None,
            MetricType::Info,
        )?;
        m.encode_info(&[
            ("version", Escaped(crate::export::control::VERSION)),
            (
                "timing",
                Escaped(if shared.attribution.is_some() {
                    "true"
                } else {
                    "false"
                }),
            ),
        ])?;
        gauge(
            &mut enc,
            "vsnoop_uptime_seconds",
            "Seconds since the daemon started",
            &tap,
            shared.started.elapsed().as_secs_f64(),
        )?;
        gauge(
            &mut enc,
            "vsnoop_frontend_connected",
            "1 while a frontend (VMM) is connected",
            &tap,
            i64::from(shared.connected.load(Ordering::Relaxed)),
        )?;
        counter_family(
            &mut enc,
            "vsnoop_frontend_connections",
            "Frontend connections served",
            &tap,
            shared.connections.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut enc,
            "vsnoop_ack_offload_enabled",
            "1 when the ACK offload switch is on",
            &tap,
            i64::from(shared.ack_offload()),
        )?;
        self.encode_offload(&mut enc, &tap)?;

        // Per-queue counters, one family per counter.
        let queues: Vec<Vec<(&'static str, u64)>> =
            shared.queues.iter().map(|q| q.snapshot()).collect();
        let names: Vec<&'static str> = queues
            .first()
            .map(|q| q.iter().map(|(n, _)| *n).collect())
            .unwrap_or_default();
        for (i, name) in names.iter().enumerate() {
            let family = format!("vsnoop_queue_{name}");
            let help = format!("Per queue pair counter {name} (README: SIGNALS AND COUNTERS)");
            let mut m = enc.encode_descriptor(&family, &help, None, MetricType::Counter)?;
            for (q, values) in queues.iter().enumerate() {
                let index = q.to_string();
                let labels = [("queue", Escaped(&index)), ("tap", Escaped(&shared.tap))];
                let v = values.get(i).map_or(0, |(_, v)| *v);
                counter(&mut m.encode_family(&labels)?, v)?;
            }
        }

        // Capture: zero when idle; the counters restart with each capture.
        let capture = shared.capture.status();
        gauge(
            &mut enc,
            "vsnoop_capture_active",
            "1 while a capture is running",
            &tap,
            i64::from(capture.is_some()),
        )?;
        counter_family(
            &mut enc,
            "vsnoop_capture_frames",
            "Frames recorded by the running capture (restarts with each capture)",
            &tap,
            capture.as_ref().map_or(0, |c| c.frames),
        )?;
        counter_family(
            &mut enc,
            "vsnoop_capture_dropped",
            "Frames the running capture dropped because the writer fell behind",
            &tap,
            capture.as_ref().map_or(0, |c| c.dropped),
        )?;

        let Some(a) = self.attribution() else {
            return Ok(());
        };
        for (name, help, v) in [
            (
                "vsnoop_attribution_packets",
                "Frames the delay attribution looked at",
                a.packets,
            ),
            (
                "vsnoop_attribution_packets_other",
                "Frames that were not IPv4/IPv6 TCP, UDP or ICMP echo",
                a.packets_other,
            ),
            (
                "vsnoop_attribution_flows_evicted",
                "Flows forgotten after being idle",
                a.flows_evicted,
            ),
            (
                "vsnoop_attribution_flows_untracked",
                "New flows not tracked because the flow table was full",
                a.flows_untracked,
            ),
        ] {
            counter_family(&mut enc, name, help, &tap, v)?;
        }
        gauge(
            &mut enc,
            "vsnoop_attribution_flows_tracked",
            "Flows tracked now",
            &tap,
            a.flows_tracked as i64,
        )?;
        for ((family, help), (_, h)) in DELAY_FAMILIES.iter().zip(&a.delays) {
            let (buckets, count, sum) = encoder_buckets(h.as_ref());
            let unit = Unit::Seconds;
            let mut m = enc.encode_descriptor(family, help, Some(&unit), MetricType::Histogram)?;
            m.encode_family(&tap)?
                .encode_histogram::<()>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::time::Instant;

    use crate::attribution::hook::AttributionHook;
    use crate::export::capture::CaptureSlot;
    use crate::metrics::QueueMetrics;

    fn histogram(values: &[u64]) -> Histogram<u64> {
        let mut h = Histogram::<u64>::new(2).unwrap();
        h.auto(true);
        for &v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn buckets_count_values_up_to_each_bound() {
        // 3 us, 3 us, 40 us, 2 ms, 20 s (beyond the last bound).
        let h = histogram(&[3_000, 3_000, 40_000, 2_000_000, 20_000_000_000]);
        let (cumulative, count, sum) = cumulative_buckets(Some(&h), &BUCKETS_NS);
        assert_eq!(count, 5);
        let at = |ns: u64| cumulative[BUCKETS_NS.iter().position(|&b| b == ns).unwrap()];
        assert_eq!(at(1_000), 0);
        assert_eq!(at(2_500), 0);
        assert_eq!(at(5_000), 2);
        assert_eq!(at(25_000), 2);
        assert_eq!(at(50_000), 3);
        assert_eq!(at(1_000_000), 3);
        assert_eq!(at(2_500_000), 4);
        assert_eq!(at(10_000_000_000), 4);
        assert!(cumulative.windows(2).all(|w| w[0] <= w[1]));
        let exact = 3_000.0 * 2.0 + 40_000.0 + 2_000_000.0 + 20e9;
        assert!((sum - exact).abs() / exact < 0.01, "{sum}");

        let (buckets, count, sum_s) = encoder_buckets(Some(&h));
        assert_eq!(buckets.len(), BUCKETS_NS.len() + 1);
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), count);
        assert_eq!(buckets.last().unwrap(), &(f64::MAX, 1));
        assert_eq!(buckets[0].0, 1e-6);
        assert!((sum_s - exact / 1e9).abs() < 0.3);
    }

    #[test]
    fn empty_histograms_give_empty_buckets() {
        let (cumulative, count, sum) = cumulative_buckets(None, &BUCKETS_NS);
        assert_eq!((count, sum), (0, 0.0));
        assert!(cumulative.iter().all(|&c| c == 0));
        let h = histogram(&[]);
        let (buckets, count, _) = encoder_buckets(Some(&h));
        assert_eq!(count, 0);
        assert!(buckets.iter().all(|b| b.1 == 0));
    }

    fn shared(tap: &str) -> Arc<Shared> {
        let q = Arc::new(QueueMetrics::default());
        QueueMetrics::add(&q.rx_packets, 5);
        QueueMetrics::add(&q.tx_drop_bad_gso, 2);
        Arc::new(Shared {
            started: Instant::now(),
            tap: tap.into(),
            queues: vec![q, Arc::new(QueueMetrics::default())],
            attribution: Some(Arc::new(AttributionHook::new(Default::default()))),
            capture: Arc::new(CaptureSlot::new()),
            offload: Arc::new(crate::offload::OffloadPort::new(
                crate::offload::OffloadConfig::default(),
                1,
            )),
            connections: AtomicU64::new(1),
            connected: AtomicBool::new(false),
        })
    }

    #[test]
    fn exposition_has_every_family_and_ends_with_eof() {
        let registry = registry(shared("t\"0"));
        let text = render(&registry).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in [
            "vsnoop_queue_rx_packets_total{queue=\"0\",tap=\"t\\\"0\"} 5",
            "vsnoop_queue_rx_packets_total{queue=\"1\",tap=\"t\\\"0\"} 0",
            "vsnoop_queue_tx_drop_bad_gso_total{queue=\"0\",tap=\"t\\\"0\"} 2",
            "vsnoop_ack_offload_enabled{tap=\"t\\\"0\"} 1",
            "vsnoop_capture_active{tap=\"t\\\"0\"} 0",
            "vsnoop_attribution_packets_total{tap=\"t\\\"0\"} 0",
            "# TYPE vsnoop_outside_rtt_seconds histogram",
            "# UNIT vsnoop_outside_rtt_seconds seconds",
            "vsnoop_backend_rx_seconds_bucket{le=\"+Inf\",tap=\"t\\\"0\"} 0",
            "vsnoop_guest_delay_seconds_count{tap=\"t\\\"0\"} 0",
            "vsnoop_guest_delay_seconds_bucket{le=\"0.000001\",tap=\"t\\\"0\"} 0",
            "vsnoop_guest_delay_seconds_bucket{le=\"0.0000025\",tap=\"t\\\"0\"} 0",
            "vsnoop_guest_delay_seconds_bucket{le=\"10.0\",tap=\"t\\\"0\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(text.contains("vsnoop_build_info{version=\""), "{text}");
    }

    #[test]
    fn http_answers_metrics_404_and_garbage() {
        let registry = registry(shared("t0"));
        let text = |r: Vec<u8>| String::from_utf8(r).unwrap();
        let ok = text(respond(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            &registry,
        ));
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")));
        assert!(ok.ends_with("# EOF\n"));
        let head = text(respond(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n", &registry));
        assert!(
            head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let nf = text(respond(b"GET / HTTP/1.1\r\n\r\n", &registry));
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = text(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &registry));
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        for garbage in [
            &b""[..],
            b"\r\n\r\n",
            b"\xff\xfe\n\n",
            b"GET\n\n",
            b"a b c d\n\n",
            b"\x00\x01 garbage\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
        ] {
            let r = text(respond(garbage, &registry));
            assert!(r.starts_with("HTTP/1.1 400"), "{garbage:?}: {r}");
        }
        let big = vec![b'x'; MAX_HEAD + 1];
        assert!(text(respond(&big, &registry)).starts_with("HTTP/1.1 431"));
    }
}
