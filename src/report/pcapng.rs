//! Reading a vsnoop capture and pairing the two records of every frame.
//!
//! pcap-file splits the file into blocks (and checks the section and
//! interface headers); the bodies of the blocks vsnoop writes (interface
//! descriptions and enhanced packets) are decoded here. Two reasons: the
//! crate exposes its typed parsers only through a byte-order type parameter
//! from a crate vsnoop does not depend on, and its parsers of other block
//! types (name resolution) can panic on hostile input. Bodies are read with
//! bounds-checked accessors only, so no input makes this module panic.
//!
//! A vsnoop capture has two interfaces, 0 `host` and 1 `guest`, nanosecond
//! timestamps, and every frame twice with one `epb_packetid`: toward the
//! guest a host record (inbound, `host_in`) then a guest record (outbound,
//! `ring`); from the guest a guest record (inbound, `pop`) then a host record
//! (outbound, `host_out`). See `src/export/capture.rs`.

use std::collections::{HashMap, VecDeque};
use std::io::{Cursor, Read};

use anyhow::{anyhow, bail, Result};
use pcap_file::pcapng::blocks::{
    ENHANCED_PACKET_BLOCK, INTERFACE_DESCRIPTION_BLOCK, PACKET_BLOCK, SECTION_HEADER_BLOCK,
    SIMPLE_PACKET_BLOCK,
};
use pcap_file::pcapng::PcapNgReader;
use pcap_file::PcapError;

use crate::timing::{RxStamps, TxStamps};

/// Start of every error about a file that is not a vsnoop capture.
pub const NOT_VSNOOP: &str = "not a vsnoop capture";
/// `if_name` option code.
const OPT_IF_NAME: u16 = 2;
/// `if_tsresol` option code.
const OPT_IF_TSRESOL: u16 = 9;
/// `epb_flags` option code.
const OPT_EPB_FLAGS: u16 = 2;
/// `epb_packetid` option code.
const OPT_EPB_PACKETID: u16 = 5;
/// A record whose partner has not come within this many records is given
/// up (vsnoop writes the two records of a frame back to back).
pub const PAIR_WINDOW: u64 = 1 << 16;

/// Where a record was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vantage {
    /// Interface 0: the tap.
    Host,
    /// Interface 1: guest memory.
    Guest,
}

/// `epb_flags` direction of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Entering vsnoop at this point.
    Inbound,
    /// Leaving vsnoop at this point.
    Outbound,
}

/// One packet record of a vsnoop capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// `epb_packetid`: the same for the two records of one frame.
    pub id: u64,
    /// Interface.
    pub vantage: Vantage,
    /// Timestamp (ns since the epoch).
    pub ts_ns: u64,
    /// Direction bits, when present.
    pub way: Option<Way>,
    /// Frame length before the snaplen cut.
    pub original_len: u32,
    /// Captured bytes.
    pub data: &'a [u8],
}

/// What the reader hands to its caller.
#[derive(Debug)]
pub enum Event<'a> {
    /// A new section begins: packet ids start over.
    Section,
    /// A packet record.
    Record(Record<'a>),
}

/// How reading ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadEnd {
    /// Packet records read.
    pub records: u64,
    /// Sections (a capture has one).
    pub sections: u64,
    /// Why the end of the file was not read, if it was not.
    pub warning: Option<String>,
    /// Bytes kept per frame (the interfaces' `snaplen`; `None`: whole frames).
    pub snaplen: Option<u32>,
}

