//! CDFs of transfer throughput from `benches/ack-offload.sh`'s CSV, one panel
//! per contention emulation and one line per configuration (QEMU's tap
//! backend, vsnoop with the ACK offload off, on), like Figure 5 of the vSnoop
//! paper (SC 2010).
//!
//! ```text
//! cargo run --release --example ack_cdf -- --csv benches/results/ack-offload.csv \
//!     [--size 100000] [--out benches/results/ack-offload-cdf.svg]
//! ```
//!
//! CSV columns: `config,contention,size_bytes,rep,seconds,mb_per_s,status`;
//! only rows with status `ok` and the chosen size are drawn. The x axis
//! (MB/s, 10^6 B/s, log scale) is shared by all panels.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Configurations in drawing order: (CSV name, legend, colour). The `ab-`
/// ones are `XFER_AB` pairs: both states on the offload-on boot.
const CONFIGS: [(&str, &str, RGBColor); 5] = [
    ("vanilla", "QEMU tap (vanilla)", RGBColor(127, 127, 127)),
    ("off", "vsnoop, offload off", RGBColor(31, 119, 180)),
    ("on", "vsnoop, offload on", RGBColor(214, 39, 40)),
    (
        "ab-off",
        "offload off (pairs, one boot)",
        RGBColor(23, 190, 207),
    ),
    (
        "ab-on",
        "offload on (pairs, one boot)",
        RGBColor(255, 127, 14),
    ),
];
const PANEL: (u32, u32) = (640, 430);

struct Args {
    csv: PathBuf,
    size: u64,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut csv = None;
    let mut size = 100_000u64;
    let mut out = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--csv" => csv = Some(PathBuf::from(value()?)),
            "--size" => size = value()?.parse().context("--size BYTES")?,
            "--out" => out = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("usage: ack_cdf --csv FILE [--size BYTES] [--out FILE.svg]");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a} (see --help)"),
        }
    }
    let csv = csv.ok_or_else(|| anyhow!("--csv FILE is required"))?;
    let out = out.unwrap_or_else(|| csv.with_extension("svg"));
    Ok(Args { csv, size, out })
}

/// Throughput samples by contention (in CSV order) and configuration.
type Samples = Vec<(String, BTreeMap<String, Vec<f64>>)>;

fn read_samples(text: &str, size: u64) -> Result<Samples> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("empty CSV"))?
        .split(',')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| anyhow!("CSV has no column {name}"))
    };
    let (c_config, c_cont, c_size, c_rate, c_status) = (
        col("config")?,
        col("contention")?,
        col("size_bytes")?,
        col("mb_per_s")?,
        col("status")?,
    );
    let mut out: Samples = Vec::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < header.len() {
            continue;
        }
        let contention = f[c_cont].to_string();
        // Keep every contention's panel (in CSV order), even without this size.
        let i = match out.iter().position(|(c, _)| *c == contention) {
            Some(i) => i,
            None => {
                out.push((contention, BTreeMap::new()));
                out.len() - 1
            }
        };
        if f[c_status] != "ok" || f[c_size].parse::<u64>().ok() != Some(size) {
            continue;
        }
        let rate: f64 = f[c_rate]
            .parse()
            .with_context(|| format!("line {}: mb_per_s", n + 2))?;
        if rate.is_finite() && rate > 0.0 {
            out[i]
                .1
                .entry(f[c_config].to_string())
                .or_default()
                .push(rate);
        }
    }
    for (_, by_config) in out.iter_mut() {
        for v in by_config.values_mut() {
            v.sort_by(f64::total_cmp);
        }
    }
    Ok(out)
}

fn describe(contention: &str) -> String {
    let pair = |s: &str| {
        s.split_once('/')
            .map(|(a, b)| (a.to_string(), b.to_string()))
    };
    if contention == "none" {
        "1/1: unthrottled".into()
    } else if let Some((p, q)) = contention.strip_prefix("cg").and_then(pair) {
        format!("cgroup cpu quota {q} ms per {p} ms, guest busy")
    } else if let Some((r, s)) = contention.strip_prefix("stop").and_then(pair) {
        format!("SIGSTOP/SIGCONT: run {r} ms, stop {s} ms")
    } else if let Some((slice, hogs)) = contention.strip_prefix("rr").and_then(pair) {
        format!("vCPU round robin with {hogs} busy loops, {slice} ms slices")
    } else {
        contention.to_string()
    }
}

