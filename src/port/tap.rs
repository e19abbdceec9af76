//! A Linux TAP interface with one file descriptor per queue pair.
//!
//! Opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (and IFF_MULTI_QUEUE for
//! more than one queue pair), non-blocking. The kernel creates the interface
//! if it does not exist; vsnoop never configures addresses on it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUN_DEVICE: &str = "/dev/net/tun";
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_MULTI_QUEUE: u16 = 0x0100;
const IFF_VNET_HDR: u16 = 0x4000;
const IFF_ATTACH_QUEUE: u16 = 0x0200;
const IFF_DETACH_QUEUE: u16 = 0x0400;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

/// Errors attaching to or configuring the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name does not fit in IFNAMSIZ or is empty.
    #[error("invalid tap name {0:?}: 1 to 15 bytes, no '/' or whitespace")]
    InvalidName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open {TUN_DEVICE} (is the tun module loaded? are you root or CAP_NET_ADMIN?)")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error(
        "cannot attach to tap {name:?} (queue {queue}): permission denied needs CAP_NET_ADMIN; \
             'invalid argument' usually means it exists with other flags (multi-queue or not)"
    )]
    SetIff {
        /// Interface name.
        name: String,
        /// Queue index.
        queue: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the virtio-net header size on tap {0:?}")]
    SetVnetHdrSize(String, #[source] io::Error),
    /// TUNSETOFFLOAD failed.
    #[error("cannot set offloads {flags:#x} on tap {name:?}")]
    SetOffload {
        /// Interface name.
        name: String,
        /// Requested TUN_F_* flags.
        flags: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// TUNSETQUEUE failed.
    #[error("cannot {action} queue {queue} of tap {name:?}")]
    SetQueue {
        /// "attach" or "detach".
        action: &'static str,
        /// Interface name.
        name: String,
        /// Queue index.
        queue: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, TapError>;

/// `struct ifreq` with the members we use.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    // The union (flags for our requests), padded to the kernel's 24 bytes.
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut req = IfReq::default();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

fn ioctl_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: every caller passes a request whose argument is a pointer to a
    // live, correctly sized `T` (an ifreq or an int) owned by the caller.
    let ret = unsafe { libc::ioctl(fd, request as _, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the request takes its argument by value; no memory is passed.
    let ret = unsafe { libc::ioctl(fd, request as _, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A tap interface, one non-blocking fd per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
    multi_queue: bool,
}

impl Tap {
    /// Attaches to (creating if missing) tap `name` with `queues` queues.
    pub fn open(name: &str, queues: usize) -> Result<Tap> {
        if name.is_empty()
            || name.len() > 15
            || name
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let multi_queue = queues > 1;
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if multi_queue {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut files = Vec::with_capacity(queues);
        for queue in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(TUN_DEVICE)
                .map_err(TapError::OpenTun)?;
            let mut req = IfReq::new(name);
            req.data[..2].copy_from_slice(&flags.to_ne_bytes());
            ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| {
                TapError::SetIff {
                    name: name.to_string(),
                    queue,
                    source,
                }
            })?;
            files.push(file);
        }
        Ok(Tap {
            name: name.to_string(),
            queues: files,
            multi_queue,
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Raw fd of queue `index` (for epoll and I/O).
    pub fn queue_fd(&self, index: usize) -> RawFd {
        self.queues[index].as_raw_fd()
    }

    /// Sets the virtio-net header length the tap reads and writes.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<()> {
        for file in &self.queues {
            let mut size = len as libc::c_int;
            ioctl_ptr(file.as_raw_fd(), TUNSETVNETHDRSZ, &mut size)
                .map_err(|e| TapError::SetVnetHdrSize(self.name.clone(), e))?;
        }
        Ok(())
    }

    /// Sets which offloads (TUN_F_*) the tap may hand to the guest.
    pub fn set_offloads(&self, flags: u32) -> Result<()> {
        // Offloads are per device; setting them through one queue is enough.
        if let Some(file) = self.queues.first() {
            ioctl_val(file.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)).map_err(
                |source| TapError::SetOffload {
                    name: self.name.clone(),
                    flags,
                    source,
                },
            )?;
        }
        Ok(())
    }

    /// Attaches or detaches queue `index` (multi-queue taps only), so the
    /// kernel does not steer frames to a queue pair the guest is not using.
    pub fn set_queue_enabled(&self, index: usize, enabled: bool) -> Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        let mut req = IfReq::new("");
        let flag = if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        req.data[..2].copy_from_slice(&flag.to_ne_bytes());
        match ioctl_ptr(self.queue_fd(index), TUNSETQUEUE, &mut req) {
            // Already in the requested state.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            r => r.map_err(|source| TapError::SetQueue {
                action: if enabled { "attach" } else { "detach" },
                name: self.name.clone(),
                queue: index,
                source,
            }),
        }
    }
}

/// `readv(2)` on a raw fd: `Ok(None)` when no frame is ready.
pub fn readv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
    let count = iov.len().min(1024) as libc::c_int;
    // SAFETY: every iovec points into guest memory or a buffer that stays
    // mapped and unaliased by Rust references for the duration of the call.
    // The raw syscall skips glibc's thread-cancellation wrapper (3 % of the
    // per-frame cost); vsnoop never cancels threads.
    let ret = unsafe { libc::syscall(libc::SYS_readv, fd, iov.as_ptr(), count) };
    io_result(ret as isize)
}

/// `writev(2)` on a raw fd: `Ok(None)` when the fd would block.
pub fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
    let count = iov.len().min(1024) as libc::c_int;
    // SAFETY: every iovec points into mapped guest memory or a live buffer.
    // Raw syscall for the same reason as in `readv`.
    let ret = unsafe { libc::syscall(libc::SYS_writev, fd, iov.as_ptr(), count) };
    io_result(ret as isize)
}

fn io_result(ret: isize) -> io::Result<Option<usize>> {
    if ret >= 0 {
        return Ok(Some(ret as usize));
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::WouldBlock => Ok(None),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names_before_touching_the_kernel() {
        for bad in ["", "a-name-that-is-too-long", "a/b", "a b"] {
            assert!(
                matches!(Tap::open(bad, 1), Err(TapError::InvalidName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let req = IfReq::new("tap0");
        assert_eq!(&req.name[..5], b"tap0\0");
    }
}
