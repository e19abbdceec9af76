//! End-to-end data-path tests without QEMU: vsnoop runs in a private network
//! namespace, the test drives it through `common::frontend` (a vhost-user
//! frontend with its own split-virtqueue driver) and plays the host side of
//! the TAP with an AF_PACKET socket inside the namespace. Every frame is
//! checked byte for byte; hostile descriptors must be counted and dropped
//! while the daemon keeps serving.
//!
//! Run: `cargo test --release --test protocol -- --nocapture` (as root).

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::frontend::*;
use common::{require_tool, Netns, TempDir, Vsnoop};
use vhost::VhostBackend;

const T: Duration = Duration::from_secs(10);
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x01];
const ETHERTYPE_TEST: [u8; 2] = [0x88, 0xb5];
const MAGIC: &[u8; 4] = b"VSNP";
/// Direction tags inside test frames.
const G2T: u8 = 1;
const T2G: u8 = 2;
const PROBE: u8 = 3;
const HDR0: [u8; NET_HDR_LEN] = [0; NET_HDR_LEN];

// ---------------------------------------------------------------------------
// Environment: namespace + daemon + packet socket on the tap
// ---------------------------------------------------------------------------

struct Env {
    port: Option<PacketPort>,
    vs: Vsnoop,
    ns: Netns,
    _dir: TempDir,
    sock: PathBuf,
    tap: String,
    ok: bool,
    connections: usize,
}

impl Env {
    /// Starts `vsnoop --socket SOCK --tap TAP EXTRA...` in a new namespace,
    /// brings the tap up with 10.77.0.1/24 and opens the packet socket.
    fn start(extra: &[&str]) -> Env {
        let ns = quiet_netns("vsp");
        let dir = TempDir::new("proto");
        let sock = dir.join("vsnoop.sock");
        let tap = common::unique("vst");
        let sock_s = sock.to_str().unwrap().to_string();
        let mut args = vec!["--socket", &sock_s, "--tap", &tap];
        args.extend_from_slice(extra);
        let vs = Vsnoop::spawn(&ns, &args, &dir.join("vsnoop.log"));
        let mut env = Env {
            port: None,
            vs,
            ns,
            _dir: dir,
            sock,
            tap,
            ok: false,
            connections: 0,
        };
        if !extra.contains(&"--client") {
            env.vs.wait_for_log("listening on", T);
        }
        env.ns.wait_for_link(&env.tap, T);
        env.ns.exec(&["ip", "link", "set", &env.tap, "up"]);
        env.ns
            .exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", &env.tap]);
        env.port = Some(PacketPort::open(&env.ns.name, &env.tap).expect("packet socket"));
        env
    }

    fn port(&self) -> &PacketPort {
        self.port.as_ref().unwrap()
    }

    /// Connects a frontend and waits for the daemon to log the connection.
    fn connect(&mut self, opts: Options) -> Result<TestFrontend> {
        let fe = TestFrontend::connect(&self.sock, opts)?;
        self.connections += 1;
        self.wait_log_count("frontend connected", self.connections)?;
        Ok(fe)
    }