fn size_name(b: u64) -> String {
    if b >= 1_000_000 && b % 1_000_000 == 0 {
        format!("{} MB", b / 1_000_000)
    } else if b >= 1000 && b % 1000 == 0 {
        format!("{} KB", b / 1000)
    } else {
        format!("{b} B")
    }
}

fn median(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// An empirical CDF as a staircase, starting at (`floor`, 0).
fn staircase(sorted: &[f64], floor: f64) -> Vec<(f64, f64)> {
    let n = sorted.len() as f64;
    let mut out = vec![(floor, 0.0)];
    for (i, &x) in sorted.iter().enumerate() {
        out.push((x, i as f64 / n));
        out.push((x, (i + 1) as f64 / n));
    }
    out
}

fn tick(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    contention: &str,
    by_config: &BTreeMap<String, Vec<f64>>,
    (lo, hi): (f64, f64),
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(describe(contention), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("throughput (MB/s)")
        .y_desc("fraction of transfers")
        .x_label_formatter(&|v| tick(*v))
        .draw()
        .map_err(plot_err)?;
    let mut any = false;
    for (name, legend, color) in CONFIGS {
        let Some(v) = by_config.get(name).filter(|v| !v.is_empty()) else {
            continue;
        };
        any = true;
        let label = format!("{legend}: median {:.3} (n={})", median(v), v.len());
        chart
            .draw_series(LineSeries::new(staircase(v, lo), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if any {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(plot_err)?;
    }
    Ok(())
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let text =
        fs::read_to_string(&args.csv).with_context(|| format!("read {}", args.csv.display()))?;
    let samples = read_samples(&text, args.size)?;
    let all = || {
        samples
            .iter()
            .flat_map(|(_, m)| m.values().flatten().copied())
    };
    let (mut lo, mut hi) = all().fold((f64::INFINITY, 0f64), |(l, h), v| (l.min(v), h.max(v)));
    if samples.is_empty() || hi <= 0.0 {
        bail!(
            "no successful {} transfers in {}",
            size_name(args.size),
            args.csv.display()
        );
    }
    // Whole decades around the data, so the panels compare at a glance.
    lo = 10f64.powf((lo / 1.2).log10().floor());
    hi = 10f64.powf((hi * 1.2).log10().ceil());
    let cols = if samples.len() <= 2 { samples.len() } else { 2 };
    let rows = samples.len().div_ceil(cols);
    let title_h = 40;
    let size = (PANEL.0 * cols as u32, PANEL.1 * rows as u32 + title_h);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, body) = root.split_vertically(title_h);
        top.draw(&Text::new(
            format!(
                "CDF of the throughput of successive {} host->guest transfers (TCG guest)",
                size_name(args.size)
            ),
            (15, 10),
            ("sans-serif", 20).into_font(),
        ))
        .map_err(plot_err)?;
        let panels = body.split_evenly((rows, cols));
        for ((contention, by_config), area) in samples.iter().zip(panels.iter()) {
            draw_panel(area, contention, by_config, (lo, hi))?;
        }
        root.present().map_err(plot_err)?;
    }
    fs::write(&args.out, svg).with_context(|| format!("write {}", args.out.display()))?;
    for (contention, by_config) in &samples {
        let medians: Vec<String> = CONFIGS
            .iter()
            .filter_map(|(n, _, _)| by_config.get(*n).map(|v| format!("{n} {:.3}", median(v))))
            .collect();
        println!(
            "{contention}: median MB/s {}",
            if medians.is_empty() {
                "-".to_string()
            } else {
                medians.join(", ")
            }
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ack_cdf: {e:#}");
            ExitCode::FAILURE
        }
    }
}
