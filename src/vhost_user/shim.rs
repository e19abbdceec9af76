//! A message relay between the frontend (VMM) and the vhost-user request
//! handler, which works around two known QEMU behaviours on the way.
//!
//! 1. QEMU up to 7.2 sends VHOST_USER_SET_VRING_ENABLE after
//!    SET_PROTOCOL_FEATURES but *before* SET_FEATURES acks
//!    VHOST_USER_F_PROTOCOL_FEATURES. The `vhost` crate's dispatcher rejects
//!    such a request (InactiveFeature) and drops the connection. The relay
//!    holds those early ring-enable requests back, acknowledges them itself
//!    if the frontend asked for a reply, and replays the latest state per
//!    ring right after SET_FEATURES has been forwarded, which is the state
//!    the frontend meant.
//! 2. With several queue pairs, QEMU drives one vhost device per pair over
//!    the same connection, and with CONFIGURE_MEM_SLOTS each of them sends
//!    ADD_MEM_REG (and later REM_MEM_REG) for every guest memory region. The
//!    handler refuses a second ADD of a region it has ("memory regions
//!    intersect") and drops the connection. The relay counts the adds of
//!    each region, forwards the first add and the last remove only, and
//!    acknowledges the others itself.
//!
//! Frontends that follow the spec (DPDK virtio-user, cloud-hypervisor, newer
//! QEMU) never trigger either: their messages pass through byte for byte,
//! file descriptors included. Nothing else is interpreted, so the rust-vmm
//! crates stay unmodified.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use log::{debug, info};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Message header size: request, flags, payload size (u32 each).
pub const HEADER_LEN: usize = 12;
/// Largest payload relayed (the vhost crate itself accepts less).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most file descriptors one message may carry.
pub const MAX_FDS: usize = 32;

const SET_FEATURES: u32 = 2;
const RESET_OWNER: u32 = 4;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_ENABLE: u32 = 18;
const RESET_DEVICE: u32 = 34;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
/// A memory region as the messages describe it: guest address, size,
/// frontend address, offset in the fd (4 x u64).
const REGION_LEN: usize = 32;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// One vhost-user message with the descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    /// Request code.
    pub request: u32,
    /// Flags (version, reply, need-reply).
    pub flags: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Attached file descriptors (closed when the message is dropped).
    pub fds: Vec<OwnedFd>,
}

impl Message {
    fn new(request: u32, flags: u32, payload: Vec<u8>) -> Self {
        Message {
            request,
            flags,
            payload,
            fds: Vec::new(),
        }
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&self.request.to_le_bytes());
        h[4..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..12].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        h
    }

    fn u64_payload(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.payload.get(..8)?.try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }

    /// The region of ADD_MEM_REG / REM_MEM_REG (after 8 bytes of padding).
    fn single_region(&self) -> Option<Region> {
        Region::parse(self.payload.get(8..8 + REGION_LEN)?)
    }

    /// The regions of SET_MEM_TABLE (u32 count, u32 padding, then regions).
    fn table_regions(&self) -> Vec<Region> {
        let count = self
            .payload
            .get(..4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        self.payload
            .get(8..)
            .unwrap_or_default()
            .chunks_exact(REGION_LEN)
            .take(count)
            .filter_map(Region::parse)
            .collect()
    }

    fn vring_state(&self) -> Option<(u32, u32)> {
        let index: [u8; 4] = self.payload.get(..4)?.try_into().ok()?;
        let num: [u8; 4] = self.payload.get(4..8)?.try_into().ok()?;
        Some((u32::from_le_bytes(index), u32::from_le_bytes(num)))
    }
}

/// A guest memory region: guest address, size, frontend address, mmap offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Region([u64; 4]);

impl Region {
    fn parse(b: &[u8]) -> Option<Region> {
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                b.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        Some(Region([word(0)?, word(1)?, word(2)?, word(3)?]))
    }
}

/// Reads one message; `Ok(None)` on a clean end of stream.
pub fn read_message(sock: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec covers the live `header` array, and `raw_fds` has
    // room for MAX_FDS descriptors; received descriptors are owned below.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: recvmsg just gave us these descriptors; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    if n < HEADER_LEN {
        sock.read_exact(&mut header[n..])?;
    }
    let request = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let flags = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message {request} with {size}-byte payload"),
        ));
    }
    let mut payload = vec![0u8; size];
    sock.read_exact(&mut payload)?;
    Ok(Some(Message {
        request,
        flags,
        payload,
        fds,
    }))
}

