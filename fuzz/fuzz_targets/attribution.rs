//! Sequences of frames, each with a direction and timestamp deltas, through
//! the delay attribution with a tiny flow table (so the eviction and
//! "untracked" paths run): matching, sweeping, `snapshot()` and its JSON never
//! panic, and the counters stay consistent. `packet::parse` is also fuzzed on
//! raw bytes, and a frame cut to `PREFIX_LEN` bytes must parse the same as the
//! whole frame whenever it parses at all.
//!
//! Most frames are built from fuzzed header fields drawn from small value sets
//! (a few addresses, ports, sequence numbers, timestamps) so that flows
//! collide and requests find their answers; some are raw fuzz bytes.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vsnoop::attribution::packet::{self, PREFIX_LEN};
use vsnoop::attribution::{AttributionConfig, Attributor, ShapeConfig};
use vsnoop::timing::{RxStamps, TxStamps};

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0x77, 0, 2];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0x77, 0, 1];
const PORTS: [u16; 6] = [22, 53, 80, 5201, 40000, 40001];
/// Frames per run at most (keeps every run short).
const MAX_FRAMES: usize = 512;

/// `parse` on raw bytes; a prefix that parses parses like the whole frame.
fn check_parse(frame: &[u8]) {
    let whole = packet::parse(frame);
    let cut = packet::parse(&frame[..frame.len().min(PREFIX_LEN)]);
    if cut.is_some() {
        assert_eq!(cut, whole, "a cut frame parsed differently");
    }
}

fn ip_addr(v6: bool, host: u8, out: &mut Vec<u8>) {
    if v6 {
        out.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, host]);
    } else {
        out.extend_from_slice(&[10, 77, 0, host]);
    }
}

/// A sequence or acknowledgment number: mostly from a small set near a base
/// (so ranges overlap and ACKs land in them), sometimes anything.
fn seq_number(u: &mut Unstructured) -> Result<u32> {
    Ok(if u.ratio(1, 8)? {
        u.arbitrary()?
    } else {
        1_000_000u32.wrapping_add(u32::from(u.int_in_range(0u16..=64)?) * 500)
    })
}

