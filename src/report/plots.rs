//! The report's SVG plots (plotters), and the plot data drawn from the
//! attributor's HDR histograms and time series.
//!
//! Every axis range is sanitised before plotters sees it (finite, positive
//! on log axes, non-empty), so no data makes plotting fail or panic.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::attribution::{Attributor, Component, FlowSummary, SeriesPoint};

/// Size of every plot (pixels).
const SIZE: (u32, u32) = (960, 600);
/// Per-flow time series drawn at most.
pub const MAX_FLOW_PLOTS: usize = 8;
/// Points per time-series line at most (beyond, see [`thin`]).
const MAX_POINTS: usize = 5_000;
/// Histogram bins per decade of inter-arrival time.
const BINS_PER_DECADE: f64 = 10.0;
/// Line colours, one per series.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

/// One plot of the report: written, or skipped for lack of data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plot {
    /// File name in the output directory.
    pub file: String,
    /// What it shows.
    pub what: String,
    /// Why it was not written, if it was not.
    pub skipped: Option<String>,
}

impl Plot {
    fn new(file: impl Into<String>, what: impl Into<String>, skipped: Option<String>) -> Plot {
        Plot {
            file: file.into(),
            what: what.into(),
            skipped,
        }
    }
}

/// Points of an empirical CDF from a histogram: (value / `scale`,
/// fraction of samples <= value), one per recorded bucket, at the bucket's
/// middle (as the report's percentiles).
pub fn cdf_points(h: &Histogram<u64>, scale: f64) -> Vec<(f64, f64)> {
    let total = h.len() as f64;
    let mut below = 0u64;
    h.iter_recorded()
        .map(|v| {
            below += v.count_at_value();
            (
                h.median_equivalent(v.value_iterated_to()) as f64 / scale,
                below as f64 / total,
            )
        })
        .collect()
}

/// Bin edges spaced evenly on a log axis from `lo` to `hi` (`lo` > 0).
pub fn log_edges(lo: f64, hi: f64, per_decade: f64) -> Vec<f64> {
    let decades = (hi / lo).log10().max(0.0);
    let n = ((decades * per_decade).ceil() as usize).clamp(1, 1000);
    let step = (hi / lo).powf(1.0 / n as f64);
    (0..=n).map(|i| lo * step.powi(i as i32)).collect()
}

/// Fraction of a histogram's samples (value / `scale`) in each bin between
/// `edges`; values outside count in the first or last bin.
pub fn bin_fractions(h: &Histogram<u64>, scale: f64, edges: &[f64]) -> Vec<f64> {
    let bins = edges.len().saturating_sub(1).max(1);
    let mut counts = vec![0u64; bins];
    for v in h.iter_recorded() {
        let x = h.median_equivalent(v.value_iterated_to()) as f64 / scale;
        let i = edges.partition_point(|&e| e <= x).saturating_sub(1);
        counts[i.min(bins - 1)] += v.count_at_value();
    }
    let total = h.len().max(1) as f64;
    counts.into_iter().map(|c| c as f64 / total).collect()
}

/// A log-axis range covering the positive values, at least a decade wide.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for v in values.filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi == 0.0 {
        return (1e-3, 1.0);
    }
    let (lo, hi) = (lo / 1.5, hi * 1.5);
    if hi / lo >= 10.0 {
        return (lo, hi);
    }
    let mid = (lo * hi).sqrt();
    (mid / 10f64.sqrt(), mid * 10f64.sqrt())
}

