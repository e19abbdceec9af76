//! Custody: a copy of the bytes delivered to the guest but not yet
//! acknowledged by it (rule 5), so they can be re-delivered if the guest
//! drops them after we acknowledged them to the sender.

use super::wire::seq_lt;

/// Bytes `[start, start + len)` of one flow's stream toward the guest.
#[derive(Debug, Default)]
pub struct Custody {
    /// Bytes `[head, end)` are held; the bytes past `end` are stale but
    /// initialized, so the next append overwrites them instead of
    /// zero-filling new ones.
    buf: Vec<u8>,
    /// Index in `buf` of the byte at `start`.
    head: usize,
    /// Index in `buf` just past the last byte held.
    end: usize,
    /// Sequence number of the first byte held.
    start: u32,
    /// False once a byte between `start` and the delivered edge is missing.
    incomplete: bool,
}

impl Custody {
    /// Bytes held.
    pub fn len(&self) -> usize {
        self.end - self.head
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence number just past the last byte held.
    pub fn end(&self) -> u32 {
        self.start.wrapping_add(self.len() as u32)
    }

    /// Whether every byte from `start` to `end` is held.
    pub fn complete(&self) -> bool {
        !self.incomplete
    }

    /// Empties the custody and restarts it at `seq`. The buffer keeps its
    /// memory until [`Custody::take_buffer`] takes it.
    pub fn reset(&mut self, seq: u32) {
        self.head = 0;
        self.end = 0;
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
            self.end = 0;
            std::mem::take(&mut self.buf)
        })
    }

    /// Whether the custody has no memory of its own.
    pub fn unbuffered(&self) -> bool {
        self.buf.capacity() == 0
    }

    /// Gives an unbuffered custody the buffer `buf` (its contents are
    /// stale: only bytes appended from now on are held).
    pub fn give_buffer(&mut self, buf: Vec<u8>) {
        debug_assert!(self.unbuffered());
        self.buf = buf;
        self.head = 0;
        self.end = 0;
    }

    /// Marks the copy as having a gap (a byte could not be kept).
    pub fn invalidate(&mut self) {
        self.incomplete = true;
    }

    /// Appends `len` bytes at `end()`, filled by `fill`; returns bytes kept.
    pub fn append(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> usize) -> usize {
        let at = self.end;
        if self.buf.len() < at + len {
            self.buf.resize(at + len, 0);
        }
        let got = fill(&mut self.buf[at..at + len]).min(len);
        self.end = at + got;
        if got < len {
            self.incomplete = true;
        }
        got
    }

    /// Drops bytes below `seq` (the guest acknowledged them).
    pub fn trim(&mut self, seq: u32) {
        if !seq_lt(self.start, seq) {
            return;
        }
        let drop = seq.wrapping_sub(self.start) as usize;
        if drop >= self.len() {
            let complete = self.complete() && drop == self.len();
            self.reset(seq);
            self.incomplete = !complete;
            return;
        }
        self.head += drop;
        self.start = seq;
        // Compact once the dead prefix dominates, so memory follows the window.
        if self.head > 64 * 1024 && self.head * 2 > self.end {
            self.buf.drain(..self.head);
            self.end -= self.head;
            self.head = 0;
        }
    }

    /// The held bytes from `seq` on, at most `max` of them.
    pub fn bytes_from(&self, seq: u32, max: usize) -> &[u8] {
        let off = seq.wrapping_sub(self.start) as usize;
        if off >= self.len() {
            return &[];
        }
        let from = self.head + off;
        &self.buf[from..(from + max).min(self.end)]
    }

    /// Heap bytes in use (the budget counts what is held, not capacity).
    pub fn held(&self) -> usize {
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_trims_and_reads_back_across_wrap() {
        let mut c = Custody::default();
        c.reset(u32::MAX - 2);
        assert_eq!(
            c.append(6, |b| {
                b.copy_from_slice(b"abcdef");
                6
            }),
            6
        );
        assert_eq!(c.end(), 3);
        assert_eq!(c.bytes_from(u32::MAX, 10), b"cdef");
        c.trim(1);
        assert_eq!(c.len(), 2);
        assert_eq!(c.bytes_from(1, 1), b"e");
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
        assert_eq!(c.append(10, |_| 4), 4);
        assert_eq!(c.len(), 4);
        assert!(!c.complete());
    }

    #[test]
    fn trimming_below_start_is_ignored() {
        let mut c = Custody::default();
        c.reset(100);
        c.append(3, |b| {
            b.fill(1);
            3
        });
        c.trim(50);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn an_emptied_buffer_moves_to_another_custody() {
        let mut a = Custody::default();
        a.reset(0);
        assert!(a.unbuffered() && a.take_buffer().is_none());
        a.append(4, |b| {
            b.copy_from_slice(b"abcd");
            4
        });
        // Bytes held: the buffer stays.
        assert!(a.take_buffer().is_none());
        a.trim(4);
        let buf = a.take_buffer().unwrap();
        assert!(a.unbuffered() && a.is_empty() && a.complete() && a.end() == 4);
        let mut b = Custody::default();
        b.reset(100);
        b.give_buffer(buf);
        assert!(!b.unbuffered() && b.is_empty());
        b.append(2, |x| {
            x.copy_from_slice(b"yz");
            2
        });
        assert_eq!(b.bytes_from(100, 10), b"yz");
        assert_eq!(b.held(), 2);
    }
}
