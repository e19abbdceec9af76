//! ACK compression and send burstiness between two vantage points.
//!
//! Definitions (docs: delay-attribution.md): for ACKs of one flow that
//! advance the cumulative acknowledgment, with `r_i` the time at the upstream
//! point and `s_i` at the downstream point, the spacing ratio is
//! `xi_i = (s_i - s_{i-1}) / (r_i - r_{i-1})`, computed only where the
//! upstream gap is at least `delta`. A compression event is a maximal run of
//! at least `k` consecutive ratios `<= theta`. Bursts are maximal runs of data
//! segments whose inter-departure gap is below `burst_gap`.

use hdrhistogram::Histogram;

use super::snapshot::{AckCompressionSummary, BurstSummary, Summary};

/// Spacing ratios are kept in thousandths in the histogram.
const RATIO_SCALE: f64 = 1000.0;

/// Parameters of the compression and burst metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShapeConfig {
    /// Smallest upstream gap for which a spacing ratio is computed (ns).
    pub delta_ns: u64,
    /// Ratios in a row that make a compression event.
    pub k: u32,
    /// Largest ratio that counts as compressed within an event.
    pub theta: f64,
    /// Segments closer than this (ns) belong to one burst.
    pub burst_gap_ns: u64,
}

impl Default for ShapeConfig {
    fn default() -> Self {
        ShapeConfig {
            delta_ns: 20_000,
            k: 3,
            theta: 0.75,
            burst_gap_ns: 100_000,
        }
    }
}

/// A histogram created on its first sample (most flows never fill most of
/// their histograms), two significant digits (1 % resolution), auto-resizing.
#[derive(Clone, Debug, Default)]
pub struct Dist(Option<Histogram<u64>>);

impl Dist {
    /// Records one value.
    pub fn record(&mut self, value: u64) {
        let h = self.0.get_or_insert_with(|| {
            // Cannot fail: 2 significant digits is in range.
            let mut h = Histogram::new(2).expect("valid histogram precision");
            h.auto(true);
            h
        });
        if h.record(value).is_err() {
            h.saturating_record(value);
        }
    }

    /// The histogram, if anything was recorded.
    pub fn histogram(&self) -> Option<&Histogram<u64>> {
        self.0.as_ref()
    }

