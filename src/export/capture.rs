//! pcapng capture at the guest boundary, one interface per vantage point.
//!
//! Interface 0 ("host") sees frames where they cross the tap: read from it
//! (`host_in`, inbound) or written to it (`host_out`, outbound). Interface 1
//! ("guest") sees them where they cross guest memory: published in the RX
//! used ring (`ring`, outbound to the guest) or taken from the TX avail ring
//! (`pop`, inbound from the guest). Every frame is recorded at both points
//! with the same `epb_packetid`, nanosecond timestamps (`if_tsresol` = 9) and
//! `epb_flags` direction bits, so `frame.time_delta` between the two records
//! of one id is vsnoop's own delay for that frame.
//!
//! The data path only copies the frame into a record and hands it to a
//! bounded queue; a writer thread does the file I/O. When the queue is full
//! the record is dropped and counted rather than slowing the guest.
//!
//! Timestamps are CLOCK_MONOTONIC shifted once, at start, to the wall clock,
//! so all records share one clock and readers show calendar times.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness};

use crate::timing::{now_ns, DataPathHook, PacketView, RxStamps, TxStamps};

/// Interface id of the host-side vantage point.
pub const HOST_INTERFACE: u32 = 0;
/// Interface id of the guest-side vantage point.
pub const GUEST_INTERFACE: u32 = 1;
/// `epb_flags` direction: inbound.
pub const FLAG_INBOUND: u32 = 0b01;
/// `epb_flags` direction: outbound.
pub const FLAG_OUTBOUND: u32 = 0b10;
/// Enhanced Packet Block type.
const EPB_TYPE: u32 = 6;
/// `epb_flags` option code.
const OPT_FLAGS: u16 = 2;
/// `epb_packetid` option code (pcap-file 2.0 cannot write it, so packet
/// blocks are encoded here; the section and interface blocks use the crate).
const OPT_PACKET_ID: u16 = 5;
/// Records waiting for the writer before new ones are dropped.
const QUEUE_DEPTH: usize = 16 * 1024;

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

/// One frame seen at both vantage points.
struct Record {
    id: u64,
    /// (interface, timestamp ns since the epoch, epb_flags) per vantage point,
    /// in the order the frame passed them.
    points: [(u32, u64, u32); 2],
    original_len: u32,
    data: Vec<u8>,
}

enum Message {
    Frame(Record),
    Flush(mpsc::Sender<()>),
}

