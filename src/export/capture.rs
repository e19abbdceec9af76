//! pcapng capture at the guest boundary, one interface per vantage point.
//!
//! Interface 0 ("host") sees frames where they cross the tap: read from it
//! (`host_in`, inbound) or written to it (`host_out`, outbound). Interface 1
//! ("guest") sees them where they cross guest memory: published in the RX
//! used ring (`ring`, outbound to the guest) or taken from the TX avail ring
//! (`pop`, inbound from the guest). Every frame is recorded at both points
//! with the same `epb_packetid`, nanosecond timestamps (`if_tsresol` = 9) and
//! `epb_flags` direction bits, so `frame.time_delta` between the two records
//! of one id is vsnoop's own delay for that frame. Frames the ACK offload
//! makes are recorded once, where they appear: early ACKs and resets on the
//! host interface (outbound), custody re-deliveries on the guest interface;
//! guest ACKs it suppressed only on the guest interface (inbound).
//!
//! The data path only copies the frame into a record and hands it to a
//! bounded queue; a writer thread does the file I/O. When the queue is full
//! the record is dropped and counted rather than slowing the guest.
//!
//! A [`CaptureFilter`] (`--capture-filter`) is decided on the first
//! [`PREFIX_LEN`] bytes of a frame, copied to the stack, before anything else
//! is copied or allocated; frames it refuses are only counted. With a size
//! limit (`--capture-max-mb`) the writer thread rotates files: FILE becomes
//! FILE.1 (FILE.1 becomes FILE.2, ...), at most `files` files are kept, and
//! every file starts with its own section header and interface blocks, so
//! each one is a complete pcapng. Both records of a frame always land in the
//! same file.
//!
//! Timestamps are CLOCK_MONOTONIC shifted once, at start, to the wall clock,
//! so all records share one clock and readers show calendar times.

use std::borrow::Cow;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{info, warn};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness};

use crate::attribution::packet::{self, PacketMeta, Transport, PREFIX_LEN};
use crate::config::{Config, ConfigError};
use crate::timing::{wall_minus_monotonic_ns, DataPathHook, PacketView, RxStamps, TxStamps};

/// Interface id of the host-side vantage point.
pub const HOST_INTERFACE: u32 = 0;
/// Interface id of the guest-side vantage point.
pub const GUEST_INTERFACE: u32 = 1;
/// `epb_flags` direction: inbound.
pub const FLAG_INBOUND: u32 = 0b01;
/// `epb_flags` direction: outbound.
pub const FLAG_OUTBOUND: u32 = 0b10;
/// Capture files kept when rotating, unless told otherwise.
pub const DEFAULT_FILES: usize = 4;
/// Enhanced Packet Block type.
const EPB_TYPE: u32 = 6;
/// `epb_flags` option code.
const OPT_FLAGS: u16 = 2;
/// `epb_packetid` option code (pcap-file 2.0 cannot write it, so packet
/// blocks are encoded here; the section and interface blocks use the crate).
const OPT_PACKET_ID: u16 = 5;
/// Records waiting for the writer before new ones are dropped.
const QUEUE_DEPTH: usize = 16 * 1024;
/// Buffer of the capture file.
const FILE_BUFFER: usize = 1 << 20;

/// Why a capture could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be created.
    #[error("cannot create capture file {0}")]
    Create(PathBuf, #[source] io::Error),
    /// The pcapng headers could not be written.
    #[error("cannot write pcapng headers to {0}: {1}")]
    Header(PathBuf, String),
    /// The writer thread could not start.
    #[error("cannot start the capture writer thread")]
    Thread(#[source] io::Error),
}

// ---------------------------------------------------------------------------
// Filter
// ---------------------------------------------------------------------------

/// Why a capture filter was refused (the text says what was wrong and where).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(String);

/// What the terms look like, for error messages.
const FILTER_USAGE: &str =
    "expected `host ADDR`, `net ADDR/PREFIX`, `port N` or `proto tcp|udp|icmp|icmpv6`";

/// A protocol a `proto` term names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterProto {
    /// TCP (over IPv4 or IPv6).
    Tcp,
    /// UDP (over IPv4 or IPv6).
    Udp,
    /// ICMP (IPv4) echo request or reply.
    Icmp,
    /// ICMPv6 echo request or reply.
    Icmpv6,
}

impl FilterProto {
    fn name(self) -> &'static str {
        match self {
            FilterProto::Tcp => "tcp",
            FilterProto::Udp => "udp",
            FilterProto::Icmp => "icmp",
            FilterProto::Icmpv6 => "icmpv6",
        }
    }
}

/// One term of a capture filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterTerm {
    /// `host ADDR`: the IP source or destination is ADDR.
    Host(IpAddr),
    /// `net ADDR/PREFIX`: the IP source or destination is in the network
    /// (`addr` has its host bits cleared; IPv4 networks match IPv4 packets
    /// only, IPv6 networks IPv6 packets only).
    Net {
        /// Network address.
        addr: IpAddr,
        /// Prefix length (0..=32 or 0..=128).
        prefix: u8,
    },
    /// `port N`: the TCP or UDP source or destination port is N.
    Port(u16),
    /// `proto NAME`: the transport protocol.
    Proto(FilterProto),
}

impl FilterTerm {
    /// True when the frame whose headers are `meta` matches this term.
    pub fn matches(&self, meta: &PacketMeta) -> bool {
        match *self {
            FilterTerm::Host(addr) => meta.src == addr || meta.dst == addr,
            FilterTerm::Net { addr, prefix } => {
                in_net(meta.src, addr, prefix) || in_net(meta.dst, addr, prefix)
            }
            FilterTerm::Port(port) => match meta.transport {
                Transport::Tcp { sport, dport, .. } | Transport::Udp { sport, dport } => {
                    sport == port || dport == port
                }
                Transport::Echo { .. } => false,
            },
            FilterTerm::Proto(proto) => matches!(
                (proto, meta.transport),
                (FilterProto::Tcp, Transport::Tcp { .. })
                    | (FilterProto::Udp, Transport::Udp { .. })
                    | (FilterProto::Icmp, Transport::Echo { v6: false, .. })
                    | (FilterProto::Icmpv6, Transport::Echo { v6: true, .. })
            ),
        }
    }
}

impl fmt::Display for FilterTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterTerm::Host(addr) => write!(f, "host {addr}"),
            FilterTerm::Net { addr, prefix } => write!(f, "net {addr}/{prefix}"),
            FilterTerm::Port(port) => write!(f, "port {port}"),
            FilterTerm::Proto(proto) => write!(f, "proto {}", proto.name()),
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

