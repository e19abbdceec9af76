//! report.md: the report in words and tables.

use std::fmt::Write;

use super::plots::Plot;
use super::{flow_label, Analysis, CaptureInfo};
use crate::attribution::packet::PREFIX_LEN;
use crate::attribution::snapshot::{
    AckCompressionSummary, BurstSummary, DelaySummary, FlowSummary, Summary,
};
use crate::attribution::Snapshot;

/// Flows listed in report.md at most (all are in summary.json).
pub const MAX_FLOW_ROWS: usize = 100;

/// The whole report.md.
pub fn render(analysis: &Analysis, plots: &[Plot]) -> String {
    let mut md = String::from("# vsnoop report\n\n");
    capture_section(&mut md, &analysis.capture, &analysis.snapshot);
    delay_section(&mut md, &analysis.snapshot.interface);
    ack_section(&mut md, &analysis.snapshot, &analysis.capture);
    burst_section(&mut md, &analysis.snapshot);
    flow_section(&mut md, &analysis.snapshot.flows);
    plot_section(&mut md, plots);
    md
}

/// A number with three significant digits ("20.0", "0.0123"); "-" for none.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let digits = (2 - v.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{v:.digits$}")
}

/// A UTC date and time from nanoseconds since the epoch.
pub fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        ns / 1_000_000 % 1000
    )
}

fn capture_section(md: &mut String, c: &CaptureInfo, s: &Snapshot) {
    let _ = writeln!(md, "- capture: `{}` ({} bytes)", c.file, c.bytes);
    let _ = writeln!(
        md,
        "- frames: {} seen at both vantage points ({} toward the guest, {} from the guest), \
         from {} records",
        c.frames, c.frames_to_guest, c.frames_from_guest, c.records
    );
    if c.unpaired_records + c.inconsistent_pairs > 0 {
        let _ = writeln!(
            md,
            "- skipped: {} records without their partner, {} pairs with contradicting \
             direction flags",
            c.unpaired_records, c.inconsistent_pairs
        );
    }
    if c.records > 0 {
        let _ = writeln!(
            md,
            "- time: {} to {} ({} s)",
            utc(c.first_record_ns),
            utc(c.last_record_ns),
            num(c.span_s)
        );
    }
    let _ = writeln!(
        md,
        "- attribution: {} frames, {} not IPv4/IPv6 TCP, UDP or ICMP echo; {} flows \
         ({} forgotten after closing, {} not tracked: table full)",
        s.packets,
        s.packets_other,
        s.flows.len(),
        s.flows_evicted,
        s.flows_untracked
    );
    let _ = writeln!(
        md,
        "- ACK compression parameters: k = {}, theta = {}",
        c.compression_k, c.compression_theta
    );
    if let Some(w) = &c.warning {
        let _ = writeln!(md, "- **warning**: {w}");
    }
    if let Some(n) = c.snaplen.filter(|&n| (n as usize) < PREFIX_LEN) {
        let _ = writeln!(
            md,
            "- **note**: frames were captured cut to {n} bytes, fewer than the {PREFIX_LEN} \
             header bytes the attribution reads: headers cut short (e.g. TCP with options) \
             count as not attributed"
        );
    }
    md.push('\n');
}

fn delay_section(md: &mut String, d: &DelaySummary) {
    md.push_str("## Delay components (all flows)\n\n");
    md.push_str("| component | samples | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for (name, s) in [
        ("outside RTT", &d.outside_rtt_ms),
        ("backend delay", &d.backend_delay_ms),
        ("guest delay", &d.guest_delay_ms),
        ("backend rx", &d.backend_rx_ms),
        ("backend tx", &d.backend_tx_ms),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} |",
            s.count,
            opt(s, s.p50),
            opt(s, s.p90),
            opt(s, s.p99),
            opt(s, s.p999),
            opt(s, s.max)
        );
    }
    md.push_str(
        "\nOutside RTT: a guest packet written to the tap (`host_out`) until the remote answer \
         is read from it (`host_in`). Guest delay: a remote packet in the guest's RX ring \
         (`ring`) until the guest's answer leaves its TX ring (`pop`). Backend delay: vsnoop's \
         share of one round trip through the guest. Backend rx / tx: every frame, `host_in` -> \
         `ring` and `pop` -> `host_out`. Percentiles from HDR histograms (1 % resolution).\n\n",
    );
}

/// A value of a distribution, "-" when it has no samples.
fn opt(s: &Summary, v: f64) -> String {
    if s.count == 0 {
        "-".into()
    } else {
        num(v)
    }
}

