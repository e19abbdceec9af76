//! Custody: a copy of the bytes delivered to the guest but not yet
//! acknowledged by it (rule 5), so they can be re-delivered if the guest
//! drops them after we acknowledged them to the sender.

use super::wire::seq_lt;

/// Bytes `[start, start + len)` of one flow's stream toward the guest, in a
/// ring: trimming what the guest acknowledged moves an index, never bytes
/// (a bulk flow trims on every guest ACK; compacting a linear buffer copied
/// each byte a second time).
#[derive(Debug, Default)]
pub struct Custody {
    /// The ring's memory: `size` bytes of capacity, of which the first
    /// `buf.len()` are initialized. Appends fill the ring from the start
    /// before it wraps, so the initialized part only grows as far as the
    /// bytes held ever reached; stale bytes are overwritten, never zeroed
    /// again (a ring zero-filled to its power of two up front cost a second
    /// write of every byte of a large burst).
    buf: Vec<u8>,
    /// Ring size: 0, or a power of two no larger than `buf.capacity()`.
    size: usize,
    /// Index in `buf` of the byte at `start`.
    head: usize,
    /// Bytes held.
    len: usize,
    /// Sequence number of the first byte held.
    start: u32,
    /// False once a byte between `start` and the delivered edge is missing.
    incomplete: bool,
}

/// Smallest ring allocated (bytes): one full-sized segment. Flows that get a
/// segment now and then (many flows) keep a small footprint; a bulk flow
/// doubles its way up.
const MIN_RING: usize = 2048;

impl Custody {
    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequence number just past the last byte held.
    pub fn end(&self) -> u32 {
        self.start.wrapping_add(self.len as u32)
    }

    /// Whether every byte from `start` to `end` is held.
    pub fn complete(&self) -> bool {
        !self.incomplete
    }

    /// Empties the custody and restarts it at `seq`. The buffer keeps its
    /// memory until [`Custody::take_buffer`] takes it.
    pub fn reset(&mut self, seq: u32) {
        self.head = 0;
        self.len = 0;
        self.start = seq;
        self.incomplete = false;
    }

    /// The memory of an empty custody, if it has any. The engine takes it
    /// back after every guest packet (the budget counts bytes held, and a
    /// million idle flows must not keep a window's worth of capacity each)
    /// and hands it to the next flow that needs one ([`Custody::give_buffer`]),
    /// which saves an allocation per burst.
    pub fn take_buffer(&mut self) -> Option<Vec<u8>> {
        (self.is_empty() && self.buf.capacity() > 0).then(|| {
            self.head = 0;
            self.size = 0;
            std::mem::take(&mut self.buf)
        })
    }

    /// Whether the custody has no memory of its own.
    pub fn unbuffered(&self) -> bool {
        self.buf.capacity() == 0
    }

    /// Gives an unbuffered custody the buffer `buf` (its contents are
    /// stale: only bytes appended from now on are held). The ring is the
    /// largest power of two its capacity holds.
    pub fn give_buffer(&mut self, mut buf: Vec<u8>) {
        debug_assert!(self.unbuffered() && self.is_empty());
        self.size = buf.capacity().checked_ilog2().map_or(0, |b| 1 << b);
        buf.truncate(self.size);
        self.buf = buf;
        self.head = 0;
    }

    /// Marks the copy as having a gap (a byte could not be kept).
    pub fn invalidate(&mut self) {
        self.incomplete = true;
    }

    /// Appends `n` bytes at `end()`. `fill(offset, buf)` fills `buf` with
    /// the appended bytes from `offset` on (once, or twice where the ring
    /// wraps) and returns how many it wrote; returns the bytes kept.
    pub fn append(&mut self, n: usize, mut fill: impl FnMut(usize, &mut [u8]) -> usize) -> usize {
        if n == 0 {
            return 0;
        }
        if self.len + n > self.size {
            self.grow(self.len + n);
        }
        let size = self.size;
        let tail = (self.head + self.len) & (size - 1);
        let first = n.min(size - tail);
        // Before the first wrap, the tail may reach past what is initialized
        // (after it, everything is); the wrapped part lies below the tail.
        if self.buf.len() < tail + first {
            self.buf.resize(tail + first, 0);
        }
        let mut got = fill(0, &mut self.buf[tail..tail + first]).min(first);
        if got == first && first < n {
            got += fill(first, &mut self.buf[..n - first]).min(n - first);
        }
        self.len += got;
        if got < n {
            self.incomplete = true;
        }
        got
    }