fn in_net(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => u32::from(a) & mask32(prefix) == u32::from(n),
        (IpAddr::V6(a), IpAddr::V6(n)) => u128::from(a) & mask128(prefix) == u128::from(n),
        _ => false,
    }
}

/// A parsed `--capture-filter`: a frame is recorded when it matches any
/// term. Frames that [`packet::parse`] cannot read (ARP, IPv6 with extension
/// headers, ICMP other than echo, later fragments, ...) match no term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureFilter {
    terms: Vec<FilterTerm>,
}

impl CaptureFilter {
    /// The terms, in the order given.
    pub fn terms(&self) -> &[FilterTerm] {
        &self.terms
    }

    /// True when the frame whose headers are `meta` matches any term.
    pub fn matches(&self, meta: &PacketMeta) -> bool {
        self.terms.iter().any(|t| t.matches(meta))
    }

    /// True when the Ethernet frame (or its first [`PREFIX_LEN`] bytes)
    /// matches any term; a frame that does not parse matches none.
    pub fn matches_frame(&self, frame: &[u8]) -> bool {
        packet::parse(frame).is_some_and(|meta| self.matches(&meta))
    }
}

impl fmt::Display for CaptureFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, term) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{term}")?;
        }
        Ok(())
    }
}

impl FromStr for CaptureFilter {
    type Err = FilterError;

    /// Parses comma-separated terms: `host ADDR`, `net ADDR/PREFIX`,
    /// `port N`, `proto tcp|udp|icmp|icmpv6` (keywords and protocol names
    /// in any case, any whitespace around words).
    fn from_str(text: &str) -> Result<Self, FilterError> {
        if text.trim().is_empty() {
            return Err(FilterError(format!(
                "empty filter: {FILTER_USAGE}, separated by commas"
            )));
        }
        let terms = text
            .split(',')
            .enumerate()
            .map(|(i, term)| parse_term(term.trim(), i + 1))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CaptureFilter { terms })
    }
}

fn parse_term(term: &str, index: usize) -> Result<FilterTerm, FilterError> {
    let fail = |what: String| Err(FilterError(format!("term {index} {term:?}: {what}")));
    let mut words = term.split_whitespace();
    let Some(keyword) = words.next() else {
        return Err(FilterError(format!(
            "term {index} is empty (two commas in a row or a trailing comma?)"
        )));
    };
    let keyword = keyword.to_ascii_lowercase();
    if !matches!(keyword.as_str(), "host" | "net" | "port" | "proto") {
        return fail(format!("unknown term; {FILTER_USAGE}"));
    }
    let Some(value) = words.next() else {
        return fail(format!("`{keyword}` needs a value; {FILTER_USAGE}"));
    };
    if words.next().is_some() {
        return fail("one value per term; separate terms with commas".into());
    }
    match keyword.as_str() {
        "host" => match value.parse::<IpAddr>() {
            Ok(addr) => Ok(FilterTerm::Host(addr)),
            Err(_) => fail(format!("{value:?} is not an IPv4 or IPv6 address")),
        },
        "net" => {
            let Some((addr, prefix)) = value.split_once('/') else {
                return fail(format!("{value:?} is not ADDR/PREFIX (e.g. 10.0.0.0/8)"));
            };
            let Ok(addr) = addr.parse::<IpAddr>() else {
                return fail(format!("{addr:?} is not an IPv4 or IPv6 address"));
            };
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix.parse::<u8>() {
                Ok(p) if p <= max && !prefix.starts_with('+') => p,
                _ => {
                    return fail(format!(
                        "prefix length {prefix:?} is not a number from 0 to {max}"
                    ))
                }
            };
            let addr = match addr {
                IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(prefix)).into()),
                IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(prefix)).into()),
            };
            Ok(FilterTerm::Net { addr, prefix })
        }
        "port" => match value.parse::<u16>() {
            Ok(port) if !value.starts_with('+') => Ok(FilterTerm::Port(port)),
            _ => fail(format!("{value:?} is not a port number (0 to 65535)")),
        },
        _ => match value.to_ascii_lowercase().as_str() {
            "tcp" => Ok(FilterTerm::Proto(FilterProto::Tcp)),
            "udp" => Ok(FilterTerm::Proto(FilterProto::Udp)),
            "icmp" => Ok(FilterTerm::Proto(FilterProto::Icmp)),
            "icmpv6" => Ok(FilterTerm::Proto(FilterProto::Icmpv6)),
            _ => fail(format!(
                "unknown protocol {value:?} (tcp, udp, icmp or icmpv6)"
            )),
        },
    }
}

// ---------------------------------------------------------------------------
// Settings and rotation
// ---------------------------------------------------------------------------

/// Filter and rotation, applied to every capture a [`CaptureSlot`] starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSettings {
    /// Record only frames matching this filter (all frames without one).
    pub filter: Option<CaptureFilter>,
    /// Start a new file when the current one would grow beyond this many
    /// bytes (never rotate without it).
    pub max_bytes: Option<u64>,
    /// Files kept when rotating, the one being written included (at least 1).
    pub files: usize,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        CaptureSettings {
            filter: None,
            max_bytes: None,
            files: DEFAULT_FILES,
        }
    }
}

impl CaptureSettings {
    /// The settings of `--capture-filter`, `--capture-max-mb` and
    /// `--capture-files`.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let filter = config
            .capture_filter
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(ConfigError::CaptureFilter)?;
        Ok(CaptureSettings {
            filter,
            max_bytes: config.capture_max_bytes,
            files: config.capture_files.max(1),
        })
    }
}

/// The name of rotated file number `n` (1 = the most recent) of `path`:
/// `cap.pcapng` -> `cap.1.pcapng`; without an extension `cap` -> `cap.1`.
pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut name = OsString::new();
    match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) => {
            name.push(stem);
            name.push(format!(".{n}."));
            name.push(ext);
        }
        _ => {
            name.push(path.file_name().unwrap_or(path.as_os_str()));
            name.push(format!(".{n}"));
        }
    }
    path.with_file_name(name)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Shifts `path` to `path.1`, `path.1` to `path.2`, ..., keeping `files`
/// files in total (`path` itself, written next, included): the oldest,
/// `path.(files-1)`, is deleted. With `files` = 1 `path` is just deleted.
pub fn shift_rotated_files(path: &Path, files: usize) -> io::Result<()> {
    if files <= 1 {
        return remove_if_exists(path);
    }
    remove_if_exists(&rotated_path(path, files - 1))?;
    for n in (1..files - 1).rev() {
        rename_if_exists(&rotated_path(path, n), &rotated_path(path, n + 1))?;
    }
    fs::rename(path, rotated_path(path, 1))
}

// ---------------------------------------------------------------------------
// Capture
// ---------------------------------------------------------------------------