/// Writes one message (descriptors ride with the header).
pub fn write_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let header = msg.header();
    let raw: Vec<RawFd> = msg.fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let sent = sock
        .send_with_fds(&[&header[..], &msg.payload[..]], &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let total = HEADER_LEN + msg.payload.len();
    if sent < total {
        // A stream socket may take the message in parts; the descriptors
        // went with the first part.
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(&header);
        all.extend_from_slice(&msg.payload);
        (&*sock).write_all(&all[sent..])?;
    }
    Ok(())
}

/// The decisions of the relay, kept apart from the sockets so they can be tested.
#[derive(Debug, Default)]
pub struct FrontendFixes {
    features_set: bool,
    /// Latest early SET_VRING_ENABLE per ring.
    deferred: BTreeMap<u32, u32>,
    /// Memory regions the handler has, and how many times the frontend
    /// added each (once per vhost device).
    regions: BTreeMap<Region, u32>,
}

/// What to do with a frontend message.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward as is.
    Forward,
    /// Forward, then send these ring-enable requests (ring, enable).
    ForwardThenEnable(Vec<(u32, u32)>),
    /// Hold back (or drop); reply with success if the frontend wants a reply.
    Defer {
        /// The frontend set NEED_REPLY.
        reply: bool,
    },
}

impl FrontendFixes {
    /// Decides about one frontend message.
    pub fn on_frontend_message(&mut self, msg: &Message) -> Action {
        let reply = msg.flags & FLAG_NEED_REPLY != 0;
        match msg.request {
            SET_MEM_TABLE => {
                self.regions = msg.table_regions().into_iter().map(|r| (r, 1)).collect();
                Action::Forward
            }
            ADD_MEM_REG => match msg.single_region() {
                Some(region) => {
                    let adds = self.regions.entry(region).or_insert(0);
                    *adds += 1;
                    if *adds == 1 {
                        Action::Forward
                    } else {
                        debug!("memory region {region:?} added again ({adds} times): acknowledged");
                        Action::Defer { reply }
                    }
                }
                None => Action::Forward,
            },
            REM_MEM_REG => match msg.single_region() {
                Some(region) => match self.regions.get_mut(&region) {
                    Some(adds) if *adds > 1 => {
                        *adds -= 1;
                        Action::Defer { reply }
                    }
                    _ => {
                        self.regions.remove(&region);
                        Action::Forward
                    }
                },
                None => Action::Forward,
            },
            SET_VRING_ENABLE if !self.features_set => match msg.vring_state() {
                Some((index, num)) => {
                    self.deferred.insert(index, num);
                    Action::Defer { reply }
                }
                None => Action::Forward,
            },
            SET_FEATURES => {
                self.features_set = true;
                let deferred = std::mem::take(&mut self.deferred);
                let protocol = msg.u64_payload().unwrap_or(0) & PROTOCOL_FEATURES_BIT != 0;
                if protocol && !deferred.is_empty() {
                    Action::ForwardThenEnable(deferred.into_iter().collect())
                } else {
                    Action::Forward
                }
            }
            RESET_OWNER | RESET_DEVICE => {
                self.features_set = false;
                self.deferred.clear();
                self.regions.clear();
                Action::Forward
            }
            _ => Action::Forward,
        }
    }
}

