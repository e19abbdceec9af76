//! Validated configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::attribution::{AttributionConfig, ShapeConfig};
use crate::cli::{DaemonArgs, Switch};

/// Largest number of queue pairs (the vhost-user queue masks are 64 bits).
pub const MAX_QUEUE_PAIRS: usize = 16;

/// Why the arguments were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// --queues out of range.
    #[error("--queues must be between 1 and {MAX_QUEUE_PAIRS}, got {0}")]
    QueuePairs(usize),
    /// --queue-size not a power of two in range.
    #[error("--queue-size must be a power of two between 64 and 32768, got {0}")]
    QueueSize(usize),
    /// --tap name unusable.
    #[error("--tap must be 1 to 15 bytes without '/' or spaces, got {0:?}")]
    TapName(String),
    /// --socket empty.
    #[error("--socket must not be empty")]
    Socket,
    /// --capture-snaplen out of range.
    #[error("--capture-snaplen must be between 64 and 262144, got {0}")]
    Snaplen(usize),
    /// --tap missing.
    #[error("--tap is required")]
    Tap,
    /// --capture-max-mb or --capture-files out of range.
    #[error("--capture-max-mb must be at least 1 and --capture-files at least 1")]
    Rotation,
    /// --capture-filter does not parse.
    #[error("--capture-filter: {0}")]
    CaptureFilter(crate::export::capture::FilterError),
    /// --max-flows out of range.
    #[error("--max-flows must be between 1 and 1000000, got {0}")]
    MaxFlows(usize),
    /// --compression-k / --compression-theta out of range.
    #[error("--compression-k must be at least 2 and --compression-theta between 0 and 1")]
    Compression,
}

/// Everything the daemon needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Connect instead of listen.
    pub client: bool,
    /// TAP interface name.
    pub tap: String,
    /// Queue pairs.
    pub queue_pairs: usize,
    /// Largest virtqueue size.
    pub queue_size: usize,
    /// ACK offload requested.
    pub ack_offload: bool,
    /// ACK offload engine settings (`enabled` mirrors `ack_offload`).
    pub offload: crate::offload::OffloadConfig,
    /// pcapng capture file, if any.
    pub capture: Option<PathBuf>,
    /// Bytes kept per captured frame.
    pub capture_snaplen: usize,
    /// Capture filter expression, if any.
    pub capture_filter: Option<String>,
    /// Rotate the capture file at this size (bytes).
    pub capture_max_bytes: Option<u64>,
    /// Capture files kept when rotating.
    pub capture_files: usize,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// Prometheus endpoint address.
    pub metrics: Option<SocketAddr>,
    /// Delay attribution limits and parameters.
    pub attribution: AttributionConfig,
    /// Longest wait on SIGTERM / SIGINT for the guest to acknowledge the
    /// bytes acknowledged early.
    pub shutdown_drain: std::time::Duration,
}

impl TryFrom<DaemonArgs> for Config {
    type Error = ConfigError;

    fn try_from(cli: DaemonArgs) -> Result<Self, Self::Error> {
        let socket = cli.socket.ok_or(ConfigError::Socket)?;
        let tap = cli.tap.ok_or(ConfigError::Tap)?;
        if cli.queues == 0 || cli.queues > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(cli.queues));
        }
        if !cli.queue_size.is_power_of_two() || !(64..=32768).contains(&cli.queue_size) {
            return Err(ConfigError::QueueSize(cli.queue_size));
        }
        if tap.is_empty()
            || tap.len() > 15
            || tap
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(ConfigError::TapName(tap));
        }
        if socket.as_os_str().is_empty() {
            return Err(ConfigError::Socket);
        }
        if !(64..=262_144).contains(&cli.capture_snaplen) {
            return Err(ConfigError::Snaplen(cli.capture_snaplen));
        }
        if cli.capture_max_mb == Some(0) || cli.capture_files == 0 {
            return Err(ConfigError::Rotation);
        }
        if let Some(filter) = &cli.capture_filter {
            filter
                .parse::<crate::export::capture::CaptureFilter>()
                .map_err(ConfigError::CaptureFilter)?;
        }
        if cli.offload_max_flows == 0 || cli.offload_max_flows > 4_000_000 {
            return Err(ConfigError::MaxFlows(cli.offload_max_flows));
        }
        if cli.max_flows == 0 || cli.max_flows > 1_000_000 {
            return Err(ConfigError::MaxFlows(cli.max_flows));
        }
        if cli.compression_k < 2 || !(cli.compression_theta > 0.0 && cli.compression_theta < 1.0) {
            return Err(ConfigError::Compression);
        }
        Ok(Config {
            socket,
            client: cli.client,
            tap,
            queue_pairs: cli.queues,
            queue_size: cli.queue_size,
            ack_offload: cli.ack_offload == Switch::On,
            offload: crate::offload::OffloadConfig {
                enabled: cli.ack_offload == Switch::On,
                window_bound: cli.ack_window_bound,
                custody_budget: cli.custody_budget_mb.saturating_mul(1024 * 1024),
                max_flows: cli.offload_max_flows,
                ..crate::offload::OffloadConfig::default()
            },
            capture: cli.capture,
            capture_snaplen: cli.capture_snaplen,
            capture_filter: cli.capture_filter,
            capture_max_bytes: cli.capture_max_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
            capture_files: cli.capture_files,
            control: cli.control,
            metrics: cli.metrics,
            attribution: AttributionConfig {
                max_flows: cli.max_flows,
                shape: ShapeConfig {
                    k: cli.compression_k,
                    theta: cli.compression_theta,
                    ..ShapeConfig::default()
                },
                ..AttributionConfig::default()
            },
            shutdown_drain: std::time::Duration::from_millis(cli.shutdown_drain_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut args = vec!["vsnoop", "--socket", "/tmp/s", "--tap", "tap0"];
        args.extend_from_slice(extra);
        Config::try_from(Cli::try_parse_from(args).unwrap().daemon)
    }

    #[test]
    fn defaults_are_sensible() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.queue_pairs, 1);
        assert_eq!(c.queue_size, 1024);
        assert!(!c.client);
        assert!(c.ack_offload, "the ACK offload is on by default");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        assert_eq!(parse(&["--queues", "0"]), Err(ConfigError::QueuePairs(0)));
        assert_eq!(parse(&["--queues", "17"]), Err(ConfigError::QueuePairs(17)));
        assert_eq!(
            parse(&["--queue-size", "100"]),
            Err(ConfigError::QueueSize(100))
        );
        assert_eq!(
            parse(&["--queue-size", "32"]),
            Err(ConfigError::QueueSize(32))
        );
        assert!(parse(&["--queue-size", "32768"]).is_ok());
        assert_eq!(
            parse(&["--capture-snaplen", "10"]),
            Err(ConfigError::Snaplen(10))
        );
    }

    #[test]
    fn bad_tap_names_are_refused() {
        let cli = Cli::try_parse_from(["vsnoop", "--socket", "/s", "--tap", "much-too-long-name"])
            .unwrap();
        assert!(matches!(
            Config::try_from(cli.daemon),
            Err(ConfigError::TapName(_))
        ));
    }
}
