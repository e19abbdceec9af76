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
/// Guest layout: descriptor table, avail ring, used ring, then the rest of
/// memory (indirect tables, buffers).
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const REST: u64 = 0x400;
/// flags, idx, ring[QSIZE], used_event.
const AVAIL_LEN: usize = 4 + 2 * QSIZE as usize + 2;
const DESC_LEN: usize = 16 * QSIZE as usize;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // The input fills the avail ring first, then the descriptor table, then
    // memory from REST on: a short input already makes chains. (Laid out as
    // in memory, with the avail ring past the 4 KiB that libFuzzer's inputs
    // reach by default, the avail index stayed 0 and no chain was ever
    // walked.)
    let (avail, rest) = data.split_at(data.len().min(AVAIL_LEN));
    let (desc, rest) = rest.split_at(rest.len().min(DESC_LEN));
    let rest = &rest[..rest.len().min(MEM - REST as usize)];
    mem.write_slice(avail, GuestAddress(AVAIL)).unwrap();
    mem.write_slice(desc, GuestAddress(DESC)).unwrap();
    mem.write_slice(rest, GuestAddress(REST)).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
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
