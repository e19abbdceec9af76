//! Host side of the guest's `tcpsink` (`tests/tools/guest/tcpsink.c`, started by
//! the guest's /init on [`SINK_PORT`]).
//!
//! Protocol, one transfer per connection: the client sends an 8-byte big-endian
//! length L and then L bytes; the sink reads them all and answers one line
//! `"<L> <sha256-hex>\n"`, then closes. If the client stops early (FIN), the
//! sink answers `"ERR <received> <L>\n"`.
//!
//! Every sender here runs on a thread inside the test's namespace ([`in_netns`]),
//! sends random data and checks the sink's hash against it.
#![allow(dead_code)]

use super::guest::{in_netns, sha256_hex, SINK_PORT};
use super::Netns;
use rand::RngCore;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How a transfer ends early (after [`SendOptions::abort_after`] payload bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// `SO_LINGER` 0 and close: the kernel sends a RST.
    Reset,
    /// `shutdown(SHUT_WR)`: a FIN; the sink answers `ERR <got> <L>`, which is
    /// read to EOF.
    Fin,
}

/// Options of one transfer.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Bytes per `write()` call.
    pub write_chunk: usize,
    /// `TCP_NODELAY` (with a small `write_chunk`: many small segments).
    pub nodelay: bool,
    /// Sleep after every `write()` (paces the sender).
    pub write_pause: Option<Duration>,
    /// Sleep between connect and the first byte (an idle connection).
    pub idle_after_connect: Option<Duration>,
    /// The whole transfer (connect retries, sending, waiting for the reply).
    pub timeout: Duration,
    /// End the transfer early after this many payload bytes.
    pub abort_after: Option<(usize, Abort)>,
    /// Payload bytes written so far, updated after every `write()`.
    pub progress: Option<Arc<AtomicU64>>,
}

impl Default for SendOptions {
    fn default() -> SendOptions {
        SendOptions {
            write_chunk: 256 * 1024,
            nodelay: false,
            write_pause: None,
            idle_after_connect: None,
            timeout: Duration::from_secs(180),
            abort_after: None,
            progress: None,
        }
    }
}

/// TCP options the connection negotiated (the sender's `TCP_INFO` right
/// after the handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub timestamps: bool,
    pub sack: bool,
    /// (scale the guest announced, our own scale) when window scaling is on.
    pub wscale: Option<(u8, u8)>,
    pub ecn: bool,
}

/// Outcome of one transfer.
#[derive(Clone, Debug)]
pub struct SinkResult {
    /// The sink's reply line without the newline (empty after a RST abort).
    pub reply: String,
    /// Length announced in the header.
    pub len: u64,
    /// Payload bytes written.
    pub sent: u64,
    /// SHA-256 of the whole announced payload (what the sink should report).
    pub sha256: String,
    /// From the first header byte written to the end of the sink's reply
    /// (the benchmark's measure); until the abort for aborted transfers.
    pub elapsed: Duration,
    /// What the handshake negotiated (None if `TCP_INFO` failed).
    pub negotiated: Option<Negotiated>,
}

