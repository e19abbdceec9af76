//! The header fields the attribution needs, parsed from the first bytes of
//! a frame.
//!
//! Frames come from the guest or from the tap and may be cut short (vsnoop
//! only copies a prefix of each frame off the data path), so lengths come from
//! the IP header, never from the slice; anything that does not parse is
//! reported as `None` and counted by the caller. Header views are etherparse's
//! zero-copy slices.

use std::net::IpAddr;

use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice,
    SingleVlanHeaderSlice, TcpHeaderSlice, TcpOptionElement, UdpHeaderSlice,
};

/// Bytes of a frame the attribution looks at: Ethernet, two VLAN tags, an
/// IPv6 header and a TCP header with 40 bytes of options fit.
pub const PREFIX_LEN: usize = 14 + 8 + 40 + 60;

/// TCP header flags the matchers use.
pub mod flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// A TCP segment's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpMeta {
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful with the ACK flag).
    pub ack: u32,
    /// FIN/SYN/RST/ACK bits (see [`flags`]).
    pub flags: u8,
    /// Payload bytes according to the IP header (a GSO frame's whole payload).
    pub payload_len: u32,
    /// Timestamps option: (TSval, TSecr).
    pub timestamps: Option<(u32, u32)>,
}

impl TcpMeta {
    /// Sequence space the segment occupies (payload, plus one for SYN and FIN).
    pub fn seq_len(&self) -> u32 {
        self.payload_len
            + u32::from(self.flags & flags::SYN != 0)
            + u32::from(self.flags & flags::FIN != 0)
    }

    /// True for a segment that carries nothing but an acknowledgment.
    pub fn is_pure_ack(&self) -> bool {
        self.seq_len() == 0 && self.flags & flags::RST == 0
    }
}

/// The transport part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Segment fields.
        tcp: TcpMeta,
    },
    /// UDP.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMP or ICMPv6 echo request or reply.
    Echo {
        /// ICMPv6 rather than ICMPv4.
        v6: bool,
        /// Request (true) or reply (false).
        request: bool,
        /// Identifier.
        id: u16,
        /// Sequence number.
        seq: u16,
    },
}

/// Addresses and transport fields of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketMeta {
    /// IP source.
    pub src: IpAddr,
    /// IP destination.
    pub dst: IpAddr,
    /// Transport fields.
    pub transport: Transport,
}