/// A running capture; install it as the data path hook.
pub struct Capture {
    path: PathBuf,
    snaplen: usize,
    queue: SyncSender<Message>,
    next_id: AtomicU64,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
    /// Wall clock minus CLOCK_MONOTONIC, in ns.
    clock_offset: u64,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Capture {
    /// Creates `path` and starts the writer; frames are cut at `snaplen` bytes.
    pub fn start(path: &Path, snaplen: usize) -> Result<Capture, CaptureError> {
        let file = File::create(path).map_err(|e| CaptureError::Create(path.to_path_buf(), e))?;
        let buffered = BufWriter::with_capacity(1 << 20, file);
        let mut writer = PcapNgWriter::with_endianness(buffered, Endianness::Little)
            .map_err(|e| CaptureError::Header(path.to_path_buf(), e.to_string()))?;
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
            writer
                .write_pcapng_block(idb)
                .map_err(|e| CaptureError::Header(path.to_path_buf(), e.to_string()))?;
        }
        let (queue, rx) = mpsc::sync_channel(QUEUE_DEPTH);
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        let display = path.display().to_string();
        let handle = thread::Builder::new()
            .name("vsnoop-capture".into())
            .spawn(move || write_records(writer, rx, &counter, &display))
            .map_err(CaptureError::Thread)?;
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        info!("capturing to {} (snaplen {snaplen})", path.display());
        Ok(Capture {
            path: path.to_path_buf(),
            snaplen,
            queue,
            next_id: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            written,
            clock_offset: wall.wrapping_sub(now_ns()),
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Frames recorded so far (each is two pcapng records).
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Frames dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Path, snaplen and counters.
    pub fn status(&self) -> CaptureStatus {
        CaptureStatus {
            path: self.path.clone(),
            snaplen: self.snaplen,
            frames: self.written(),
            dropped: self.dropped(),
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
            "capture {}: {} frames recorded, {} dropped",
            self.path.display(),
            self.written(),
            self.dropped()
        );
    }

    fn record(&self, packet: &PacketView<'_>, points: [(u32, u64, u32); 2]) {
        let frame_len = packet.len.saturating_sub(packet.hdr_len);
        let mut data = vec![0u8; frame_len.min(self.snaplen)];
        let copied = packet.copy_frame_prefix(&mut data);
        data.truncate(copied);
        let record = Record {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            points: points.map(|(i, t, f)| (i, t.wrapping_add(self.clock_offset), f)),
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

impl DataPathHook for Capture {
    fn rx_published(&self, _queue_pair: usize, packet: &PacketView<'_>, stamps: RxStamps) {
        self.record(
            packet,
            [
                (HOST_INTERFACE, stamps.host_in, FLAG_INBOUND),
                (GUEST_INTERFACE, stamps.ring, FLAG_OUTBOUND),
            ],
        );
    }

    fn tx_sent(&self, _queue_pair: usize, packet: &PacketView<'_>, stamps: TxStamps) {
        self.record(
            packet,
            [
                (GUEST_INTERFACE, stamps.pop, FLAG_INBOUND),
                (HOST_INTERFACE, stamps.host_out, FLAG_OUTBOUND),
            ],
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
}

/// The capture that can be started and stopped while the daemon runs; the
/// data path hook always points here.
pub struct CaptureSlot {
    current: RwLock<Option<Arc<Capture>>>,
}

impl Default for CaptureSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl CaptureSlot {
    /// An empty slot (no capture running).
    pub fn new() -> Self {
        CaptureSlot {
            current: RwLock::new(None),
        }
    }

    fn current(&self) -> Option<Arc<Capture>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts capturing to `path`; a running capture is stopped first.
    pub fn start(&self, path: &Path, snaplen: usize) -> Result<CaptureStatus, CaptureError> {
        let capture = Arc::new(Capture::start(path, snaplen)?);
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
}

fn write_records(
    mut writer: PcapNgWriter<BufWriter<File>>,
    queue: Receiver<Message>,
    written: &AtomicU64,
    path: &str,
) {
    let mut failed = false;
    let mut block = Vec::with_capacity(4096);
    while let Ok(message) = queue.recv() {
        match message {
            Message::Frame(record) if !failed => {
                for (interface, ts, flags) in record.points {
                    block.clear();
                    encode_epb(
                        &mut block,
                        interface,
                        ts,
                        record.original_len,
                        &record.data,
                        flags,
                        record.id,
                    );
                    // Packet blocks go straight to the buffered file: the
                    // section and interface blocks are already written.
                    if let Err(e) = writer.get_mut().write_all(&block) {
                        warn!("capture {path}: write failed, capture stopped: {e}");
                        failed = true;
                        break;
                    }
                }
                if !failed {
                    written.fetch_add(1, Ordering::Relaxed);
                }
            }
            Message::Frame(_) => {}
            Message::Flush(done) => {
                if let Err(e) = writer.get_mut().flush() {
                    warn!("capture {path}: flush failed: {e}");
                }
                let _ = done.send(());
            }
        }
    }
    let _ = writer.get_mut().flush();
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
    use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
    use pcap_file::pcapng::{Block, PcapNgReader};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn records_each_frame_at_both_points_with_one_id() {
        let dir = std::env::temp_dir().join(format!("vsnoop-cap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("unit.pcapng");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut packet = vec![0u8; 12];
        packet.extend((0..100u8).collect::<Vec<_>>());
        mem.write_slice(&packet, GuestAddress(0x1000)).unwrap();
        let segments = [Segment {
            addr: GuestAddress(0x1000),
            len: 112,
        }];
        let view = PacketView {
            mem: &mem,
            segments: &segments,
            len: 112,
            hdr_len: 12,
        };
        let capture = Capture::start(&path, 64).unwrap();
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
}
