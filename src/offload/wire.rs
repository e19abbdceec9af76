//! Typed views over the TCP/IP headers the ACK offload reads and edits.
//!
//! Frames are Ethernet II carrying IPv4 (options allowed, not fragmented) or
//! IPv6 (TCP directly after the fixed header). Anything else is "not ours"
//! and passes untouched: VLAN tags, IPv6 extension headers, fragments, short
//! or inconsistent headers. Parsing works on a prefix of the frame (the
//! headers) plus the frame length, so it never needs the payload in memory.
//!
//! Offsets are from the start of the Ethernet header, so an edit can be made
//! in a private copy of the headers and the payload sent from guest memory.

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// Longest header prefix the parser needs: Ethernet, IPv4 with options, TCP
/// with options.
pub const MAX_HEADERS: usize = ETH_LEN + 60 + 60;

/// TCP flag bits (byte 13 of the TCP header).
pub mod flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push function.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer field significant.
    pub const URG: u8 = 0x20;
    /// ECN-Echo.
    pub const ECE: u8 = 0x40;
    /// Congestion Window Reduced.
    pub const CWR: u8 = 0x80;
}

/// TCP option kinds the offload cares about.
pub mod option {
    /// End of option list.
    pub const END: u8 = 0;
    /// No-operation (padding).
    pub const NOP: u8 = 1;
    /// Maximum segment size.
    pub const MSS: u8 = 2;
    /// Window scale.
    pub const WSCALE: u8 = 3;
    /// SACK permitted.
    pub const SACK_PERM: u8 = 4;
    /// SACK blocks.
    pub const SACK: u8 = 5;
    /// Timestamps.
    pub const TIMESTAMPS: u8 = 8;
    /// TCP MD5 signature (RFC 2385).
    pub const MD5: u8 = 19;
    /// TCP Authentication Option (RFC 5925).
    pub const AO: u8 = 29;
    /// Multipath TCP (RFC 8684).
    pub const MPTCP: u8 = 30;
    /// TCP Fast Open cookie (RFC 7413).
    pub const FASTOPEN: u8 = 34;
}

/// Which IP version carries the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpVersion {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// The options of one TCP header, with where the editable ones sit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOptions {
    /// MSS option value.
    pub mss: Option<u16>,
    /// Window-scale shift (clamped to 14 as RFC 7323 says).
    pub wscale: Option<u8>,
    /// SACK permitted.
    pub sack_permitted: bool,
    /// (TSval, TSecr).
    pub timestamps: Option<(u32, u32)>,
    /// Frame offset of the timestamps option's TSval.
    pub timestamps_at: usize,
    /// Frame offset of the SACK option's kind byte and its length (0: none).
    pub sack_at: usize,
    /// Length of the SACK option in bytes.
    pub sack_len: u8,
    /// TCP-MD5, TCP-AO, MPTCP or TFO present: never offloaded.
    pub md5: bool,
    /// TCP-AO.
    pub ao: bool,
    /// MPTCP.
    pub mptcp: bool,
    /// TCP Fast Open.
    pub fastopen: bool,
}

/// A parsed TCP segment in an Ethernet frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    /// IP version.
    pub version: IpVersion,
    /// Source and destination addresses (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Offset of the IP header.
    pub ip_at: usize,
    /// Offset of the TCP header.
    pub tcp_at: usize,
    /// Offset of the payload (end of the TCP header).
    pub payload_at: usize,
    /// Payload bytes (from the IP length, so GSO super-frames count whole).
    pub payload_len: u32,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Flag byte (see [`flags`]).
    pub flags: u8,
    /// The AE bit (AccECN, RFC 9768): bit 0 of byte 12.
    pub ae: bool,
    /// Raw window field.
    pub window: u16,
    /// Checksum field.
    pub checksum: u16,
    /// Urgent pointer.
    pub urgent: u16,
    /// IP ECN codepoint (0..=3; 3 is CE).
    pub ecn: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// DSCP (upper six bits of TOS / traffic class).
    pub dscp: u8,
    /// IPv4 DF bit.
    pub dont_fragment: bool,
    /// IPv6 flow label.
    pub flow_label: u32,
    /// Options.
    pub options: TcpOptions,
}

impl TcpSegment {
    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Sequence space the segment occupies (payload plus SYN and FIN).
    pub fn seq_len(&self) -> u32 {
        self.payload_len + u32::from(self.has(flags::SYN)) + u32::from(self.has(flags::FIN))
    }

    /// A pure ACK: ACK set, no payload, no SYN/FIN/RST/URG.
    pub fn is_pure_ack(&self) -> bool {
        self.payload_len == 0
            && self.has(flags::ACK)
            && self.flags & (flags::SYN | flags::FIN | flags::RST | flags::URG) == 0
    }
}

