//! The virtio-net header (`struct virtio_net_hdr_v1`) that precedes every
//! frame in both directions, and the offload negotiation it depends on.
//!
//! Layout (little endian, virtio 1.x section 5.1.6):
//! ```text
//! 0      flags        u8   NEEDS_CSUM (1), DATA_VALID (2), RSC_INFO (4)
//! 1      gso_type     u8   NONE 0, TCPV4 1, UDP 3, TCPV6 4, ECN bit 0x80
//! 2..4   hdr_len      u16
//! 4..6   gso_size     u16
//! 6..8   csum_start   u16
//! 8..10  csum_offset  u16
//! 10..12 num_buffers  u16  (present with VERSION_1 or MRG_RXBUF)
//! ```

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
};

/// Header length when VERSION_1 or MRG_RXBUF is negotiated.
pub const HDR_LEN_V1: usize = 12;
/// Header length of a legacy device without MRG_RXBUF.
pub const HDR_LEN_LEGACY: usize = 10;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// `flags`: the checksum from `csum_start` on must be completed by the receiver.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was validated (device to driver).
pub const FLAG_DATA_VALID: u8 = 2;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation offload.
pub const GSO_UDP: u8 = 3;
/// TCP over IPv6 segmentation.
pub const GSO_TCPV6: u8 = 4;
/// ECN (CWR) must be preserved on segmentation.
pub const GSO_ECN: u8 = 0x80;

/// Largest Ethernet frame carried in one virtio-net packet: a 64 KiB IP
/// datagram plus an Ethernet header with one VLAN tag.
pub const MAX_FRAME_LEN: usize = 65_535 + 14 + 4;

// TUNSETOFFLOAD flags from <linux/if_tun.h>.
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_TSO_ECN: u32 = 0x08;

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// What the negotiated features mean for the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Length of the virtio-net header on both rings and on the tap.
    pub hdr_len: usize,
    /// RX packets may span several chains (`num_buffers` is filled in).
    pub mergeable: bool,
    /// Offload flags for TUNSETOFFLOAD (what the tap may hand us for the guest).
    pub tap_offloads: u32,
    /// Whether the tap may hand us GSO frames.
    pub guest_gso: bool,
    /// Guest may send NEEDS_CSUM frames.
    pub host_csum: bool,
    /// Guest may send TCPv4 GSO frames.
    pub host_tso4: bool,
    /// Guest may send TCPv6 GSO frames.
    pub host_tso6: bool,
    /// Guest may set the ECN bit on GSO frames.
    pub host_ecn: bool,
    /// The frontend logs dirty pages (VHOST_F_LOG_ALL: migration running):
    /// writes that bypass vm-memory must be marked dirty by hand.
    pub log_all: bool,
}

impl Negotiated {
    /// Derives the data-path parameters from the features the driver acked.
    ///
    /// Host-to-guest offloads follow the guest: checksum offload needs
    /// GUEST_CSUM, and TSO additionally needs GUEST_TSO4/6 (virtio requires
    /// GUEST_CSUM for any GUEST_TSO, so a guest acking TSO without it gets none).
    pub fn from_features(features: u64) -> Self {
        let mergeable = has(features, VIRTIO_NET_F_MRG_RXBUF);
        let hdr_len = if mergeable || has(features, VIRTIO_F_VERSION_1) {
            HDR_LEN_V1
        } else {
            HDR_LEN_LEGACY
        };
        let mut tap_offloads = 0;
        if has(features, VIRTIO_NET_F_GUEST_CSUM) {
            tap_offloads |= TUN_F_CSUM;
            if has(features, VIRTIO_NET_F_GUEST_TSO4) {
                tap_offloads |= TUN_F_TSO4;
            }
            if has(features, VIRTIO_NET_F_GUEST_TSO6) {
                tap_offloads |= TUN_F_TSO6;
            }
            if tap_offloads & (TUN_F_TSO4 | TUN_F_TSO6) != 0
                && has(features, VIRTIO_NET_F_GUEST_ECN)
            {
                tap_offloads |= TUN_F_TSO_ECN;
            }
        }
        let host_csum = has(features, VIRTIO_NET_F_CSUM);
        Negotiated {
            hdr_len,
            mergeable,
            tap_offloads,
            guest_gso: tap_offloads & (TUN_F_TSO4 | TUN_F_TSO6) != 0,
            host_csum,
            host_tso4: host_csum && has(features, VIRTIO_NET_F_HOST_TSO4),
            host_tso6: host_csum && has(features, VIRTIO_NET_F_HOST_TSO6),
            host_ecn: has(features, VIRTIO_NET_F_HOST_ECN),
            log_all: features & crate::vhost_user::VHOST_F_LOG_ALL != 0,
        }
    }