    fn wait_log_count(&self, needle: &str, n: usize) -> Result<()> {
        let deadline = Instant::now() + T;
        while self.vs.log_text().matches(needle).count() < n {
            ensure!(
                Instant::now() < deadline,
                "vsnoop never logged {needle:?} {n} times"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn assert_alive(&mut self) -> Result<()> {
        if let Some(status) = self.vs.child.try_wait()? {
            bail!("vsnoop died: {status}");
        }
        Ok(())
    }

    fn stats(&mut self) -> HashMap<String, u64> {
        self.vs.stats()
    }

    /// Polls the counters until `key` reaches `want` (fails if it overshoots).
    fn wait_counter(&mut self, key: &str, want: u64) -> Result<HashMap<String, u64>> {
        let deadline = Instant::now() + T;
        loop {
            let s = self.stats();
            let v = get(&s, key)?;
            if v == want {
                return Ok(s);
            }
            ensure!(v < want, "counter {key} is {v}, expected {want}");
            ensure!(
                Instant::now() < deadline,
                "counter {key} stuck at {v}, expected {want}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(mut self) {
        self.assert_alive().unwrap();
        let log = self.vs.log_text();
        assert!(!log.contains("panicked"), "vsnoop panicked:\n{log}");
        self.ok = true;
        let v = VIOLATIONS.with(|v| v.borrow().clone());
        assert!(
            v.is_empty(),
            "data moved correctly, but with spec violations:\n{}",
            v.join("\n")
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !self.ok {
            let log = self.vs.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- vsnoop log (last 60 lines, {}) ----", self.tap);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            eprintln!("---- end of vsnoop log ----");
        }
        self.port = None;
    }
}

/// A new namespace without IPv6 chatter (router solicitations, MLD) on its taps.
fn quiet_netns(prefix: &str) -> Netns {
    let ns = Netns::new(prefix);
    ns.exec(&[
        "sh",
        "-c",
        "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 \
         /proc/sys/net/ipv6/conf/default/disable_ipv6; do \
         [ -e $f ] && echo 1 > $f; done; true",
    ]);
    ns
}

fn get(s: &HashMap<String, u64>, key: &str) -> Result<u64> {
    s.get(key)
        .copied()
        .with_context(|| format!("counter {key} missing from stats {s:?}"))
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

fn test_frame(
    dst: [u8; 6],
    src: [u8; 6],
    dir: u8,
    seq: u32,
    len: usize,
    rng: &mut StdRng,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE_TEST);
    f.extend_from_slice(MAGIC);
    f.push(dir);
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push(rng.gen());
    }
    f
}

/// (direction, seq) of a test frame.
fn tag(frame: &[u8]) -> Option<(u8, u32)> {
    if frame.len() < 23 || frame[12..14] != ETHERTYPE_TEST || &frame[14..18] != MAGIC {
        return None;
    }
    Some((
        frame[18],
        u32::from_be_bytes(frame[19..23].try_into().unwrap()),
    ))
}

fn random_split(rng: &mut StdRng, total: usize) -> Vec<usize> {
    let k = rng.gen_range(0..4);
    (0..k)
        .map(|_| rng.gen_range(1..=total.max(2) / 2))
        .collect()
}

#[derive(Clone, Copy)]
struct Traffic {
    pair: usize,
    count: usize,
    min_len: usize,
    max_len: usize,
    indirect: bool,
    random_split: bool,
    window: usize,
}

impl Traffic {
    fn new(count: usize) -> Traffic {
        Traffic {
            pair: 0,
            count,
            min_len: 24,
            max_len: 1514,
            indirect: false,
            random_split: true,
            window: 32,
        }
    }
}

/// Guest -> tap: sends `t.count` frames on the TX ring and captures each one
/// on the tap, in order, byte for byte. Returns (frames, bytes).
fn guest_to_tap(
    env: &Env,
    fe: &mut TestFrontend,
    t: Traffic,
    rng: &mut StdRng,
) -> Result<(u64, u64)> {
    let mut seq = rng.gen::<u32>() & 0x7fff_ffff;
    let mut bytes = 0;
    let mut sent = 0;
    while sent < t.count {
        let n = t.window.min(t.count - sent);
        let mut expect = Vec::new();
        for _ in 0..n {
            let len = rng.gen_range(t.min_len..=t.max_len);
            let f = test_frame([0xff; 6], GUEST_MAC, G2T, seq, len, rng);
            seq = seq.wrapping_add(1);
            let split = if t.random_split {
                random_split(rng, len + NET_HDR_LEN)
            } else {
                vec![]
            };
            fe.send(t.pair, &HDR0, &f, &split, t.indirect, T)?;
            bytes += f.len() as u64;
            expect.push(f);
        }
        for (i, want) in expect.iter().enumerate() {
            let got = loop {
                let f = env.port().recv(T).with_context(|| {
                    format!(
                        "frame {} of {} (len {}) never reached the tap",
                        sent + i,
                        t.count,
                        want.len()
                    )
                })?;
                match tag(&f) {
                    Some((G2T, _)) => break f,
                    _ => eprintln!("tap: ignoring unrelated frame of {} bytes", f.len()),
                }
            };
            if got != *want {
                bail!(
                    "guest->tap frame {} differs: sent {} bytes tag {:?}, captured {} bytes tag {:?}, first difference at {:?}",
                    sent + i,
                    want.len(),
                    tag(want),
                    got.len(),
                    tag(&got),
                    want.iter().zip(got.iter()).position(|(a, b)| a != b)
                );
            }
        }
        sent += n;
    }
    fe.flush_tx(t.pair, T)?;
    Ok((sent as u64, bytes))
}

thread_local! {
    static VIOLATIONS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Records a non-fatal spec violation (once per message) for [`Env::finish`].
fn violation(msg: String) {
    VIOLATIONS.with(|v| {
        let mut v = v.borrow_mut();
        if !v.contains(&msg) {
            eprintln!("SPEC VIOLATION: {msg}");
            v.push(msg);
        }
    });
}

/// Checks the virtio-net header of a received packet.
fn check_rx_hdr(fe: &TestFrontend, p: &RxPacket) -> Result<()> {
    if fe.acked & F_GUEST_CSUM == 0 {
        ensure!(
            p.hdr[0] == 0 && p.hdr[1] == 0,
            "RX header flags {:#x} gso_type {:#x} without GUEST_CSUM",
            p.hdr[0],
            p.hdr[1]
        );
    }
    if fe.mrg() {
        ensure!(
            p.num_buffers() as usize == p.buffers,
            "num_buffers {} but {} buffers used",
            p.num_buffers(),
            p.buffers
        );
    } else {
        if p.num_buffers() != 1 {
            // A spec violation that Linux guests tolerate: recorded, reported
            // when the test ends, so the rest of the data path is still checked.
            violation(format!(
                "RX num_buffers is {} without MRG_RXBUF; virtio 1.x requires 1 \
                 (\"the device MUST set num_buffers to 1 if VIRTIO_NET_F_MRG_RXBUF has not been negotiated\")",
                p.num_buffers()
            ));
        }
    }
    Ok(())
}

/// Receives the next test frame with direction `dir`, skipping probes and
/// unrelated frames.
fn recv_test_frame(fe: &mut TestFrontend, pair: usize, dir: u8) -> Result<(Vec<u8>, RxPacket)> {
    loop {
        let p = fe.recv(pair, T)?;
        check_rx_hdr(fe, &p)?;
        match tag(&p.frame) {
            Some((d, _)) if d == dir => return Ok((p.frame.clone(), p)),
            Some((PROBE, _)) => continue,
            _ => eprintln!("guest: ignoring unrelated frame of {} bytes", p.frame.len()),
        }
    }
}

/// Tap -> guest: injects frames on the tap and reads them from the RX ring,
/// in order, byte for byte. Returns (frames, bytes, buffers used).
fn tap_to_guest(
    env: &Env,
    fe: &mut TestFrontend,
    t: Traffic,
    rng: &mut StdRng,
) -> Result<(u64, u64, usize)> {
    let mut seq = rng.gen::<u32>() & 0x7fff_ffff;
    let mut bytes = 0;
    let mut done = 0;
    let mut buffers = 0;
    while done < t.count {
        let n = t.window.min(t.count - done);
        let mut expect = Vec::new();
        for _ in 0..n {
            let len = rng.gen_range(t.min_len..=t.max_len);
            let f = test_frame(GUEST_MAC, HOST_MAC, T2G, seq, len, rng);
            seq = seq.wrapping_add(1);
            env.port().send(&f)?;
            bytes += f.len() as u64;
            expect.push(f);
        }
        for (i, want) in expect.iter().enumerate() {
            let (got, p) = recv_test_frame(fe, t.pair, T2G)
                .with_context(|| format!("tap->guest frame {} of {}", done + i, t.count))?;
            buffers += p.buffers;
            if got != *want {
                bail!(
                    "tap->guest frame {} differs: sent {} bytes tag {:?}, received {} bytes tag {:?}, first difference at {:?}",
                    done + i,
                    want.len(),
                    tag(want),
                    got.len(),
                    tag(&got),
                    want.iter().zip(got.iter()).position(|(a, b)| a != b)
                );
            }
        }
        done += n;
    }
    Ok((done as u64, bytes, buffers))
}

/// Both directions, checking the packet and byte counters against what moved.
fn both_ways(env: &mut Env, fe: &mut TestFrontend, t: Traffic, rng: &mut StdRng) -> Result<()> {
    let s0 = env.stats();
    let (tx_n, tx_b) = guest_to_tap(env, fe, t, rng).context("guest -> tap")?;
    let (rx_n, rx_b, bufs) = tap_to_guest(env, fe, t, rng).context("tap -> guest")?;
    let s1 = env.wait_counter("rx_packets", get(&s0, "rx_packets")? + rx_n)?;
    let s1 = if get(&s1, "tx_packets")? != get(&s0, "tx_packets")? + tx_n {
        env.wait_counter("tx_packets", get(&s0, "tx_packets")? + tx_n)?
    } else {
        s1
    };
    let d = |k: &str| -> Result<u64> { Ok(get(&s1, k)? - get(&s0, k)?) };
    ensure!(
        d("tx_bytes")? == tx_b,
        "tx_bytes moved {} for {tx_b} bytes sent",
        d("tx_bytes")?
    );
    ensure!(
        d("rx_bytes")? == rx_b,
        "rx_bytes moved {} for {rx_b} bytes received",
        d("rx_bytes")?
    );
    for k in s1.keys().filter(|k| k.contains("drop")) {
        ensure!(
            d(k)? == 0,
            "drop counter {k} moved by {} during clean traffic",
            d(k)?
        );
    }
    eprintln!(
        "pair {}: {tx_n} frames / {tx_b} B guest->tap, {rx_n} frames / {rx_b} B tap->guest in {bufs} RX buffers",
        t.pair
    );
    Ok(())
}

/// A few frames each way: "traffic still flows".
fn still_flows(env: &mut Env, fe: &mut TestFrontend, rng: &mut StdRng) -> Result<()> {
    let t = Traffic {
        window: 4,
        ..Traffic::new(4)
    };
    guest_to_tap(env, fe, t, rng).context("guest -> tap afterwards")?;
    tap_to_guest(env, fe, t, rng).context("tap -> guest afterwards")?;
    Ok(())
}

fn opts(features: u64, order: Order) -> Options {
    Options {
        features,
        order,
        ..Options::default()
    }
}

// ---------------------------------------------------------------------------
// Data path
// ---------------------------------------------------------------------------

#[test]
fn spec_order_plain_rings_both_ways() -> Result<()> {
    let mut env = Env::start(&[]);
    let mut rng = StdRng::seed_from_u64(1);
    let mut fe = env.connect(opts(0, Order::Spec))?;
    // Scattered RX buffers: header and data in separate descriptors.
    fe.fill_rx(0, &[12, 700, 814], false)?;
    both_ways(&mut env, &mut fe, Traffic::new(300), &mut rng)?;
    env.finish();
    Ok(())
}

#[test]
fn qemu72_order_mrg_event_idx_both_ways() -> Result<()> {
    let mut env = Env::start(&[]);
    let mut rng = StdRng::seed_from_u64(2);
    let features = F_MRG_RXBUF | F_EVENT_IDX;
    let mut fe = env.connect(opts(features, Order::Qemu72))?;
    eprintln!("requests sent: {:?}", fe.sent);
    fe.fill_rx(0, &[1536], false)?;
    both_ways(&mut env, &mut fe, Traffic::new(300), &mut rng)?;
    env.finish();
    Ok(())
}

#[test]
fn mergeable_rx_small_buffers() -> Result<()> {
    let mut env = Env::start(&[]);
    let mut rng = StdRng::seed_from_u64(3);
    let mut fe = env.connect(opts(F_MRG_RXBUF, Order::Spec))?;
    // 256-byte buffers: full-size frames span 6 buffers.
    fe.fill_rx(0, &[256], false)?;
    let t = Traffic {
        min_len: 1000,
        window: 16,
        ..Traffic::new(100)
    };
    let (n, _, bufs) = tap_to_guest(&env, &mut fe, t, &mut rng)?;
    ensure!(
        bufs as u64 >= 4 * n,
        "only {bufs} buffers for {n} frames of >= 1000 bytes"
    );
    // Mixed sizes, two-descriptor buffers smaller than a header + frame.
    fe.rxq(0).rx_layout = Some((vec![8, 92], false));
    both_ways(&mut env, &mut fe, Traffic::new(200), &mut rng)?;
    env.finish();
    Ok(())
}

#[test]
fn event_idx_indirect_many_frames() -> Result<()> {
    let mut env = Env::start(&[]);
    let mut rng = StdRng::seed_from_u64(4);
    let features = F_MRG_RXBUF | F_EVENT_IDX | F_INDIRECT_DESC;
    let mut fe = env.connect(opts(features, Order::Spec))?;
    fe.fill_rx(0, &[12, 500, 1024], true)?;
    let t = Traffic {
        indirect: true,
        window: 64,
        ..Traffic::new(2000)
    };
    both_ways(&mut env, &mut fe, t, &mut rng)?;
    let txq = fe.txq(0);
    eprintln!(
        "TX ring: {} kicks, {} suppressed by EVENT_IDX",
        txq.kicks, txq.suppressed_kicks
    );
    // Same without MRG_RXBUF on a second connection.
    drop(fe);
    let mut fe = env.connect(opts(F_EVENT_IDX | F_INDIRECT_DESC, Order::Qemu72))?;
    fe.fill_rx(0, &[12, 1514], true)?;
    both_ways(
        &mut env,
        &mut fe,
        Traffic {
            indirect: true,
            ..Traffic::new(500)
        },
        &mut rng,
    )?;
    env.finish();
    Ok(())
}

#[test]
fn rx_buffers_posted_before_the_ring_starts() -> Result<()> {
    // Like a Linux guest: RX buffers are posted (and kicked) before the
    // backend gets the kick eventfd.
    let mut env = Env::start(&[]);
    let mut rng = StdRng::seed_from_u64(5);
    let mut fe = env.connect(opts(F_MRG_RXBUF | F_EVENT_IDX, Order::Qemu72))?;
    fe.fill_rx(0, &[2048], false)?;
    both_ways(&mut env, &mut fe, Traffic::new(50), &mut rng)?;
    env.finish();
    Ok(())
}

#[test]
fn kernel_stack_arp_and_ping() -> Result<()> {
    let mut env = Env::start(&[]);
    let mut fe = env.connect(opts(F_MRG_RXBUF, Order::Spec))?;
    fe.fill_rx(0, &[1536], false)?;
    let guest_ip = [10, 77, 0, 2];
    let host_ip = [10, 77, 0, 1];
    // ARP who-has 10.77.0.1 tell 10.77.0.2
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&guest_ip);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&host_ip);
    fe.send_frame(0, &arp)?;
    let tap_mac: [u8; 6] = loop {
        let p = fe
            .recv(0, T)
            .context("no ARP reply from the namespace's kernel")?;
        check_rx_hdr(&fe, &p)?;
        let f = &p.frame;
        if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
            ensure!(f[0..6] == GUEST_MAC, "ARP reply not addressed to the guest");
            ensure!(f[28..32] == host_ip, "ARP reply for the wrong address");
            break f[22..28].try_into().unwrap();
        }
    };
    // ICMP echo request with a 1000-byte payload.
    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(&payload);
    let c = inet_csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = 20 + icmp.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        1,
        0,
        0,
    ];
    ip.extend_from_slice(&guest_ip);
    ip.extend_from_slice(&host_ip);
    let c = inet_csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&tap_mac);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    fe.send(0, &HDR0, &frame, &[12, 14, 20], false, T)?;
    loop {
        let p = fe.recv(0, T).context("no ICMP echo reply")?;
        check_rx_hdr(&fe, &p)?;
        let f = &p.frame;
        if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] {
            // The kernel asks for our MAC: answer.
            let mut r = Vec::new();
            r.extend_from_slice(&tap_mac);
            r.extend_from_slice(&GUEST_MAC);
            r.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
            r.extend_from_slice(&GUEST_MAC);
            r.extend_from_slice(&guest_ip);
            r.extend_from_slice(&tap_mac);
            r.extend_from_slice(&host_ip);
            fe.send_frame(0, &r)?;
            continue;
        }
        if f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[23] == 1 {
            let ihl = (f[14] & 0xf) as usize * 4;
            let icmp_r = &f[14 + ihl..];
            ensure!(
                icmp_r[0] == 0,
                "ICMP type {} instead of echo reply",
                icmp_r[0]
            );
            ensure!(inet_csum(icmp_r) == 0, "bad ICMP checksum in the reply");
            ensure!(
                inet_csum(&f[14..14 + ihl]) == 0,
                "bad IP checksum in the reply"
            );
            ensure!(icmp_r[8..] == payload[..], "echo payload differs");
            break;
        }
    }
    env.finish();
    Ok(())
}

