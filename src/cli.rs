//! Command-line arguments (also the source of `--help`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// vsnoop: a vhost-user virtio-net backend that moves a VM's packets to a
/// TAP interface and tells where every millisecond of a round trip went.
///
/// Start it, then point QEMU at the socket:
///   vsnoop --socket /tmp/vsnoop.sock --tap vsnoop0 --control /tmp/vsnoop.ctl
///   qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on
///     -numa node,memdev=mem -chardev socket,id=c0,path=/tmp/vsnoop.sock
///     -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0
///
/// The daemon serves one VMM connection at a time and keeps running across
/// guest shutdowns and VMM restarts. SIGUSR1 prints the counters; SIGINT and
/// SIGTERM print them and exit. The subcommands talk to a running daemon
/// through its --control socket, or analyse a capture offline.
#[derive(Debug, Parser)]
#[command(
    name = "vsnoop",
    version,
    about,
    long_about,
    verbatim_doc_comment,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Client subcommand; without one, vsnoop runs the backend.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Backend options.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Options of the backend daemon.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// vhost-user unix socket: vsnoop listens there (QEMU connects as a
    /// client), or with --client connects to a VMM listening there.
    #[arg(long, value_name = "PATH", required = true)]
    pub socket: Option<PathBuf>,

    /// TAP interface to attach to; created if missing. vsnoop does not
    /// configure addresses on it.
    #[arg(long, value_name = "NAME", required = true)]
    pub tap: Option<String>,

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

    /// Record only frames matching this filter: comma-separated terms, each
    /// one of `host ADDR` (IPv4 or IPv6 source or destination),
    /// `net ADDR/PREFIX` (source or destination in the network),
    /// `port N` (TCP or UDP source or destination port) and
    /// `proto tcp|udp|icmp|icmpv6`. A frame is recorded when it matches ANY
    /// term, e.g. "proto icmp, port 53, net 10.77.0.0/24". Frames whose
    /// headers vsnoop does not parse (ARP, ICMP other than echo, IPv6
    /// extension headers, later fragments) match no term. Applies to
    /// captures started from the control socket too.
    #[arg(long, value_name = "FILTER")]
    pub capture_filter: Option<String>,

    /// Start a new capture file when the current one reaches this many
    /// megabytes (FILE.pcapng becomes FILE.1.pcapng, and so on).
    #[arg(long, value_name = "MB")]
    pub capture_max_mb: Option<u64>,

    /// Capture files kept when rotating (oldest removed).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub capture_files: usize,

    /// Unix socket for the control API (JSON): `vsnoop stats`, `flows`,
    /// `top`, `ack-offload` and `capture` talk to it.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Serve Prometheus / OpenMetrics text on http://ADDR/metrics
    /// (e.g. 127.0.0.1:9400).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Flows the delay attribution tracks at most.
    #[arg(long, value_name = "N", default_value_t = 16_384)]
    pub max_flows: usize,

    /// ACK compression: ACKs in a row that make a compression event.
    #[arg(long, value_name = "K", default_value_t = 3)]
    pub compression_k: u32,

    /// ACK compression: largest spacing ratio counted as compressed.
    #[arg(long, value_name = "THETA", default_value_t = 0.75)]
    pub compression_theta: f64,

    /// ACK offload: acknowledge TCP data to remote senders as soon as it is
    /// in the guest's RX buffers, keeping a copy until the guest confirms it
    /// (see README, ACK OFFLOAD). On by default; switchable at run time with
    /// `vsnoop ack-offload`.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub ack_offload: Switch,

    /// ACK offload: largest window, in bytes, our early ACKs advertise
    /// (vSnoop's buf_size; never more than the guest's own window). 0: no bound.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub ack_window_bound: u32,

    /// ACK offload: memory for copies of acknowledged bytes the guest has not
    /// confirmed yet, all flows together, in MiB. A flow that cannot get
    /// budget is not acknowledged early.
    #[arg(long, value_name = "MB", default_value_t = 64)]
    pub custody_budget_mb: usize,

    /// ACK offload: TCP flows tracked at most (new flows beyond pass through).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub offload_max_flows: usize,

    /// ACK offload: on SIGTERM / SIGINT, stop early ACKs and wait up to this
    /// long for the guest to acknowledge what was acknowledged on its behalf
    /// before exiting (custody does not outlive the process). A second
    /// signal exits at once. 0: exit at once.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub shutdown_drain_ms: u64,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the counters and the delay attribution of a running daemon.
    Stats {
        /// The daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Print the whole snapshot as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the per-flow delay table of a running daemon.
    Flows {
        /// The daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Print the flows as a JSON array.
        #[arg(long)]
        json: bool,
        /// Show at most this many flows (most packets first).
        #[arg(long, value_name = "N", default_value_t = 50)]
        limit: usize,
    },
    /// Live terminal view of a running daemon (Ctrl-C to quit).
    Top {
        /// The daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
    },
    /// Switch the ACK offload of a running daemon, or (without on|off) list
    /// its flows: mode, reason, bytes owed and held in custody.
    AckOffload {
        /// The daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// New state; without it, the offload's flows are listed.
        #[arg(value_enum, value_name = "on|off")]
        state: Option<Switch>,
        /// Print the flow list as JSON (the `offload_flows` reply).
        #[arg(long, conflicts_with = "state")]
        json: bool,
        /// Flows listed at most (those owing the sender most bytes first).
        #[arg(long, value_name = "N", default_value_t = 50, conflicts_with = "state")]
        limit: usize,
    },
    /// Start, stop or query the capture of a running daemon.
    Capture {
        /// The daemon's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// What to do.
        #[command(subcommand)]
        action: CaptureAction,
    },
    /// Analyse a vsnoop capture offline: delay attribution, ACK compression
    /// and plots (SVG) in DIR.
    Report {
        /// A capture written by `vsnoop --capture`.
        #[arg(value_name = "FILE.pcapng")]
        file: PathBuf,
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// ACK compression: ACKs in a row that make a compression event.
        #[arg(long, value_name = "K", default_value_t = 3)]
        compression_k: u32,
        /// ACK compression: largest spacing ratio counted as compressed.
        #[arg(long, value_name = "THETA", default_value_t = 0.75)]
        compression_theta: f64,
    },
}