    /// Largest RX packet (header included) the tap can hand us. The tap's
    /// MTU can change at any time and a tap read into too small a buffer
    /// truncates silently, so this is the protocol limit, not the MTU.
    pub fn max_rx_packet(&self) -> usize {
        self.hdr_len + MAX_FRAME_LEN
    }

    /// Checks a guest TX header against what was negotiated.
    pub fn check_tx_header(&self, hdr: &VnetHdr) -> Result<(), TxHeaderError> {
        if hdr.needs_csum() && !self.host_csum {
            return Err(TxHeaderError::CsumNotNegotiated);
        }
        let gso = hdr.gso_type();
        let allowed = match gso & !GSO_ECN {
            GSO_NONE => return Ok(()),
            GSO_TCPV4 => self.host_tso4,
            GSO_TCPV6 => self.host_tso6,
            _ => false,
        };
        if !allowed || (gso & GSO_ECN != 0 && !self.host_ecn) {
            return Err(TxHeaderError::GsoNotNegotiated(gso));
        }
        Ok(())
    }
}

/// Why a guest TX header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxHeaderError {
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM.
    #[error("checksum offload requested but VIRTIO_NET_F_CSUM not negotiated")]
    CsumNotNegotiated,
    /// A GSO type the guest did not negotiate (or an unknown one).
    #[error("GSO type {0:#x} not negotiated")]
    GsoNotNegotiated(u8),
}

/// A copy of the first bytes of a virtio-net header (at least 10 bytes valid).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    bytes: [u8; HDR_LEN_V1],
}