fn inet_csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn two_queue_pairs() -> Result<()> {
    let mut env = Env::start(&["--queues", "2"]);
    let mut rng = StdRng::seed_from_u64(6);
    let o = Options {
        queue_pairs: 2,
        ..opts(F_MRG_RXBUF | F_EVENT_IDX | F_MQ, Order::Spec)
    };
    let mut fe = env.connect(o)?;
    fe.fill_rx(0, &[1536], false)?;
    fe.fill_rx(1, &[1536], false)?;
    let s0 = env.stats();
    for pair in 0..2 {
        guest_to_tap(
            &env,
            &mut fe,
            Traffic {
                pair,
                ..Traffic::new(100)
            },
            &mut rng,
        )
        .with_context(|| format!("TX pair {pair}"))?;
    }
    // The tap picks the queue: collect tap->guest frames from both RX rings.
    let mut expect = HashMap::new();
    for seq in 0..64u32 {
        let len = rng.gen_range(60..1514);
        let f = test_frame(GUEST_MAC, HOST_MAC, T2G, seq, len, &mut rng);
        env.port().send(&f)?;
        expect.insert(seq, f);
    }
    let deadline = Instant::now() + T;
    let mut per_pair = [0; 2];
    while !expect.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "{} frames never arrived on either RX ring",
            expect.len()
        );
        let mut got_any = false;
        for pair in 0..2 {
            let vq = fe.rxq(pair);
            if vq.used_idx() == vq.last_used() {
                continue;
            }
            got_any = true;
            let p = fe.recv(pair, T)?;
            check_rx_hdr(&fe, &p)?;
            if let Some((T2G, seq)) = tag(&p.frame) {
                let want = expect
                    .remove(&seq)
                    .with_context(|| format!("duplicate frame {seq}"))?;
                ensure!(want == p.frame, "frame {seq} differs on RX ring {pair}");
                if let Some(c) = per_pair.get_mut(pair) {
                    *c += 1;
                }
            }
        }
        if !got_any {
            thread::sleep(Duration::from_millis(2));
        }
    }
    eprintln!("tap->guest frames per RX ring: {per_pair:?}");
    let s1 = env.wait_counter("rx_packets", get(&s0, "rx_packets")? + 64)?;
    ensure!(
        get(&s1, "tx_packets")? - get(&s0, "tx_packets")? == 200,
        "tx_packets"
    );
    env.finish();
    Ok(())
}

// ---------------------------------------------------------------------------
// Hostile descriptors
// ---------------------------------------------------------------------------