    /// Grows the ring to at least `need` bytes in place (the allocator may
    /// extend it without a copy; nothing new is zero-filled here), then
    /// moves the part that wrapped to just past the old end.
    #[cold]
    fn grow(&mut self, need: usize) {
        let old = self.size;
        let size = need.max(MIN_RING).next_power_of_two();
        self.buf.reserve_exact(size - self.buf.len());
        self.size = size;
        // The new size is at least twice the old one, so the wrapped part
        // (shorter than the old ring) fits past the old end. A ring that
        // wrapped was initialized to its end.
        let wrapped = (self.head + self.len).saturating_sub(old);
        if wrapped > 0 {
            self.buf.resize(old + wrapped, 0);
            self.buf.copy_within(..wrapped, old);
        }
    }

    /// The bytes held, in order, as the ring's two parts.
    fn held_slices(&self) -> (&[u8], &[u8]) {
        if self.len == 0 {
            return (&[], &[]);
        }
        let first = self.len.min(self.size - self.head);
        (
            &self.buf[self.head..self.head + first],
            &self.buf[..self.len - first],
        )
    }

    /// Drops bytes below `seq` (the guest acknowledged them).
    pub fn trim(&mut self, seq: u32) {
        if !seq_lt(self.start, seq) {
            return;
        }
        let drop = seq.wrapping_sub(self.start) as usize;
        if drop >= self.len {
            let complete = self.complete() && drop == self.len;
            self.reset(seq);
            self.incomplete = !complete;
            return;
        }
        self.head = (self.head + drop) & (self.size - 1);
        self.len -= drop;
        self.start = seq;
    }

    /// Appends the held bytes from `seq` on, at most `max` of them, to
    /// `out`; returns how many.
    pub fn copy_from(&self, seq: u32, max: usize, out: &mut Vec<u8>) -> usize {
        let off = seq.wrapping_sub(self.start) as usize;
        if off >= self.len {
            return 0;
        }
        let n = max.min(self.len - off);
        let (mut skip, mut rest) = (off, n);
        for part in <[&[u8]; 2]>::from(self.held_slices()) {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            let k = rest.min(part.len() - skip);
            out.extend_from_slice(&part[skip..skip + k]);
            (skip, rest) = (0, rest - k);
        }
        n
    }

    /// Heap bytes in use (the budget counts what is held, not capacity).
    pub fn held(&self) -> usize {
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `fill` that copies from `src`, as the data path copies from guest memory.
    fn fill_from(src: &[u8]) -> impl FnMut(usize, &mut [u8]) -> usize + '_ {
        |off, b| {
            b.copy_from_slice(&src[off..off + b.len()]);
            b.len()
        }
    }

    fn read(c: &Custody, seq: u32, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        assert_eq!(c.copy_from(seq, max, &mut out), out.len());
        out
    }

    #[test]
    fn appends_trims_and_reads_back_across_wrap() {
        let mut c = Custody::default();
        c.reset(u32::MAX - 2);
        assert_eq!(c.append(6, fill_from(b"abcdef")), 6);
        assert_eq!(c.end(), 3);
        assert_eq!(read(&c, u32::MAX, 10), b"cdef");
        c.trim(1);
        assert_eq!(c.len(), 2);
        assert_eq!(read(&c, 1, 1), b"e");
        assert!(c.complete());
        // Trimming past the end leaves a gap marker unless it lands exactly.
        c.trim(3);
        assert!(c.is_empty() && c.complete());
        c.trim(10);
        assert!(!c.complete());
    }

    #[test]
    fn a_short_fill_marks_the_copy_incomplete() {
        let mut c = Custody::default();
        c.reset(0);
        assert_eq!(c.append(10, |_, _| 4), 4);
        assert_eq!(c.len(), 4);
        assert!(!c.complete());
    }

