//! Cost of the delay attribution per packet (ns), without I/O: the work the
//! data path hook does for each frame after it has copied the frame's first
//! bytes. Run: `cargo bench --bench attribution`.
//!
//! Cases: a bulk TCP flow toward the guest (data segments, then the guest's
//! ACKs), with timestamps; a UDP frame (the DPDK packet-rate benchmark's
//! traffic); and a frame that is not IP (ARP); with 1 and 10 000 flows live.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use etherparse::{PacketBuilder, TcpOptionElement};
use vsnoop::attribution::{AttributionConfig, Attributor};
use vsnoop::timing::{RxStamps, TxStamps};

fn tcp(to_guest: bool, port: u16, seq: u32, ack: u32, len: usize, ts: (u32, u32)) -> Vec<u8> {
    let (src, dst, sport, dport) = if to_guest {
        ([10, 77, 0, 1], [10, 77, 0, 2], port, 5201)
    } else {
        ([10, 77, 0, 2], [10, 77, 0, 1], 5201, port)
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, seq, 64000)
        .ack(ack)
        .options(&[
            TcpOptionElement::Noop,
            TcpOptionElement::Noop,
            TcpOptionElement::Timestamp(ts.0, ts.1),
        ])
        .unwrap()
        .write(&mut out, &vec![0; len])
        .unwrap();
    out.truncate(vsnoop::attribution::packet::PREFIX_LEN);
    out
}

/// An attributor with `flows` live TCP flows (ports 10000..).
fn with_flows(flows: u16) -> Attributor {
    let mut a = Attributor::new(AttributionConfig::default());
    for i in 0..flows {
        let f = tcp(true, 10_000 + i, 0, 0, 100, (1, 1));
        a.on_rx(
            &f,
            1514,
            RxStamps {
                host_in: 1,
                ring: 2,
            },
        );
    }
    a
}

fn bench(c: &mut Criterion) {
    // Frames are built once; the loop patches sequence numbers and
    // timestamps in place (the parser does not check checksums).
    const SEQ: usize = 14 + 20 + 4;
    const ACK: usize = 14 + 20 + 8;
    const TSVAL: usize = 14 + 20 + 20 + 4;
    const TSECR: usize = TSVAL + 4;
    let put = |f: &mut [u8], at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_be_bytes());
    for flows in [1u16, 10_000] {
        let mut a = with_flows(flows);
        let mut data = tcp(true, 10_000, 0, 1, 1448, (0, 7));
        let mut ack = tcp(false, 10_000, 1, 0, 0, (7, 0));
        let mut t = 1_000u64;
        let mut seq = 0u32;
        c.bench_function(
            &format!("tcp data segment + guest ACK, {flows} flows"),
            |b| {
                b.iter(|| {
                    t += 1_000;
                    seq = seq.wrapping_add(1448);
                    let tick = (t / 1_000_000) as u32;
                    put(&mut data, SEQ, seq);
                    put(&mut data, TSVAL, tick);
                    a.on_rx(
                        black_box(&data),
                        1514,
                        RxStamps {
                            host_in: t,
                            ring: t + 200,
                        },
                    );
                    put(&mut ack, ACK, seq.wrapping_add(1448));
                    put(&mut ack, TSECR, tick);
                    a.on_tx(
                        black_box(&ack),
                        66,
                        TxStamps {
                            kick: t + 500,
                            pop: t + 500,
                            host_out: t + 600,
                        },
                    );
                })
            },
        );
    }
    let mut udp = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4([10, 77, 0, 2], [10, 77, 0, 1], 64)
        .udp(9, 9)
        .write(&mut udp, &[0; 18])
        .unwrap();
    let mut a = with_flows(1);
    let mut t = 0u64;
    c.bench_function("udp frame from the guest (64 B)", |b| {
        b.iter(|| {
            t += 500;
            a.on_tx(
                black_box(&udp),
                64,
                TxStamps {
                    kick: t,
                    pop: t,
                    host_out: t + 300,
                },
            );
        })
    });
    let arp = [0u8; 60];
    c.bench_function("non-IP frame", |b| {
        b.iter(|| {
            t += 500;
            a.on_tx(
                black_box(&arp),
                60,
                TxStamps {
                    kick: t,
                    pop: t,
                    host_out: t + 300,
                },
            );
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
