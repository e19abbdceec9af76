//! `vsnoop report`: offline analysis of a capture written by `--capture`.
//!
//! The capture holds every frame twice, once per vantage point, with one
//! packet id ([`pcapng`]). The report pairs the two records of each frame,
//! feeds the same [`Attributor`] the daemon runs live (`on_rx` / `on_tx`
//! with the recorded timestamps), and writes into the output directory:
//! `summary.json` (the attributor's [`Snapshot`] plus facts about the file),
//! `report.md` ([`markdown`]) and SVG plots ([`plots`]).

pub mod markdown;
pub mod pcapng;
pub mod plots;

use std::cell::Cell;
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::attribution::{AttributionConfig, Attributor, FlowSummary, ShapeConfig, Snapshot};
use pcapng::{Event, Paired, Pairer, Record};

/// Everything the report is made of.
pub struct Analysis {
    /// The attributor after the whole capture.
    pub attributor: Attributor,
    /// Its snapshot, with every flow (also those it forgot) in `flows`.
    pub snapshot: Snapshot,
    /// Facts about the file.
    pub capture: CaptureInfo,
}

/// Facts about the capture file (the `capture` object of summary.json).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CaptureInfo {
    /// The file analysed.
    pub file: String,
    /// Its size (bytes).
    pub bytes: u64,
    /// Packet records read (two per frame).
    pub records: u64,
    /// Frames seen at both vantage points (record pairs) fed to the attribution.
    pub frames: u64,
    /// Of those, toward the guest.
    pub frames_to_guest: u64,
    /// Of those, from the guest.
    pub frames_from_guest: u64,
    /// Records whose partner is missing (skipped).
    pub unpaired_records: u64,
    /// Pairs whose direction flags contradict each other (skipped).
    pub inconsistent_pairs: u64,
    /// pcapng sections (one per capture).
    pub sections: u64,
    /// Bytes kept per frame (null: whole frames).
    pub snaplen: Option<u32>,
    /// Earliest record (ns since the epoch).
    pub first_record_ns: u64,
    /// Latest record (ns since the epoch).
    pub last_record_ns: u64,
    /// Time between them (s).
    pub span_s: f64,
    /// Why the end of the file was not read (a truncated or damaged last block).
    pub warning: Option<String>,
    /// ACK compression: ratios in a row that make an event.
    pub compression_k: u32,
    /// ACK compression: largest ratio counted as compressed.
    pub compression_theta: f64,
}

/// summary.json: the snapshot's fields, plus `capture`.
#[derive(Serialize)]
struct SummaryFile<'a> {
    #[serde(flatten)]
    snapshot: &'a Snapshot,
    capture: &'a CaptureInfo,
}

/// Analyses `file` and writes the report into `out` (created if missing).
/// `k` and `theta` are the ACK-compression parameters.
pub fn run(file: &Path, out: &Path, k: u32, theta: f64) -> Result<()> {
    let shape = shape_config(k, theta)?;
    let analysis = analyse(file, shape, true)?;
    if let Some(w) = &analysis.capture.warning {
        eprintln!("vsnoop report: warning: {}: {w}", file.display());
    }
    write_report(out, &analysis)?;
    eprintln!(
        "vsnoop report: {} frames, {} flows; report written to {}",
        analysis.capture.frames,
        analysis.snapshot.flows.len(),
        out.display()
    );
    Ok(())
}

/// The shape parameters, checked as the daemon checks them.
fn shape_config(k: u32, theta: f64) -> Result<ShapeConfig> {
    if k < 2 || !(theta > 0.0 && theta < 1.0) {
        bail!("--compression-k must be at least 2 and --compression-theta between 0 and 1");
    }
    Ok(ShapeConfig {
        k,
        theta,
        ..ShapeConfig::default()
    })
}

/// Writes summary.json, the plots and report.md into `out`.
pub fn write_report(out: &Path, analysis: &Analysis) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let summary = SummaryFile {
        snapshot: &analysis.snapshot,
        capture: &analysis.capture,
    };
    let json = serde_json::to_string_pretty(&summary).context("encoding summary.json")?;
    write(&out.join("summary.json"), json)?;
    let plots = plots::write_all(
        out,
        &analysis.attributor,
        &analysis.snapshot.flows,
        analysis.capture.first_record_ns,
    )?;
    write(&out.join("report.md"), markdown::render(analysis, &plots))
}