/// Reads every record of the capture in `input`, in file order. Errors: not
/// pcapng, not a vsnoop capture, a read error. A last block cut short (a
/// capture ended by a crash) or damaged ends reading with a warning.
pub fn read_records<R: Read>(mut input: R, on: &mut dyn FnMut(Event<'_>)) -> Result<ReadEnd> {
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut input, &mut magic)?;
    // Checked before pcap-file sees the file: it would parse any other
    // first block with its own (possibly panicking) parsers.
    if n < 4 || u32::from_le_bytes(magic) != SECTION_HEADER_BLOCK {
        bail!("{NOT_VSNOOP}: not a pcapng file");
    }
    let mut reader = PcapNgReader::new(Cursor::new(magic).chain(input))
        .map_err(|e| anyhow!("{NOT_VSNOOP}: bad pcapng section header ({})", describe(&e)))?;
    let mut state = Blocks::new(is_big_endian(reader.section().endianness));
    let mut end = ReadEnd {
        sections: 1,
        ..ReadEnd::default()
    };
    while let Some(next) = reader.next_raw_block() {
        let raw = match next {
            Ok(raw) => raw,
            Err(PcapError::IoError(e)) if e.kind() != std::io::ErrorKind::UnexpectedEof => {
                return Err(anyhow!(e).context("read error"));
            }
            Err(e) => {
                state.check_interfaces()?;
                end.warning = Some(stop_reason(&e, end.records));
                break;
            }
        };
        if raw.type_ == SECTION_HEADER_BLOCK {
            end.sections += 1;
            on(Event::Section);
        }
        if let Some(record) = state.block(raw.type_, &raw.body, end.records)? {
            end.records += 1;
            on(Event::Record(record));
        }
    }
    state.check_interfaces()?;
    end.snaplen = state.snaplen();
    Ok(end)
}

fn read_up_to<R: Read>(input: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

fn is_big_endian(e: pcap_file::Endianness) -> bool {
    matches!(e, pcap_file::Endianness::Big)
}

/// pcap-file's error, with the I/O error's own words where it has one.
fn describe(e: &PcapError) -> String {
    match e {
        PcapError::IoError(io) => io.to_string(),
        _ => e.to_string(),
    }
}

fn stop_reason(e: &PcapError, records: u64) -> String {
    match e {
        PcapError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => format!(
            "the capture ends with an incomplete block after {records} records \
             (cut short, e.g. by a crash); it was ignored"
        ),
        _ => format!(
            "damaged block after {records} records ({}); the rest of the file was ignored",
            describe(e)
        ),
    }
}

/// An interface description, as far as the report cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Interface {
    name: String,
    tsresol: Option<u8>,
    /// 0: no limit.
    snaplen: u32,
}

/// Per-section decoding state.
struct Blocks {
    big: bool,
    interfaces: Vec<Interface>,
    checked: bool,
}

impl Blocks {
    fn new(big: bool) -> Blocks {
        Blocks {
            big,
            interfaces: Vec::new(),
            checked: false,
        }
    }

    /// Takes one block; returns the packet record it holds, if any.
    fn block<'a>(&mut self, type_: u32, body: &'a [u8], index: u64) -> Result<Option<Record<'a>>> {
        match type_ {
            SECTION_HEADER_BLOCK => {
                self.big = body.get(..4) == Some(&[0x1a, 0x2b, 0x3c, 0x4d]);
                self.interfaces.clear();
                self.checked = false;
                Ok(None)
            }
            INTERFACE_DESCRIPTION_BLOCK => {
                self.interfaces.push(parse_idb(body, self.big));
                self.checked = false;
                Ok(None)
            }
            ENHANCED_PACKET_BLOCK => {
                if !self.checked {
                    self.check_interfaces()?;
                    self.checked = true;
                }
                parse_epb(body, self.big)
                    .map(Some)
                    .map_err(|why| anyhow!("{NOT_VSNOOP}: record {}: {why}", index + 1))
            }
            PACKET_BLOCK | SIMPLE_PACKET_BLOCK => {
                bail!("{NOT_VSNOOP}: it holds packet records without packet ids")
            }
            _ => Ok(None),
        }
    }

    /// The smallest snaplen of the interfaces, if any limits frames.
    fn snaplen(&self) -> Option<u32> {
        self.interfaces
            .iter()
            .map(|i| i.snaplen)
            .filter(|&s| s > 0)
            .min()
    }

    /// A vsnoop capture: interfaces `host` and `guest`, nanosecond stamps.
    fn check_interfaces(&self) -> Result<()> {
        let names: Vec<&str> = self.interfaces.iter().map(|i| i.name.as_str()).collect();
        if names != ["host", "guest"] {
            bail!(
                "{NOT_VSNOOP}: expected two interfaces named host and guest, found {}",
                describe_interfaces(&names)
            );
        }
        for i in &self.interfaces {
            if i.tsresol != Some(9) {
                bail!(
                    "{NOT_VSNOOP}: interface {} does not have nanosecond timestamps (if_tsresol {})",
                    i.name,
                    i.tsresol.map_or("missing".to_string(), |r| r.to_string())
                );
            }
        }
        Ok(())
    }
}