/// Waits until the sum of `keys` moved by exactly one since `before`.
fn expect_drop(
    env: &mut Env,
    before: &HashMap<String, u64>,
    keys: &[&str],
    what: &str,
) -> Result<()> {
    let sum = |s: &HashMap<String, u64>| -> Result<u64> { keys.iter().map(|k| get(s, k)).sum() };
    let want = sum(before)? + 1;
    let deadline = Instant::now() + T;
    loop {
        env.assert_alive()
            .with_context(|| format!("after {what}"))?;
        let s = env.stats();
        let v = sum(&s)?;
        if v == want {
            // No other drop counter may have moved.
            for (k, val) in s
                .iter()
                .filter(|(k, _)| k.contains("drop") || *k == "bad_head_index")
            {
                if !keys.contains(&k.as_str()) {
                    ensure!(
                        *val == get(before, k)?,
                        "{what}: unexpected counter {k} moved ({} -> {val}) instead of {keys:?}",
                        get(before, k)?
                    );
                }
            }
            return Ok(());
        }
        ensure!(
            v < want,
            "{what}: {keys:?} moved by {} (expected 1)",
            v + 1 - want
        );
        ensure!(
            Instant::now() < deadline,
            "{what}: none of {keys:?} moved; counters now {s:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

type Build = Box<dyn Fn(&mut Vq) -> (u16, Chain)>;

/// One descriptor (direct) pointing at `addr`/`len`.
fn one(addr: u64, len: u32, flags: u16) -> Build {
    Box::new(move |vq: &mut Vq| {
        let d = vq.alloc_descs(1).unwrap();
        vq.write_desc(d[0], addr, len, flags, 0);
        (
            d[0],
            Chain {
                descs: d,
                hostile: true,
                ..Chain::default()
            },
        )
    })
}

fn tx_payload() -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(99);
    let mut v = HDR0.to_vec();
    v.extend(test_frame([0xff; 6], GUEST_MAC, PROBE, 0, 100, &mut rng));
    v
}

/// An indirect descriptor whose table (entries as (addr, len, flags, next))
/// is written into guest memory; `table_len` overrides the length.
fn indirect(
    entries: Vec<(u64, u32, u16, u16)>,
    table_len: Option<u32>,
    table_addr: Option<u64>,
) -> Build {
    Box::new(move |vq: &mut Vq| {
        let mut chain = Chain {
            hostile: true,
            ..Chain::default()
        };
        let table = vq.mem().alloc(16 * entries.len().max(1), 16).unwrap();
        chain.allocs.push(table);
        for (i, &(a, l, f, n)) in entries.iter().enumerate() {
            write_desc_at(vq.mem(), table + 16 * i as u64, a, l, f, n);
        }
        let d = vq.alloc_descs(1).unwrap();
        vq.write_desc(
            d[0],
            table_addr.unwrap_or(table),
            table_len.unwrap_or(16 * entries.len() as u32),
            DESC_F_INDIRECT,
            0,
        );
        chain.descs = d;
        (chain.descs[0], chain)
    })
}

/// A data buffer address inside guest memory for hand-made tables.
fn scratch(fe: &TestFrontend, data: &[u8]) -> u64 {
    let a = fe.mem.alloc(data.len(), 8).unwrap();
    fe.mem.write(a, data);
    a
}

fn publish_hostile(vq: &mut Vq, build: &Build) -> u16 {
    let (head, chain) = build(vq);
    vq.publish(head, chain);
    vq.notify();
    head
}

/// Lets a hostile chain the device did not return go (after a grace period).
fn settle_hostile_tx(fe: &mut TestFrontend, head: u16) -> Result<bool> {
    let deadline = Instant::now() + Duration::from_millis(300);
    loop {
        fe.reap_tx(0)?;
        if !fe.txq(0).inflight.contains_key(&head) {
            return Ok(true);
        }
        if Instant::now() > deadline {
            fe.txq(0).forget(head);
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn hostile_tx_descriptors_are_counted_and_dropped() -> Result<()> {
    let mut env = Env::start(&[]);
    let mut rng = StdRng::seed_from_u64(7);
    let mut fe = env.connect(opts(F_MRG_RXBUF | F_INDIRECT_DESC, Order::Spec))?;
    fe.fill_rx(0, &[1536], false)?;
    still_flows(&mut env, &mut fe, &mut rng)?;

    let end = fe.mem.end();
    let base = fe.mem.gpa_base;
    let size = fe.opts.queue_size;
    let p = tx_payload();
    let good = scratch(&fe, &p);
    let plen = p.len() as u32;
    let hdr = scratch(&fe, &HDR0);
    let data = scratch(&fe, &p[NET_HDR_LEN..]);
    let dlen = plen - NET_HDR_LEN as u32;
    let big = {
        let mut v = HDR0.to_vec();
        v.resize(NET_HDR_LEN + 70_000, 0x5a);
        scratch(&fe, &v)
    };
    let big_chunks = {
        let mut v = HDR0.to_vec();
        v.resize(NET_HDR_LEN + 66_000, 0x3c);
        scratch(&fe, &v)
    };
    let nested_table = {
        let mut t = [0u8; 16];
        t[0..8].copy_from_slice(&good.to_le_bytes());
        t[8..12].copy_from_slice(&plen.to_le_bytes());
        scratch(&fe, &t)
    };

    const BAD_CHAIN: &str = "tx_drop_bad_chain";
    const BAD_ADDR: &str = "tx_drop_bad_address";
    let cases: Vec<(&str, Vec<&str>, Build)> = vec![
        (
            "buffer above guest memory",
            vec![BAD_ADDR],
            one(end + 0x10000, plen, 0),
        ),
        (
            "buffer below guest memory",
            vec![BAD_ADDR],
            one(0x1000, plen, 0),
        ),
        ("buffer at address 0", vec![BAD_ADDR], one(0, plen, 0)),
        (
            "buffer crossing the end of guest memory",
            vec![BAD_ADDR],
            one(end - 64, 4096, 0),
        ),
        ("buffer just past the end", vec![BAD_ADDR], one(end, 64, 0)),
        (
            "address + length overflows u64",
            vec![BAD_ADDR],
            one(u64::MAX - 15, 64, 0),
        ),
        (
            "4 GiB length running past the end of guest memory",
            vec![BAD_ADDR],
            one(base + 0x100, u32::MAX, 0),
        ),
        (
            "valid header, data outside guest memory",
            vec![BAD_ADDR],
            Box::new(move |vq: &mut Vq| {
                let d = vq.alloc_descs(2).unwrap();
                vq.write_desc(d[0], hdr, NET_HDR_LEN as u32, DESC_F_NEXT, d[1]);
                vq.write_desc(d[1], end + 4096, dlen, 0, 0);
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "two-descriptor loop",
            vec![BAD_CHAIN],
            Box::new(move |vq: &mut Vq| {
                let d = vq.alloc_descs(2).unwrap();
                vq.write_desc(d[0], hdr, NET_HDR_LEN as u32, DESC_F_NEXT, d[1]);
                vq.write_desc(d[1], data, dlen, DESC_F_NEXT, d[0]);
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "descriptor chained to itself",
            vec![BAD_CHAIN],
            Box::new(move |vq: &mut Vq| {
                let d = vq.alloc_descs(1).unwrap();
                vq.write_desc(d[0], good, plen, DESC_F_NEXT, d[0]);
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "next index beyond the queue",
            vec![BAD_CHAIN],
            Box::new(move |vq: &mut Vq| {
                let d = vq.alloc_descs(1).unwrap();
                vq.write_desc(d[0], good, plen, DESC_F_NEXT, size + 5);
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "loop through every free descriptor (chain longer than the queue)",
            vec![BAD_CHAIN],
            Box::new(move |vq: &mut Vq| {
                let n = vq.num_free() - 8;
                let d = vq.alloc_descs(n).unwrap();
                for i in 0..n {
                    let (a, l) = if i == 0 {
                        (hdr, NET_HDR_LEN as u32)
                    } else {
                        (data, 1)
                    };
                    vq.write_desc(d[i], a, l, DESC_F_NEXT, d[(i + 1) % n]);
                }
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "device-writable buffer on TX",
            vec!["tx_drop_writable_buffer"],
            Box::new(move |vq: &mut Vq| {
                let d = vq.alloc_descs(2).unwrap();
                vq.write_desc(d[0], hdr, NET_HDR_LEN as u32, DESC_F_NEXT, d[1]);
                vq.write_desc(d[1], data, dlen, DESC_F_WRITE, 0);
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "8-byte chain (short vnet header)",
            vec!["tx_drop_short_header"],
            one(good, 8, 0),
        ),
        (
            "11-byte chain (short vnet header)",
            vec!["tx_drop_short_header"],
            one(good, 11, 0),
        ),
        (
            "zero-length descriptor",
            vec!["tx_drop_short_header", BAD_CHAIN],
            one(good, 0, 0),
        ),
        (
            "70000-byte frame",
            vec!["tx_drop_too_large"],
            one(big, NET_HDR_LEN as u32 + 70_000, 0),
        ),
        (
            "66000-byte frame in 17 descriptors",
            vec!["tx_drop_too_large"],
            Box::new(move |vq: &mut Vq| {
                let total = NET_HDR_LEN as u32 + 66_000;
                let n = total.div_ceil(4096) as usize;
                let d = vq.alloc_descs(n).unwrap();
                for i in 0..n {
                    let off = 4096 * i as u32;
                    let l = (total - off).min(4096);
                    let (f, next) = if i + 1 < n {
                        (DESC_F_NEXT, d[i + 1])
                    } else {
                        (0, 0)
                    };
                    vq.write_desc(d[i], big_chunks + off as u64, l, f, next);
                }
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "indirect table outside guest memory",
            vec![BAD_ADDR, BAD_CHAIN],
            indirect(vec![(good, plen, 0, 0)], None, Some(end + 0x20000)),
        ),
        (
            "indirect table length not a multiple of 16",
            vec![BAD_CHAIN],
            indirect(
                vec![(hdr, 12, DESC_F_NEXT, 1), (data, dlen, 0, 0)],
                Some(24),
                None,
            ),
        ),
        (
            "zero-length indirect table",
            vec![BAD_CHAIN],
            indirect(vec![(good, plen, 0, 0)], Some(0), None),
        ),
        (
            "nested indirect descriptor",
            vec![BAD_CHAIN],
            indirect(vec![(nested_table, 16, DESC_F_INDIRECT, 0)], None, None),
        ),
        (
            "loop inside an indirect table",
            vec![BAD_CHAIN],
            indirect(
                vec![(hdr, 12, DESC_F_NEXT, 1), (data, dlen, DESC_F_NEXT, 0)],
                None,
                None,
            ),
        ),
        (
            "indirect next index beyond the table",
            vec![BAD_CHAIN],
            indirect(
                vec![(hdr, 12, DESC_F_NEXT, 7), (data, dlen, 0, 0)],
                None,
                None,
            ),
        ),
        (
            "indirect entry outside guest memory",
            vec![BAD_ADDR],
            indirect(
                vec![(hdr, 12, DESC_F_NEXT, 1), (end + 8192, dlen, 0, 0)],
                None,
                None,
            ),
        ),
        (
            "writable entry in an indirect TX table",
            vec!["tx_drop_writable_buffer"],
            indirect(
                vec![(hdr, 12, DESC_F_NEXT, 1), (data, dlen, DESC_F_WRITE, 0)],
                None,
                None,
            ),
        ),
    ];

    let mut failures = Vec::new();
    for (what, keys, build) in &cases {
        let before = env.stats();
        let head = publish_hostile(fe.txq(0), build);
        let r = (|| -> Result<()> {
            expect_drop(&mut env, &before, keys, what)?;
            let returned = settle_hostile_tx(&mut fe, head)?;
            // The hostile frame must not have reached the tap.
            while let Some(f) = env.port().recv(Duration::from_millis(50)) {
                ensure!(
                    !matches!(tag(&f), Some((PROBE, _))),
                    "{what}: the dropped frame reached the tap"
                );
            }
            still_flows(&mut env, &mut fe, &mut rng).with_context(|| format!("after {what}"))?;
            eprintln!("ok: {what} -> {keys:?} (chain returned in used ring: {returned})");
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("FAILED: {what}: {e:#}");
            failures.push(format!("{what}: {e:#}"));
            env.assert_alive().context("vsnoop died")?;
            // Resynchronise: forget the chain and keep going if traffic flows.
            fe.txq(0).forget(head);
            if still_flows(&mut env, &mut fe, &mut rng).is_err() {
                failures.push(format!("{what}: traffic does not flow anymore; stopping"));
                break;
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} hostile TX cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    env.finish();
    Ok(())
}

#[test]
fn hostile_rx_descriptors_are_counted_and_dropped() -> Result<()> {
    let mut env = Env::start(&[]);
    let mut rng = StdRng::seed_from_u64(8);
    let o = opts(F_INDIRECT_DESC, Order::Spec);
    let o_mrg = opts(F_INDIRECT_DESC | F_MRG_RXBUF, Order::Spec);
    // Addresses are the same in every connection's fresh guest memory.
    let w = o.gpa_base + (o.mem_size as u64) / 2;
    let end = o.gpa_base + o.mem_size as u64;
    // (what, expected counters, features, probe frame length, hostile chain)
    let cases: Vec<(&str, Vec<&str>, &Options, usize, Build)> = vec![
        (
            "device-readable RX buffer",
            vec!["rx_drop_readonly_buffer"],
            &o,
            200,
            one(w, 2048, 0),
        ),
        (
            "readable header then writable data",
            vec!["rx_drop_readonly_buffer"],
            &o,
            200,
            Box::new(move |vq: &mut Vq| {
                let d = vq.alloc_descs(2).unwrap();
                vq.write_desc(d[0], w, 12, DESC_F_NEXT, d[1]);
                vq.write_desc(d[1], w + 64, 1600, DESC_F_WRITE, 0);
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "device-readable RX buffer (MRG_RXBUF)",
            vec!["rx_drop_readonly_buffer"],
            &o_mrg,
            200,
            one(w, 2048, 0),
        ),
        (
            "RX buffer outside guest memory",
            vec!["rx_drop_bad_address"],
            &o,
            200,
            one(end + 4096, 2048, DESC_F_WRITE),
        ),
        (
            "RX buffer crossing the end of guest memory",
            vec!["rx_drop_bad_address"],
            &o,
            200,
            one(end - 100, 2048, DESC_F_WRITE),
        ),
        (
            "RX buffer address overflow",
            vec!["rx_drop_bad_address"],
            &o,
            200,
            one(u64::MAX - 100, 2048, DESC_F_WRITE),
        ),
        (
            "RX descriptor loop",
            vec!["rx_drop_bad_chain"],
            &o,
            200,
            Box::new(move |vq: &mut Vq| {
                let d = vq.alloc_descs(2).unwrap();
                vq.write_desc(d[0], w, 12, DESC_F_WRITE | DESC_F_NEXT, d[1]);
                vq.write_desc(d[1], w + 64, 100, DESC_F_WRITE | DESC_F_NEXT, d[0]);
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "RX descriptor loop (MRG_RXBUF)",
            vec!["rx_drop_bad_chain"],
            &o_mrg,
            200,
            Box::new(move |vq: &mut Vq| {
                let d = vq.alloc_descs(1).unwrap();
                vq.write_desc(d[0], w, 2048, DESC_F_WRITE | DESC_F_NEXT, d[0]);
                (
                    d[0],
                    Chain {
                        descs: d,
                        hostile: true,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "RX indirect table outside guest memory",
            vec!["rx_drop_bad_address", "rx_drop_bad_chain"],
            &o,
            200,
            indirect(vec![(w, 2048, DESC_F_WRITE, 0)], None, Some(end + 0x30000)),
        ),
        (
            "RX indirect table length not a multiple of 16",
            vec!["rx_drop_bad_chain"],
            &o,
            200,
            indirect(vec![(w, 2048, DESC_F_WRITE, 0)], Some(20), None),
        ),
        (
            "frame larger than the only RX buffer (no MRG_RXBUF)",
            vec!["rx_drop_frame_too_large"],
            &o,
            1000,
            // A legitimate (if small) buffer: like vhost-net, the device may
            // keep it for a frame that fits, so one small frame goes first.
            Box::new(move |vq: &mut Vq| {
                let d = vq.alloc_descs(2).unwrap();
                vq.mem().fill(w, 12, RX_POISON);
                vq.mem().fill(w + 64, 100, RX_POISON);
                vq.write_desc(d[0], w, 12, DESC_F_WRITE | DESC_F_NEXT, d[1]);
                vq.write_desc(d[1], w + 64, 100, DESC_F_WRITE, 0);
                let writable = vec![(w, 12), (w + 64, 100)];
                (
                    d[0],
                    Chain {
                        descs: d,
                        writable,
                        ..Chain::default()
                    },
                )
            }),
        ),
        (
            "RX buffer shorter than the vnet header",
            vec!["rx_drop_bad_chain"],
            &o,
            200,
            one(w, 6, DESC_F_WRITE),
        ),
        (
            "RX buffer shorter than the vnet header (MRG_RXBUF)",
            vec!["rx_drop_bad_chain"],
            &o_mrg,
            200,
            one(w, 6, DESC_F_WRITE),
        ),
    ];
    let mut failures = Vec::new();
    for (what, keys, o, probe_len, build) in &cases {
        // A fresh connection per case: nothing else is posted on the RX ring.
        let mut fe = env.connect((*o).clone())?;
        let before = env.stats();
        let head = publish_hostile(fe.rxq(0), build);
        let probe = test_frame(GUEST_MAC, HOST_MAC, PROBE, 0, *probe_len, &mut rng);
        env.port().send(&probe)?;
        let r_drop = expect_drop(&mut env, &before, keys, what);
        // Whatever the counters say: post good buffers (no refill) and check
        // that both directions still work.
        let r_flow = (|| -> Result<()> {
            fe.post_rx(0, &[12, 1514], false, 8)?;
            fe.rxq(0).rx_layout = None;
            let t = Traffic {
                window: 4,
                ..Traffic::new(4)
            };
            if *probe_len > 1000 - 1 {
                let small = Traffic {
                    max_len: 100,
                    ..Traffic::new(1)
                };
                tap_to_guest(&env, &mut fe, small, &mut rng)
                    .with_context(|| format!("a frame that fits the small buffer, after {what}"))?;
            }
            tap_to_guest(&env, &mut fe, t, &mut rng)
                .with_context(|| format!("tap -> guest after {what}"))?;
            guest_to_tap(&env, &mut fe, t, &mut rng)
                .with_context(|| format!("guest -> tap after {what}"))?;
            Ok(())
        })();
        env.assert_alive()
            .with_context(|| format!("vsnoop died after {what}"))?;
        match (r_drop, r_flow) {
            (Ok(()), Ok(())) => {
                let returned = !fe.rxq(0).inflight.contains_key(&head);
                eprintln!("ok: {what} -> {keys:?} (chain returned in used ring: {returned})");
            }
            (d, f) => {
                for e in [d.err(), f.err()].into_iter().flatten() {
                    eprintln!("FAILED: {what}: {e:#}");
                    failures.push(format!("{what}: {e:#}"));
                }
            }
        }
        drop(fe);
        env.wait_log_count("frontend disconnected", env.connections)?;
    }
    ensure!(
        failures.is_empty(),
        "{} hostile RX cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    env.finish();
    Ok(())
}

#[test]
fn no_mrg_large_rx_buffers() -> Result<()> {
    // Without MRG_RXBUF, buffers that hold a maximum-size frame (the direct
    // tap read path); num_buffers must still read 1.
    let mut env = Env::start(&[]);
    let mut rng = StdRng::seed_from_u64(11);
    let mut fe = env.connect(opts(F_EVENT_IDX, Order::Spec))?;
    fe.fill_rx(0, &[12, 4096], false)?;
    both_ways(&mut env, &mut fe, Traffic::new(100), &mut rng)?;
    env.finish();
    Ok(())
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

#[test]
fn reconnect_after_disconnect() -> Result<()> {
    let mut env = Env::start(&[]);
    let mut rng = StdRng::seed_from_u64(9);
    // 1: spec order, abrupt disconnect with buffers in flight.
    let mut fe = env.connect(opts(F_MRG_RXBUF | F_EVENT_IDX, Order::Spec))?;
    fe.fill_rx(0, &[1536], false)?;
    both_ways(&mut env, &mut fe, Traffic::new(50), &mut rng)?;
    drop(fe);
    env.wait_log_count("frontend disconnected", 1)?;
    // 2: QEMU order, graceful stop with GET_VRING_BASE.
    let mut fe = env.connect(opts(
        F_MRG_RXBUF | F_EVENT_IDX | F_INDIRECT_DESC,
        Order::Qemu72,
    ))?;
    fe.fill_rx(0, &[1536], false)?;
    both_ways(
        &mut env,
        &mut fe,
        Traffic {
            indirect: true,
            ..Traffic::new(50)
        },
        &mut rng,
    )?;
    let tx_avail = fe.txq(0).avail_idx() as u32;
    let tx_base = fe.get_vring_base(1)?;
    ensure!(
        tx_base == tx_avail,
        "GET_VRING_BASE(TX) = {tx_base}, driver made {tx_avail} chains available"
    );
    let _rx_base = fe.get_vring_base(0)?;
    drop(fe);
    env.wait_log_count("frontend disconnected", 2)?;
    // 3: a fresh connection still works; and an idle connect/disconnect.
    let idle = TestFrontend::connect(&env.sock, opts(0, Order::Spec))?;
    env.connections += 1;
    env.wait_log_count("frontend connected", env.connections)?;
    drop(idle);
    env.wait_log_count("frontend disconnected", 3)?;
    let mut fe = env.connect(opts(0, Order::Spec))?;
    fe.fill_rx(0, &[12, 1514], false)?;
    both_ways(&mut env, &mut fe, Traffic::new(50), &mut rng)?;
    env.finish();
    Ok(())
}

/// `VHOST_F_LOG_ALL`.
const F_LOG_ALL: u64 = 1 << 26;

#[test]
fn log_all_drains_the_ack_offload_and_clearing_it_resumes() -> Result<()> {
    // Migration start (SET_FEATURES with LOG_ALL) must reach the ACK offload
    // (rule 15), and traffic keeps flowing while it drains and after.
    let mut env = Env::start(&["--ack-offload", "on"]);
    let mut rng = StdRng::seed_from_u64(15);
    let mut fe = env.connect(opts(F_MRG_RXBUF | F_EVENT_IDX, Order::Spec))?;
    fe.fill_rx(0, &[1536], false)?;
    both_ways(&mut env, &mut fe, Traffic::new(20), &mut rng)?;
    ensure!(
        fe.offered & F_LOG_ALL != 0,
        "the backend does not offer VHOST_F_LOG_ALL"
    );
    fe.fe
        .set_features(fe.acked | F_LOG_ALL)
        .context("SET_FEATURES +LOG_ALL")?;
    env.wait_log_count("VHOST_F_LOG_ALL set: ACK offload draining", 1)?;
    both_ways(&mut env, &mut fe, Traffic::new(20), &mut rng)?;
    fe.fe
        .set_features(fe.acked)
        .context("SET_FEATURES -LOG_ALL")?;
    env.wait_log_count("VHOST_F_LOG_ALL cleared: ACK offload resumed", 1)?;
    both_ways(&mut env, &mut fe, Traffic::new(20), &mut rng)?;
    env.finish();
    Ok(())
}

/// The frontend's dirty log (VHOST_USER_SET_LOG_BASE): a memfd with one bit
/// per 4 KiB guest page, mapped here to read the bits the backend set.
struct DirtyLog {
    fd: std::os::fd::OwnedFd,
    ptr: *const u8,
    len: usize,
}

impl DirtyLog {
    /// A zeroed log covering guest addresses below `end`.
    fn new(end: u64) -> Result<DirtyLog> {
        use std::os::fd::FromRawFd;
        let pages = end.div_ceil(4096) as usize;
        let len = pages.div_ceil(8).next_multiple_of(4096);
        // SAFETY: a NUL-terminated name; the fd is checked and then owned.
        let raw = unsafe { libc::memfd_create(c"vsnoop-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        ensure!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        ensure!(
            unsafe { libc::ftruncate(raw, len as libc::off_t) } == 0,
            "ftruncate: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new shared read-only mapping of our memfd, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        ensure!(
            ptr != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Ok(DirtyLog {
            fd,
            ptr: ptr.cast(),
            len,
        })
    }

    fn dirty(&self, gpa: u64) -> bool {
        let page = (gpa / 4096) as usize;
        assert!(page / 8 < self.len, "page {page} outside the log");
        // SAFETY: in bounds (checked above); the backend sets bits
        // concurrently, a volatile read sees a consistent byte.
        let byte = unsafe { std::ptr::read_volatile(self.ptr.add(page / 8)) };
        byte & (1 << (page % 8)) != 0
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.ptr.cast_mut().cast(), self.len) };
    }
}

#[test]
fn dirty_log_marks_rx_buffers_and_used_ring() -> Result<()> {
    // Migration: with LOG_SHMFD and VHOST_F_LOG_ALL, every guest page the
    // backend writes must be dirty in the frontend's log. RX data is read
    // from the tap straight into guest buffers (raw readv, marked by hand);
    // the used ring is written through vm-memory (marked by its bitmap).
    use std::os::fd::AsRawFd;
    use vhost::vhost_user::VhostUserProtocolFeatures;
    use vhost::VhostUserDirtyLogRegion;
    // 1024 entries: the used elements and index are on the ring's first page,
    // avail_event (written through vm-memory) on its third, so a used-ring
    // write that misses the log shows.
    let mut env = Env::start(&["--queue-size", "1024"]);
    let mut rng = StdRng::seed_from_u64(26);
    let mut fe = env.connect(Options {
        log_shmfd: true,
        queue_size: 1024,
        ..opts(F_MRG_RXBUF | F_EVENT_IDX, Order::Spec)
    })?;
    ensure!(
        fe.protocol_acked & VhostUserProtocolFeatures::LOG_SHMFD.bits() != 0,
        "the backend does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD"
    );
    let log = DirtyLog::new(fe.mem.end())?;
    fe.fe
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log.len as u64,
                mmap_offset: 0,
                mmap_handle: log.fd.as_raw_fd(),
            }),
        )
        .context("SET_LOG_BASE")?;
    fe.fe
        .set_features(fe.acked | F_LOG_ALL)
        .context("SET_FEATURES +LOG_ALL")?;
    env.wait_log_count("VHOST_F_LOG_ALL set", 1)?;

    // RX chains of a 12-byte header buffer and a page-aligned data page:
    // the headers share pages, so only the readv writes the data pages
    // (and the readv and the num_buffers field the header pages).
    const CHAINS: usize = 64;
    let headers: Vec<u64> = (0..CHAINS)
        .map(|_| fe.mem.alloc(NET_HDR_LEN, 8))
        .collect::<Result<_>>()?;
    let mut data_pages = HashMap::new();
    let mut header_of = HashMap::new();
    for &hdr in &headers {
        let data = fe.mem.alloc(4096, 4096)?;
        let vq = fe.rxq(0);
        let d = vq.alloc_descs(2).context("RX descriptors")?;
        vq.write_desc(
            d[0],
            hdr,
            NET_HDR_LEN as u32,
            DESC_F_WRITE | DESC_F_NEXT,
            d[1],
        );
        vq.write_desc(d[1], data, 4096, DESC_F_WRITE, 0);
        data_pages.insert(u32::from(d[0]), data);
        header_of.insert(u32::from(d[0]), hdr);
        let chain = Chain {
            descs: d.clone(),
            allocs: vec![hdr, data],
            writable: vec![(hdr, NET_HDR_LEN as u32), (data, 4096)],
            hostile: false,
        };
        vq.publish(d[0], chain);
    }
    let used_before = fe.rxq(0).used_idx();
    fe.rxq(0).notify();
    // (The used ring may be dirty already: the backend writes avail_event.)
    ensure!(
        data_pages.values().all(|&p| !log.dirty(p)),
        "RX data pages dirty before any RX traffic"
    );
    let mut t = Traffic::new(20);
    t.window = 8;
    tap_to_guest(&env, &mut fe, t, &mut rng)?;

    let vq = &fe.vqs[0];
    let used_after = vq.used_idx();
    let mut checked = 0;
    let mut i = used_before;
    while i != used_after {
        let slot = u64::from(i % vq.size);
        let elem = vq.used_gpa + 4 + 8 * slot;
        let id = fe.mem.read_u32(elem);
        let len = fe.mem.read_u32(elem + 4) as usize;
        let data = *data_pages
            .get(&id)
            .with_context(|| format!("used id {id} was not posted"))?;
        ensure!(
            len <= NET_HDR_LEN || log.dirty(data),
            "RX data page {data:#x} (chain {id}, {len} bytes used) is not dirty in the log"
        );
        ensure!(
            log.dirty(elem),
            "used element page {elem:#x} is not dirty in the log"
        );
        // The header: the tap's readv and then num_buffers wrote it.
        let hdr = header_of[&id];
        ensure!(
            log.dirty(hdr),
            "header page {hdr:#x} of chain {id} is not dirty in the log"
        );
        checked += 1;
        i = i.wrapping_add(1);
    }
    ensure!(checked >= 20, "only {checked} used RX elements");
    ensure!(
        log.dirty(vq.used_gpa + 2),
        "the used index page is not dirty in the log"
    );
    // Pages the backend never wrote stay clean.
    let unused = data_pages.len() - checked;
    let clean = data_pages.values().filter(|&&p| !log.dirty(p)).count();
    ensure!(
        clean == unused,
        "{clean} clean data pages, {unused} chains unused"
    );
    env.finish();
    Ok(())
}

#[test]
fn client_mode_connects_to_a_listening_frontend() -> Result<()> {
    let dir = TempDir::new("client");
    let path = dir.join("vmm.sock");
    let listener = UnixListener::bind(&path)?;
    let path_s = path.to_str().unwrap().to_string();
    let mut env = {
        // Env::start passes --socket itself; build the namespace by hand here.
        let ns = quiet_netns("vsc");
        let tap = common::unique("vsc");
        let log = dir.join("vsnoop.log");
        let vs = Vsnoop::spawn(&ns, &["--socket", &path_s, "--tap", &tap, "--client"], &log);
        ns.wait_for_link(&tap, T);
        ns.exec(&["ip", "link", "set", &tap, "up"]);
        let port = PacketPort::open(&ns.name, &tap)?;
        Env {
            port: Some(port),
            vs,
            ns,
            _dir: TempDir::new("client-env"),
            sock: path.clone(),
            tap,
            ok: false,
            connections: 0,
        }
    };
    listener.set_nonblocking(false)?;
    let (stream, _) = listener.accept()?;
    let mut fe = TestFrontend::from_stream(stream, opts(F_MRG_RXBUF, Order::Qemu72))?;
    env.connections = 1;
    env.wait_log_count("frontend connected", 1)?;
    fe.fill_rx(0, &[1536], false)?;
    let mut rng = StdRng::seed_from_u64(10);
    both_ways(&mut env, &mut fe, Traffic::new(20), &mut rng)?;
    env.finish();
    Ok(())
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// Runs vsnoop with `args` in a fresh namespace; expects a quick non-zero exit.
fn expect_cli_error(args: &[&str]) -> Result<String> {
    let ns = Netns::new("vsa");
    let dir = TempDir::new("cli");
    let log = dir.join("vsnoop.log");
    let mut vs = Vsnoop::spawn(&ns, args, &log);
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = vs.child.try_wait()? {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "vsnoop {args:?} kept running:\n{}",
            vs.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    };
    let text = vs.log_text();
    ensure!(
        !status.success(),
        "vsnoop {args:?} exited successfully:\n{text}"
    );
    ensure!(
        status.code().is_some(),
        "vsnoop {args:?} died from a signal: {status}"
    );
    ensure!(
        !text.contains("panicked"),
        "vsnoop {args:?} panicked:\n{text}"
    );
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.to_lowercase().contains("error"))
        .collect();
    ensure!(
        !errors.is_empty(),
        "vsnoop {args:?} printed no error line:\n{text}"
    );
    ensure!(
        errors.len() == 1,
        "vsnoop {args:?} printed {} error lines (want one clear line):\n{text}",
        errors.len()
    );
    eprintln!("{args:?} -> exit {:?}: {}", status.code(), errors[0]);
    Ok(errors[0].to_string())
}

#[test]
fn cli_rejects_bad_arguments() -> Result<()> {
    let cases: &[&[&str]] = &[
        &[],
        &["--tap", "vsx0"],
        &["--socket", "/tmp/vsnoop-cli-never.sock"],
        &[
            "--socket",
            "/tmp/vsnoop-cli-never.sock",
            "--tap",
            "vsx0",
            "--bogus",
        ],
        &[
            "--socket",
            "/tmp/vsnoop-cli-never.sock",
            "--tap",
            "vsx0",
            "--queues",
            "0",
        ],
        &[
            "--socket",
            "/tmp/vsnoop-cli-never.sock",
            "--tap",
            "vsx0",
            "--queues",
            "many",
        ],
        &[
            "--socket",
            "/tmp/vsnoop-cli-never.sock",
            "--tap",
            "vsx0",
            "--queue-size",
            "100",
        ],
        &[
            "--socket",
            "/tmp/vsnoop-cli-never.sock",
            "--tap",
            "vsx0",
            "--queue-size",
            "0",
        ],
        &[
            "--socket",
            "/tmp/vsnoop-cli-never.sock",
            "--tap",
            "vsx0",
            "--queue-size",
            "65536",
        ],
        &[
            "--socket",
            "/tmp/vsnoop-cli-never.sock",
            "--tap",
            "vsx0",
            "--ack-offload",
            "maybe",
        ],
        &[
            "--socket",
            "/tmp/vsnoop-cli-never.sock",
            "--tap",
            "a-name-longer-than-15",
        ],
        &[
            "--socket",
            "/nonexistent-dir/x/vsnoop.sock",
            "--tap",
            "vsx0",
        ],
    ];
    let mut failures = Vec::new();
    for args in cases {
        if let Err(e) = expect_cli_error(args) {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} CLI cases failed:\n{}",
        failures.len(),
        failures.join("\n---\n")
    );
    Ok(())
}

#[test]
fn cli_refuses_a_socket_in_use() -> Result<()> {
    let dir = TempDir::new("inuse");
    let path = dir.join("busy.sock");
    let listener = UnixListener::bind(&path)?;
    let path_s = path.to_str().unwrap().to_string();
    let line = expect_cli_error(&["--socket", &path_s, "--tap", "vsbusy0"])?;
    ensure!(!line.is_empty());
    // The live listener must still own its socket.
    ensure!(
        path.exists(),
        "vsnoop removed a socket that another process listens on"
    );
    let _client = std::os::unix::net::UnixStream::connect(&path)
        .context("the original listener is no longer reachable")?;
    listener.set_nonblocking(true)?;
    listener
        .accept()
        .context("the original listener did not get the connection")?;
    Ok(())
}

/// Without CAP_NET_ADMIN the tap cannot be created: one clear error line,
/// exit status 1, no panic.
#[test]
fn cli_reports_a_missing_tap_permission() -> Result<()> {
    require_tool("setpriv");
    let ns = Netns::new("vsp");
    let dir = TempDir::new("perm");
    let sock = dir.join("vhost.sock");
    let out = ns
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            env!("CARGO_BIN_EXE_vsnoop"),
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            "vsperm0",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "want exit 1, got {}: {stderr}",
        out.status
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    ensure!(errors.len() == 1, "want one error line:\n{stderr}");
    ensure!(
        errors[0].contains("CAP_NET_ADMIN") && errors[0].contains("vsperm0"),
        "the error line should name the tap and the missing capability:\n{stderr}"
    );
    ensure!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Capture
// ---------------------------------------------------------------------------

/// `--capture` records every frame at both vantage points; tshark reads the
/// file: two interfaces, nanosecond timestamps, one packet id per frame at
/// both points, direction flags, host before guest for RX and guest before
/// host for TX.
#[test]
fn capture_records_every_frame_at_both_vantage_points() -> Result<()> {
    require_tool("tshark");
    let capdir = TempDir::new("capture");
    let file = capdir.join("vsnoop.pcapng");
    let file_s = file.to_str().unwrap().to_string();
    let mut env = Env::start(&["--capture", &file_s]);
    let mut rng = StdRng::seed_from_u64(11);
    let mut fe = env.connect(opts(F_MRG_RXBUF, Order::Spec))?;
    fe.fill_rx(0, &[1536], false)?;
    both_ways(&mut env, &mut fe, Traffic::new(200), &mut rng)?;
    let stats = env.stats();
    let frames = get(&stats, "rx_packets")? + get(&stats, "tx_packets")?;
    drop(fe);
    ensure!(env.vs.terminate() == Some(0), "vsnoop did not exit cleanly");

    let out = std::process::Command::new("tshark")
        .args(["-r", &file_s, "-T", "fields", "-E", "separator=,"])
        .args(["-e", "frame.interface_id", "-e", "frame.packet_id"])
        .args([
            "-e",
            "frame.packet_flags_direction",
            "-e",
            "frame.time_epoch",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    // id -> [(interface, direction, epoch string)]
    let mut by_id: HashMap<u64, Vec<(u32, u32, String)>> = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        ensure!(f.len() == 4, "unexpected tshark line {line:?}");
        let id: u64 = f[1]
            .parse()
            .with_context(|| format!("packet id in {line:?}"))?;
        let dir = u32::from_str_radix(f[2].trim_start_matches("0x"), 16)?;
        by_id
            .entry(id)
            .or_default()
            .push((f[0].parse()?, dir, f[3].to_string()));
    }
    ensure!(
        by_id.len() as u64 == frames,
        "{} packet ids in the capture, {frames} frames counted",
        by_id.len()
    );
    let ns = |epoch: &str| -> Result<u128> {
        let (s, frac) = epoch.split_once('.').context("epoch without fraction")?;
        ensure!(frac.len() == 9, "timestamp {epoch} is not in nanoseconds");
        Ok(s.parse::<u128>()? * 1_000_000_000 + frac.parse::<u128>()?)
    };
    for (id, points) in &by_id {
        ensure!(
            points.len() == 2,
            "packet {id} recorded {} times",
            points.len()
        );
        let (first, second) = (&points[0], &points[1]);
        ensure!(first.0 != second.0, "packet {id} twice on one interface");
        // The first point is where the frame entered vsnoop: inbound there,
        // outbound at the second point, and never earlier.
        ensure!(
            first.1 == 1 && second.1 == 2,
            "packet {id}: directions {points:?}"
        );
        ensure!(
            ns(&second.2)? >= ns(&first.2)?,
            "packet {id}: time goes backwards {points:?}"
        );
    }
    env.ok = true;
    Ok(())
}