fn write(path: &Path, text: String) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads `file` and runs the attribution over it; `progress` prints a line
/// on stderr about every second.
pub fn analyse(file: &Path, shape: ShapeConfig, progress: bool) -> Result<Analysis> {
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
    let read = Rc::new(Cell::new(0));
    let input = Counting {
        inner: f,
        count: read.clone(),
    };
    let mut feed = Feed::new(shape);
    let mut meter = Progress::new(bytes, read, progress);
    let end = pcapng::read_records(input, &mut |event| {
        feed.event(event);
        meter.tick(feed.records);
    })
    .with_context(|| file.display().to_string())?;
    feed.pairer.finish();
    let mut capture = feed.info(file, bytes, shape);
    capture.sections = end.sections;
    capture.warning = end.warning;
    capture.snaplen = end.snaplen;
    let snapshot = full_snapshot(&feed.attributor);
    Ok(Analysis {
        attributor: feed.attributor,
        snapshot,
        capture,
    })
}

/// The snapshot with the flows the attributor forgot (closed TCP flows)
/// added back: a report lists every flow of the capture.
fn full_snapshot(attributor: &Attributor) -> Snapshot {
    let mut snapshot = attributor.snapshot();
    snapshot
        .flows
        .extend(attributor.forgotten().iter().cloned());
    snapshot.flows.sort_by(|a, b| {
        (b.packets_to_guest + b.packets_from_guest)
            .cmp(&(a.packets_to_guest + a.packets_from_guest))
            .then(a.id.cmp(&b.id))
    });
    snapshot
}

/// Pairs records and feeds the frames to the attributor.
struct Feed {
    attributor: Attributor,
    pairer: Pairer,
    records: u64,
    first_ns: Option<u64>,
    last_ns: u64,
}

impl Feed {
    fn new(shape: ShapeConfig) -> Feed {
        Feed {
            attributor: Attributor::new(AttributionConfig {
                record_series: true,
                max_flows: 1_000_000,
                idle_timeout_ns: u64::MAX,
                shape,
                keep_forgotten: true,
            }),
            pairer: Pairer::default(),
            records: 0,
            first_ns: None,
            last_ns: 0,
        }
    }

    fn event(&mut self, event: Event<'_>) {
        match event {
            // Packet ids start over in a new section.
            Event::Section => self.pairer.finish(),
            Event::Record(r) => self.record(&r),
        }
    }

    fn record(&mut self, r: &Record<'_>) {
        self.records += 1;
        self.first_ns = Some(self.first_ns.map_or(r.ts_ns, |f| f.min(r.ts_ns)));
        self.last_ns = self.last_ns.max(r.ts_ns);
        // The captured bytes may be cut by the snaplen: the attribution
        // takes lengths from the IP header and counts the original length.
        let len = (r.original_len as usize).max(r.data.len());
        match self.pairer.push(r) {
            Some(Paired::Rx(stamps)) => self.attributor.on_rx(r.data, len, stamps),
            Some(Paired::Tx(stamps)) => self.attributor.on_tx(r.data, len, stamps),
            None => {}
        }
    }

    fn info(&self, file: &Path, bytes: u64, shape: ShapeConfig) -> CaptureInfo {
        let s = self.pairer.stats;
        let first = self.first_ns.unwrap_or(0);
        CaptureInfo {
            file: file.display().to_string(),
            bytes,
            records: self.records,
            frames: s.rx + s.tx,
            frames_to_guest: s.rx,
            frames_from_guest: s.tx,
            unpaired_records: s.unpaired,
            inconsistent_pairs: s.inconsistent,
            sections: 1,
            snaplen: None,
            first_record_ns: first,
            last_record_ns: self.last_ns.max(first),
            span_s: self.last_ns.saturating_sub(first) as f64 / 1e9,
            warning: None,
            compression_k: shape.k,
            compression_theta: shape.theta,
        }
    }
}

/// Counts the bytes read from the file (for progress).
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// A progress line on stderr about every second.
struct Progress {
    enabled: bool,
    size: u64,
    read: Rc<Cell<u64>>,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(size: u64, read: Rc<Cell<u64>>, enabled: bool) -> Progress {
        let now = Instant::now();
        Progress {
            enabled,
            size,
            read,
            started: now,
            last: now,
        }
    }

    fn tick(&mut self, records: u64) {
        // Looking at the clock every record would cost more than the rest.
        if !self.enabled || records % 4096 != 0 || self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last = Instant::now();
        let pct = 100.0 * self.read.get() as f64 / self.size.max(1) as f64;
        eprintln!(
            "vsnoop report: {:.0}% read, {records} records, {:.0} s",
            pct.min(100.0),
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// "tcp 10.77.0.2:40000 -> 10.77.0.1:5201", "icmp 10.77.0.2 -> 10.77.0.1 id 7".
pub fn flow_label(f: &FlowSummary) -> String {
    let end = |addr: &str, port: u16| {
        if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        }
    };
    if f.proto.starts_with("icmp") {
        format!("{} {} -> {} id {}", f.proto, f.src, f.dst, f.sport)
    } else {
        format!(
            "{} {} -> {}",
            f.proto,
            end(&f.src, f.sport),
            end(&f.dst, f.dport)
        )
    }
}

#[cfg(test)]
mod tests;