fn describe_interfaces(names: &[&str]) -> String {
    match names.len() {
        0 => "none".to_string(),
        n => format!(
            "{n}: {}",
            names
                .iter()
                .map(|n| if n.is_empty() { "(unnamed)" } else { n })
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn parse_idb(body: &[u8], big: bool) -> Interface {
    let mut interface = Interface {
        snaplen: u32_at(body, 4, big).unwrap_or(0),
        ..Interface::default()
    };
    for (code, value) in options(body.get(8..).unwrap_or(&[]), big) {
        match (code, value) {
            (OPT_IF_NAME, v) => {
                interface.name = String::from_utf8_lossy(v)
                    .trim_end_matches('\0')
                    .to_string()
            }
            (OPT_IF_TSRESOL, [r]) => interface.tsresol = Some(*r),
            _ => {}
        }
    }
    interface
}

fn parse_epb(body: &[u8], big: bool) -> Result<Record<'_>, &'static str> {
    let field = |i: usize| u32_at(body, 4 * i, big);
    let (Some(interface), Some(hi), Some(lo), Some(captured), Some(original_len)) =
        (field(0), field(1), field(2), field(3), field(4))
    else {
        return Err("enhanced packet block shorter than its fixed fields");
    };
    let captured = captured as usize;
    let data = 20usize
        .checked_add(captured)
        .and_then(|end| body.get(20..end))
        .ok_or("captured length beyond the end of the block")?;
    let vantage = match interface {
        0 => Vantage::Host,
        1 => Vantage::Guest,
        _ => return Err("record on an interface other than host and guest"),
    };
    let (mut way, mut id) = (None, None);
    let after_data = body.get(20 + captured.div_ceil(4) * 4..).unwrap_or(&[]);
    for (code, value) in options(after_data, big) {
        match code {
            OPT_EPB_FLAGS => way = u32_at(value, 0, big).and_then(direction),
            OPT_EPB_PACKETID if value.len() == 8 => id = u64_at(value, 0, big),
            _ => {}
        }
    }
    Ok(Record {
        id: id.ok_or("no packet id (epb_packetid)")?,
        vantage,
        ts_ns: (u64::from(hi) << 32) | u64::from(lo),
        way,
        original_len,
        data,
    })
}

fn direction(flags: u32) -> Option<Way> {
    match flags & 0b11 {
        0b01 => Some(Way::Inbound),
        0b10 => Some(Way::Outbound),
        _ => None,
    }
}

/// The (code, value) options in `b`, up to `opt_endofopt` or the first
/// option that does not fit.
fn options(mut b: &[u8], big: bool) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let code = u16_at(b, 0, big)?;
        let len = usize::from(u16_at(b, 2, big)?);
        if code == 0 {
            return None;
        }
        let value = b.get(4..4 + len)?;
        b = b.get(4 + len.div_ceil(4) * 4..).unwrap_or(&[]);
        Some((code, value))
    })
}

fn u16_at(b: &[u8], at: usize, big: bool) -> Option<u16> {
    let bytes: [u8; 2] = b.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(if big {
        u16::from_be_bytes(bytes)
    } else {
        u16::from_le_bytes(bytes)
    })
}

fn u32_at(b: &[u8], at: usize, big: bool) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if big {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_le_bytes(bytes)
    })
}