impl SinkResult {
    pub fn mbyte_per_s(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// Sends `len` random bytes to the sink at `addr:port` from inside `ns`; panics
/// unless the sink's reply carries the right length and hash. Returns the reply
/// line and the time from the first byte sent to the end of the reply.
pub fn send(ns: &Netns, addr: &str, port: u16, len: usize) -> (String, Duration) {
    match send_with(ns, addr, port, len, &SendOptions::default()) {
        Ok(r) => (r.reply, r.elapsed),
        Err(e) => panic!("tcpsink transfer of {len} bytes to {addr}:{port}: {e}"),
    }
}

/// [`send`] with options; returns an error string instead of panicking. A
/// complete transfer is checked (length and hash); an aborted one is not.
pub fn send_with(
    ns: &Netns,
    addr: &str,
    port: u16,
    len: usize,
    opts: &SendOptions,
) -> Result<SinkResult, String> {
    spawn_send(ns, addr, port, len, opts)
        .join()
        .map_err(|_| "sender thread panicked".to_string())?
}

/// Starts [`send_with`] on its own thread inside `ns` and returns at once
/// (for tests that act while the transfer runs; see [`SendOptions::progress`]).
pub fn spawn_send(
    ns: &Netns,
    addr: &str,
    port: u16,
    len: usize,
    opts: &SendOptions,
) -> thread::JoinHandle<Result<SinkResult, String>> {
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    let sha256 = sha256_hex(&data);
    let text = format!("{addr}:{port}");
    let target: Result<SocketAddr, _> = text.parse();
    let opts = opts.clone();
    in_netns(ns, move || {
        let target = target.map_err(|e| format!("bad address {text}: {e}"))?;
        transfer(target, data, sha256, &opts)
    })
}

/// Default guest address and port: [`super::guest::GUEST_IP`]:[`SINK_PORT`].
pub fn guest_target() -> (&'static str, u16) {
    (super::guest::GUEST_IP, SINK_PORT)
}

fn transfer(
    addr: SocketAddr,
    data: Vec<u8>,
    sha256: String,
    opts: &SendOptions,
) -> Result<SinkResult, String> {
    let deadline = Instant::now() + opts.timeout;
    let len = data.len() as u64;
    // The sink may be (re)starting: retry refused connections until the deadline.
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() + Duration::from_millis(200) < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
    };
    stream
        .set_nodelay(opts.nodelay)
        .map_err(|e| e.to_string())?;
    let negotiated = negotiated(&stream);
    let left = |what: &str| -> Result<Duration, String> {
        let d = deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(format!("timed out ({:?}) {what}", opts.timeout))
        } else {
            Ok(d)
        }
    };
    stream
        .set_write_timeout(Some(left("before sending")?))
        .map_err(|e| e.to_string())?;
    if let Some(idle) = opts.idle_after_connect {
        thread::sleep(idle);
    }
    let start = Instant::now();
    stream
        .write_all(&len.to_be_bytes())
        .map_err(|e| format!("send header: {e}"))?;
    let limit = match opts.abort_after {
        Some((n, _)) => n.min(data.len()),
        None => data.len(),
    };
    let chunk = opts.write_chunk.max(1);
    let mut sent = 0usize;
    while sent < limit {
        let end = (sent + chunk).min(limit);
        stream
            .set_write_timeout(Some(left(&format!("after sending {sent} bytes"))?))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(&data[sent..end])
            .map_err(|e| format!("send after {sent} of {len} bytes: {e}"))?;
        sent = end;
        if let Some(p) = &opts.progress {
            p.store(sent as u64, Ordering::Relaxed);
        }
        if let Some(pause) = opts.write_pause {
            thread::sleep(pause);
        }
    }
    let mut result = SinkResult {
        reply: String::new(),
        len,
        sent: sent as u64,
        sha256,
        elapsed: Duration::ZERO,
        negotiated,
    };
    match opts.abort_after {
        Some((_, Abort::Reset)) => {
            set_linger_zero(&stream).map_err(|e| format!("SO_LINGER: {e}"))?;
            drop(stream); // RST
            result.elapsed = start.elapsed();
            return Ok(result);
        }
        Some((_, Abort::Fin)) => {
            stream
                .shutdown(Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
        }
        None => {}
    }
    stream
        .set_read_timeout(Some(left("waiting for the sink's reply")?))
        .map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) => {
            return Err(format!(
                "reading the sink's reply after sending {sent} bytes: {e} (got {:?})",
                String::from_utf8_lossy(&reply)
            ))
        }
    }
    result.elapsed = start.elapsed();
    result.reply = String::from_utf8_lossy(&reply).trim_end().to_string();
    if opts.abort_after.is_none() {
        let expected = format!("{len} {}", result.sha256);
        if result.reply != expected {
            return Err(format!(
                "sink replied {:?}, expected {expected:?}",
                result.reply
            ));
        }
    }
    Ok(result)
}

/// Reads `tcpi_options` and the window scales from `TCP_INFO`.
fn negotiated(stream: &TcpStream) -> Option<Negotiated> {
    // struct tcp_info starts with u8 state, ca_state, retransmits, probes,
    // backoff, options, then snd_wscale:4 | rcv_wscale:4.
    let mut buf = [0u8; 104];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 || len < 7 {
        return None;
    }
    let options = buf[5];
    Some(Negotiated {
        timestamps: options & 1 != 0,
        sack: options & 2 != 0,
        wscale: (options & 4 != 0).then_some((buf[6] & 0x0f, buf[6] >> 4)),
        ecn: options & 8 != 0,
    })
}

fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own with a correctly sized struct.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `nstat -asz NAMES...` inside `ns` (absolute values, zeros included, the
/// history file left alone): counter name -> value.
pub fn nstat(ns: &Netns, names: &[&str]) -> std::collections::HashMap<String, u64> {
    let mut argv = vec!["nstat", "-asz"];
    argv.extend_from_slice(names);
    let out = ns.exec(&argv);
    let mut map: std::collections::HashMap<String, u64> = out
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let value = it.next()?.parse().ok()?;
            Some((name.to_string(), value))
        })
        .collect();
    for n in names {
        map.entry(n.to_string()).or_insert(0);
    }
    map
}