/// A CDF as a staircase starting at `floor` (values below it drawn at it).
fn staircase(points: &[(f64, f64)], floor: f64) -> Vec<(f64, f64)> {
    let mut out = vec![(floor, 0.0)];
    let mut previous = 0.0;
    for &(x, f) in points {
        let x = x.max(floor);
        out.push((x, previous));
        out.push((x, f));
        previous = f;
    }
    out
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws one SVG into `path`.
fn render(path: &Path, draw: impl FnOnce(&Area<'_>) -> Result<()>) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
}

/// Tick label for a log axis: plain numbers without trailing noise.
fn tick(v: f64) -> String {
    if v >= 1.0 {
        format!("{}", (v * 100.0).round() / 100.0)
    } else {
        let digits = (-v.log10().floor()) as usize + 1;
        format!("{v:.digits$}")
    }
}

fn legend_line(color: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
}

/// Writes every plot into `out`; returns what was written and skipped.
pub fn write_all(
    out: &Path,
    attributor: &Attributor,
    flows: &[FlowSummary],
    start_ns: u64,
) -> Result<Vec<Plot>> {
    let mut plots = vec![delay_cdf(out, attributor)?];
    let shape = attributor.shape();
    plots.push(interarrival(
        out,
        "ack-interarrival-remote.svg",
        "remote ACKs",
        ["host_in (upstream)", "ring (downstream)"],
        shape.remote_acks.gap_histograms(),
    )?);
    plots.push(interarrival(
        out,
        "ack-interarrival-guest.svg",
        "guest ACKs",
        ["pop (upstream)", "host_out (downstream)"],
        shape.guest_acks.gap_histograms(),
    )?);
    plots.push(spacing_ratio_cdf(out, attributor)?);
    plots.extend(flow_series(out, attributor.series(), flows, start_ns)?);
    Ok(plots)
}

/// One line of a chart.
struct Line {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Colour of a delay component, the same in every plot.
fn component_color(index: usize) -> RGBColor {
    COLORS[index % COLORS.len()]
}

/// The delay components with their names, interface-wide, in the order of
/// their colours.
pub fn components(attributor: &Attributor) -> [(&'static str, Option<&Histogram<u64>>); 5] {
    let d = attributor.delays();
    [
        ("outside RTT", d.outside.histogram()),
        ("backend delay", d.backend.histogram()),
        ("guest delay", d.guest.histogram()),
        ("backend rx", d.backend_rx.histogram()),
        ("backend tx", d.backend_tx.histogram()),
    ]
}

/// The CDF of a non-empty histogram as a line labelled with its sample count.
fn cdf_line(name: &str, h: Option<&Histogram<u64>>, scale: f64, color: RGBColor) -> Option<Line> {
    let h = h.filter(|h| !h.is_empty())?;
    Some(Line {
        label: format!("{name} (n = {})", h.len()),
        color,
        points: cdf_points(h, scale),
    })
}

fn delay_cdf(out: &Path, attributor: &Attributor) -> Result<Plot> {
    let file = "delay-cdf.svg";
    let what = "CDF of each delay component (ms, log scale), all flows";
    let lines: Vec<Line> = components(attributor)
        .into_iter()
        .enumerate()
        .filter_map(|(i, (name, h))| cdf_line(name, h, 1e6, component_color(i)))
        .collect();
    if lines.is_empty() {
        return Ok(Plot::new(file, what, Some("no delay samples".into())));
    }
    let texts = [
        "Delay components: CDF",
        "delay (ms, log scale)",
        "fraction of samples",
    ];
    render(&out.join(file), |root| draw_cdf(root, texts, &lines, &[]))?;
    Ok(Plot::new(file, what, None))
}

/// CDF lines on a log x axis; `texts` are the title and the axis
/// descriptions; `marks` are vertical lines (x, label).
fn draw_cdf(
    root: &Area<'_>,
    texts: [&str; 3],
    lines: &[Line],
    marks: &[(f64, String)],
) -> Result<()> {
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (lo, hi) = log_range(xs.chain(marks.iter().map(|m| m.0)));
    let mut chart = ChartBuilder::on(root)
        .caption(texts[0], ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(texts[1])
        .y_desc(texts[2])
        .x_label_formatter(&|v| tick(*v))
        .draw()
        .map_err(plot_err)?;
    for line in lines {
        chart
            .draw_series(LineSeries::new(
                staircase(&line.points, lo),
                line.color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(line.label.as_str())
            .legend(legend_line(line.color));
    }
    let grey = COLORS[5];
    for (x, label) in marks.iter().filter(|m| m.0.is_finite() && m.0 > 0.0) {
        chart
            .draw_series(LineSeries::new([(*x, 0.0), (*x, 1.0)], grey))
            .map_err(plot_err)?
            .label(label.as_str())
            .legend(legend_line(grey));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

fn interarrival(
    out: &Path,
    file: &str,
    who: &str,
    names: [&str; 2],
    (up, down): (Option<&Histogram<u64>>, Option<&Histogram<u64>>),
) -> Result<Plot> {
    let what = format!(
        "histogram of the inter-arrival times of {who} at the upstream and downstream points"
    );
    let hists: Vec<(&str, &Histogram<u64>)> = names
        .into_iter()
        .zip([up, down])
        .filter_map(|(n, h)| h.filter(|h| !h.is_empty()).map(|h| (n, h)))
        .collect();
    if hists.is_empty() {
        return Ok(Plot::new(file, what, Some(format!("no {who} to compare"))));
    }
    let title = format!("Inter-arrival times of {who}");
    render(&out.join(file), |root| {
        draw_histograms(root, &title, &hists)
    })?;
    Ok(Plot::new(file, what, None))
}

fn draw_histograms(root: &Area<'_>, title: &str, hists: &[(&str, &Histogram<u64>)]) -> Result<()> {
    let values = hists.iter().flat_map(|(_, h)| {
        let min = h.median_equivalent(h.min()) as f64 / 1e6;
        let max = h.median_equivalent(h.max()) as f64 / 1e6;
        [min, max]
    });
    let (lo, hi) = log_range(values);
    let edges = log_edges(lo, hi, BINS_PER_DECADE);
    let bins: Vec<Vec<f64>> = hists
        .iter()
        .map(|(_, h)| bin_fractions(h, 1e6, &edges))
        .collect();
    // Head room for the legend.
    let top = bins.iter().flatten().fold(0f64, |a, &b| a.max(b)).max(0.01) * 1.25;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..top)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("inter-arrival time (ms, log scale)")
        .y_desc("fraction of ACK gaps")
        .x_label_formatter(&|v| tick(*v))
        .draw()
        .map_err(plot_err)?;
    for (i, ((name, h), fractions)) in hists.iter().zip(&bins).enumerate() {
        let fill = COLORS[i % COLORS.len()].mix(0.45).filled();
        let bars = fractions
            .iter()
            .enumerate()
            .filter(|(_, f)| **f > 0.0)
            .map(|(b, f)| Rectangle::new([(edges[b], 0.0), (edges[b + 1], *f)], fill));
        chart
            .draw_series(bars)
            .map_err(plot_err)?
            .label(format!("{name}, {} gaps", h.len()))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], fill));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

fn spacing_ratio_cdf(out: &Path, attributor: &Attributor) -> Result<Plot> {
    let file = "spacing-ratio-cdf.svg";
    let what = "CDF of the ACK spacing ratio xi (downstream gap / upstream gap, log scale), \
                remote and guest ACKs";
    let shape = attributor.shape();
    let lines: Vec<Line> = [
        (
            "remote ACKs (ring / host_in)",
            shape.remote_acks.ratio_histogram(),
        ),
        (
            "guest ACKs (host_out / pop)",
            shape.guest_acks.ratio_histogram(),
        ),
    ]
    .into_iter()
    .enumerate()
    .filter_map(|(i, (name, h))| cdf_line(name, h, 1000.0, COLORS[i]))
    .collect();
    if lines.is_empty() {
        return Ok(Plot::new(file, what, Some("no spacing ratios".into())));
    }
    let theta = attributor.config().shape.theta;
    let texts = [
        "ACK spacing ratio: CDF",
        "spacing ratio xi (log scale; < 1 compressed, > 1 expanded)",
        "fraction of ratios",
    ];
    let marks = [(theta, format!("theta = {theta}"))];
    render(&out.join(file), |root| {
        draw_cdf(root, texts, &lines, &marks)
    })?;
    Ok(Plot::new(file, what, None))
}

/// Name of a component in the plots.
fn component_name(c: Component) -> &'static str {
    match c {
        Component::Outside => "outside RTT",
        Component::Backend => "backend delay",
        Component::Guest => "guest delay",
    }
}

/// The flows that get a time series: the busiest (`flows` is sorted by
/// packets) among those with samples, at most [`MAX_FLOW_PLOTS`].
pub fn series_flows<'a>(series: &[SeriesPoint], flows: &'a [FlowSummary]) -> Vec<&'a FlowSummary> {
    let with_samples: std::collections::HashSet<u64> = series.iter().map(|p| p.flow).collect();
    flows
        .iter()
        .filter(|f| with_samples.contains(&f.id))
        .take(MAX_FLOW_PLOTS)
        .collect()
}

fn flow_series(
    out: &Path,
    series: &[SeriesPoint],
    flows: &[FlowSummary],
    start_ns: u64,
) -> Result<Vec<Plot>> {
    let chosen = series_flows(series, flows);
    if chosen.is_empty() {
        let skipped = Some("no flow has delay samples".to_string());
        return Ok(vec![Plot::new(
            "flow-<id>-series.svg",
            "per-flow delay samples over time",
            skipped,
        )]);
    }
    let mut by_flow: HashMap<u64, Vec<&SeriesPoint>> =
        chosen.iter().map(|f| (f.id, Vec::new())).collect();
    for p in series {
        if let Some(v) = by_flow.get_mut(&p.flow) {
            v.push(p);
        }
    }
    let mut plots = Vec::new();
    for flow in chosen {
        let file = format!("flow-{}-series.svg", flow.id);
        let label = super::flow_label(flow);
        let lines = component_lines(&by_flow[&flow.id], start_ns);
        let title = format!("Flow {}: {label}", flow.id);
        render(&out.join(&file), |root| {
            draw_time_series(root, &title, &lines)
        })?;
        plots.push(Plot::new(
            file,
            format!("delay samples over time, flow {} ({label})", flow.id),
            None,
        ));
    }
    Ok(plots)
}

/// One (seconds since start, ms) line per component, thinned to
/// [`MAX_POINTS`] (the largest sample of each run of consecutive ones),
/// labelled with the component and its sample count.
fn component_lines(points: &[&SeriesPoint], start_ns: u64) -> Vec<Line> {
    [Component::Outside, Component::Backend, Component::Guest]
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let mut line: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.component == c)
                .map(|p| {
                    let t = p.t_ns.saturating_sub(start_ns) as f64 / 1e9;
                    (t, p.value_ns as f64 / 1e6)
                })
                .collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (points, stride) = thin(&line, MAX_POINTS);
            let shown = if stride > 1 {
                format!(", largest of each {stride} shown")
            } else {
                String::new()
            };
            let label = format!("{} ({} samples{shown})", component_name(c), line.len());
            (!points.is_empty()).then_some(Line {
                label,
                color: component_color(i),
                points,
            })
        })
        .collect()
}

/// At most `max` points of `line`: the largest (by y) of each run of
/// `stride` consecutive ones, so delay spikes stay visible; and the stride.
pub fn thin(line: &[(f64, f64)], max: usize) -> (Vec<(f64, f64)>, usize) {
    let stride = line.len().div_ceil(max.max(1)).max(1);
    let points = line
        .chunks(stride)
        .filter_map(|run| {
            run.iter()
                .copied()
                .reduce(|a, b| if b.1 > a.1 { b } else { a })
        })
        .collect();
    (points, stride)
}

/// The time axis: the flow's own span, padded (at least 10 ms wide).
fn time_range(lines: &[Line]) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for t in lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)) {
        if t.is_finite() {
            lo = lo.min(t);
            hi = hi.max(t);
        }
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.03).max(0.005);
    ((lo - pad).max(0.0), hi + pad)
}

fn draw_time_series(root: &Area<'_>, title: &str, lines: &[Line]) -> Result<()> {
    let (t0, t1) = time_range(lines);
    let (lo, hi) = log_range(lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
    // Head room for the legend above the highest line.
    let hi = hi * 6.0;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(t0..t1, (lo..hi).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("time since the start of the capture (s)")
        .y_desc("delay (ms, log scale)")
        .y_label_formatter(&|v| tick(*v))
        .draw()
        .map_err(plot_err)?;
    for line in lines {
        let clamped = line.points.iter().map(|&(t, v)| (t, v.max(lo)));
        chart
            .draw_series(LineSeries::new(clamped, line.color.stroke_width(1)).point_size(2))
            .map_err(plot_err)?
            .label(line.label.as_str())
            .legend(legend_line(line.color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}