fn u64_at(b: &[u8], at: usize, big: bool) -> Option<u64> {
    let bytes: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(if big {
        u64::from_be_bytes(bytes)
    } else {
        u64::from_le_bytes(bytes)
    })
}

/// A frame seen at both vantage points, with the stamps the live daemon
/// would have handed to the attributor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paired {
    /// Toward the guest.
    Rx(RxStamps),
    /// From the guest (`kick` = `pop`: the capture does not record kicks).
    Tx(TxStamps),
}

/// Pairing counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PairStats {
    /// Frames toward the guest.
    pub rx: u64,
    /// Frames from the guest.
    pub tx: u64,
    /// Records whose partner never came (skipped).
    pub unpaired: u64,
    /// Pairs whose direction flags contradict each other (skipped).
    pub inconsistent: u64,
}

#[derive(Clone, Copy, Debug)]
struct Half {
    index: u64,
    vantage: Vantage,
    ts_ns: u64,
    way: Option<Way>,
}

/// Matches the two records of each packet id.
#[derive(Debug, Default)]
pub struct Pairer {
    pending: HashMap<u64, Half>,
    /// (record index, id) of pending records, oldest first (may hold ids
    /// already paired: checked on expiry).
    order: VecDeque<(u64, u64)>,
    seen: u64,
    /// Counters so far.
    pub stats: PairStats,
}

impl Pairer {
    /// Takes one record; returns the frame it completes, if any.
    pub fn push(&mut self, r: &Record<'_>) -> Option<Paired> {
        self.seen += 1;
        self.expire();
        let half = Half {
            index: self.seen,
            vantage: r.vantage,
            ts_ns: r.ts_ns,
            way: r.way,
        };
        match self.pending.remove(&r.id) {
            Some(first) if first.vantage != r.vantage => {
                let paired = classify(first, half);
                match paired {
                    Some(Paired::Rx(_)) => self.stats.rx += 1,
                    Some(Paired::Tx(_)) => self.stats.tx += 1,
                    None => self.stats.inconsistent += 1,
                }
                paired
            }
            earlier => {
                // Twice at one point: the earlier record lost its partner.
                self.stats.unpaired += u64::from(earlier.is_some());
                self.pending.insert(r.id, half);
                self.order.push_back((half.index, r.id));
                None
            }
        }
    }

    /// Gives up on records that waited longer than [`PAIR_WINDOW`].
    fn expire(&mut self) {
        while let Some(&(index, id)) = self.order.front() {
            if index + PAIR_WINDOW > self.seen {
                break;
            }
            self.order.pop_front();
            if self.pending.get(&id).is_some_and(|h| h.index == index) {
                self.pending.remove(&id);
                self.stats.unpaired += 1;
            }
        }
    }

    /// Counts every record still waiting as unpaired (end of a section).
    pub fn finish(&mut self) {
        self.stats.unpaired += self.pending.len() as u64;
        self.pending.clear();
        self.order.clear();
    }
}

/// The frame two records of one id describe: the entry point is the record
/// flagged inbound (or, without flags, the one written first).
fn classify(first: Half, second: Half) -> Option<Paired> {
    let (host, guest) = if first.vantage == Vantage::Host {
        (first, second)
    } else {
        (second, first)
    };
    use Way::{Inbound, Outbound};
    let enters_at_host = match (host.way, guest.way) {
        (Some(Inbound), Some(Outbound) | None) | (None, Some(Outbound)) => true,
        (Some(Outbound), Some(Inbound) | None) | (None, Some(Inbound)) => false,
        (None, None) => first.vantage == Vantage::Host,
        _ => return None,
    };
    Some(if enters_at_host {
        Paired::Rx(RxStamps {
            host_in: host.ts_ns,
            ring: guest.ts_ns,
        })
    } else {
        Paired::Tx(TxStamps {
            kick: guest.ts_ns,
            pop: guest.ts_ns,
            host_out: host.ts_ns,
        })
    })
}