/// A running relay for one frontend connection.
pub struct Relay {
    frontend: UnixStream,
    backend: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` and `backend` until either side closes.
    pub fn start(frontend: UnixStream, backend: UnixStream) -> io::Result<Relay> {
        let frontend_writer = Arc::new(Mutex::new(frontend.try_clone()?));
        let mut threads = Vec::new();

        // Frontend -> backend, with the reordering.
        {
            let mut from = frontend.try_clone()?;
            let to = backend.try_clone()?;
            let reply_to = frontend_writer.clone();
            let closer = (frontend.try_clone()?, backend.try_clone()?);
            threads.push(
                thread::Builder::new()
                    .name("vu-relay-in".into())
                    .spawn(move || {
                        let mut fixes = FrontendFixes::default();
                        if let Err(e) = relay_requests(&mut from, &to, &reply_to, &mut fixes) {
                            debug!("frontend -> backend relay ended: {e}");
                        }
                        let _ = closer.0.shutdown(Shutdown::Both);
                        let _ = closer.1.shutdown(Shutdown::Both);
                    })?,
            );
        }
        // Backend -> frontend, verbatim (replies).
        {
            let mut from = backend.try_clone()?;
            let closer = (frontend.try_clone()?, backend.try_clone()?);
            threads.push(
                thread::Builder::new()
                    .name("vu-relay-out".into())
                    .spawn(move || {
                        loop {
                            match read_message(&mut from) {
                                Ok(Some(msg)) => {
                                    let to =
                                        frontend_writer.lock().unwrap_or_else(|e| e.into_inner());
                                    if let Err(e) = write_message(&to, &msg) {
                                        debug!("backend -> frontend relay ended: {e}");
                                        break;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    debug!("backend -> frontend relay ended: {e}");
                                    break;
                                }
                            }
                        }
                        let _ = closer.0.shutdown(Shutdown::Both);
                        let _ = closer.1.shutdown(Shutdown::Both);
                    })?,
            );
        }
        Ok(Relay {
            frontend,
            backend,
            threads,
        })
    }

    /// Closes both sides (used on shutdown).
    pub fn close(&self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.backend.shutdown(Shutdown::Both);
    }

    /// Waits for both relay threads.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn relay_requests(
    from: &mut UnixStream,
    to: &UnixStream,
    reply_to: &Mutex<UnixStream>,
    fixes: &mut FrontendFixes,
) -> io::Result<()> {
    while let Some(msg) = read_message(from)? {
        debug!(
            "frontend request {} ({} bytes, {} fds)",
            msg.request,
            msg.payload.len(),
            msg.fds.len()
        );
        match fixes.on_frontend_message(&msg) {
            Action::Forward => write_message(to, &msg)?,
            Action::ForwardThenEnable(rings) => {
                write_message(to, &msg)?;
                info!(
                    "frontend enabled rings before SET_FEATURES (QEMU <= 7.2); replaying {rings:?}"
                );
                for (index, num) in rings {
                    let mut payload = index.to_le_bytes().to_vec();
                    payload.extend_from_slice(&num.to_le_bytes());
                    write_message(to, &Message::new(SET_VRING_ENABLE, FLAG_VERSION, payload))?;
                }
            }
            Action::Defer { reply } => {
                if reply {
                    let ack = Message::new(
                        msg.request,
                        FLAG_VERSION | FLAG_REPLY,
                        0u64.to_le_bytes().to_vec(),
                    );
                    let sock = reply_to.lock().unwrap_or_else(|e| e.into_inner());
                    write_message(&sock, &ack)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enable(index: u32, num: u32, flags: u32) -> Message {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        Message::new(SET_VRING_ENABLE, flags, p)
    }

    fn features(bits: u64) -> Message {
        Message::new(SET_FEATURES, FLAG_VERSION, bits.to_le_bytes().to_vec())
    }

    #[test]
    fn early_enables_are_deferred_and_replayed_after_set_features() {
        let mut r = FrontendFixes::default();
        assert_eq!(
            r.on_frontend_message(&enable(0, 1, 1)),
            Action::Defer { reply: false }
        );
        assert_eq!(
            r.on_frontend_message(&enable(1, 0, 1)),
            Action::Defer { reply: false }
        );
        assert_eq!(
            r.on_frontend_message(&enable(1, 1, 9)),
            Action::Defer { reply: true }
        );
        assert_eq!(
            r.on_frontend_message(&features(PROTOCOL_FEATURES_BIT | 1)),
            Action::ForwardThenEnable(vec![(0, 1), (1, 1)])
        );
        // After SET_FEATURES everything passes through.
        assert_eq!(r.on_frontend_message(&enable(0, 0, 1)), Action::Forward);
        assert_eq!(
            r.on_frontend_message(&features(PROTOCOL_FEATURES_BIT)),
            Action::Forward
        );
    }

    #[test]
    fn spec_order_passes_through_untouched() {
        let mut r = FrontendFixes::default();
        assert_eq!(
            r.on_frontend_message(&features(PROTOCOL_FEATURES_BIT)),
            Action::Forward
        );
        assert_eq!(r.on_frontend_message(&enable(0, 1, 1)), Action::Forward);
    }

    #[test]
    fn deferred_enables_are_dropped_without_protocol_features_or_after_reset() {
        let mut r = FrontendFixes::default();
        r.on_frontend_message(&enable(0, 1, 1));
        // Without PROTOCOL_FEATURES the backend enables all rings itself.
        assert_eq!(r.on_frontend_message(&features(1)), Action::Forward);
        let mut r = FrontendFixes::default();
        r.on_frontend_message(&features(PROTOCOL_FEATURES_BIT));
        r.on_frontend_message(&Message::new(RESET_OWNER, FLAG_VERSION, vec![]));
        assert_eq!(
            r.on_frontend_message(&enable(0, 1, 1)),
            Action::Defer { reply: false }
        );
    }

    fn region_message(request: u32, gpa: u64, flags: u32) -> Message {
        let mut p = 0u64.to_le_bytes().to_vec();
        for word in [gpa, 0x1000_0000, 0x7f00_0000_0000 + gpa, 0] {
            p.extend_from_slice(&word.to_le_bytes());
        }
        Message::new(request, flags, p)
    }

    #[test]
    fn a_region_added_once_per_queue_pair_reaches_the_handler_once() {
        let mut r = FrontendFixes::default();
        let add = |gpa, flags| region_message(ADD_MEM_REG, gpa, flags);
        let rem = |gpa, flags| region_message(REM_MEM_REG, gpa, flags);
        // QEMU with two queue pairs: each vhost device adds the region.
        assert_eq!(r.on_frontend_message(&add(0, 9)), Action::Forward);
        assert_eq!(
            r.on_frontend_message(&add(0, 9)),
            Action::Defer { reply: true }
        );
        // Another region is new.
        assert_eq!(r.on_frontend_message(&add(1 << 32, 1)), Action::Forward);
        // Removed by both devices: only the last remove goes through.
        assert_eq!(
            r.on_frontend_message(&rem(0, 1)),
            Action::Defer { reply: false }
        );
        assert_eq!(r.on_frontend_message(&rem(0, 9)), Action::Forward);
        // Unknown and malformed regions are the handler's to judge.
        assert_eq!(r.on_frontend_message(&rem(0, 1)), Action::Forward);
        let short = Message::new(ADD_MEM_REG, FLAG_VERSION, vec![0; 12]);
        assert_eq!(r.on_frontend_message(&short), Action::Forward);
        // A reset forgets them: the next add is forwarded.
        r.on_frontend_message(&Message::new(RESET_OWNER, FLAG_VERSION, vec![]));
        assert_eq!(r.on_frontend_message(&add(1 << 32, 1)), Action::Forward);
    }

    #[test]
    fn regions_of_a_memory_table_count_as_added() {
        let mut r = FrontendFixes::default();
        let mut table = 2u32.to_le_bytes().to_vec();
        table.extend_from_slice(&0u32.to_le_bytes());
        for gpa in [0u64, 1 << 32] {
            // The region of `region_message`, without its padding.
            table.extend_from_slice(&region_message(ADD_MEM_REG, gpa, 0).payload[8..]);
        }
        let set = Message::new(SET_MEM_TABLE, FLAG_VERSION, table);
        assert_eq!(r.on_frontend_message(&set), Action::Forward);
        // A hot-plugged region is new; a region of the table is not.
        assert_eq!(
            r.on_frontend_message(&region_message(ADD_MEM_REG, 2 << 32, 1)),
            Action::Forward
        );
        assert_eq!(
            r.on_frontend_message(&region_message(ADD_MEM_REG, 1 << 32, 1)),
            Action::Defer { reply: false }
        );
    }

    #[test]
    fn truncated_enable_is_forwarded_for_the_handler_to_reject() {
        let mut r = FrontendFixes::default();
        let short = Message::new(SET_VRING_ENABLE, FLAG_VERSION, vec![0, 0]);
        assert_eq!(r.on_frontend_message(&short), Action::Forward);
    }

    #[test]
    fn messages_and_descriptors_cross_a_socket_intact() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut msg = Message::new(
            SET_FEATURES,
            FLAG_VERSION | FLAG_NEED_REPLY,
            vec![1, 2, 3, 4, 5, 6, 7, 8],
        );
        msg.fds.push(OwnedFd::from(file));
        write_message(&a, &msg).unwrap();
        let got = read_message(&mut b).unwrap().unwrap();
        assert_eq!(got.request, SET_FEATURES);
        assert_eq!(got.flags, FLAG_VERSION | FLAG_NEED_REPLY);
        assert_eq!(got.payload, msg.payload);
        assert_eq!(got.fds.len(), 1);
        drop(b);
        // Reading from a closed peer ends cleanly.
        let (mut c, d) = UnixStream::pair().unwrap();
        drop(d);
        assert!(read_message(&mut c).unwrap().is_none());
        let _ = a.flush();
    }

    #[test]
    fn oversized_payload_is_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut header = [0u8; HEADER_LEN];
        header[8..12].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
        (&a).write_all(&header).unwrap();
        assert!(read_message(&mut b).is_err());
    }
}