impl VnetHdr {
    /// Wraps header bytes; `bytes` shorter than 12 are zero-padded.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut hdr = VnetHdr::default();
        let n = bytes.len().min(HDR_LEN_V1);
        hdr.bytes[..n].copy_from_slice(&bytes[..n]);
        hdr
    }

    /// Raw bytes.
    pub fn as_bytes(&self) -> &[u8; HDR_LEN_V1] {
        &self.bytes
    }

    /// Mutable raw bytes (to fill a header before copying it out).
    pub fn as_bytes_mut(&mut self) -> &mut [u8; HDR_LEN_V1] {
        &mut self.bytes
    }

    /// `flags` byte.
    pub fn flags(&self) -> u8 {
        self.bytes[0]
    }

    /// NEEDS_CSUM is set.
    pub fn needs_csum(&self) -> bool {
        self.flags() & FLAG_NEEDS_CSUM != 0
    }

    /// `gso_type` byte (including the ECN bit).
    pub fn gso_type(&self) -> u8 {
        self.bytes[1]
    }

    /// `hdr_len`: length of the headers to replicate on each segment.
    pub fn hdr_len(&self) -> u16 {
        u16::from_le_bytes([self.bytes[2], self.bytes[3]])
    }

    /// `gso_size`: maximum segment payload.
    pub fn gso_size(&self) -> u16 {
        u16::from_le_bytes([self.bytes[4], self.bytes[5]])
    }

    /// `csum_start`: where checksumming starts.
    pub fn csum_start(&self) -> u16 {
        u16::from_le_bytes([self.bytes[6], self.bytes[7]])
    }

    /// `csum_offset`: where the checksum goes, relative to `csum_start`.
    pub fn csum_offset(&self) -> u16 {
        u16::from_le_bytes([self.bytes[8], self.bytes[9]])
    }

    /// `num_buffers`: RX chains this packet spans (mergeable RX buffers).
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.bytes[10], self.bytes[11]])
    }

    /// Sets `num_buffers`.
    pub fn set_num_buffers(&mut self, n: u16) {
        self.bytes[10..12].copy_from_slice(&n.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_TSO4)
        | (1 << VIRTIO_NET_F_GUEST_TSO6)
        | (1 << VIRTIO_NET_F_GUEST_ECN)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_ECN);

    #[test]
    fn header_fields_decode_little_endian() {
        let bytes = [1, 0x81, 0x36, 0, 0xa8, 0x05, 0x22, 0, 0x10, 0, 3, 0];
        let hdr = VnetHdr::from_bytes(&bytes);
        assert!(hdr.needs_csum());
        assert_eq!(hdr.gso_type(), GSO_TCPV4 | GSO_ECN);
        assert_eq!(hdr.hdr_len(), 54);
        assert_eq!(hdr.gso_size(), 1448);
        assert_eq!(hdr.csum_start(), 34);
        assert_eq!(hdr.csum_offset(), 16);
        assert_eq!(hdr.num_buffers(), 3);
    }

    #[test]
    fn short_header_is_zero_padded_and_num_buffers_round_trips() {
        let mut hdr = VnetHdr::from_bytes(&[0, 4]);
        assert_eq!(hdr.gso_type(), GSO_TCPV6);
        assert_eq!(hdr.num_buffers(), 0);
        hdr.set_num_buffers(0x1234);
        assert_eq!(&hdr.as_bytes()[10..12], &[0x34, 0x12]);
        assert_eq!(hdr.num_buffers(), 0x1234);
    }

    #[test]
    fn full_feature_set_enables_all_tap_offloads() {
        let n = Negotiated::from_features(ALL);
        assert_eq!(n.hdr_len, 12);
        assert!(n.mergeable);
        assert_eq!(
            n.tap_offloads,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        assert!(n.guest_gso);
        assert_eq!(n.max_rx_packet(), 12 + MAX_FRAME_LEN);
    }

    #[test]
    fn guest_tso_without_guest_csum_gives_no_offload() {
        let f = ALL & !(1 << VIRTIO_NET_F_GUEST_CSUM);
        let n = Negotiated::from_features(f);
        assert_eq!(n.tap_offloads, 0);
        assert!(!n.guest_gso);
    }

    #[test]
    fn guest_csum_alone_gives_csum_only_and_ecn_needs_tso() {
        let f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_ECN);
        let n = Negotiated::from_features(f);
        assert_eq!(n.tap_offloads, TUN_F_CSUM);
        assert!(!n.mergeable);
        assert_eq!(n.hdr_len, 12);
    }

    #[test]
    fn legacy_without_mrg_rxbuf_uses_ten_byte_header() {
        let n = Negotiated::from_features(0);
        assert_eq!(n.hdr_len, HDR_LEN_LEGACY);
        assert_eq!(n.max_rx_packet(), 10 + MAX_FRAME_LEN);
    }

    #[test]
    fn tx_header_checks_follow_negotiation() {
        let full = Negotiated::from_features(ALL);
        let none = Negotiated::from_features(1 << VIRTIO_F_VERSION_1);
        let tso4 = VnetHdr::from_bytes(&[1, GSO_TCPV4]);
        let tso6_ecn = VnetHdr::from_bytes(&[1, GSO_TCPV6 | GSO_ECN]);
        let ufo = VnetHdr::from_bytes(&[1, GSO_UDP]);
        let csum = VnetHdr::from_bytes(&[1, 0]);
        let plain = VnetHdr::from_bytes(&[0, 0]);
        assert_eq!(full.check_tx_header(&tso4), Ok(()));
        assert_eq!(full.check_tx_header(&tso6_ecn), Ok(()));
        assert_eq!(
            full.check_tx_header(&ufo),
            Err(TxHeaderError::GsoNotNegotiated(GSO_UDP))
        );
        assert_eq!(none.check_tx_header(&plain), Ok(()));
        assert_eq!(
            none.check_tx_header(&csum),
            Err(TxHeaderError::CsumNotNegotiated)
        );
        assert!(none
            .check_tx_header(&VnetHdr::from_bytes(&[0, GSO_TCPV4]))
            .is_err());
        let no_ecn = Negotiated::from_features(ALL & !(1 << VIRTIO_NET_F_HOST_ECN));
        assert!(no_ecn.check_tx_header(&tso6_ecn).is_err());
        assert!(full
            .check_tx_header(&VnetHdr::from_bytes(&[0, 0x7f]))
            .is_err());
    }
}
