//! An allocator that backs large tables with transparent huge pages.
//!
//! With 100k to 1M flows the flow table is tens to hundreds of MB, and
//! every packet's lookup lands on a random bucket: with 4 KiB pages that is
//! a TLB miss (a page walk that itself misses the cache) on top of the cache
//! miss. Debian's default THP mode is `madvise`, so the table asks for huge
//! pages itself (offload bench, 1M flows: a data segment that finds its flow
//! cold went from 806-884 to 650-698 ns; BENCHMARKS.md).

use std::alloc::Layout;
use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global};

/// Size and alignment of a huge page on x86-64 (and the smallest block
/// this allocator maps itself).
const HUGE_PAGE: usize = 2 << 20;

/// Blocks of at least [`HUGE_PAGE`] bytes come from their own mapping,
/// aligned to a huge page and advised `MADV_HUGEPAGE`; smaller ones from the
/// global allocator. The advice is a hint: where the kernel has no huge
/// page to give (THP `never`, fragmented memory), the block is ordinary
/// memory and works the same.
#[derive(Clone, Copy, Debug, Default)]
pub struct HugePages;

impl HugePages {
    /// Whether `layout` gets its own mapping.
    fn mapped(layout: Layout) -> bool {
        layout.size() >= HUGE_PAGE && layout.align() <= HUGE_PAGE
    }
}

// SAFETY: every block is either the global allocator's (same layout test on
// the way in and out) or a private anonymous mapping of exactly
// `size.next_multiple_of(HUGE_PAGE)` bytes that stays valid until
// `deallocate` unmaps it; a layout that fits a block rounds up to the same
// length. The struct holds no state, so copies share nothing.
unsafe impl Allocator for HugePages {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if !Self::mapped(layout) {
            return Global.allocate(layout);
        }
        let len = layout
            .size()
            .checked_next_multiple_of(HUGE_PAGE)
            .ok_or(AllocError)?;
        // Map one huge page more than needed and trim to an aligned block.
        let map_len = len.checked_add(HUGE_PAGE).ok_or(AllocError)?;
        // SAFETY: a fresh private anonymous mapping; touches no existing memory.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(AllocError);
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let head = aligned - start;
        let tail = map_len - head - len;
        // SAFETY: both ranges lie inside the mapping made above and outside
        // the block handed out; unmapping an empty range is skipped.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            // Only a hint: ignore EINVAL where THP is compiled out.
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        let ptr = NonNull::new(aligned as *mut u8).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(ptr, len))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if !Self::mapped(layout) {
            // SAFETY: the caller passes a block this allocator returned for a
            // layout that fits it, and such blocks came from `Global`.
            unsafe { Global.deallocate(ptr, layout) };
            return;
        }
        let len = layout.size().next_multiple_of(HUGE_PAGE);
        // SAFETY: the block is a mapping of exactly `len` bytes (see `allocate`).
        unsafe {
            libc::munmap(ptr.as_ptr().cast(), len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_aligned_mappings_that_hold_data() {
        for size in [HUGE_PAGE, HUGE_PAGE + 1, 5 * HUGE_PAGE - 64] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            let block = HugePages.allocate(layout).unwrap();
            assert_eq!(block.len(), size.next_multiple_of(HUGE_PAGE));
            let p = block.cast::<u8>().as_ptr();
            assert_eq!(p as usize % HUGE_PAGE, 0, "{size}: aligned to a huge page");
            // SAFETY: the block is `block.len()` writable bytes.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p, block.len()) };
            assert!(bytes.iter().all(|&b| b == 0), "fresh mappings are zeroed");
            for (i, b) in bytes.iter_mut().enumerate().step_by(4093) {
                *b = i as u8;
            }
            assert!(bytes
                .iter()
                .enumerate()
                .step_by(4093)
                .all(|(i, &b)| b == i as u8));
            // SAFETY: allocated above with this layout.
            unsafe { HugePages.deallocate(block.cast(), layout) };
        }
    }

    #[test]
    fn small_blocks_come_from_the_global_allocator() {
        let layout = Layout::from_size_align(4096, 16).unwrap();
        let block = HugePages.allocate(layout).unwrap();
        assert!(block.len() >= 4096);
        // SAFETY: allocated above with this layout.
        unsafe { HugePages.deallocate(block.cast(), layout) };
    }

    #[test]
    fn a_table_grows_through_huge_blocks_and_keeps_its_entries() {
        let mut t = hashbrown::HashTable::new_in(HugePages);
        let hash = |v: &u64| v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for v in 0..200_000u64 {
            t.insert_unique(hash(&v), v, hash);
        }
        assert!((0..200_000u64).all(|v| t.find(hash(&v), |x| *x == v).is_some()));
        assert!(t.find(hash(&200_001), |x| *x == 200_001).is_none());
    }
}
