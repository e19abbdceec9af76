//! Arbitrary descriptor tables and avail rings: chain validation must never
//! panic, and every accepted segment must lie inside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vsnoop::net::chain::{collect_segments, Access};
use vsnoop::GuestMemory;

const MEM: usize = 0x2_0000;
const QSIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // Descriptor table at 0, avail ring at 0x1000, used ring at 0x2000; the
    // rest of memory (indirect tables, buffers) is fuzz data too.
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    let mut segments = Vec::new();
    let mut iov = Vec::new();
    for round in 0..QSIZE {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let access = if round % 2 == 0 {
            Access::DeviceWrites
        } else {
            Access::DeviceReads
        };
        iov.clear();
        if let Ok(total) = collect_segments(chain, &mem, access, &mut segments, &mut iov) {
            let sum: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(sum, u64::from(total));
            for s in &segments {
                assert!(GuestMemoryBackend::check_range(
                    &mem,
                    s.addr,
                    s.len as usize
                ));
            }
            let iov_sum: usize = iov.iter().map(|v| v.iov_len).sum();
            assert_eq!(iov_sum as u64, sum);
        }
    }
});
