//! Command-line arguments (also the source of `--help`).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// vsnoop: a vhost-user virtio-net backend that moves a VM's packets to a
/// TAP interface.
///
/// Start it, then point QEMU at the socket:
///   vsnoop --socket /tmp/vsnoop.sock --tap vsnoop0
///   qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on
///     -numa node,memdev=mem -chardev socket,id=c0,path=/tmp/vsnoop.sock
///     -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0
///
/// The daemon serves one VMM connection at a time and keeps running across
/// guest shutdowns and VMM restarts. SIGUSR1 prints the counters; SIGINT and
/// SIGTERM print them and exit.
#[derive(Debug, Parser)]
#[command(name = "vsnoop", version, about, long_about, verbatim_doc_comment)]
pub struct Cli {
    /// vhost-user unix socket: vsnoop listens there (QEMU connects as a
    /// client), or with --client connects to a VMM listening there.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// TAP interface to attach to; created if missing. vsnoop does not
    /// configure addresses on it.
    #[arg(long, value_name = "NAME")]
    pub tap: String,

    /// Number of queue pairs (one worker thread and one tap queue each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: usize,

    /// Largest virtqueue size the frontend may use (power of two, 64..=32768).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub queue_size: usize,

    /// Connect to a VMM that listens on --socket (QEMU server=on,
    /// cloud-hypervisor vhost_mode=server), retrying until it appears.
    #[arg(long)]
    pub client: bool,

    /// Record every frame at both vantage points (host side: the tap; guest
    /// side: guest memory) to this pcapng file, with nanosecond timestamps
    /// and one packet id per frame at both points.
    #[arg(long, value_name = "FILE.pcapng")]
    pub capture: Option<PathBuf>,

    /// Bytes of each frame kept in the capture (64..=262144).
    #[arg(long, value_name = "BYTES", default_value_t = 262_144)]
    pub capture_snaplen: usize,

    /// Acknowledge TCP data on the guest's behalf (not implemented yet:
    /// accepted so scripts can pass it; it has no effect).
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::Off)]
    pub ack_offload: Switch,
}

/// An on/off switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_contract() {
        let cli = Cli::try_parse_from([
            "vsnoop",
            "--socket",
            "/tmp/s",
            "--tap",
            "t0",
            "--queues",
            "2",
            "--queue-size",
            "256",
            "--client",
            "--ack-offload",
            "on",
        ])
        .unwrap();
        assert_eq!(cli.queues, 2);
        assert_eq!(cli.queue_size, 256);
        assert!(cli.client);
        assert_eq!(cli.ack_offload, Switch::On);
        assert!(Cli::try_parse_from([
            "vsnoop",
            "--socket",
            "/s",
            "--tap",
            "t",
            "--ack-offload",
            "maybe"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["vsnoop", "--tap", "t"]).is_err());
    }
}