/// One frame seen at its vantage points.
struct Record {
    id: u64,
    /// (interface, timestamp ns since the epoch, epb_flags) per vantage point,
    /// in the order the frame passed them: both, or only the first for
    /// frames vsnoop made itself (ACK offload); `passed` says how many.
    points: [(u32, u64, u32); 2],
    passed: usize,
    original_len: u32,
    data: Vec<u8>,
}

enum Message {
    Frame(Record),
    Flush(mpsc::Sender<()>),
}

/// Counters the writer thread updates.
#[derive(Default)]
struct WriterCounters {
    written: AtomicU64,
    rotations: AtomicU64,
}

/// A running capture; install it as the data path hook.
pub struct Capture {
    path: PathBuf,
    snaplen: usize,
    filter: Option<CaptureFilter>,
    queue: SyncSender<Message>,
    next_id: AtomicU64,
    dropped: AtomicU64,
    filtered: AtomicU64,
    counters: Arc<WriterCounters>,
    /// Wall clock minus CLOCK_MONOTONIC, in ns.
    clock_offset: u64,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The section header and both interface blocks, as bytes: every file
/// (the first and each rotated one) starts with them.
fn pcapng_header(snaplen: usize) -> Result<Vec<u8>, pcap_file::PcapError> {
    let mut writer = PcapNgWriter::with_endianness(Vec::new(), Endianness::Little)?;
    for (name, description) in [
        (
            "host",
            "vsnoop host side: frames read from / written to the tap",
        ),
        (
            "guest",
            "vsnoop guest side: frames in guest memory (used ring / avail ring)",
        ),
    ] {
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: snaplen as u32,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed(name)),
                InterfaceDescriptionOption::IfDescription(Cow::Borrowed(description)),
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        writer.write_pcapng_block(idb)?;
    }
    Ok(writer.into_inner())
}

impl Capture {
    /// Creates `path` and starts the writer; frames are cut at `snaplen`
    /// bytes, filtered and the file rotated as `settings` say.
    pub fn start(
        path: &Path,
        snaplen: usize,
        settings: &CaptureSettings,
    ) -> Result<Capture, CaptureError> {
        let header = pcapng_header(snaplen)
            .map_err(|e| CaptureError::Header(path.to_path_buf(), e.to_string()))?;
        let file = File::create(path).map_err(|e| CaptureError::Create(path.to_path_buf(), e))?;
        let mut file = BufWriter::with_capacity(FILE_BUFFER, file);
        file.write_all(&header)
            .map_err(|e| CaptureError::Header(path.to_path_buf(), e.to_string()))?;
        let (queue, rx) = mpsc::sync_channel(QUEUE_DEPTH);
        let counters = Arc::new(WriterCounters::default());
        let output = Output {
            path: path.to_path_buf(),
            bytes: header.len() as u64,
            header,
            file,
            max_bytes: settings.max_bytes,
            files: settings.files.max(1),
            counters: counters.clone(),
        };
        let handle = thread::Builder::new()
            .name("vsnoop-capture".into())
            .spawn(move || write_records(output, rx))
            .map_err(CaptureError::Thread)?;
        let mut how = format!("snaplen {snaplen}");
        if let Some(filter) = &settings.filter {
            how.push_str(&format!(", filter: {filter}"));
        }
        if let Some(max) = settings.max_bytes {
            how.push_str(&format!(
                ", new file every {max} bytes, {} file(s) kept",
                settings.files.max(1)
            ));
        }
        info!("capturing to {} ({how})", path.display());
        Ok(Capture {
            path: path.to_path_buf(),
            snaplen,
            filter: settings.filter.clone(),
            queue,
            next_id: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            counters,
            clock_offset: wall_minus_monotonic_ns(),
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Frames recorded so far (each is two pcapng records).
    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Frames dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Frames the filter refused.
    pub fn filtered(&self) -> u64 {
        self.filtered.load(Ordering::Relaxed)
    }

    /// Files started because the current one reached the size limit.
    pub fn rotations(&self) -> u64 {
        self.counters.rotations.load(Ordering::Relaxed)
    }

    /// Path, snaplen and counters.
    pub fn status(&self) -> CaptureStatus {
        CaptureStatus {
            path: self.path.clone(),
            snaplen: self.snaplen,
            frames: self.written(),
            dropped: self.dropped(),
            filtered: self.filtered(),
            rotations: self.rotations(),
        }
    }

    /// Writes out everything queued so far and flushes the file (waits up
    /// to two seconds).
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if self.queue.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(2));
        }
        info!(
            "capture {}: {} frames recorded, {} dropped, {} filtered out, {} rotations",
            self.path.display(),
            self.written(),
            self.dropped(),
            self.filtered(),
            self.rotations()
        );
    }