// One bounds check and one load each (indexing byte by byte checks each byte).
fn be16(b: &[u8], at: usize) -> u16 {
    let mut w = [0u8; 2];
    w.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(w)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

/// Parses the TCP segment in `headers` (a prefix of a `frame_len`-byte
/// frame). `None` for anything that is not a well-formed TCP segment over
/// plain IPv4/IPv6 whose headers all lie inside `headers`.
pub fn parse(headers: &[u8], frame_len: usize) -> Option<TcpSegment> {
    if headers.len() < ETH_LEN || frame_len < ETH_LEN {
        return None;
    }
    let ip_at = ETH_LEN;
    let (version, tcp_at, ip_end, src, dst, ecn, ttl, dscp, df, flow_label) =
        match be16(headers, 12) {
            0x0800 => {
                let ip = headers.get(ip_at..ip_at + 20)?;
                if ip[0] >> 4 != 4 || ip[9] != 6 {
                    return None;
                }
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let total = usize::from(be16(ip, 2));
                let frag = be16(ip, 6);
                // Fragments (MF set or an offset) carry no usable TCP header.
                if ihl < 20 || total < ihl || frag & 0x3fff != 0 {
                    return None;
                }
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                src[..4].copy_from_slice(&ip[12..16]);
                dst[..4].copy_from_slice(&ip[16..20]);
                (
                    IpVersion::V4,
                    ip_at + ihl,
                    ip_at + total,
                    src,
                    dst,
                    ip[1] & 3,
                    ip[8],
                    ip[1] >> 2,
                    frag & 0x4000 != 0,
                    0,
                )
            }
            0x86dd => {
                let ip = headers.get(ip_at..ip_at + 40)?;
                if ip[0] >> 4 != 6 || ip[6] != 6 {
                    return None;
                }
                let tclass = (ip[0] << 4) | (ip[1] >> 4);
                let label = be32(ip, 0) & 0x000f_ffff;
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                src.copy_from_slice(&ip[8..24]);
                dst.copy_from_slice(&ip[24..40]);
                (
                    IpVersion::V6,
                    ip_at + 40,
                    ip_at + 40 + usize::from(be16(ip, 4)),
                    src,
                    dst,
                    tclass & 3,
                    ip[7],
                    tclass >> 2,
                    false,
                    label,
                )
            }
            _ => return None,
        };
    let tcp = headers.get(tcp_at..tcp_at + 20)?;
    let data_off = usize::from(tcp[12] >> 4) * 4;
    let payload_at = tcp_at + data_off;
    if data_off < 20 || payload_at > ip_end || ip_end > frame_len || payload_at > headers.len() {
        return None;
    }
    let options = parse_options(headers, tcp_at + 20, payload_at)?;
    Some(TcpSegment {
        version,
        src,
        dst,
        ip_at,
        tcp_at,
        payload_at,
        payload_len: (ip_end - payload_at) as u32,
        sport: be16(tcp, 0),
        dport: be16(tcp, 2),
        seq: be32(tcp, 4),
        ack: be32(tcp, 8),
        flags: tcp[13],
        ae: tcp[12] & 1 != 0,
        window: be16(tcp, 14),
        checksum: be16(tcp, 16),
        urgent: be16(tcp, 18),
        ecn,
        ttl,
        dscp,
        dont_fragment: df,
        flow_label,
        options,
    })
}

/// Walks the options in `b[start..end]`. `None` if an option overruns the
/// header (a malformed header is not ours to edit).
#[inline(always)]
fn parse_options(b: &[u8], start: usize, end: usize) -> Option<TcpOptions> {
    let mut o = TcpOptions::default();
    // Fast path: an established flow's segments carry exactly NOP, NOP,
    // timestamps (what the loop below would find in them, read at once).
    if let Some(t) = b.get(start..end).filter(|t| t.len() == 12) {
        if t[..4] == [option::NOP, option::NOP, option::TIMESTAMPS, 10] {
            o.timestamps = Some((be32(t, 4), be32(t, 8)));
            o.timestamps_at = start + 4;
            return Some(o);
        }
    }
    let mut at = start;
    while at < end {
        let kind = b[at];
        match kind {
            option::END => break,
            option::NOP => {
                at += 1;
                continue;
            }
            _ => {}
        }
        let len = usize::from(*b.get(at + 1).filter(|_| at + 1 < end)?);
        if len < 2 || at + len > end {
            return None;
        }
        match (kind, len) {
            (option::MSS, 4) => o.mss = Some(be16(b, at + 2)),
            (option::WSCALE, 3) => o.wscale = Some(b[at + 2].min(14)),
            (option::SACK_PERM, 2) => o.sack_permitted = true,
            (option::SACK, _) if (len - 2) % 8 == 0 => {
                o.sack_at = at;
                o.sack_len = len as u8;
            }
            (option::TIMESTAMPS, 10) => {
                o.timestamps = Some((be32(b, at + 2), be32(b, at + 6)));
                o.timestamps_at = at + 2;
            }
            (option::MD5, _) => o.md5 = true,
            (option::AO, _) => o.ao = true,
            (option::MPTCP, _) => o.mptcp = true,
            (option::FASTOPEN, _) => o.fastopen = true,
            _ => {}
        }
        at += len;
    }
    Some(o)
}

/// The SACK blocks of a segment, as (left, right) edges.
pub fn sack_blocks<'a>(
    headers: &'a [u8],
    seg: &TcpSegment,
) -> impl Iterator<Item = (u32, u32)> + 'a {
    let at = seg.options.sack_at;
    let n = if at == 0 {
        0
    } else {
        usize::from(seg.options.sack_len - 2) / 8
    };
    (0..n).map(move |i| {
        let p = at + 2 + i * 8;
        (be32(headers, p), be32(headers, p + 4))
    })
}