fn ack_section(md: &mut String, s: &Snapshot, c: &CaptureInfo) {
    md.push_str("## ACK compression (TCP, all flows)\n\n");
    md.push_str(
        "| stream | points | ACKs | ratios | compressed (xi < 1) | events | ACKs in events \
         | fraction in events | xi min | xi p50 | xi p90 | xi p99 | xi max | KS distance |\n",
    );
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let shape = &s.interface_shape;
    ack_row(md, "remote ACKs", "host_in -> ring", &shape.remote_acks);
    ack_row(md, "guest ACKs", "pop -> host_out", &shape.guest_acks);
    let _ = writeln!(
        md,
        "\nxi = downstream gap / upstream gap of consecutive ACKs advancing the cumulative ACK \
         (upstream gap >= 20 us); an event is a run of at least {} ratios <= {}. KS distance: \
         largest difference between the inter-arrival CDFs at the two points.\n",
        c.compression_k, c.compression_theta
    );
}

fn ack_row(md: &mut String, who: &str, points: &str, a: &AckCompressionSummary) {
    let r = &a.spacing_ratio;
    let _ = writeln!(
        md,
        "| {who} | {points} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        a.acks,
        a.ratios,
        num(a.compressed_fraction),
        a.events,
        a.acks_in_events,
        num(a.fraction_in_events),
        opt(r, r.min),
        opt(r, r.p50),
        opt(r, r.p90),
        opt(r, r.p99),
        opt(r, r.max),
        num(a.ks_distance)
    );
}

fn burst_section(md: &mut String, s: &Snapshot) {
    md.push_str("## Send burstiness (TCP data segments, all flows)\n\n");
    md.push_str("| data | point | segments | bursts | burst size p50 | p99 | max | gap CV |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    let shape = &s.interface_shape;
    for (who, point, b) in [
        ("remote data", "host_in", &shape.remote_data.upstream),
        ("remote data", "ring", &shape.remote_data.downstream),
        ("guest data", "pop", &shape.guest_data.upstream),
        ("guest data", "host_out", &shape.guest_data.downstream),
    ] {
        burst_row(md, who, point, b);
    }
    md.push_str(
        "\nA burst is a run of segments less than 100 us apart; gap CV is the coefficient of \
         variation of the gaps between segments.\n\n",
    );
}

fn burst_row(md: &mut String, who: &str, point: &str, b: &BurstSummary) {
    let z = &b.burst_size;
    let _ = writeln!(
        md,
        "| {who} | {point} | {} | {} | {} | {} | {} | {} |",
        b.segments,
        b.bursts,
        opt(z, z.p50),
        opt(z, z.p99),
        opt(z, z.max),
        num(b.gap_cv)
    );
}

fn flow_section(md: &mut String, flows: &[FlowSummary]) {
    md.push_str("## Flows\n\n");
    if flows.is_empty() {
        md.push_str("No flows (no IPv4/IPv6 TCP, UDP or ICMP echo frames).\n\n");
        return;
    }
    let shown = flows.len().min(MAX_FLOW_ROWS);
    let _ = writeln!(
        md,
        "{} flows, most packets first{}. Delays in ms: p50 / p99 (samples).\n",
        flows.len(),
        if shown < flows.len() {
            format!(" (the first {shown}; all are in summary.json)")
        } else {
            String::new()
        }
    );
    md.push_str(
        "| id | flow | initiator | method | packets to guest | packets from guest \
         | outside RTT | guest delay | backend delay |\n",
    );
    md.push_str("|---:|---|---|---|---:|---:|---|---|---|\n");
    for f in &flows[..shown] {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f.id,
            flow_label(f),
            f.initiator,
            f.method,
            f.packets_to_guest,
            f.packets_from_guest,
            brief(&f.delays.outside_rtt_ms),
            brief(&f.delays.guest_delay_ms),
            brief(&f.delays.backend_delay_ms)
        );
    }
    md.push('\n');
}

/// "p50 / p99 (n)", or "-".
fn brief(s: &Summary) -> String {
    if s.count == 0 {
        "-".into()
    } else {
        format!("{} / {} ({})", num(s.p50), num(s.p99), s.count)
    }
}

fn plot_section(md: &mut String, plots: &[Plot]) {
    md.push_str("## Plots\n\n");
    for p in plots {
        match &p.skipped {
            None => {
                let _ = writeln!(md, "- [`{}`]({}): {}", p.file, p.file, p.what);
            }
            Some(why) => {
                let _ = writeln!(md, "- `{}` not drawn ({why}): {}", p.file, p.what);
            }
        }
    }
}