    fn record(&self, frame: Frame<'_, '_>, points: &[(u32, u64, u32)]) {
        if let Some(filter) = &self.filter {
            // Decide on the headers alone (a copy on the stack), so refused
            // frames cost neither a full copy nor an allocation.
            let mut head = [0u8; PREFIX_LEN];
            let n = frame.copy_prefix(&mut head);
            if !filter.matches_frame(&head[..n]) {
                self.filtered.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let frame_len = frame.len();
        let mut data = vec![0u8; frame_len.min(self.snaplen)];
        let copied = frame.copy_prefix(&mut data);
        data.truncate(copied);
        let mut at = [(0, 0, 0); 2];
        let passed = points.len().min(2);
        for (slot, &(i, t, f)) in at.iter_mut().zip(points) {
            *slot = (i, t.wrapping_add(self.clock_offset), f);
        }
        let record = Record {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            points: at,
            passed,
            original_len: frame_len as u32,
            data,
        };
        if let Err(TrySendError::Full(_)) = self.queue.try_send(Message::Frame(record)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.flush();
        if let Some(handle) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            drop(handle);
        }
    }
}

/// A frame to record: in guest memory, or one vsnoop made itself.
#[derive(Clone, Copy)]
enum Frame<'p, 'm> {
    Guest(&'p PacketView<'m>),
    Local(&'p [u8]),
}

impl Frame<'_, '_> {
    /// Length from the Ethernet header on.
    fn len(&self) -> usize {
        match self {
            Frame::Guest(p) => p.len.saturating_sub(p.hdr_len),
            Frame::Local(f) => f.len(),
        }
    }

    fn copy_prefix(&self, buf: &mut [u8]) -> usize {
        match self {
            Frame::Guest(p) => p.copy_frame_prefix(buf),
            Frame::Local(f) => {
                let n = buf.len().min(f.len());
                buf[..n].copy_from_slice(&f[..n]);
                n
            }
        }
    }
}

impl DataPathHook for Capture {
    fn rx_published(&self, _queue_pair: usize, packet: &PacketView<'_>, stamps: RxStamps) {
        let guest = (GUEST_INTERFACE, stamps.ring, FLAG_OUTBOUND);
        if stamps.host_in == 0 {
            // Made by vsnoop (ACK offload): it never crossed the tap.
            self.record(Frame::Guest(packet), &[guest]);
        } else {
            let host = (HOST_INTERFACE, stamps.host_in, FLAG_INBOUND);
            self.record(Frame::Guest(packet), &[host, guest]);
        }
    }

    fn tx_sent(&self, _queue_pair: usize, packet: &PacketView<'_>, stamps: TxStamps) {
        self.record(
            Frame::Guest(packet),
            &[
                (GUEST_INTERFACE, stamps.pop, FLAG_INBOUND),
                (HOST_INTERFACE, stamps.host_out, FLAG_OUTBOUND),
            ],
        );
    }

    fn local_sent(&self, _queue_pair: usize, frame: &[u8], at: u64) {
        self.record(Frame::Local(frame), &[(HOST_INTERFACE, at, FLAG_OUTBOUND)]);
    }

    fn tx_suppressed(&self, _queue_pair: usize, packet: &PacketView<'_>, pop: u64) {
        self.record(
            Frame::Guest(packet),
            &[(GUEST_INTERFACE, pop, FLAG_INBOUND)],
        );
    }
}

/// What a capture reports about itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptureStatus {
    /// The file being written.
    pub path: PathBuf,
    /// Bytes kept per frame.
    pub snaplen: usize,
    /// Frames recorded (each at both vantage points).
    pub frames: u64,
    /// Frames not recorded because the writer could not keep up.
    pub dropped: u64,
    /// Frames not recorded because the capture filter refused them.
    #[serde(default)]
    pub filtered: u64,
    /// Times the file reached the size limit and a new one was started.
    #[serde(default)]
    pub rotations: u64,
}

/// The capture that can be started and stopped while the daemon runs; the
/// data path hook always points here.
pub struct CaptureSlot {
    current: RwLock<Option<Arc<Capture>>>,
    settings: CaptureSettings,
}

impl Default for CaptureSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl CaptureSlot {
    /// An empty slot (no capture running) whose captures record every frame
    /// into one file.
    pub fn new() -> Self {
        Self::with_settings(CaptureSettings::default())
    }

    /// An empty slot whose captures (from `--capture` or the control socket)
    /// all use `settings` (filter, rotation).
    pub fn with_settings(settings: CaptureSettings) -> Self {
        CaptureSlot {
            current: RwLock::new(None),
            settings,
        }
    }

    /// The filter and rotation every capture started here uses.
    pub fn settings(&self) -> &CaptureSettings {
        &self.settings
    }

    fn current(&self) -> Option<Arc<Capture>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts capturing to `path`; a running capture is stopped first.
    pub fn start(&self, path: &Path, snaplen: usize) -> Result<CaptureStatus, CaptureError> {
        // A running capture to the same file is finished before the file is
        // recreated: two writers (and rotations) must not share a name.
        if self.current().is_some_and(|c| c.path == path) {
            self.stop();
        }
        let capture = Arc::new(Capture::start(path, snaplen, &self.settings)?);
        let status = capture.status();
        let old = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(capture);
        if let Some(old) = old {
            old.flush();
        }
        Ok(status)
    }

    /// Stops the running capture (its file is complete when this returns).
    pub fn stop(&self) -> Option<CaptureStatus> {
        let old = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        old.flush();
        Some(old.status())
    }

    /// The running capture, if any.
    pub fn status(&self) -> Option<CaptureStatus> {
        self.current().map(|c| c.status())
    }

    /// Makes the file complete up to now.
    pub fn flush(&self) {
        if let Some(c) = self.current() {
            c.flush();
        }
    }
}

impl DataPathHook for CaptureSlot {
    fn rx_published(&self, queue_pair: usize, packet: &PacketView<'_>, stamps: RxStamps) {
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = guard.as_ref() {
            c.rx_published(queue_pair, packet, stamps);
        }
    }

    fn tx_sent(&self, queue_pair: usize, packet: &PacketView<'_>, stamps: TxStamps) {
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = guard.as_ref() {
            c.tx_sent(queue_pair, packet, stamps);
        }
    }

    fn local_sent(&self, queue_pair: usize, frame: &[u8], at: u64) {
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = guard.as_ref() {
            c.local_sent(queue_pair, frame, at);
        }
    }

    fn tx_suppressed(&self, queue_pair: usize, packet: &PacketView<'_>, pop: u64) {
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = guard.as_ref() {
            c.tx_suppressed(queue_pair, packet, pop);
        }
    }
}

// ---------------------------------------------------------------------------
// Writer thread
// ---------------------------------------------------------------------------

/// The file the writer thread appends to, and when to start the next one.
struct Output {
    path: PathBuf,
    /// Section header and interface blocks, written at the start of every file.
    header: Vec<u8>,
    file: BufWriter<File>,
    /// Bytes in the current file (header included).
    bytes: u64,
    max_bytes: Option<u64>,
    files: usize,
    counters: Arc<WriterCounters>,
}

impl Output {
    /// True when `len` more bytes would take a file that holds packets
    /// beyond the limit (a file always takes at least one frame).
    fn full_for(&self, len: usize) -> bool {
        self.max_bytes.is_some_and(|max| {
            self.bytes > self.header.len() as u64 && self.bytes + len as u64 > max
        })
    }

    /// Closes the current file, shifts the names and starts a new file.
    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        shift_rotated_files(&self.path, self.files)?;
        let file = File::create(&self.path)?;
        let mut file = BufWriter::with_capacity(FILE_BUFFER, file);
        file.write_all(&self.header)?;
        let full = std::mem::replace(&mut self.file, file);
        drop(full);
        let rotations = self.counters.rotations.fetch_add(1, Ordering::Relaxed) + 1;
        info!(
            "capture {}: file reached {} bytes; moved to {}, new file started (rotation {rotations}, {} file(s) kept)",
            self.path.display(),
            self.bytes,
            if self.files > 1 {
                rotated_path(&self.path, 1).display().to_string()
            } else {
                "nowhere (deleted)".to_string()
            },
            self.files
        );
        self.bytes = self.header.len() as u64;
        Ok(())
    }
}

fn write_records(mut out: Output, queue: Receiver<Message>) {
    let display = out.path.display().to_string();
    let mut failed = false;
    let mut block = Vec::with_capacity(4096);
    while let Ok(message) = queue.recv() {
        match message {
            Message::Frame(record) if !failed => {
                block.clear();
                for &(interface, ts, flags) in &record.points[..record.passed] {
                    encode_epb(
                        &mut block,
                        interface,
                        ts,
                        record.original_len,
                        &record.data,
                        flags,
                        record.id,
                    );
                }
                if out.full_for(block.len()) {
                    if let Err(e) = out.rotate() {
                        warn!("capture {display}: rotation failed, capture stopped: {e}");
                        failed = true;
                        continue;
                    }
                }
                // Packet blocks go straight to the buffered file: the
                // section and interface blocks are already written.
                if let Err(e) = out.file.write_all(&block) {
                    warn!("capture {display}: write failed, capture stopped: {e}");
                    failed = true;
                    continue;
                }
                out.bytes += block.len() as u64;
                out.counters.written.fetch_add(1, Ordering::Relaxed);
            }
            Message::Frame(_) => {}
            Message::Flush(done) => {
                if let Err(e) = out.file.flush() {
                    warn!("capture {display}: flush failed: {e}");
                }
                let _ = done.send(());
            }
        }
    }
    let _ = out.file.flush();
}

/// Appends a little-endian Enhanced Packet Block with `epb_flags` and
/// `epb_packetid` (pcapng, section 4.3) to `out`.
fn encode_epb(
    out: &mut Vec<u8>,
    interface: u32,
    ts_ns: u64,
    original_len: u32,
    data: &[u8],
    flags: u32,
    id: u64,
) {
    let padded = data.len().div_ceil(4) * 4;
    // type, length, 5 fixed fields, data, flags (8), packet id (12), end (4), length.
    let total = (4 + 4 + 20 + padded + 8 + 12 + 4 + 4) as u32;
    out.extend_from_slice(&EPB_TYPE.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&interface.to_le_bytes());
    out.extend_from_slice(&((ts_ns >> 32) as u32).to_le_bytes());
    out.extend_from_slice(&(ts_ns as u32).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&original_len.to_le_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + padded - data.len(), 0);
    out.extend_from_slice(&OPT_FLAGS.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&OPT_PACKET_ID.to_le_bytes());
    out.extend_from_slice(&8u16.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // opt_endofopt
    out.extend_from_slice(&total.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::chain::Segment;
    use crate::GuestMemory;
    use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
    use pcap_file::pcapng::{Block, PcapNgReader};
    use vm_memory::{Bytes, GuestAddress};

    /// A 12-byte virtio-net header and a `frame_len`-byte frame (0, 1, 2,
    /// ...) at 0x1000 in fresh guest memory, and the segment holding them.
    fn packet_in_memory(frame_len: u8) -> (GuestMemory, Vec<u8>, [Segment; 1]) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut packet = vec![0u8; 12];
        packet.extend(0..frame_len);
        mem.write_slice(&packet, GuestAddress(0x1000)).unwrap();
        let segments = [Segment {
            addr: GuestAddress(0x1000),
            len: packet.len() as u32,
        }];
        (mem, packet, segments)
    }

    #[test]
    fn records_each_frame_at_both_points_with_one_id() {
        let dir = std::env::temp_dir().join(format!("vsnoop-cap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("unit.pcapng");
        let (mem, _, segments) = packet_in_memory(100);
        let view = PacketView {
            mem: &mem,
            segments: &segments,
            len: 112,
            hdr_len: 12,
        };
        let capture = Capture::start(&path, 64, &CaptureSettings::default()).unwrap();
        capture.rx_published(
            0,
            &view,
            RxStamps {
                host_in: 1_000,
                ring: 1_500,
            },
        );
        capture.tx_sent(
            0,
            &view,
            TxStamps {
                kick: 0,
                pop: 2_000,
                host_out: 2_700,
            },
        );
        drop(capture);

        let file = File::open(&path).unwrap();
        let mut reader = PcapNgReader::new(file).unwrap();
        let mut idbs = 0;
        let mut epbs = Vec::new();
        while let Some(block) = reader.next_block() {
            match block.unwrap() {
                Block::InterfaceDescription(idb) => {
                    idbs += 1;
                    assert!(idb
                        .options
                        .contains(&InterfaceDescriptionOption::IfTsResol(9)));
                }
                Block::EnhancedPacket(epb) => epbs.push(epb.into_owned()),
                _ => {}
            }
        }
        assert_eq!(idbs, 2);
        assert_eq!(epbs.len(), 4);
        // Snaplen cuts the data, original length stays the frame's.
        assert_eq!(epbs[0].data.len(), 64);
        assert_eq!(epbs[0].original_len, 100);
        assert_eq!(&epbs[0].data[..4], &[0, 1, 2, 3]);
        // RX: host inbound then guest outbound, 500 ns apart, same id.
        assert_eq!(epbs[0].interface_id, HOST_INTERFACE);
        assert_eq!(epbs[1].interface_id, GUEST_INTERFACE);
        assert_eq!(
            epbs[1].timestamp - epbs[0].timestamp,
            Duration::from_nanos(500)
        );
        assert!(epbs[0]
            .options
            .contains(&EnhancedPacketOption::Flags(FLAG_INBOUND)));
        assert!(epbs[1]
            .options
            .contains(&EnhancedPacketOption::Flags(FLAG_OUTBOUND)));
        let id = |e: &EnhancedPacketBlock| {
            e.options.iter().find_map(|o| match o {
                EnhancedPacketOption::Unknown(u) if u.code == OPT_PACKET_ID => {
                    Some(u64::from_le_bytes(u.value[..8].try_into().unwrap()))
                }
                _ => None,
            })
        };
        assert_eq!(id(&epbs[0]), id(&epbs[1]));
        assert_ne!(id(&epbs[0]), id(&epbs[2]));
        // TX: guest inbound first, then host outbound.
        assert_eq!(epbs[2].interface_id, GUEST_INTERFACE);
        assert_eq!(epbs[3].interface_id, HOST_INTERFACE);
        assert_eq!(
            epbs[3].timestamp - epbs[2].timestamp,
            Duration::from_nanos(700)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn offload_frames_are_recorded_once_where_they_appear() {
        let dir = std::env::temp_dir().join(format!("vsnoop-cap-local-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("local.pcapng");
        let (mem, packet, segments) = packet_in_memory(60);
        let view = PacketView {
            mem: &mem,
            segments: &segments,
            len: 72,
            hdr_len: 12,
        };
        let capture = Capture::start(&path, 256, &CaptureSettings::default()).unwrap();
        // A custody re-delivery: published in the ring, never read from the tap.
        capture.rx_published(
            0,
            &view,
            RxStamps {
                host_in: 0,
                ring: 5_000,
            },
        );
        // An early ACK written to the tap.
        let ack: Vec<u8> = (100..154u8).collect();
        capture.local_sent(0, &ack, 6_000);
        // A guest ACK the offload suppressed: it left the guest, not the tap.
        capture.tx_suppressed(0, &view, 7_000);
        drop(capture);

        let mut reader = PcapNgReader::new(File::open(&path).unwrap()).unwrap();
        let mut epbs = Vec::new();
        while let Some(block) = reader.next_block() {
            if let Block::EnhancedPacket(epb) = block.unwrap() {
                epbs.push(epb.into_owned());
            }
        }
        assert_eq!(epbs.len(), 3, "one record each");
        assert_eq!(epbs[0].interface_id, GUEST_INTERFACE);
        assert_eq!(&epbs[0].data[..], &packet[12..]);
        assert_eq!(epbs[1].interface_id, HOST_INTERFACE);
        assert_eq!(&epbs[1].data[..], &ack[..]);
        assert!(epbs[1]
            .options
            .contains(&EnhancedPacketOption::Flags(FLAG_OUTBOUND)));
        assert_eq!(
            epbs[1].timestamp - epbs[0].timestamp,
            Duration::from_nanos(1_000)
        );
        assert_eq!(epbs[2].interface_id, GUEST_INTERFACE);
        assert!(epbs[2]
            .options
            .contains(&EnhancedPacketOption::Flags(FLAG_INBOUND)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // -- filter ------------------------------------------------------------

    use etherparse::PacketBuilder;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn filter(text: &str) -> CaptureFilter {
        text.parse()
            .unwrap_or_else(|e| panic!("{text:?} refused: {e}"))
    }

    fn refused(text: &str) -> String {
        match text.parse::<CaptureFilter>() {
            Ok(f) => panic!("{text:?} accepted as {f}"),
            Err(e) => e.to_string(),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, &[1, 2, 3])
            .unwrap();
        out
    }

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(src, dst, 64)
            .tcp(sport, dport, 1, 1000)
            .write(&mut out, &[0; 20])
            .unwrap();
        out
    }

    fn tcp6(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
        let (IpAddr::V6(s), IpAddr::V6(d)) = (ip(src), ip(dst)) else {
            panic!()
        };
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(s.octets(), d.octets(), 64)
            .tcp(sport, dport, 1, 1000)
            .write(&mut out, &[0; 20])
            .unwrap();
        out
    }

    fn ping4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(src, dst, 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut out, &[0; 16])
            .unwrap();
        out
    }

    fn ping6(src: &str, dst: &str) -> Vec<u8> {
        let (IpAddr::V6(s), IpAddr::V6(d)) = (ip(src), ip(dst)) else {
            panic!()
        };
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6_echo_reply(7, 1)
            .write(&mut out, &[0; 16])
            .unwrap();
        out
    }

    fn arp() -> Vec<u8> {
        let mut f = vec![0u8; 42];
        f[..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&MAC_A);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f
    }

    #[test]
    fn filter_parses_every_kind_of_term() {
        let f = filter("host 10.77.0.2, net 192.168.7.9/16 ,port 53,proto tcp");
        assert_eq!(
            f.terms(),
            &[
                FilterTerm::Host(ip("10.77.0.2")),
                FilterTerm::Net {
                    addr: ip("192.168.0.0"),
                    prefix: 16
                },
                FilterTerm::Port(53),
                FilterTerm::Proto(FilterProto::Tcp),
            ]
        );
        assert_eq!(
            f.to_string(),
            "host 10.77.0.2, net 192.168.0.0/16, port 53, proto tcp"
        );
        // The canonical form parses to the same filter.
        assert_eq!(filter(&f.to_string()), f);
        let f = filter("  HOST   fd00::1 ,\tnet fd00:1:2:3::9/64, Proto ICMPv6, proto icmp, proto udp, port 0, port 65535");
        assert_eq!(
            f.terms(),
            &[
                FilterTerm::Host(ip("fd00::1")),
                FilterTerm::Net {
                    addr: ip("fd00:1:2:3::"),
                    prefix: 64
                },
                FilterTerm::Proto(FilterProto::Icmpv6),
                FilterTerm::Proto(FilterProto::Icmp),
                FilterTerm::Proto(FilterProto::Udp),
                FilterTerm::Port(0),
                FilterTerm::Port(65535),
            ]
        );
        assert_eq!(
            filter("net 0.0.0.0/0, net ::/0, net 1.2.3.4/32, net ::1/128").terms()[2],
            FilterTerm::Net {
                addr: ip("1.2.3.4"),
                prefix: 32
            }
        );
    }

    #[test]
    fn filter_refuses_bad_input_with_a_reason() {
        for (text, reason) in [
            ("", "empty filter"),
            ("   ", "empty filter"),
            ("host", "`host` needs a value"),
            ("port", "`port` needs a value"),
            ("host 10.0.0.300", "not an IPv4 or IPv6 address"),
            ("host example.com", "not an IPv4 or IPv6 address"),
            ("host 10.0.0.0/8", "not an IPv4 or IPv6 address"),
            ("net 10.0.0.0", "not ADDR/PREFIX"),
            ("net 10.0.0.0/33", "from 0 to 32"),
            ("net fd00::/129", "from 0 to 128"),
            ("net 10.0.0.0/", "from 0 to 32"),
            ("net 10.0.0.0/+8", "from 0 to 32"),
            ("net 10.0.0.0/-1", "from 0 to 32"),
            ("net ten/8", "not an IPv4 or IPv6 address"),
            ("port 65536", "not a port number"),
            ("port -1", "not a port number"),
            ("port +53", "not a port number"),
            ("port http", "not a port number"),
            ("proto sctp", "unknown protocol"),
            ("proto", "`proto` needs a value"),
            ("port 1 2", "one value per term"),
            ("host 10.0.0.1 port 53", "one value per term"),
            ("src 10.0.0.1", "unknown term"),
            ("tcp", "unknown term"),
            ("port 53,", "term 2 is empty"),
            (",port 53", "term 1 is empty"),
            ("port 1,,port 2", "term 2 is empty"),
            ("port 1; port 2", "one value per term"),
        ] {
            let e = refused(text);
            assert!(
                e.contains(reason),
                "{text:?}: {e:?} does not say {reason:?}"
            );
        }
        // The term is quoted and numbered.
        assert_eq!(
            refused("proto tcp, port 70000"),
            "term 2 \"port 70000\": \"70000\" is not a port number (0 to 65535)"
        );
    }

    #[test]
    fn bad_filter_is_a_config_error_with_the_option_name() {
        use crate::cli::Cli;
        use clap::Parser;
        let parse = |filter: &str| {
            let cli = Cli::try_parse_from([
                "vsnoop",
                "--socket",
                "/s",
                "--tap",
                "t0",
                "--capture-filter",
                filter,
            ])
            .unwrap();
            Config::try_from(cli.daemon)
        };
        let e = parse("proto sctp").unwrap_err();
        assert!(matches!(e, ConfigError::CaptureFilter(_)));
        let text = e.to_string();
        assert!(
            text.starts_with("--capture-filter: term 1 \"proto sctp\": unknown protocol"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        let config = parse("host 10.77.0.2, proto icmp").unwrap();
        let settings = CaptureSettings::from_config(&config).unwrap();
        assert_eq!(settings.filter, Some(filter("host 10.77.0.2,proto icmp")));
        assert_eq!(settings.max_bytes, None);
        assert_eq!(settings.files, DEFAULT_FILES);
    }

    #[test]
    fn filter_matches_addresses_ports_and_protocols() {
        let udp = udp4([10, 77, 0, 2], [10, 77, 0, 1], 40000, 53);
        let tcp = tcp4([192, 168, 1, 9], [10, 77, 0, 2], 5201, 33000);
        let tcp_v6 = tcp6("fd00::2", "2001:db8:5::7", 443, 50000);
        let echo = ping4([10, 77, 0, 1], [10, 77, 0, 2]);
        let echo_v6 = ping6("fd00::1", "fd00::2");
        let frames = [&udp, &tcp, &tcp_v6, &echo, &echo_v6];
        let matching = |text: &str| -> Vec<usize> {
            let f = filter(text);
            (0..frames.len())
                .filter(|&i| f.matches_frame(frames[i]))
                .collect()
        };
        assert_eq!(matching("host 10.77.0.2"), [0, 1, 3]);
        assert_eq!(matching("host 10.77.0.1"), [0, 3]);
        assert_eq!(matching("host 192.168.1.9"), [1]);
        assert_eq!(matching("host fd00::2"), [2, 4]);
        assert_eq!(matching("host 2001:db8:5::7"), [2]);
        // An IPv4 address never matches an IPv6 packet and vice versa.
        assert_eq!(matching("host ::ffff:10.77.0.2"), Vec::<usize>::new());
        assert_eq!(matching("port 53"), [0]);
        assert_eq!(matching("port 40000"), [0]);
        assert_eq!(matching("port 5201"), [1]);
        assert_eq!(matching("port 443, port 33000"), [1, 2]);
        // ICMP echo identifiers are not ports.
        assert_eq!(matching("port 7"), Vec::<usize>::new());
        assert_eq!(matching("proto udp"), [0]);
        assert_eq!(matching("proto tcp"), [1, 2]);
        assert_eq!(matching("proto icmp"), [3]);
        assert_eq!(matching("proto icmpv6"), [4]);
        assert_eq!(matching("proto icmp, proto icmpv6, port 53"), [0, 3, 4]);
        assert_eq!(matching("net 10.77.0.0/24"), [0, 1, 3]);
        assert_eq!(matching("net 10.77.0.0/31"), [0, 3]);
        assert_eq!(matching("net 10.77.0.1/32"), [0, 3]);
        assert_eq!(matching("net 10.77.0.3/32"), Vec::<usize>::new());
        assert_eq!(matching("net 192.168.1.8/31"), [1]);
        assert_eq!(matching("net 192.168.0.0/16"), [1]);
        assert_eq!(matching("net 192.169.0.0/16"), Vec::<usize>::new());
        assert_eq!(matching("net 0.0.0.0/0"), [0, 1, 3]);
        assert_eq!(matching("net ::/0"), [2, 4]);
        assert_eq!(matching("net fd00::/64"), [2, 4]);
        assert_eq!(matching("net 2001:db8::/32"), [2]);
        assert_eq!(matching("net 2001:db8:4::/48"), Vec::<usize>::new());
        assert_eq!(matching("net 2001:db8:4::/47"), [2]);
    }

    #[test]
    fn frames_that_do_not_parse_match_nothing() {
        let everything = filter("net 0.0.0.0/0, net ::/0, proto icmp, proto udp, port 0");
        assert!(!everything.matches_frame(&arp()));
        assert!(!everything.matches_frame(&[]));
        assert!(!everything.matches_frame(&[0u8; 13]));
        // ICMP destination unreachable: not an echo, so not parsed.
        let mut unreachable = ping4([10, 77, 0, 1], [10, 77, 0, 2]);
        unreachable[14 + 20] = 3;
        assert!(!everything.matches_frame(&unreachable));
        // A frame cut inside the UDP header.
        let udp = udp4([10, 77, 0, 2], [10, 77, 0, 1], 1, 2);
        assert!(everything.matches_frame(&udp));
        assert!(!everything.matches_frame(&udp[..14 + 20 + 4]));
        // The first PREFIX_LEN bytes decide.
        let big = tcp4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        assert!(filter("port 2").matches_frame(&big[..big.len().min(PREFIX_LEN)]));
    }

    // -- capture with a filter ------------------------------------------------

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vsnoop-cap-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Puts `frame` behind a zeroed virtio-net header in guest memory and
    /// calls `f` with a view of it.
    fn with_view(frame: &[u8], f: impl FnOnce(&PacketView<'_>)) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut packet = vec![0u8; 12];
        packet.extend_from_slice(frame);
        mem.write_slice(&packet, GuestAddress(0x1000)).unwrap();
        let segments = [Segment {
            addr: GuestAddress(0x1000),
            len: packet.len() as u32,
        }];
        f(&PacketView {
            mem: &mem,
            segments: &segments,
            len: packet.len(),
            hdr_len: 12,
        });
    }

    /// (interface blocks, [(packet id, interface)]) of a pcapng file.
    fn read_capture(path: &Path) -> (usize, Vec<(u64, u32)>) {
        let file = File::open(path).unwrap();
        let mut reader = PcapNgReader::new(file).unwrap();
        let mut idbs = 0;
        let mut records = Vec::new();
        while let Some(block) = reader.next_block() {
            match block.unwrap() {
                Block::InterfaceDescription(_) => idbs += 1,
                Block::EnhancedPacket(epb) => {
                    let id = epb
                        .options
                        .iter()
                        .find_map(|o| match o {
                            EnhancedPacketOption::Unknown(u) if u.code == OPT_PACKET_ID => {
                                Some(u64::from_le_bytes(u.value[..8].try_into().unwrap()))
                            }
                            _ => None,
                        })
                        .unwrap();
                    records.push((id, epb.interface_id));
                }
                _ => {}
            }
        }
        (idbs, records)
    }

    fn feed(capture: &Capture, frame: &[u8], rx: bool) {
        with_view(frame, |view| {
            if rx {
                capture.rx_published(
                    0,
                    view,
                    RxStamps {
                        host_in: 1,
                        ring: 2,
                    },
                );
            } else {
                capture.tx_sent(
                    0,
                    view,
                    TxStamps {
                        kick: 0,
                        pop: 1,
                        host_out: 2,
                    },
                );
            }
        });
    }

    #[test]
    fn filtered_frames_are_counted_not_recorded() {
        let dir = temp_dir("filter");
        let path = dir.join("f.pcapng");
        let settings = CaptureSettings {
            filter: Some(filter("proto icmp")),
            ..CaptureSettings::default()
        };
        let capture = Capture::start(&path, 262_144, &settings).unwrap();
        let echo = ping4([10, 77, 0, 1], [10, 77, 0, 2]);
        let udp = udp4([10, 77, 0, 2], [10, 77, 0, 1], 1, 2);
        feed(&capture, &echo, true);
        feed(&capture, &udp, false);
        feed(&capture, &arp(), true);
        feed(&capture, &echo, false);
        capture.flush();
        let status = capture.status();
        assert_eq!((status.frames, status.filtered, status.dropped), (2, 2, 0));
        assert_eq!(status.rotations, 0);
        drop(capture);
        let (idbs, records) = read_capture(&path);
        assert_eq!(idbs, 2);
        // Ids are only given to recorded frames.
        assert_eq!(records, [(1, 0), (1, 1), (2, 1), (2, 0)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn capture_status_serializes_the_new_counters() {
        let status = CaptureStatus {
            path: "/x.pcapng".into(),
            snaplen: 64,
            frames: 1,
            dropped: 2,
            filtered: 3,
            rotations: 4,
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"path": "/x.pcapng", "snaplen": 64, "frames": 1,
                "dropped": 2, "filtered": 3, "rotations": 4})
        );
        // A status from an older daemon (without them) still reads.
        let old: CaptureStatus = serde_json::from_value(
            serde_json::json!({"path": "/x", "snaplen": 64, "frames": 1, "dropped": 0}),
        )
        .unwrap();
        assert_eq!((old.filtered, old.rotations), (0, 0));
    }

    // -- rotation --------------------------------------------------------------

    #[test]
    fn rotated_names() {
        let p = |s: &str, n| rotated_path(Path::new(s), n);
        assert_eq!(p("/d/cap.pcapng", 1), Path::new("/d/cap.1.pcapng"));
        assert_eq!(p("/d/cap.pcapng", 12), Path::new("/d/cap.12.pcapng"));
        assert_eq!(p("/d/a.b.pcapng", 2), Path::new("/d/a.b.2.pcapng"));
        assert_eq!(p("/d/cap", 1), Path::new("/d/cap.1"));
        assert_eq!(p("cap.pcap", 3), Path::new("cap.3.pcap"));
        assert_eq!(p("/d/.hidden", 1), Path::new("/d/.hidden.1"));
    }

    #[test]
    fn shifting_keeps_the_newest_files() {
        let dir = temp_dir("shift");
        let path = dir.join("c.pcapng");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        // Three generations written, rotating each time, keeping 3 files.
        for generation in ["a", "b", "c", "d"] {
            if path.exists() {
                shift_rotated_files(&path, 3).unwrap();
            }
            std::fs::write(&path, generation).unwrap();
        }
        assert_eq!(names(), ["c.1.pcapng", "c.2.pcapng", "c.pcapng"]);
        assert_eq!(read("c.pcapng").as_deref(), Some("d"));
        assert_eq!(read("c.1.pcapng").as_deref(), Some("c"));
        assert_eq!(read("c.2.pcapng").as_deref(), Some("b"));
        // Fewer files kept: the older ones are not touched beyond the limit
        // but the oldest kept name is replaced.
        shift_rotated_files(&path, 2).unwrap();
        assert_eq!(read("c.1.pcapng").as_deref(), Some("d"));
        assert_eq!(read("c.2.pcapng").as_deref(), Some("b"));
        assert_eq!(read("c.pcapng"), None);
        // One file kept: the current one is just removed.
        std::fs::write(&path, "e").unwrap();
        shift_rotated_files(&path, 1).unwrap();
        assert_eq!(read("c.pcapng"), None);
        assert_eq!(read("c.1.pcapng").as_deref(), Some("d"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_keeps_complete_files_and_continuous_ids() {
        let dir = temp_dir("rotate");
        let path = dir.join("r.pcapng");
        let limit = 16 * 1024;
        let settings = CaptureSettings {
            filter: None,
            max_bytes: Some(limit),
            files: 3,
        };
        let capture = Capture::start(&path, 262_144, &settings).unwrap();
        let mut frame = udp4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        frame.resize(1000, 0x5a);
        // Each frame is two records of ~1.1 kB: ~7 frames per file.
        for i in 0..100 {
            feed(&capture, &frame, i % 2 == 0);
        }
        capture.flush();
        let status = capture.status();
        assert_eq!(status.frames, 100);
        assert!(status.rotations >= 10, "{status:?}");
        drop(capture);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["r.1.pcapng", "r.2.pcapng", "r.pcapng"]);
        let mut last_id = None;
        for name in ["r.2.pcapng", "r.1.pcapng", "r.pcapng"] {
            let file = dir.join(name);
            assert!(std::fs::metadata(&file).unwrap().len() <= limit);
            let (idbs, records) = read_capture(&file);
            assert_eq!(idbs, 2, "{name}");
            assert!(!records.is_empty(), "{name}");
            // Both records of every frame, ids following on from the
            // previous file.
            for pair in records.chunks(2) {
                assert_eq!(pair.len(), 2, "{name}: a frame split across files");
                assert_eq!(pair[0].0, pair[1].0);
                assert_ne!(pair[0].1, pair[1].1);
                if let Some(last) = last_id {
                    assert_eq!(pair[0].0, last + 1, "{name}");
                }
                last_id = Some(pair[0].0);
            }
        }
        assert_eq!(last_id, Some(100));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_frame_larger_than_the_limit_still_gets_a_file() {
        let dir = temp_dir("huge");
        let path = dir.join("h.pcapng");
        let settings = CaptureSettings {
            filter: None,
            max_bytes: Some(1024),
            files: 2,
        };
        let capture = Capture::start(&path, 262_144, &settings).unwrap();
        let mut frame = udp4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        frame.resize(3000, 0);
        for _ in 0..3 {
            feed(&capture, &frame, true);
        }
        capture.flush();
        assert_eq!(capture.status().frames, 3);
        assert_eq!(capture.status().rotations, 2);
        drop(capture);
        assert_eq!(read_capture(&path).1.len(), 2);
        assert_eq!(read_capture(&rotated_path(&path, 1)).1.len(), 2);
        assert!(!rotated_path(&path, 2).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
