//! Validation of guest descriptor chains.
//!
//! Everything here is guest-controlled: a chain is accepted only when every
//! descriptor has the direction the ring requires, lies entirely inside guest
//! memory, and the chain ends properly (no loop, no bad index, no bad indirect
//! table; virtio-queue truncates those silently, so a chain whose last
//! descriptor still says NEXT is refused). Accepted chains are reduced to a
//! list of guest-physical segments; host addresses are resolved only at the
//! moment of I/O, under the current memory map.

use std::ops::Deref;

use crate::GuestMemory;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress};

use super::push_iovecs;

/// One guest buffer: guest-physical address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// Loop, longer than the queue, bad next index, bad indirect table, or empty.
    #[error("malformed descriptor chain")]
    Malformed,
    /// A buffer outside guest memory, or address + length overflows.
    #[error("descriptor outside guest memory")]
    BadAddress,
    /// A buffer with the wrong direction (read-only on RX, writable on TX).
    #[error("descriptor has the wrong direction")]
    WrongDirection,
    /// The chain's total length overflows 32 bits.
    #[error("descriptor chain longer than 4 GiB")]
    TooLong,
}

/// Direction the device needs for every buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Device writes (RX ring).
    DeviceWrites,
    /// Device reads (TX ring).
    DeviceReads,
}

/// Walks `chain`, filling `segments` (cleared first) and appending one or
/// more host iovecs per segment to `iov`, and returns the chain's total
/// length. On error `iov` is left as it was.
pub fn collect_segments<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
    access: Access,
    segments: &mut Vec<Segment>,
    iov: &mut Vec<libc::iovec>,
) -> Result<u32, ChainError>
where
    M: Deref<Target = GuestMemory>,
{
    let iov_start = iov.len();
    let result = walk(chain, mem, access, segments, iov);
    if result.is_err() {
        iov.truncate(iov_start);
    }
    result
}

fn walk<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
    access: Access,
    segments: &mut Vec<Segment>,
    iov: &mut Vec<libc::iovec>,
) -> Result<u32, ChainError>
where
    M: Deref<Target = GuestMemory>,
{
    segments.clear();
    let mut total: u32 = 0;
    let mut ended = false;
    for desc in chain {
        if desc.is_write_only() != (access == Access::DeviceWrites) {
            return Err(ChainError::WrongDirection);
        }
        let len = desc.len();
        if len > 0 {
            // Resolving the buffer to host memory is also the range check:
            // every byte must be backed by a guest memory region.
            let in_memory = desc.addr().checked_add(u64::from(len)).is_some()
                && push_iovecs(
                    mem,
                    &[Segment {
                        addr: desc.addr(),
                        len,
                    }],
                    len as usize,
                    iov,
                ) == len as usize;
            if !in_memory {
                return Err(ChainError::BadAddress);
            }
            total = total.checked_add(len).ok_or(ChainError::TooLong)?;
            segments.push(Segment {
                addr: desc.addr(),
                len,
            });
        }
        ended = !desc.has_next();
    }
    if !ended {
        // The iterator stopped early: loop (ttl), bad next index, bad
        // indirect table, or a 4 GiB overflow it refused to yield.
        return Err(ChainError::Malformed);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemory;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::Bytes;

    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Lays out `descs` as one chain at the head of a mock queue and collects it.
    fn collect(descs: &[RawDescriptor], access: Access) -> (Result<u32, ChainError>, Vec<Segment>) {
        collect_in(&memory(), descs, access)
    }

    fn collect_in(
        mem: &GuestMemory,
        descs: &[RawDescriptor],
        access: Access,
    ) -> (Result<u32, ChainError>, Vec<Segment>) {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        let mut segs = Vec::new();
        let r = collect_segments(chain, mem, access, &mut segs, &mut Vec::new());
        (r, segs)
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    #[test]
    fn accepts_a_writable_chain_and_sums_lengths() {
        let (r, segs) = collect(
            &[desc(0x1000, 12, WRITE, 0), desc(0x2000, 1500, WRITE, 0)],
            Access::DeviceWrites,
        );
        assert_eq!(r, Ok(1512));
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[1].addr, GuestAddress(0x2000));
    }

    #[test]
    fn refuses_read_only_buffer_on_rx_and_writable_on_tx() {
        let (r, _) = collect(&[desc(0x1000, 64, 0, 0)], Access::DeviceWrites);
        assert_eq!(r, Err(ChainError::WrongDirection));
        let (r, _) = collect(&[desc(0x1000, 64, WRITE, 0)], Access::DeviceReads);
        assert_eq!(r, Err(ChainError::WrongDirection));
    }

    #[test]
    fn refuses_buffers_outside_memory_and_overflowing_lengths() {
        let (r, _) = collect(&[desc(0x20_0000, 64, 0, 0)], Access::DeviceReads);
        assert_eq!(r, Err(ChainError::BadAddress));
        let (r, _) = collect(&[desc(0xf_ff00, 0x200, 0, 0)], Access::DeviceReads);
        assert_eq!(r, Err(ChainError::BadAddress));
        let (r, _) = collect(&[desc(u64::MAX - 8, 64, 0, 0)], Access::DeviceReads);
        assert_eq!(r, Err(ChainError::BadAddress));
    }

    #[test]
    fn refuses_a_descriptor_loop() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // Descriptor 0 -> 1 -> 0 -> ...
        let table = vq.desc_table();
        table
            .store(
                0,
                RawDescriptor::from(SplitDescriptor::new(0x1000, 10, NEXT, 1)),
            )
            .unwrap();
        table
            .store(
                1,
                RawDescriptor::from(SplitDescriptor::new(0x2000, 10, NEXT, 0)),
            )
            .unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let mut segs = Vec::new();
        assert_eq!(
            collect_segments(chain, &mem, Access::DeviceReads, &mut segs, &mut Vec::new()),
            Err(ChainError::Malformed)
        );
    }

    #[test]
    fn refuses_next_index_beyond_queue() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.desc_table()
            .store(
                0,
                RawDescriptor::from(SplitDescriptor::new(0x1000, 10, NEXT, 99)),
            )
            .unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let mut segs = Vec::new();
        assert_eq!(
            collect_segments(chain, &mem, Access::DeviceReads, &mut segs, &mut Vec::new()),
            Err(ChainError::Malformed)
        );
    }

    #[test]
    fn follows_indirect_tables_and_refuses_bad_ones() {
        let mem = memory();
        // A valid indirect table of two descriptors at 0x8000.
        mem.write_obj(
            SplitDescriptor::new(0x1000, 12, WRITE | NEXT, 1),
            GuestAddress(0x8000),
        )
        .unwrap();
        mem.write_obj(
            SplitDescriptor::new(0x2000, 100, WRITE, 0),
            GuestAddress(0x8010),
        )
        .unwrap();
        let (r, segs) = collect_in(&mem, &[desc(0x8000, 32, INDIRECT, 0)], Access::DeviceWrites);
        assert_eq!(r, Ok(112));
        assert_eq!(segs.len(), 2);
        // Table length not a multiple of 16.
        let (r, _) = collect_in(&mem, &[desc(0x8000, 20, INDIRECT, 0)], Access::DeviceWrites);
        assert_eq!(r, Err(ChainError::Malformed));
        // Table outside guest memory.
        let (r, _) = collect_in(
            &mem,
            &[desc(0x40_0000, 32, INDIRECT, 0)],
            Access::DeviceWrites,
        );
        assert_eq!(r, Err(ChainError::Malformed));
    }
}