/// Builds one Ethernet frame from fuzzed fields into `out`; returns the
/// frame's full length (payload bytes beyond the headers are not written,
/// as on the data path, where the attribution only sees a prefix).
fn build_frame(u: &mut Unstructured, to_guest: bool, out: &mut Vec<u8>) -> Result<usize> {
    out.clear();
    if u.ratio(1, 16)? {
        // Raw bytes.
        let len = u.int_in_range(0..=2 * PREFIX_LEN)?;
        out.extend_from_slice(u.bytes(len.min(u.len()))?);
        let frame_len = if u.arbitrary()? {
            u32::from(u.arbitrary::<u16>()?) as usize
        } else {
            out.len()
        };
        return Ok(frame_len);
    }
    let (dst_mac, src_mac) = if to_guest {
        (GUEST_MAC, HOST_MAC)
    } else {
        (HOST_MAC, GUEST_MAC)
    };
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    let vlans = if u.ratio(1, 8)? {
        u.int_in_range(1..=2)?
    } else {
        0
    };
    for _ in 0..vlans {
        out.extend_from_slice(&[0x81, 0x00, 0x00, u.int_in_range(1..=3)?]);
    }
    let v6 = u.ratio(1, 3)?;
    let guest = u.int_in_range(2..=3)?;
    let remote = u.int_in_range(10..=13)?;
    let (src, dst) = if to_guest {
        (remote, guest)
    } else {
        (guest, remote)
    };
    // 0 TCP, 1 UDP, 2 ICMP(v6).
    let l4 = u.int_in_range(0..=2)?;
    let payload_len: usize = match u.int_in_range(0..=4)? {
        0 | 1 => 0,
        2 => u.int_in_range(1..=64)?,
        3 => 1448,
        _ => u.int_in_range(0..=65_000)?,
    };
    let mut l4_header = Vec::with_capacity(60);
    let protocol = match l4 {
        0 => {
            let (sport, dport) = ports(u, to_guest)?;
            l4_header.extend_from_slice(&sport.to_be_bytes());
            l4_header.extend_from_slice(&dport.to_be_bytes());
            l4_header.extend_from_slice(&seq_number(u)?.to_be_bytes());
            l4_header.extend_from_slice(&seq_number(u)?.to_be_bytes());
            let timestamps = u.ratio(2, 3)?;
            let offset: u8 = if timestamps { 8 } else { 5 };
            l4_header.push(offset << 4);
            // FIN, SYN, RST, PSH, ACK: ACK set most of the time.
            let mut flags: u8 = u.arbitrary::<u8>()? & 0x1f;
            if u.ratio(3, 4)? {
                flags = (flags | 0x10) & !0x04;
            }
            l4_header.push(flags);
            l4_header.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
            if timestamps {
                let tsval = 100 + u32::from(u.int_in_range(0u8..=32)?);
                let tsecr = if u.ratio(1, 8)? {
                    0
                } else {
                    100 + u32::from(u.int_in_range(0u8..=32)?)
                };
                l4_header.extend_from_slice(&[1, 1, 8, 10]);
                l4_header.extend_from_slice(&tsval.to_be_bytes());
                l4_header.extend_from_slice(&tsecr.to_be_bytes());
            }
            6
        }
        1 => {
            let (sport, dport) = ports(u, to_guest)?;
            l4_header.extend_from_slice(&sport.to_be_bytes());
            l4_header.extend_from_slice(&dport.to_be_bytes());
            l4_header.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
            l4_header.extend_from_slice(&[0, 0]);
            17
        }
        _ => {
            let request = u.arbitrary::<bool>()?;
            let kind = match (v6, request) {
                _ if u.ratio(1, 16)? => u.arbitrary()?,
                (false, true) => 8,
                (false, false) => 0,
                (true, true) => 128,
                (true, false) => 129,
            };
            l4_header.extend_from_slice(&[kind, 0, 0, 0]);
            l4_header.extend_from_slice(&u16::from(u.int_in_range(0u8..=2)?).to_be_bytes());
            l4_header.extend_from_slice(&u16::from(u.int_in_range(0u8..=16)?).to_be_bytes());
            if v6 {
                58
            } else {
                1
            }
        }
    };
    let l4_len = l4_header.len() + payload_len;
    if v6 {
        out.extend_from_slice(&[0x86, 0xdd]);
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        let len = if u.ratio(1, 16)? {
            u.arbitrary()?
        } else {
            l4_len.min(usize::from(u16::MAX)) as u16
        };
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[protocol, 64]);
        ip_addr(true, src, out);
        ip_addr(true, dst, out);
    } else {
        out.extend_from_slice(&[0x08, 0x00]);
        let total = if u.ratio(1, 16)? {
            u.arbitrary()?
        } else {
            (20 + l4_len).min(usize::from(u16::MAX)) as u16
        };
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&total.to_be_bytes());
        // DF, or now and then a fragment.
        let frag: u16 = if u.ratio(1, 16)? {
            u.arbitrary()?
        } else {
            0x4000
        };
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&frag.to_be_bytes());
        out.extend_from_slice(&[64, protocol, 0, 0]);
        ip_addr(false, src, out);
        ip_addr(false, dst, out);
    }
    out.extend_from_slice(&l4_header);
    // A few payload bytes, never more than the data path would copy.
    let shown = payload_len.min(PREFIX_LEN.saturating_sub(out.len()));
    out.resize(out.len() + shown, 0);
    let frame_len = out.len() - shown + payload_len;
    if u.ratio(1, 16)? {
        // Cut anywhere.
        let cut = u.int_in_range(0..=out.len())?;
        out.truncate(cut);
    }
    Ok(frame_len)
}