/// `a < b` in 32-bit sequence space.
pub fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a <= b` in 32-bit sequence space.
pub fn seq_le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

/// The larger of two sequence numbers (or timestamps, same arithmetic).
pub fn seq_max(a: u32, b: u32) -> u32 {
    if seq_lt(a, b) {
        b
    } else {
        a
    }
}

/// One's-complement sum of `data` added to `sum` (16-bit big-endian words,
/// odd trailing byte padded with zero), folded to at most 0xffff (never 0
/// unless `sum` and `data` are all zero).
///
/// Summed as big-endian 32-bit words into 64 bits (no carry to fold until
/// 16 GiB; the compiler vectorizes the loop): `hi << 16 | lo` is congruent
/// to `hi + lo` modulo 0xffff, the modulus of one's-complement arithmetic,
/// so the folded result is the 16-bit word sum's. A segment verified in
/// software (a guest without checksum offload) costs a fraction of the
/// word-at-a-time loop.
pub fn csum_add(sum: u32, data: &[u8]) -> u32 {
    let mut quads = data.chunks_exact(4);
    let mut wide: u64 = (&mut quads)
        .map(|q| u64::from(u32::from_be_bytes([q[0], q[1], q[2], q[3]])))
        .sum();
    wide += u64::from(sum);
    match *quads.remainder() {
        [a, b, c] => wide += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        [a, b] => wide += u64::from(u16::from_be_bytes([a, b])),
        [a] => wide += u64::from(a) << 8,
        _ => {}
    }
    // End-around carry: each step keeps the value modulo 0xffff and never
    // turns a nonzero sum into 0.
    while wide > 0xffff {
        wide = (wide & 0xffff) + (wide >> 16);
    }
    wide as u32
}

/// Folds a 32-bit one's-complement accumulator to 16 bits.
pub fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The TCP pseudo-header sum for `seg`'s addresses and a `tcp_len`-byte segment.
pub fn pseudo_header_sum(version: IpVersion, src: &[u8; 16], dst: &[u8; 16], tcp_len: u32) -> u32 {
    match version {
        IpVersion::V4 => {
            let sum = csum_add(csum_add(0, &src[..4]), &dst[..4]);
            sum + 6 + tcp_len
        }
        IpVersion::V6 => {
            let sum = csum_add(csum_add(0, src), dst);
            sum + 6 + (tcp_len >> 16) + (tcp_len & 0xffff)
        }
    }
}

/// What one 16-bit word changing from `old` to `new` adds to a checksum
/// delta (RFC 1624 eqn. 3: `!old + new`).
fn word_change(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// Edits to the TCP header of a frame that keep its checksum valid
/// incrementally (RFC 1624 eqn. 3): each edit adds the change of the 16-bit
/// words it touched, so the cost follows the bytes edited, not the header
/// length. Offsets are frame offsets inside the TCP header.
pub struct TcpHeaderEdit<'a> {
    frame: &'a mut [u8],
    tcp_at: usize,
    header_end: usize,
    /// One's-complement sum of `!old + new` over the changed words.
    delta: u32,
    edited: bool,
}

impl<'a> TcpHeaderEdit<'a> {
    /// An edit of the TCP header `frame[tcp_at..header_end]` (its length a
    /// multiple of 4, as every TCP header's).
    pub fn new(frame: &'a mut [u8], tcp_at: usize, header_end: usize) -> Self {
        debug_assert!((header_end - tcp_at) % 4 == 0 && header_end <= frame.len());
        TcpHeaderEdit {
            frame,
            tcp_at,
            header_end,
            delta: 0,
            edited: false,
        }
    }

    /// Writes `new` at frame offset `at` (inside the header; any alignment).
    pub fn set(&mut self, at: usize, new: &[u8]) {
        // The 16-bit words (counted from the TCP header) that `new` touches.
        let lo = self.tcp_at + ((at - self.tcp_at) & !1);
        let hi = (self.tcp_at + ((at + new.len() - self.tcp_at + 1) & !1)).min(self.header_end);
        debug_assert!(at + new.len() <= hi);
        let mut old = [0u8; 64];
        let n = hi - lo;
        old[..n].copy_from_slice(&self.frame[lo..hi]);
        self.frame[at..at + new.len()].copy_from_slice(new);
        for (o, w) in old[..n]
            .chunks_exact(2)
            .zip(self.frame[lo..hi].chunks_exact(2))
        {
            self.delta += word_change(be16(o, 0), be16(w, 0));
        }
        self.settle();
    }

    /// Writes a 32-bit field.
    pub fn set_u32(&mut self, at: usize, v: u32) {
        if !self.aligned(at, 4) {
            return self.set(at, &v.to_be_bytes());
        }
        // Word-aligned (the usual case): two words, no scratch copy.
        let old = be32(self.frame, at);
        self.frame[at..at + 4].copy_from_slice(&v.to_be_bytes());
        self.delta +=
            word_change((old >> 16) as u16, (v >> 16) as u16) + word_change(old as u16, v as u16);
        self.settle();
    }

    /// Writes a 16-bit field.
    pub fn set_u16(&mut self, at: usize, v: u16) {
        if !self.aligned(at, 2) {
            return self.set(at, &v.to_be_bytes());
        }
        let old = be16(self.frame, at);
        self.frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
        self.delta += word_change(old, v);
        self.settle();
    }

    /// Whether `len` bytes at `at` are whole words inside the header.
    fn aligned(&self, at: usize, len: usize) -> bool {
        (at - self.tcp_at) % 2 == 0 && at + len <= self.header_end
    }

    /// After an edit: keep the sum small (an edit adds at most 32 words).
    fn settle(&mut self) {
        self.delta = (self.delta & 0xffff) + (self.delta >> 16);
        self.edited = true;
    }

    /// Ends the edit: with `update_checksum`, folds the changes into the
    /// checksum field (not for a NEEDS_CSUM frame, whose field is only the
    /// pseudo-header seed the device completes). Returns whether anything
    /// was written.
    pub fn finish(self, update_checksum: bool) -> bool {
        if self.edited && update_checksum {
            let at = self.tcp_at + 16;
            let c = u16::from_be_bytes([self.frame[at], self.frame[at + 1]]);
            let c = !csum_fold(u32::from(!c) + self.delta);
            self.frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        self.edited
    }
}

/// Whether the TCP checksum of a complete segment (`tcp` = TCP header and
/// payload) is correct.
pub fn tcp_checksum_ok(seg: &TcpSegment, tcp: &[u8]) -> bool {
    let sum = pseudo_header_sum(seg.version, &seg.src, &seg.dst, tcp.len() as u32);
    csum_fold(csum_add(sum, tcp)) == 0xffff
}

/// Fills in the IPv4 header checksum of the header at `ip`.
pub fn set_ipv4_checksum(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[10] = 0;
    ip[11] = 0;
    let c = !csum_fold(csum_add(0, &ip[..ihl]));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Fills in the TCP checksum of the segment at `tcp` (header + payload).
pub fn set_tcp_checksum(version: IpVersion, src: &[u8; 16], dst: &[u8; 16], tcp: &mut [u8]) {
    tcp[16] = 0;
    tcp[17] = 0;
    let sum = pseudo_header_sum(version, src, dst, tcp.len() as u32);
    let c = !csum_fold(csum_add(sum, tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

/// What a frame we build carries.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameSpec<'a> {
    /// Destination and source MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// IP version.
    pub version: Option<IpVersion>,
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// TTL / hop limit.
    pub ttl: u8,
    /// DSCP.
    pub dscp: u8,
    /// IPv4 DF.
    pub dont_fragment: bool,
    /// IPv6 flow label.
    pub flow_label: u32,
    /// Ports.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Flags.
    pub flags: u8,
    /// Raw window.
    pub window: u16,
    /// (TSval, TSecr) to include.
    pub timestamps: Option<(u32, u32)>,
    /// Payload.
    pub payload: &'a [u8],
}

/// Appends a complete Ethernet frame (all checksums set, ECN Not-ECT) to `out`.
pub fn build_frame(spec: &FrameSpec<'_>, out: &mut Vec<u8>) {
    let version = spec.version.unwrap_or(IpVersion::V4);
    let opt_len = if spec.timestamps.is_some() { 12 } else { 0 };
    let tcp_len = 20 + opt_len + spec.payload.len();
    let start = out.len();
    out.extend_from_slice(&spec.dst_mac);
    out.extend_from_slice(&spec.src_mac);
    let ip_at = out.len() + 2;
    match version {
        IpVersion::V4 => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let total = (20 + tcp_len) as u16;
            let frag: u16 = if spec.dont_fragment { 0x4000 } else { 0 };
            out.extend_from_slice(&[0x45, spec.dscp << 2]);
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&frag.to_be_bytes());
            out.extend_from_slice(&[spec.ttl, 6, 0, 0]);
            out.extend_from_slice(&spec.src[..4]);
            out.extend_from_slice(&spec.dst[..4]);
            set_ipv4_checksum(&mut out[ip_at..ip_at + 20]);
        }
        IpVersion::V6 => {
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            let tclass = u32::from(spec.dscp << 2);
            let word = (6u32 << 28) | (tclass << 20) | (spec.flow_label & 0x000f_ffff);
            out.extend_from_slice(&word.to_be_bytes());
            out.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            out.extend_from_slice(&[6, spec.ttl]);
            out.extend_from_slice(&spec.src);
            out.extend_from_slice(&spec.dst);
        }
    }
    let tcp_at = out.len();
    out.extend_from_slice(&spec.sport.to_be_bytes());
    out.extend_from_slice(&spec.dport.to_be_bytes());
    out.extend_from_slice(&spec.seq.to_be_bytes());
    out.extend_from_slice(&spec.ack.to_be_bytes());
    out.push(((20 + opt_len) as u8 / 4) << 4);
    out.push(spec.flags);
    out.extend_from_slice(&spec.window.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    if let Some((tsval, tsecr)) = spec.timestamps {
        out.extend_from_slice(&[option::NOP, option::NOP, option::TIMESTAMPS, 10]);
        out.extend_from_slice(&tsval.to_be_bytes());
        out.extend_from_slice(&tsecr.to_be_bytes());
    }
    out.extend_from_slice(spec.payload);
    set_tcp_checksum(version, &spec.src, &spec.dst, &mut out[tcp_at..]);
    debug_assert_eq!(out.len() - start, ETH_LEN + (tcp_at - ip_at) + tcp_len);
}

/// Longest pure ACK [`AckTemplate`] holds: Ethernet, IPv6, TCP with timestamps.
const ACK_MAX: usize = ETH_LEN + 40 + 32;

/// A flow's pure ACK prepared once: every byte but seq, ack, flags, window
/// and the timestamp values is fixed for the flow (the IPv4 id is always 0,
/// so the IPv4 header and its checksum are fixed too). Emitting one copies
/// the template, writes those fields and completes the TCP checksum from the
/// precomputed sum of everything else: the same one's-complement sum as a
/// full [`build_frame`], so the frame is byte-identical, at a fraction of
/// the cost.
#[derive(Clone, Copy, Debug)]
pub struct AckTemplate {
    frame: [u8; ACK_MAX],
    len: u8,
    tcp_at: u8,
    timestamps: bool,
    /// Folded sum of the pseudo-header and the TCP header with the variable
    /// fields and the checksum zero (never 0: the protocol number is in it).
    base: u16,
}

impl AckTemplate {
    /// The template of `spec`'s frame (its seq, ack, flags, window and
    /// timestamp values do not matter; whether it has timestamps does).
    /// `spec` must have no payload.
    pub fn new(spec: &FrameSpec<'_>) -> AckTemplate {
        debug_assert!(spec.payload.is_empty());
        let mut out = Vec::with_capacity(ACK_MAX);
        build_frame(
            &FrameSpec {
                seq: 0,
                ack: 0,
                flags: 0,
                window: 0,
                timestamps: spec.timestamps.map(|_| (0, 0)),
                payload: &[],
                ..*spec
            },
            &mut out,
        );
        let version = spec.version.unwrap_or(IpVersion::V4);
        let tcp_at = out.len() - 20 - if spec.timestamps.is_some() { 12 } else { 0 };
        out[tcp_at + 16] = 0;
        out[tcp_at + 17] = 0;
        let tcp = &out[tcp_at..];
        let sum = pseudo_header_sum(version, &spec.src, &spec.dst, tcp.len() as u32);
        let mut frame = [0u8; ACK_MAX];
        frame[..out.len()].copy_from_slice(&out);
        AckTemplate {
            frame,
            len: out.len() as u8,
            tcp_at: tcp_at as u8,
            timestamps: spec.timestamps.is_some(),
            base: csum_fold(csum_add(sum, tcp)),
        }
    }

    /// Whether the template's frames carry the timestamps option.
    pub fn timestamps(&self) -> bool {
        self.timestamps
    }

    /// Appends the ACK with these fields to `out`: the frame
    /// [`build_frame`] makes of the template's spec with them.
    /// `timestamps` must be present exactly when the template has them.
    pub fn emit(
        &self,
        seq: u32,
        ack: u32,
        flag_bits: u8,
        window: u16,
        timestamps: Option<(u32, u32)>,
        out: &mut Vec<u8>,
    ) {
        debug_assert_eq!(timestamps.is_some(), self.timestamps);
        let start = out.len();
        out.extend_from_slice(&self.frame[..usize::from(self.len)]);
        let t = &mut out[start + usize::from(self.tcp_at)..];
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[13] = flag_bits;
        t[14..16].copy_from_slice(&window.to_be_bytes());
        // At most 11 words on a 16-bit base: no overflow.
        let words = |v: u32| (v >> 16) + (v & 0xffff);
        let mut sum = u32::from(self.base)
            + words(seq)
            + words(ack)
            + u32::from(flag_bits)
            + u32::from(window);
        if let Some((tsval, tsecr)) = timestamps {
            t[24..28].copy_from_slice(&tsval.to_be_bytes());
            t[28..32].copy_from_slice(&tsecr.to_be_bytes());
            sum += words(tsval) + words(tsecr);
        }
        t[16..18].copy_from_slice(&(!csum_fold(sum)).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// RFC 1071's definition, one 16-bit word at a time.
    fn word_sum(sum: u32, data: &[u8]) -> u16 {
        let mut acc = u64::from(sum);
        for w in data.chunks(2) {
            acc += u64::from(w[0]) << 8 | w.get(1).map_or(0, |&b| u64::from(b));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn csum_add_matches_the_word_at_a_time_sum() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let sums = [0, 1, 6 + 1448, 0xffff, 0x1_fffe, 0x00ff_ffff];
        for len in 0..=1600 {
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for &sum in &sums {
                let got = csum_add(sum, &data);
                assert!(got <= 0xffff, "len {len}: not folded ({got:#x})");
                assert_eq!(got as u16, word_sum(sum, &data), "len {len}, sum {sum:#x}");
            }
        }
        // Sums that are multiples of 0xffff stay 0xffff (one's-complement
        // "negative zero"), as the word loop gives; only all-zero input is 0.
        for len in [2, 4, 6, 7, 8, 1448, 9000] {
            let ones = vec![0xffu8; len];
            assert_eq!(csum_add(0, &ones) as u16, word_sum(0, &ones), "len {len}");
            assert_eq!(csum_add(0, &vec![0u8; len]), 0, "len {len}");
        }
        // Long inputs (a 64 KB GSO segment) where the wide sum carries far.
        let big = vec![0xffu8; 65_535];
        assert_eq!(csum_add(0xffff, &big) as u16, word_sum(0xffff, &big));
    }

    fn v4_segment(options: &[etherparse::TcpOptionElement], payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1000, 2000, 0xdead_beef, 4096)
            .ack(0x1234_5678)
            .options(options)
            .unwrap();
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn parses_ipv4_tcp_with_options() {
        use etherparse::TcpOptionElement::*;
        let f = v4_segment(
            &[
                MaximumSegmentSize(1460),
                WindowScale(7),
                SelectiveAcknowledgementPermitted,
                Timestamp(11, 22),
            ],
            b"hello",
        );
        let s = parse(&f, f.len()).unwrap();
        assert_eq!(s.version, IpVersion::V4);
        assert_eq!((s.sport, s.dport), (1000, 2000));
        assert_eq!((s.seq, s.ack, s.window), (0xdead_beef, 0x1234_5678, 4096));
        assert_eq!(s.payload_len, 5);
        assert_eq!(&f[s.payload_at..], b"hello");
        assert_eq!(s.options.mss, Some(1460));
        assert_eq!(s.options.wscale, Some(7));
        assert!(s.options.sack_permitted);
        assert_eq!(s.options.timestamps, Some((11, 22)));
        assert_eq!(be32(&f, s.options.timestamps_at), 11);
        assert_eq!(s.ttl, 64);
        assert!(tcp_checksum_ok(&s, &f[s.tcp_at..]));
        assert!(s.has(flags::ACK) && !s.has(flags::SYN));
    }

    #[test]
    fn parses_ipv6_and_sack_blocks() {
        use etherparse::TcpOptionElement::*;
        let b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv6([1; 16], [2; 16], 33)
            .tcp(5, 6, 100, 10)
            .ack(50)
            .options(&[SelectiveAcknowledgement(
                (200, 300),
                [Some((400, 500)), None, None],
            )])
            .unwrap();
        let mut f = Vec::new();
        b.write(&mut f, &[]).unwrap();
        let s = parse(&f, f.len()).unwrap();
        assert_eq!(s.version, IpVersion::V6);
        assert_eq!(s.ttl, 33);
        assert_eq!(s.payload_len, 0);
        assert!(s.is_pure_ack());
        let blocks: Vec<_> = sack_blocks(&f, &s).collect();
        assert_eq!(blocks, vec![(200, 300), (400, 500)]);
        assert!(tcp_checksum_ok(&s, &f[s.tcp_at..]));
    }

    #[test]
    fn rejects_what_is_not_plain_tcp() {
        let f = v4_segment(&[], b"x");
        // Truncated headers, every length.
        for cut in 0..f.len() - 1 {
            let _ = parse(&f[..cut], f.len());
        }
        assert!(parse(&f[..30], f.len()).is_none());
        // Frame shorter than the IP total length.
        assert!(parse(&f, f.len() - 2).is_none());
        // A fragment.
        let mut frag = f.clone();
        frag[ETH_LEN + 6] = 0x20;
        assert!(parse(&frag, frag.len()).is_none());
        // UDP.
        let mut udp = f.clone();
        udp[ETH_LEN + 9] = 17;
        assert!(parse(&udp, udp.len()).is_none());
        // Data offset below 5 words or past the IP payload.
        let mut bad = f.clone();
        bad[ETH_LEN + 20 + 12] = 0x40;
        assert!(parse(&bad, bad.len()).is_none());
        bad[ETH_LEN + 20 + 12] = 0xf0;
        assert!(parse(&bad, bad.len()).is_none());
        // VLAN-tagged: not ours.
        let mut vlan = f.clone();
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert!(parse(&vlan, vlan.len()).is_none());
    }

    #[test]
    fn options_that_overrun_the_header_are_rejected() {
        use etherparse::TcpOptionElement::*;
        let mut f = v4_segment(&[MaximumSegmentSize(1460)], b"");
        let opt = ETH_LEN + 20 + 20;
        f[opt + 1] = 9; // MSS claims 9 bytes in a 4-byte option space
        assert!(parse(&f, f.len()).is_none());
        f[opt + 1] = 0; // zero length would loop forever
        assert!(parse(&f, f.len()).is_none());
    }

    #[test]
    fn flags_md5_ao_mptcp_and_fastopen() {
        for kind in [option::MD5, option::AO, option::MPTCP, option::FASTOPEN] {
            let mut f = v4_segment(&vec![etherparse::TcpOptionElement::Noop; 4], b"");
            let opt = ETH_LEN + 20 + 20;
            f[opt] = kind;
            f[opt + 1] = 4;
            let o = parse(&f, f.len()).unwrap().options;
            assert_eq!(
                [o.md5, o.ao, o.mptcp, o.fastopen],
                [
                    kind == option::MD5,
                    kind == option::AO,
                    kind == option::MPTCP,
                    kind == option::FASTOPEN
                ]
            );
        }
    }

    #[test]
    fn sequence_comparisons_wrap() {
        assert!(seq_lt(0xffff_fff0, 5));
        assert!(!seq_lt(5, 0xffff_fff0));
        assert!(seq_le(7, 7));
        assert_eq!(seq_max(0xffff_fff0, 5), 5);
        assert_eq!(seq_max(9, 5), 9);
    }

    #[test]
    fn incremental_update_matches_a_full_recompute() {
        use etherparse::TcpOptionElement::*;
        let mut f = v4_segment(&[Timestamp(1, 2)], b"payload!");
        let s = parse(&f, f.len()).unwrap();
        let tcp = s.tcp_at;
        let mut e = TcpHeaderEdit::new(&mut f, tcp, s.payload_at);
        e.set_u32(tcp + 8, 0x0102_0304);
        e.set_u16(tcp + 14, 77);
        e.set_u32(s.options.timestamps_at + 4, 999);
        assert!(e.finish(true));
        let s2 = parse(&f, f.len()).unwrap();
        assert_eq!(
            (s2.ack, s2.window, s2.options.timestamps),
            (0x0102_0304, 77, Some((1, 999)))
        );
        assert!(tcp_checksum_ok(&s2, &f[tcp..]));
        // A corrupt segment stays corrupt after an incremental update.
        let mut g = v4_segment(&[], b"abcd");
        let gs = parse(&g, g.len()).unwrap();
        let last = g.len() - 1;
        g[last] ^= 0x40;
        let mut e = TcpHeaderEdit::new(&mut g, gs.tcp_at, gs.payload_at);
        e.set(gs.tcp_at + 14, &[1]);
        e.finish(true);
        let gs2 = parse(&g, g.len()).unwrap();
        assert!(!tcp_checksum_ok(&gs2, &g[gs.tcp_at..]));
        // Nothing written: nothing changes, not even the checksum.
        let before = g.clone();
        assert!(!TcpHeaderEdit::new(&mut g, gs.tcp_at, gs.payload_at).finish(true));
        assert_eq!(g, before);
    }

    #[test]
    fn incremental_edits_at_any_offset_and_length_keep_the_checksum_exact() {
        use etherparse::TcpOptionElement::*;
        // Options of 40 bytes, so edits reach the last header byte.
        let opts = [
            Noop,
            MaximumSegmentSize(1460),
            Noop,
            WindowScale(7),
            Timestamp(5, 6),
            SelectiveAcknowledgement((1, 2), [Some((3, 4)), None, None]),
        ];
        let mut f = v4_segment(&opts, b"xyz");
        let s = parse(&f, f.len()).unwrap();
        let (tcp, end) = (s.tcp_at, s.payload_at);
        assert_eq!(end - tcp, 60);
        let mut x: u32 = 0x9e37_79b9;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for round in 0..2000 {
            let mut e = TcpHeaderEdit::new(&mut f, tcp, end);
            for _ in 0..1 + round % 4 {
                // Anywhere but the checksum field itself.
                let at = tcp + 18 + (next() as usize) % 42;
                let len = 1 + (next() as usize) % (end - at).min(12);
                let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                // The 16- and 32-bit writers too, aligned or not.
                match len {
                    2 => e.set_u16(at, u16::from_be_bytes([bytes[0], bytes[1]])),
                    4 => e.set_u32(at, be32(&bytes, 0)),
                    _ => e.set(at, &bytes),
                }
            }
            e.finish(true);
            // The addresses are unchanged, so `s` still gives the pseudo-header.
            assert!(tcp_checksum_ok(&s, &f[tcp..]), "round {round}");
        }
        // NEEDS_CSUM: the seed in the checksum field is left alone.
        let seed = f[tcp + 16..tcp + 18].to_vec();
        let mut e = TcpHeaderEdit::new(&mut f, tcp, end);
        e.set_u32(tcp + 4, 42);
        assert!(e.finish(false));
        assert_eq!(f[tcp + 16..tcp + 18], seed[..]);
    }

    #[test]
    fn built_frames_parse_back_with_good_checksums() {
        for version in [IpVersion::V4, IpVersion::V6] {
            let spec = FrameSpec {
                dst_mac: [2; 6],
                src_mac: [1; 6],
                version: Some(version),
                src: [9; 16],
                dst: [8; 16],
                ttl: 61,
                dscp: 10,
                dont_fragment: true,
                flow_label: 0xabcde,
                sport: 1,
                dport: 2,
                seq: 3,
                ack: 4,
                flags: flags::ACK | flags::ECE,
                window: 500,
                timestamps: Some((7, 8)),
                payload: b"xyz",
            };
            let mut out = vec![0xaa]; // appending, not overwriting
            build_frame(&spec, &mut out);
            let f = &out[1..];
            let s = parse(f, f.len()).unwrap();
            assert_eq!(s.version, version);
            assert_eq!((s.seq, s.ack, s.window, s.flags), (3, 4, 500, spec.flags));
            assert_eq!(s.options.timestamps, Some((7, 8)));
            assert_eq!((s.ttl, s.dscp, s.ecn), (61, 10, 0));
            assert_eq!(&f[s.payload_at..], b"xyz");
            assert!(tcp_checksum_ok(&s, &f[s.tcp_at..]));
            if version == IpVersion::V4 {
                assert!(s.dont_fragment);
                assert_eq!(csum_fold(csum_add(0, &f[ETH_LEN..ETH_LEN + 20])), 0xffff);
            } else {
                assert_eq!(s.flow_label, 0xabcde);
            }
            // etherparse agrees.
            let p = etherparse::SlicedPacket::from_ethernet(f).unwrap();
            assert!(p.transport.is_some());
        }
    }

    #[test]
    fn ack_template_frames_match_the_full_builder() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x00ff_10ad);
        for round in 0..4000 {
            let version = if round % 2 == 0 {
                IpVersion::V4
            } else {
                IpVersion::V6
            };
            let ts = round % 4 < 2;
            let spec = FrameSpec {
                dst_mac: rng.gen(),
                src_mac: rng.gen(),
                version: Some(version),
                src: rng.gen(),
                dst: rng.gen(),
                ttl: rng.gen(),
                dscp: rng.gen::<u8>() & 0x3f,
                dont_fragment: rng.gen(),
                flow_label: rng.gen(),
                sport: rng.gen(),
                dport: rng.gen(),
                seq: rng.gen(),
                ack: rng.gen(),
                flags: if rng.gen() {
                    flags::ACK
                } else {
                    flags::ACK | flags::ECE
                },
                // Extremes too: all-ones fields drive the sum to its limits.
                window: if round % 7 == 0 { u16::MAX } else { rng.gen() },
                timestamps: ts.then(|| {
                    if round % 11 == 0 {
                        (u32::MAX, u32::MAX)
                    } else {
                        (rng.gen(), rng.gen())
                    }
                }),
                payload: &[],
            };
            let mut spec = spec;
            if round % 5 == 0 {
                // The window that makes the checksum 0x0000 (a sum of 0xffff).
                spec.window = 0;
                let mut f = Vec::new();
                build_frame(&spec, &mut f);
                let c = f.len() - 20 - if ts { 12 } else { 0 } + 16;
                spec.window = u16::from_be_bytes([f[c], f[c + 1]]);
            }
            let mut full = vec![0xaa];
            build_frame(&spec, &mut full);
            // A template made from other variable fields gives the same frame.
            let tpl = AckTemplate::new(&FrameSpec {
                seq: rng.gen(),
                ack: rng.gen(),
                window: rng.gen(),
                timestamps: spec.timestamps.map(|_| (rng.gen(), rng.gen())),
                ..spec
            });
            assert_eq!(tpl.timestamps(), ts);
            let mut fast = vec![0xaa];
            tpl.emit(
                spec.seq,
                spec.ack,
                spec.flags,
                spec.window,
                spec.timestamps,
                &mut fast,
            );
            assert_eq!(fast, full, "round {round}");
        }
    }

    #[test]
    fn timestamps_fast_path_agrees_with_the_option_walk() {
        let mut b = [0u8; 40];
        b[20..24].copy_from_slice(&[option::NOP, option::NOP, option::TIMESTAMPS, 10]);
        b[24..28].copy_from_slice(&0x8000_0001u32.to_be_bytes());
        b[28..32].copy_from_slice(&0xffff_fffeu32.to_be_bytes());
        let fast = parse_options(&b, 20, 32).unwrap();
        // The same option after padding the walk must step over.
        let mut c = [0u8; 40];
        c[20..22].copy_from_slice(&[option::NOP, option::NOP]);
        c[22..34].copy_from_slice(&b[22..34]);
        c[32..36].copy_from_slice(&[option::NOP; 4]);
        let walked = parse_options(&c, 20, 36).unwrap();
        assert_eq!(fast, walked);
        assert_eq!(fast.timestamps, Some((0x8000_0001, 0xffff_fffe)));
        assert_eq!(fast.timestamps_at, 24);
        // Twelve bytes that are not NOP, NOP, timestamps take the walk.
        b[20..24].copy_from_slice(&[option::MSS, 4, 0x0a, 0x80]);
        b[24..32].fill(option::NOP);
        let other = parse_options(&b, 20, 32).unwrap();
        assert_eq!((other.mss, other.timestamps), (Some(0x0a80), None));
    }
}
