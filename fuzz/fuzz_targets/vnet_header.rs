//! Arbitrary virtio-net headers and feature sets: decoding and the TX
//! header check never panic, and a refused header is explained.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vsnoop::net::vnet_hdr::{Negotiated, VnetHdr};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let features = u64::from_le_bytes(data[..8].try_into().unwrap());
    let negotiated = Negotiated::from_features(features);
    let hdr = VnetHdr::from_bytes(&data[8..]);
    let _ = (
        hdr.hdr_len(),
        hdr.gso_size(),
        hdr.csum_start(),
        hdr.csum_offset(),
    );
    if let Err(e) = negotiated.check_tx_header(&hdr) {
        assert!(!e.to_string().is_empty());
    }
    assert!(negotiated.max_rx_packet() >= negotiated.hdr_len);
});