/// (source, destination) ports: the guest's from the upper half of
/// [`PORTS`] and the remote's from the lower half, mostly.
fn ports(u: &mut Unstructured, to_guest: bool) -> Result<(u16, u16)> {
    let guest = PORTS[u.int_in_range(3..=5)?];
    let remote = PORTS[u.int_in_range(0..=3)?];
    Ok(if to_guest {
        (remote, guest)
    } else {
        (guest, remote)
    })
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let max_flows = u.int_in_range(1..=8)?;
    let idle_timeout_ns = match u.int_in_range(0..=3)? {
        0 => 1_000_000,
        1 => 1_000_000_000,
        2 => 300_000_000_000,
        _ => u.arbitrary()?,
    };
    let config = AttributionConfig {
        max_flows,
        idle_timeout_ns,
        shape: ShapeConfig {
            delta_ns: u.int_in_range(0..=50_000)?,
            k: u.int_in_range(2..=5)?,
            theta: f64::from(u.int_in_range(1u8..=99)?) / 100.0,
            burst_gap_ns: u.int_in_range(0..=200_000)?,
        },
        record_series: u.arbitrary()?,
        ..AttributionConfig::default()
    };
    let mut a = Attributor::new(config);
    let mut frame = Vec::with_capacity(2 * PREFIX_LEN);
    let mut t: u64 = u.int_in_range(0..=1u64 << 40)?;
    let mut fed = 0u64;
    for i in 0..MAX_FRAMES {
        if u.is_empty() {
            break;
        }
        let header: u8 = u.arbitrary()?;
        let to_guest = header & 1 != 0;
        // Time since the previous frame: mostly small, sometimes long enough
        // to make flows idle, now and then backwards (two queues' frames
        // interleave) or anywhere at all (a crafted capture file).
        t = match header >> 5 {
            0..=3 => t.wrapping_add(u64::from(u.arbitrary::<u16>()?) * 16),
            4 => t.wrapping_add(u64::from(u.arbitrary::<u32>()?)),
            5 => t.wrapping_add(u64::from(u.arbitrary::<u16>()?) << 24),
            6 => t.wrapping_sub(u64::from(u.arbitrary::<u16>()?)),
            _ => u.arbitrary()?,
        };
        let backend = if header & 2 != 0 {
            u64::from(u.arbitrary::<u16>()?)
        } else {
            u64::from(u.arbitrary::<u8>()?) * 1000
        };
        let frame_len = build_frame(&mut u, to_guest, &mut frame)?;
        check_parse(&frame);
        // Usually a later second point; with bit 2 the stamps may be reversed.
        let second = if header & 4 != 0 {
            t.wrapping_sub(backend)
        } else {
            t.saturating_add(backend)
        };
        if to_guest {
            a.on_rx(
                &frame,
                frame_len,
                RxStamps {
                    host_in: t,
                    ring: second,
                },
            );
        } else {
            a.on_tx(
                &frame,
                frame_len,
                TxStamps {
                    kick: t.saturating_sub(backend / 2),
                    pop: t,
                    host_out: second,
                },
            );
        }
        fed += 1;
        let counters = a.counters();
        assert_eq!(counters.packets, fed);
        assert!(counters.packets_other <= fed);
        assert!(counters.flows_tracked <= max_flows as u64);
        if i % 8 == 7 || header & 0x18 == 0x18 {
            let snapshot = a.snapshot();
            assert_eq!(snapshot.packets, fed);
            assert!(snapshot.flows.len() <= max_flows);
            let json = serde_json::to_string(&snapshot).expect("snapshot to JSON");
            assert!(json.starts_with('{'));
        }
    }
    let snapshot = a.snapshot();
    serde_json::to_string(&snapshot).expect("snapshot to JSON");
    let _ = (a.delays(), a.shape(), a.series().len());
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    // The raw input is a frame too.
    check_parse(data);
    let _ = run(data);
});