/// Capture actions.
#[derive(Debug, Subcommand)]
pub enum CaptureAction {
    /// Start capturing to FILE (replaces a running capture).
    Start {
        /// pcapng file to write.
        #[arg(value_name = "FILE.pcapng")]
        file: PathBuf,
        /// Bytes of each frame kept (64..=262144).
        #[arg(long, value_name = "BYTES", default_value_t = 262_144)]
        snaplen: usize,
    },
    /// Stop the running capture, close its file and print its final counters.
    Stop,
    /// Show the running capture and its counters, if any.
    ///
    /// Prints the file, the snaplen, frames recorded, frames dropped (the
    /// writer fell behind), frames filtered out (--capture-filter) and file
    /// rotations (--capture-max-mb).
    Status,
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
        assert!(cli.command.is_none());
        let d = cli.daemon;
        assert_eq!(d.queues, 2);
        assert_eq!(d.queue_size, 256);
        assert!(d.client);
        assert_eq!(d.ack_offload, Switch::On);
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

    #[test]
    fn subcommands_do_not_need_the_daemon_options() {
        let cli = Cli::try_parse_from(["vsnoop", "stats", "--control", "/c", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Stats { json: true, .. })
        ));
        let cli = Cli::try_parse_from(["vsnoop", "report", "x.pcapng", "--out", "d"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Report { .. })));
        let cli =
            Cli::try_parse_from(["vsnoop", "capture", "--control", "/c", "start", "f"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Capture {
                action: CaptureAction::Start { .. },
                ..
            })
        ));
        // Daemon options and a subcommand do not mix.
        assert!(Cli::try_parse_from(["vsnoop", "--tap", "t", "stats", "--control", "/c"]).is_err());
    }
}