    #[test]
    fn trimming_below_start_is_ignored() {
        let mut c = Custody::default();
        c.reset(100);
        c.append(3, fill_from(&[1, 1, 1]));
        c.trim(50);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn an_emptied_buffer_moves_to_another_custody() {
        let mut a = Custody::default();
        a.reset(0);
        assert!(a.unbuffered() && a.take_buffer().is_none());
        a.append(4, fill_from(b"abcd"));
        // Bytes held: the buffer stays.
        assert!(a.take_buffer().is_none());
        a.trim(4);
        let buf = a.take_buffer().unwrap();
        assert!(a.unbuffered() && a.is_empty() && a.complete() && a.end() == 4);
        let mut b = Custody::default();
        b.reset(100);
        b.give_buffer(buf);
        assert!(!b.unbuffered() && b.is_empty());
        b.append(2, fill_from(b"yz"));
        assert_eq!(read(&b, 100, 10), b"yz");
        assert_eq!(b.held(), 2);
    }

    /// A stream pushed through the ring in uneven appends and trims, so it
    /// wraps and grows many times: what comes back is the stream.
    #[test]
    fn the_ring_returns_the_stream_across_wraps_and_growth() {
        let stream: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut c = Custody::default();
        let isn = u32::MAX - 5_000; // the sequence space wraps too
        c.reset(isn);
        let (mut appended, mut acked) = (0usize, 0usize);
        let mut step = 1usize;
        while acked < stream.len() {
            step = (step * 31 + 17) % 9_000 + 1;
            let n = step.min(stream.len() - appended);
            assert_eq!(c.append(n, fill_from(&stream[appended..appended + n])), n);
            appended += n;
            // Everything held reads back, from any point.
            let mid = acked + (appended - acked) / 3;
            let got = read(&c, isn.wrapping_add(mid as u32), 4_000);
            assert_eq!(got, &stream[mid..(mid + 4_000).min(appended)]);
            // The guest acknowledges most of it (all of it at the end).
            acked = if appended == stream.len() {
                appended
            } else {
                (acked + appended * 3) / 4
            };
            c.trim(isn.wrapping_add(acked as u32));
            assert_eq!(c.len(), appended - acked);
            assert!(c.complete());
            // Memory follows what is held (at most ~12 KB here), not the stream.
            assert!(c.size <= 16 * 1024, "ring of {} bytes", c.size);
            assert!(c.buf.len() <= c.size && c.size <= c.buf.capacity());
        }
        assert!(c.is_empty() && c.end() == isn.wrapping_add(stream.len() as u32));
    }

    #[test]
    fn a_foreign_buffer_is_cut_to_a_power_of_two() {
        let mut c = Custody::default();
        c.reset(0);
        let mut foreign = Vec::with_capacity(10_000);
        foreign.resize(9_500, 0);
        c.give_buffer(foreign);
        assert_eq!((c.size, c.buf.len()), (8_192, 8_192));
        assert_eq!(c.append(9_000, |_, b| b.len()), 9_000);
        // Grown to the next power of two, initialized only as far as used.
        assert_eq!((c.size, c.buf.len()), (16_384, 9_000));
        assert_eq!(c.append(0, |_, _| unreachable!()), 0);
    }

    /// Growing a ring whose bytes wrap keeps them in order.
    #[test]
    fn a_wrapped_ring_grows_in_order() {
        let stream: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        let mut c = Custody::default();
        c.reset(0);
        c.append(6_000, fill_from(&stream[..6_000]));
        c.trim(5_000);
        // 5000..9000 now wraps in the 8 KB ring.
        c.append(3_000, fill_from(&stream[6_000..9_000]));
        assert_eq!((c.size, c.head, c.len), (8_192, 5_000, 4_000));
        // Past the ring: it grows twice over, the wrapped part moves.
        c.append(31_000, fill_from(&stream[9_000..]));
        assert_eq!(c.size, 65_536);
        assert_eq!(read(&c, 5_000, usize::MAX), &stream[5_000..]);
    }
}
