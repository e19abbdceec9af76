//! Passive round-trip matchers: TCP timestamps, TCP seq/ack with Karn's
//! rule, and in-order request/response (ICMP echo, UDP).
//!
//! Each matcher remembers when something was sent toward one side and gives
//! one sample when the answer from that side comes back. Entries carry two
//! times (`first`, `second`): where the packet crossed the two vantage
//! points, so a sample can be split into the guest's share and vsnoop's.

use std::collections::VecDeque;

/// Entries a matcher keeps before it forgets the oldest.
pub const MAX_PENDING: usize = 256;

/// `a < b` in 32-bit serial-number arithmetic (RFC 1982, RFC 7323 5.2).
pub fn serial_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a <= b` in serial-number arithmetic.
pub fn serial_le(a: u32, b: u32) -> bool {
    a == b || serial_lt(a, b)
}

/// When a packet crossed the two vantage points on its way (ns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crossing {
    /// First point (toward the guest: `host_in`; from the guest: `pop`).
    pub first: u64,
    /// Second point (toward the guest: `ring`; from the guest: `host_out`).
    pub second: u64,
}

/// pping-style TCP timestamp matching for one direction: the first time
/// each TSval is seen, matched by the first TSecr echoing it.
#[derive(Clone, Debug, Default)]
pub struct TsMatcher {
    pending: VecDeque<(u32, Crossing)>,
}

impl TsMatcher {
    /// A packet carrying `tsval` went toward the other side.
    pub fn sent(&mut self, tsval: u32, at: Crossing) {
        match self.pending.back() {
            // One entry per TSval tick: only its first appearance.
            Some(&(last, _)) if serial_le(tsval, last) => return,
            _ => {}
        }
        if self.pending.len() == MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back((tsval, at));
    }

    /// A packet from the other side echoes `tsecr`: returns the crossing of
    /// the packet that first carried it, once.
    pub fn echoed(&mut self, tsecr: u32) -> Option<Crossing> {
        while let Some(&(tsval, at)) = self.pending.front() {
            if serial_lt(tsecr, tsval) {
                // Echo of a value already matched or never recorded.
                return None;
            }
            self.pending.pop_front();
            if tsval == tsecr {
                return Some(at);
            }
        }
        None
    }
}

#[derive(Clone, Copy, Debug)]
struct Range {
    start: u32,
    end: u32,
    at: Crossing,
    retransmitted: bool,
}

/// Seq/ack matching for one direction's data, Karn's rule: a sample only
/// for an ACK that advances into a byte range sent exactly once. Ranges are
/// whole frames, so a GSO frame is one range and any ACK landing inside it
/// is matched to it.
#[derive(Clone, Debug, Default)]
pub struct SeqMatcher {
    ranges: VecDeque<Range>,
    /// Highest sequence number sent plus one.
    highest: Option<u32>,
    /// Highest cumulative ACK seen.
    acked: Option<u32>,
}

impl SeqMatcher {
    /// A segment occupying `[start, start + len)` in sequence space went out.
    pub fn sent(&mut self, start: u32, len: u32, at: Crossing) {
        if len == 0 {
            return;
        }
        let end = start.wrapping_add(len);
        let highest = *self.highest.get_or_insert(start);
        if serial_lt(start, highest) {
            // Some of these bytes went before: every range they touch is
            // ambiguous from now on.
            for r in self.ranges.iter_mut() {
                if serial_lt(r.start, end) && serial_lt(start, r.end) {
                    r.retransmitted = true;
                }
            }
            if serial_le(end, highest) {
                return;
            }
            self.push(Range {
                start: highest,
                end,
                at,
                retransmitted: true,
            });
        } else {
            self.push(Range {
                start,
                end,
                at,
                retransmitted: false,
            });
        }
        self.highest = Some(end);
    }

    fn push(&mut self, range: Range) {
        if self.ranges.len() == MAX_PENDING {
            self.ranges.pop_front();
        }
        self.ranges.push_back(range);
    }

    /// The other side acknowledged up to `ack`: returns the crossing of the
    /// range the ACK lands in, if the ACK advances and the range was sent once.
    pub fn acked(&mut self, ack: u32) -> Option<Crossing> {
        if let Some(previous) = self.acked {
            if serial_le(ack, previous) {
                return None;
            }
        }
        self.acked = Some(ack);
        let mut sample = None;
        while let Some(r) = self.ranges.front().copied() {
            if serial_lt(ack, r.start) || ack == r.start {
                break;
            }
            if serial_le(ack, r.end) && !r.retransmitted {
                sample = Some(r.at);
            }
            if serial_le(r.end, ack) {
                self.ranges.pop_front();
            } else {
                break;
            }
        }
        sample
    }
}

/// In-order request/response matching (ICMP echo by sequence number, UDP by
/// order): a response answers the oldest outstanding request with the same
/// key.
#[derive(Clone, Debug, Default)]
pub struct RequestMatcher {
    pending: VecDeque<(u16, Crossing)>,
}

impl RequestMatcher {
    /// A request with `key` went out.
    pub fn request(&mut self, key: u16, at: Crossing) {
        if self.pending.len() == MAX_PENDING.min(64) {
            self.pending.pop_front();
        }
        self.pending.push_back((key, at));
    }

    /// A response with `key` came back: the request it answers, once.
    pub fn response(&mut self, key: u16) -> Option<Crossing> {
        let index = self.pending.iter().position(|&(k, _)| k == key)?;
        // Requests before it were never answered.
        let (_, at) = self.pending.drain(..=index).next_back()?;
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: u64) -> Crossing {
        Crossing {
            first: t,
            second: t + 1,
        }
    }

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(serial_lt(u32::MAX - 5, 3));
        assert!(!serial_lt(3, u32::MAX - 5));
        assert!(serial_le(7, 7));
    }

    #[test]
    fn timestamps_match_the_first_packet_of_each_tick_once() {
        let mut m = TsMatcher::default();
        m.sent(100, at(1));
        m.sent(100, at(2)); // same tick: not a new entry
        m.sent(101, at(3));
        assert_eq!(m.echoed(100), Some(at(1)));
        assert_eq!(m.echoed(100), None, "one sample per TSval");
        assert_eq!(m.echoed(101), Some(at(3)));
        assert_eq!(m.echoed(99), None);
    }

    #[test]
    fn timestamps_skip_values_never_echoed_and_wrap() {
        let mut m = TsMatcher::default();
        m.sent(u32::MAX - 1, at(1));
        m.sent(u32::MAX, at(2));
        m.sent(2, at(3));
        assert_eq!(m.echoed(2), Some(at(3)), "older entries dropped on the way");
        assert_eq!(m.echoed(u32::MAX), None);
    }

    #[test]
    fn seq_ack_samples_exact_and_in_range_acks() {
        let mut m = SeqMatcher::default();
        m.sent(1000, 100, at(10));
        m.sent(1100, 100, at(20));
        m.sent(1200, 64000, at(30)); // a GSO frame
        assert_eq!(m.acked(1100), Some(at(10)));
        assert_eq!(m.acked(1100), None, "duplicate ACK");
        assert_eq!(m.acked(1200), Some(at(20)));
        assert_eq!(m.acked(4000), Some(at(30)), "ACK inside a GSO range");
        assert_eq!(m.acked(65200), Some(at(30)));
        assert_eq!(m.acked(65300), None, "beyond anything sent");
    }

    #[test]
    fn cumulative_ack_samples_the_segment_it_ends_in() {
        let mut m = SeqMatcher::default();
        m.sent(0, 10, at(1));
        m.sent(10, 10, at(2));
        m.sent(20, 10, at(3));
        assert_eq!(m.acked(30), Some(at(3)));
    }

    #[test]
    fn karn_rule_excludes_retransmitted_ranges() {
        let mut m = SeqMatcher::default();
        m.sent(0, 100, at(1));
        m.sent(100, 100, at(2));
        m.sent(0, 100, at(3)); // retransmission
        assert_eq!(m.acked(100), None);
        assert_eq!(m.acked(200), Some(at(2)));
        // A retransmission that also carries new bytes: the new part is
        // ambiguous too.
        m.sent(200, 100, at(4));
        m.sent(250, 100, at(5));
        assert_eq!(m.acked(300), None);
        assert_eq!(m.acked(350), None);
    }

    #[test]
    fn seq_ack_across_wrap_around() {
        let mut m = SeqMatcher::default();
        m.sent(u32::MAX - 49, 100, at(7));
        assert_eq!(m.acked(50), Some(at(7)));
    }

    #[test]
    fn requests_answered_in_order() {
        let mut m = RequestMatcher::default();
        m.request(1, at(1));
        m.request(2, at(2));
        m.request(3, at(3));
        assert_eq!(m.response(2), Some(at(2)), "request 1 lost");
        assert_eq!(m.response(1), None);
        assert_eq!(m.response(3), Some(at(3)));
        assert_eq!(m.response(3), None);
    }
}