    /// Summary with values divided by `scale`.
    pub fn summary(&self, scale: f64) -> Summary {
        self.0
            .as_ref()
            .map(|h| Summary::from_histogram(h, scale))
            .unwrap_or_default()
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.0.as_ref().map_or(0, |h| h.len())
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Accumulated ACK-spacing statistics (one flow, or the whole interface).
#[derive(Clone, Debug, Default)]
pub struct AckStats {
    acks: u64,
    ratios: u64,
    compressed: u64,
    events: u64,
    acks_in_events: u64,
    ratio: Dist,
    gap_upstream: Dist,
    gap_downstream: Dist,
}

impl AckStats {
    /// Summary for export.
    pub fn summary(&self) -> AckCompressionSummary {
        self.summary_with_open_run(0, 0)
    }

    /// Summary counting `open_events` runs still open, with `open_acks` ACKs.
    pub fn summary_with_open_run(&self, open_events: u64, open_acks: u64) -> AckCompressionSummary {
        let events = self.events + open_events;
        let acks_in_events = self.acks_in_events + open_acks;
        let frac = |n: u64| {
            if self.ratios == 0 {
                0.0
            } else {
                n as f64 / self.ratios as f64
            }
        };
        AckCompressionSummary {
            acks: self.acks,
            ratios: self.ratios,
            compressed_fraction: frac(self.compressed),
            events,
            acks_in_events,
            fraction_in_events: frac(acks_in_events),
            spacing_ratio: self.ratio.summary(RATIO_SCALE),
            gap_upstream_ms: self.gap_upstream.summary(1e6),
            gap_downstream_ms: self.gap_downstream.summary(1e6),
            ks_distance: ks_distance(
                self.gap_upstream.histogram(),
                self.gap_downstream.histogram(),
            ),
        }
    }

    /// Inter-arrival histograms (ns) at the upstream and downstream points.
    pub fn gap_histograms(&self) -> (Option<&Histogram<u64>>, Option<&Histogram<u64>>) {
        (
            self.gap_upstream.histogram(),
            self.gap_downstream.histogram(),
        )
    }

    /// Spacing-ratio histogram, in thousandths.
    pub fn ratio_histogram(&self) -> Option<&Histogram<u64>> {
        self.ratio.histogram()
    }
}

/// What one advancing ACK contributed.
#[derive(Clone, Copy, Debug, PartialEq)]
struct AckStep {
    gap_upstream: u64,
    gap_downstream: u64,
    ratio: Option<f64>,
    /// A compression event closed with this many ACKs.
    closed_event: Option<u64>,
}

/// Follows the advancing ACKs of one flow in one direction.
#[derive(Clone, Debug, Default)]
pub struct AckTracker {
    previous: Option<(u64, u64)>,
    run: u64,
    stats: AckStats,
}

impl AckTracker {
    /// Records an ACK seen at `upstream` then at `downstream` (ns), also into
    /// the interface-wide `total`.
    pub fn observe(
        &mut self,
        upstream: u64,
        downstream: u64,
        cfg: &ShapeConfig,
        total: &mut AckStats,
    ) {
        let step = self.step(upstream, downstream, cfg);
        for stats in [&mut self.stats, total] {
            stats.acks += 1;
            let Some(step) = step else { continue };
            stats.gap_upstream.record(step.gap_upstream);
            stats.gap_downstream.record(step.gap_downstream);
            if let Some(ratio) = step.ratio {
                stats.ratios += 1;
                stats.compressed += u64::from(ratio < 1.0);
                stats.ratio.record((ratio * RATIO_SCALE).round() as u64);
            }
            if let Some(n) = step.closed_event {
                stats.events += 1;
                stats.acks_in_events += n;
            }
        }
    }

    fn step(&mut self, upstream: u64, downstream: u64, cfg: &ShapeConfig) -> Option<AckStep> {
        let previous = self.previous.replace((upstream, downstream));
        let (r0, s0) = previous?;
        let gap_upstream = upstream.saturating_sub(r0);
        let gap_downstream = downstream.saturating_sub(s0);
        let mut closed_event = None;
        let ratio = if gap_upstream >= cfg.delta_ns && gap_upstream > 0 {
            let ratio = gap_downstream as f64 / gap_upstream as f64;
            if ratio <= cfg.theta {
                self.run += 1;
            } else {
                closed_event = self.close_run(cfg);
            }
            Some(ratio)
        } else {
            None
        };
        Some(AckStep {
            gap_upstream,
            gap_downstream,
            ratio,
            closed_event,
        })
    }

    fn close_run(&mut self, cfg: &ShapeConfig) -> Option<u64> {
        let run = std::mem::take(&mut self.run);
        (run >= u64::from(cfg.k)).then_some(run)
    }

    /// A run still open that is long enough to be an event: its ACKs.
    pub fn open_event(&self, cfg: &ShapeConfig) -> Option<u64> {
        (self.run >= u64::from(cfg.k)).then_some(self.run)
    }

    /// Summary, counting a run still open as an event if it is long enough.
    pub fn summary(&self, cfg: &ShapeConfig) -> AckCompressionSummary {
        if self.run >= u64::from(cfg.k) {
            self.stats.summary_with_open_run(1, self.run)
        } else {
            self.stats.summary()
        }
    }
}

/// Accumulated burst statistics at one vantage point.
#[derive(Clone, Debug, Default)]
pub struct BurstStats {
    segments: u64,
    bursts: u64,
    sizes: Dist,
    // Sums for the mean and variance of the gaps, shifted by the first gap
    // so the sum of squares stays well conditioned; no division per sample.
    gaps: u64,
    shift: f64,
    sum: f64,
    sum_sq: f64,
}

impl BurstStats {
    fn add_gap(&mut self, gap: u64) {
        if self.gaps == 0 {
            self.shift = gap as f64;
        }
        self.gaps += 1;
        let x = gap as f64 - self.shift;
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Summary for export (`open_burst` segments not yet closed included).
    pub fn summary(&self, open_burst: u64) -> BurstSummary {
        let mut sizes = self.sizes.clone();
        if open_burst > 0 {
            sizes.record(open_burst);
        }
        let n = self.gaps as f64;
        let mean = self.shift + self.sum / n;
        let cv = if self.gaps >= 2 && mean > 0.0 {
            let variance = (self.sum_sq - self.sum * self.sum / n) / (n - 1.0);
            variance.max(0.0).sqrt() / mean
        } else {
            0.0
        };
        BurstSummary {
            segments: self.segments,
            bursts: self.bursts + u64::from(open_burst > 0),
            burst_size: sizes.summary(1.0),
            gap_cv: cv,
        }
    }
}

/// Follows the data segments of one flow in one direction at one point.
#[derive(Clone, Debug, Default)]
pub struct BurstTracker {
    previous: Option<u64>,
    run: u64,
    stats: BurstStats,
}

impl BurstTracker {
    /// Records a data segment seen at `t` (ns), also into `total`.
    pub fn observe(&mut self, t: u64, cfg: &ShapeConfig, total: &mut BurstStats) {
        let gap = self.previous.replace(t).map(|p| t.saturating_sub(p));
        let mut closed = None;
        match gap {
            Some(g) if g < cfg.burst_gap_ns => self.run += 1,
            _ => {
                if self.run > 0 {
                    closed = Some(self.run);
                }
                self.run = 1;
            }
        }
        for stats in [&mut self.stats, total] {
            stats.segments += 1;
            if let Some(g) = gap {
                stats.add_gap(g);
            }
            if let Some(n) = closed {
                stats.bursts += 1;
                stats.sizes.record(n);
            }
        }
    }

    /// Summary for export.
    pub fn summary(&self) -> BurstSummary {
        self.stats.summary(self.run)
    }
}

/// Kolmogorov-Smirnov distance between two histograms: the largest
/// difference between their cumulative distributions.
pub fn ks_distance(a: Option<&Histogram<u64>>, b: Option<&Histogram<u64>>) -> f64 {
    let (Some(a), Some(b)) = (a, b) else {
        return 0.0;
    };
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let points = |h: &Histogram<u64>| -> Vec<(u64, u64)> {
        h.iter_recorded()
            .map(|v| {
                (
                    h.highest_equivalent(v.value_iterated_to()),
                    v.count_at_value(),
                )
            })
            .collect()
    };
    let (pa, pb) = (points(a), points(b));
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut ca, mut cb, mut best) = (0, 0, 0u64, 0u64, 0f64);
    while i < pa.len() || j < pb.len() {
        let va = pa.get(i).map_or(u64::MAX, |p| p.0);
        let vb = pb.get(j).map_or(u64::MAX, |p| p.0);
        let v = va.min(vb);
        if va == v {
            ca += pa[i].1;
            i += 1;
        }
        if vb == v {
            cb += pb[j].1;
            j += 1;
        }
        best = best.max((ca as f64 / na - cb as f64 / nb).abs());
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ShapeConfig {
        ShapeConfig {
            delta_ns: 10,
            k: 3,
            theta: 0.75,
            burst_gap_ns: 50,
        }
    }

    #[test]
    fn evenly_spaced_acks_are_not_compressed() {
        let (mut t, mut total) = (AckTracker::default(), AckStats::default());
        for i in 0..10u64 {
            t.observe(i * 1000, i * 1000 + 300, &cfg(), &mut total);
        }
        let s = t.summary(&cfg());
        assert_eq!(s.acks, 10);
        assert_eq!(s.ratios, 9);
        assert_eq!(s.events, 0);
        assert_eq!(s.compressed_fraction, 0.0);
        assert!((s.spacing_ratio.p50 - 1.0).abs() < 0.01);
        assert!(s.ks_distance < 0.01);
    }

    #[test]
    fn a_run_of_compressed_acks_is_one_event() {
        // Upstream 1000 ns apart; downstream: ACKs 3..7 released together
        // (gaps 100 ns, ratio 0.1), then spacing resumes.
        let (mut t, mut total) = (AckTracker::default(), AckStats::default());
        let down = [0, 1000, 2000, 5000, 5100, 5200, 5300, 5400, 6400, 7400];
        for (i, &s) in down.iter().enumerate() {
            t.observe(i as u64 * 1000, s, &cfg(), &mut total);
        }
        let s = t.summary(&cfg());
        assert_eq!(s.ratios, 9);
        assert_eq!(s.events, 1);
        assert_eq!(s.acks_in_events, 4);
        assert!((s.fraction_in_events - 4.0 / 9.0).abs() < 1e-9);
        assert_eq!(total.summary().events, 1);
        assert!(s.ks_distance > 0.3, "{}", s.ks_distance);
    }

    #[test]
    fn runs_shorter_than_k_and_small_gaps_do_not_count() {
        let (mut t, mut total) = (AckTracker::default(), AckStats::default());
        // Two compressed ratios only, then an upstream gap below delta (no ratio).
        let points = [(0, 0), (1000, 100), (2000, 200), (3000, 3000), (3005, 3004)];
        for (r, s) in points {
            t.observe(r, s, &cfg(), &mut total);
        }
        let s = t.summary(&cfg());
        assert_eq!(s.ratios, 3);
        assert_eq!(s.events, 0);
        assert_eq!(s.acks, 5);
    }

    #[test]
    fn an_open_run_is_reported_as_an_event() {
        let (mut t, mut total) = (AckTracker::default(), AckStats::default());
        for i in 0..5u64 {
            t.observe(i * 1000, i * 10, &cfg(), &mut total);
        }
        assert_eq!(t.summary(&cfg()).events, 1);
        assert_eq!(t.summary(&cfg()).acks_in_events, 4);
    }

    #[test]
    fn bursts_split_on_large_gaps() {
        let (mut t, mut total) = (BurstTracker::default(), BurstStats::default());
        // Bursts of 3, 1 and 2 segments.
        for time in [0, 10, 20, 200, 400, 410] {
            t.observe(time, &cfg(), &mut total);
        }
        let s = t.summary();
        assert_eq!(s.segments, 6);
        assert_eq!(s.bursts, 3);
        assert_eq!(s.burst_size.max, 3.0);
        assert_eq!(s.burst_size.min, 1.0);
        assert!(s.gap_cv > 0.5);
        assert_eq!(
            total.summary(0).bursts,
            2,
            "open burst only in the flow view"
        );
    }

    #[test]
    fn ks_distance_of_disjoint_and_equal_distributions() {
        let mut a = Histogram::<u64>::new(2).unwrap();
        let mut b = Histogram::<u64>::new(2).unwrap();
        for v in 1..100 {
            a.record(v).unwrap();
            b.record(v + 10_000).unwrap();
        }
        assert!((ks_distance(Some(&a), Some(&b)) - 1.0).abs() < 1e-9);
        assert_eq!(ks_distance(Some(&a), Some(&a)), 0.0);
        assert_eq!(ks_distance(None, Some(&a)), 0.0);
    }
}