/// Parses an Ethernet frame (or its first [`PREFIX_LEN`] bytes). Returns
/// `None` for anything that is not IPv4/IPv6 carrying TCP, UDP or an ICMP
/// echo, for fragments after the first, and for malformed headers.
pub fn parse(frame: &[u8]) -> Option<PacketMeta> {
    let eth = Ethernet2HeaderSlice::from_slice(frame).ok()?;
    let mut ether_type = eth.ether_type();
    let mut rest = &frame[eth.slice().len()..];
    // Up to two VLAN tags (802.1Q / 802.1ad).
    for _ in 0..2 {
        if ether_type != EtherType::VLAN_TAGGED_FRAME
            && ether_type != EtherType::PROVIDER_BRIDGING
            && ether_type != EtherType::VLAN_DOUBLE_TAGGED_FRAME
        {
            break;
        }
        let vlan = SingleVlanHeaderSlice::from_slice(rest).ok()?;
        ether_type = vlan.ether_type();
        rest = &rest[vlan.slice().len()..];
    }
    let (src, dst, protocol, l4, l4_len) = match ether_type {
        EtherType::IPV4 => {
            let ip = Ipv4HeaderSlice::from_slice(rest).ok()?;
            if ip.is_fragmenting_payload() && ip.fragments_offset().value() != 0 {
                return None;
            }
            let header_len = ip.slice().len();
            let l4_len = usize::from(ip.total_len()).checked_sub(header_len)?;
            (
                IpAddr::V4(ip.source_addr()),
                IpAddr::V4(ip.destination_addr()),
                ip.protocol(),
                &rest[header_len..],
                l4_len,
            )
        }
        EtherType::IPV6 => {
            // Extension headers are not followed: flows using them are not
            // attributed (counted as "other").
            let ip = Ipv6HeaderSlice::from_slice(rest).ok()?;
            (
                IpAddr::V6(ip.source_addr()),
                IpAddr::V6(ip.destination_addr()),
                ip.next_header(),
                &rest[ip.slice().len()..],
                usize::from(ip.payload_length()),
            )
        }
        _ => return None,
    };
    let transport = match protocol {
        IpNumber::TCP => {
            let tcp = TcpHeaderSlice::from_slice(l4).ok()?;
            let header_len = tcp.slice().len();
            let payload_len = l4_len.checked_sub(header_len)? as u32;
            let mut timestamps = None;
            for option in tcp.options_iterator() {
                match option {
                    Ok(TcpOptionElement::Timestamp(val, ecr)) => timestamps = Some((val, ecr)),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let flags = u8::from(tcp.fin())
                | u8::from(tcp.syn()) << 1
                | u8::from(tcp.rst()) << 2
                | u8::from(tcp.ack()) << 4;
            Transport::Tcp {
                sport: tcp.source_port(),
                dport: tcp.destination_port(),
                tcp: TcpMeta {
                    seq: tcp.sequence_number(),
                    ack: tcp.acknowledgment_number(),
                    flags,
                    payload_len,
                    timestamps,
                },
            }
        }
        IpNumber::UDP => {
            let udp = UdpHeaderSlice::from_slice(l4).ok()?;
            Transport::Udp {
                sport: udp.source_port(),
                dport: udp.destination_port(),
            }
        }
        IpNumber::ICMP | IpNumber::IPV6_ICMP => {
            let v6 = protocol == IpNumber::IPV6_ICMP;
            if l4.len() < 8 {
                return None;
            }
            // Echo request / reply: type, code, checksum, identifier, sequence.
            let request = match (v6, l4[0]) {
                (false, 8) | (true, 128) => true,
                (false, 0) | (true, 129) => false,
                _ => return None,
            };
            Transport::Echo {
                v6,
                request,
                id: u16::from_be_bytes([l4[4], l4[5]]),
                seq: u16::from_be_bytes([l4[6], l4[7]]),
            }
        }
        _ => return None,
    };
    Some(PacketMeta {
        src,
        dst,
        transport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn tcp_frame(payload: &[u8], ts: Option<(u32, u32)>) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([10, 77, 0, 1], [10, 77, 0, 2], 64)
            .tcp(40000, 5201, 1000, 65535)
            .ack(77);
        if let Some((val, ecr)) = ts {
            b = b
                .options(&[
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                    TcpOptionElement::Timestamp(val, ecr),
                ])
                .unwrap();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn tcp_fields_and_timestamps() {
        let frame = tcp_frame(&[7u8; 100], Some((123, 456)));
        let meta = parse(&frame).unwrap();
        assert_eq!(meta.src, "10.77.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(meta.dst, "10.77.0.2".parse::<IpAddr>().unwrap());
        let Transport::Tcp { sport, dport, tcp } = meta.transport else {
            panic!("not tcp")
        };
        assert_eq!((sport, dport), (40000, 5201));
        assert_eq!(tcp.seq, 1000);
        assert_eq!(tcp.ack, 77);
        assert_eq!(tcp.flags, flags::ACK);
        assert_eq!(tcp.payload_len, 100);
        assert_eq!(tcp.timestamps, Some((123, 456)));
        assert!(!tcp.is_pure_ack());
    }

    #[test]
    fn payload_length_comes_from_the_ip_header_of_a_cut_frame() {
        let frame = tcp_frame(&[7u8; 3000], None);
        let meta = parse(&frame[..PREFIX_LEN]).unwrap();
        let Transport::Tcp { tcp, .. } = meta.transport else {
            panic!()
        };
        assert_eq!(tcp.payload_len, 3000);
        assert_eq!(tcp.timestamps, None);
    }

    #[test]
    fn syn_and_fin_occupy_sequence_space() {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6([1; 16], [2; 16], 64)
            .tcp(1, 2, 10, 100)
            .syn()
            .fin()
            .write(&mut out, &[])
            .unwrap();
        let Transport::Tcp { tcp, .. } = parse(&out).unwrap().transport else {
            panic!()
        };
        assert_eq!(tcp.seq_len(), 2);
        assert!(!tcp.is_pure_ack());
    }

    #[test]
    fn udp_and_icmp_echo() {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .single_vlan(5.try_into().unwrap())
            .ipv4([1, 2, 3, 4], [5, 6, 7, 8], 64)
            .udp(53, 1234)
            .write(&mut out, &[1, 2, 3])
            .unwrap();
        assert_eq!(
            parse(&out).unwrap().transport,
            Transport::Udp {
                sport: 53,
                dport: 1234
            }
        );
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([1, 2, 3, 4], [5, 6, 7, 8], 64)
            .icmpv4_echo_request(0x1234, 9)
            .write(&mut out, &[0; 8])
            .unwrap();
        assert_eq!(
            parse(&out).unwrap().transport,
            Transport::Echo {
                v6: false,
                request: true,
                id: 0x1234,
                seq: 9
            }
        );
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6([1; 16], [2; 16], 64)
            .icmpv6_echo_reply(7, 8)
            .write(&mut out, &[0; 8])
            .unwrap();
        assert_eq!(
            parse(&out).unwrap().transport,
            Transport::Echo {
                v6: true,
                request: false,
                id: 7,
                seq: 8
            }
        );
    }

    #[test]
    fn refuses_what_it_cannot_attribute() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0u8; 13]), None);
        // ARP.
        let mut arp = vec![0u8; 42];
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(parse(&arp), None);
        // IPv4 with a total length shorter than its header.
        let mut frame = tcp_frame(&[], None);
        frame[16] = 0;
        frame[17] = 10;
        assert_eq!(parse(&frame), None);
        // Every prefix of a valid frame parses or is refused, never panics.
        let frame = tcp_frame(&[1u8; 50], Some((1, 2)));
        for n in 0..frame.len() {
            let _ = parse(&frame[..n]);
        }
    }
}
