//! Validated configuration.

use std::path::PathBuf;

use crate::cli::{Cli, Switch};

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
}

/// Everything the daemon needs, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// pcapng capture file, if any.
    pub capture: Option<PathBuf>,
    /// Bytes kept per captured frame.
    pub capture_snaplen: usize,
}

impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, Self::Error> {
        if cli.queues == 0 || cli.queues > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(cli.queues));
        }
        if !cli.queue_size.is_power_of_two() || !(64..=32768).contains(&cli.queue_size) {
            return Err(ConfigError::QueueSize(cli.queue_size));
        }
        if cli.tap.is_empty()
            || cli.tap.len() > 15
            || cli
                .tap
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(ConfigError::TapName(cli.tap));
        }
        if cli.socket.as_os_str().is_empty() {
            return Err(ConfigError::Socket);
        }
        if !(64..=262_144).contains(&cli.capture_snaplen) {
            return Err(ConfigError::Snaplen(cli.capture_snaplen));
        }
        Ok(Config {
            socket: cli.socket,
            client: cli.client,
            tap: cli.tap,
            queue_pairs: cli.queues,
            queue_size: cli.queue_size,
            ack_offload: cli.ack_offload == Switch::On,
            capture: cli.capture,
            capture_snaplen: cli.capture_snaplen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut args = vec!["vsnoop", "--socket", "/tmp/s", "--tap", "tap0"];
        args.extend_from_slice(extra);
        Config::try_from(Cli::try_parse_from(args).unwrap())
    }

    #[test]
    fn defaults_are_sensible() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.queue_pairs, 1);
        assert_eq!(c.queue_size, 1024);
        assert!(!c.client);
        assert!(!c.ack_offload);
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
            Config::try_from(cli),
            Err(ConfigError::TapName(_))
        ));
    }
}
