//! A real test guest under `qemu-system-x86_64 -accel tcg`, run inside a [`Netns`].
//!
//! The guest image (`vmlinuz`, `initramfs.gz`) comes from `scripts/build-guest.sh`
//! (`$VSNOOP_GUEST_DIR`, default `target/guest`). Its /init configures eth0 from
//! `vsnoop.ip=...`, applies `vsnoop.sysctl=...`, starts `iperf3 -s -D` and
//! `tcpsink -D -p 5001` ([`SINK_PORT`], unless `vsnoop.sink=0`; extra options from
//! `vsnoop.sinkargs=...`), prints `VSNOOP-GUEST-READY` and runs an
//! interactive shell on ttyS0 with echo off. The serial console is QEMU's stdio,
//! connected to pipes here; [`Guest::run`] frames each command with begin/end
//! markers (`echo __VSB""EGIN_n` so the marker never matches its own text) and
//! returns the exit code and the output.
//!
//! QEMU 7.2 under TCG segfaults (exit 139) at the guest's DRIVER_OK when a
//! vhost-user NIC uses MSI-X, so the NIC is always created with `vectors=0`; an
//! exit by SIGSEGV is reported as a QEMU crash, not as a guest hang.
//!
//! Host-side helpers: [`in_netns`] runs a closure on a thread that has entered the
//! namespace (sockets it opens live there), [`send_to_guest`] and
//! [`receive_from_guest`] move hashed random data with busybox `nc` in the guest,
//! [`iperf_mbits`] and [`ping_rtt_ms`] parse tool output.
#![allow(dead_code)]

use super::{require_tool, Netns};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Guest address used by the tests (inside the private namespace only).
pub const GUEST_IP: &str = "10.77.0.2";
/// Host-side (tap) address used by the tests (inside the private namespace only).
pub const HOST_IP: &str = "10.77.0.1";
/// Fixed MAC of the guest NIC.
pub const GUEST_MAC: &str = "52:54:00:77:00:02";
/// Fixed MAC the tests give the host side of the tap, so a re-created tap keeps
/// its address and the guest's neighbour entry stays valid.
pub const HOST_MAC: &str = "02:77:00:00:00:01";

/// Port of the guest's `tcpsink` (started by /init unless `vsnoop.sink=0`;
/// protocol in `tests/tools/guest/tcpsink.c` and [`super::sink`]).
pub const SINK_PORT: u16 = 5001;
/// Guest shell snippet that stops every tcpsink process and waits until they are gone.
const STOP_SINK_CMD: &str =
    "killall tcpsink 2>/dev/null; n=0; while pidof tcpsink >/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done; ";

const READY: &str = "VSNOOP-GUEST-READY";
/// The guest shell's PS1 (set by the guest's /init).
const PROMPT: &str = "guest# ";

/// Directory holding the guest image.
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("VSNOOP_GUEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest"),
    }
}

/// Makes sure the guest image exists and is current: runs `scripts/build-guest.sh`
/// once per test process (it is cached and returns at once when up to date).
/// Fails the test, never skips it, when the image cannot be built.
pub fn ensure_image() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = guest_dir();
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-guest.sh");
            let out = Command::new("bash")
                .arg(&script)
                .env("VSNOOP_GUEST_DIR", &dir)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            let ok = out.status.success()
                && dir.join("vmlinuz").is_file()
                && dir.join("initramfs.gz").is_file();
            if ok {
                Ok(dir)
            } else {
                Err(format!(
                    "guest image missing and {} failed ({}):\n{}{}",
                    script.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Serialises real guests (one QEMU at a time on a 2-core machine), also across
/// test processes: an exclusive `flock` on a file in the temp directory, held
/// until the returned guard is dropped.
pub struct GuestLock {
    _file: fs::File,
}

pub fn lock() -> GuestLock {
    let path = std::env::temp_dir().join("vsnoop-guest.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
    GuestLock { _file: file }
}

/// How the guest NIC reaches the host.
#[derive(Clone, Debug)]
pub enum Backend {
    /// vhost-user; QEMU connects to `socket` (the backend is the server).
    /// With `reconnect`, QEMU reconnects every second after the backend goes away.
    VhostUserClient { socket: PathBuf, reconnect: bool },
    /// vhost-user; QEMU listens on `socket` (`server=on,wait=off`) and the
    /// backend connects (`vsnoop --client`). QEMU still waits for the backend
    /// before it starts the guest (vhost-user netdev initialisation).
    VhostUserServer { socket: PathBuf },
    /// QEMU's own tap backend (QEMU creates the tap `ifname`), for comparisons.
    Tap { ifname: String },
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub backend: Backend,
    /// `vsnoop.ip=` for the guest's eth0.
    pub ip_cidr: String,
    pub mac: String,
    pub mem_mb: u32,
    /// Appended to `-device virtio-net-pci,netdev=n0,vectors=0,mrg_rxbuf=on,mac=...`.
    pub device_opts: String,
    /// Appended to the kernel command line.
    pub append: String,
    /// Appended to QEMU's arguments (e.g. `-qmp unix:PATH,server=on,wait=off`).
    pub extra_args: Vec<String>,
    /// Queue pairs of a vhost-user device (`queues=N`, `mq=on`); the guest
    /// gets one vCPU per pair, as Linux's virtio-net enables
    /// min(pairs, CPUs) of them.
    pub queues: u16,
}

impl GuestConfig {
    pub fn new(backend: Backend) -> GuestConfig {
        GuestConfig {
            backend,
            ip_cidr: format!("{GUEST_IP}/24"),
            mac: GUEST_MAC.to_string(),
            mem_mb: 256,
            device_opts: String::new(),
            append: String::new(),
            extra_args: Vec::new(),
            queues: 1,
        }
    }

    /// The QEMU arguments (without the program name).
    pub fn qemu_args(&self, image: &Path) -> Vec<String> {
        let mem = self.mem_mb;
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-smp".into(),
            self.queues.max(1).to_string(),
            "-m".into(),
            format!("{mem}M"),
            // vhost-user needs guest memory the backend can map.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-kernel".into(),
            image.join("vmlinuz").display().to_string(),
            "-initrd".into(),
            image.join("initramfs.gz").display().to_string(),
            "-append".into(),
            format!(
                "console=ttyS0 quiet loglevel=1 panic=-1 vsnoop.ip={} {}",
                self.ip_cidr, self.append
            )
            .trim_end()
            .to_string(),
            "-chardev".into(),
            "stdio,id=ser0,signal=off".into(),
            "-serial".into(),
            "chardev:ser0".into(),
        ];
        let multiqueue = self.queues > 1;
        let vhost_user_netdev = if multiqueue {
            format!("vhost-user,id=n0,chardev=c0,queues={}", self.queues)
        } else {
            "vhost-user,id=n0,chardev=c0".to_string()
        };
        match &self.backend {
            Backend::VhostUserClient { socket, reconnect } => {
                let mut chardev = format!("socket,id=c0,path={}", socket.display());
                if *reconnect {
                    chardev.push_str(",reconnect=1");
                }
                args.extend(["-chardev".into(), chardev]);
                args.extend(["-netdev".into(), vhost_user_netdev]);
            }
            Backend::VhostUserServer { socket } => {
                let chardev = format!("socket,id=c0,path={},server=on,wait=off", socket.display());
                args.extend(["-chardev".into(), chardev]);
                args.extend(["-netdev".into(), vhost_user_netdev]);
            }
            Backend::Tap { ifname } => {
                args.extend([
                    "-netdev".into(),
                    format!("tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=off"),
                ]);
            }
        }
        // vectors=0: legacy INTx; MSI-X + vhost-user crashes QEMU 7.2 under TCG.
        let mut device = format!(
            "virtio-net-pci,netdev=n0,vectors=0,mrg_rxbuf=on,mac={}",
            self.mac
        );
        if multiqueue {
            device.push_str(",mq=on");
        }
        if !self.device_opts.is_empty() {
            device.push(',');
            device.push_str(self.device_opts.trim_start_matches(','));
        }
        args.extend(["-device".into(), device]);
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// A running QEMU guest. Dropping it kills QEMU (by its PID).
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Mutex<Vec<u8>>>,
    reader: Option<thread::JoinHandle<()>>,
    stderr_path: PathBuf,
    console_path: PathBuf,
    seq: u32,
    /// Console bytes before this offset belong to earlier commands.
    cursor: usize,
    exit: Option<ExitStatus>,
    started: Instant,
    pub argv: Vec<String>,
}

impl Guest {
    /// Starts QEMU inside `ns`; QEMU's stderr and the console are also written to
    /// `dir` (`qemu-N.stderr`, `console-N.log`). Does not wait for the boot.
    pub fn boot(ns: &Netns, cfg: &GuestConfig, dir: &Path) -> Guest {
        require_tool("qemu-system-x86_64");
        let image = ensure_image();
        let n = super::unique("");
        let stderr_path = dir.join(format!("qemu-{n}.stderr"));
        let console_path = dir.join(format!("console-{n}.log"));
        let stderr = fs::File::create(&stderr_path).expect("create qemu stderr log");
        let argv = cfg.qemu_args(&image);
        let mut child = ns
            .command("qemu-system-x86_64")
            .args(&argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("qemu stdout");
        let console = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&console);
        let mut log = fs::File::create(&console_path).ok();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Some(f) = log.as_mut() {
                            let _ = f.write_all(&buf[..n]);
                        }
                        sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                }
            }
        });
        Guest {
            child,
            stdin,
            console,
            reader: Some(reader),
            stderr_path,
            console_path,
            seq: 0,
            cursor: 0,
            exit: None,
            started: Instant::now(),
            argv,
        }
    }

    /// QEMU's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console output so far (carriage returns removed).
    pub fn console_text(&self) -> String {
        let bytes = self.console.lock().unwrap();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// QEMU's stderr so far.
    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// A diagnostic block: QEMU status, command line, stderr and the console tail.
    pub fn diagnostics(&mut self) -> String {
        let status = match self.poll_exit() {
            Some(st) => describe_exit(st),
            None => format!("QEMU (pid {}) still running", self.child.id()),
        };
        let console = self.console_text();
        let tail_start = console.len().saturating_sub(4000);
        let tail_start = (tail_start..console.len())
            .find(|&i| console.is_char_boundary(i))
            .unwrap_or(0);
        format!(
            "--- {status}\n--- qemu-system-x86_64 {}\n--- QEMU stderr:\n{}\n--- console (last 4000 bytes):\n{}\n---",
            self.argv.join(" "),
            self.stderr_text(),
            &console[tail_start..]
        )
    }

    /// Waits until `path` exists (a socket QEMU creates); panics with
    /// diagnostics if QEMU exits or `timeout` passes first.
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            self.assert_alive(&format!("waiting for QEMU to create {}", path.display()));
            assert!(
                Instant::now() < deadline,
                "{} never appeared\n{}",
                path.display(),
                self.diagnostics()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Exit status if QEMU has exited.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit = Some(st);
            }
        }
        self.exit
    }

    /// Panics with diagnostics if QEMU is no longer running.
    pub fn assert_alive(&mut self, context: &str) {
        if self.poll_exit().is_some() {
            panic!("{context}: QEMU is gone\n{}", self.diagnostics());
        }
    }

    /// Waits until /init printed the ready marker and the shell answers a command.
    /// Returns the time since QEMU was started.
    pub fn wait_booted(&mut self, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console_text().contains(READY) {
                break;
            }
            if self.poll_exit().is_some() {
                panic!("guest did not boot: QEMU exited\n{}", self.diagnostics());
            }
            if self.console_text().contains("Kernel panic") {
                panic!("guest kernel panic\n{}", self.diagnostics());
            }
            if Instant::now() > deadline {
                panic!(
                    "guest did not boot within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(20));
        let (code, out) = self.run("echo shell-ok", left);
        assert!(
            code == 0 && out.contains("shell-ok"),
            "guest shell not answering: {out}"
        );
        self.started.elapsed()
    }

    /// Runs `cmd` in the guest shell; returns (exit code, output). Panics with
    /// diagnostics on timeout or if QEMU exits.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        match self.try_run(cmd, timeout) {
            Ok(r) => r,
            Err(e) => panic!("guest command {cmd:?}: {e}\n{}", self.diagnostics()),
        }
    }

    /// Like [`Guest::run`] but asserts exit code 0 and returns the output.
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> String {
        let (code, out) = self.run(cmd, timeout);
        if code != 0 {
            panic!(
                "guest command {cmd:?} exited {code}:\n{out}\n{}",
                self.diagnostics()
            );
        }
        out
    }

    /// Runs `cmd`; on timeout or QEMU exit returns an error string (no panic).
    /// After a timeout the command may still be running; see [`Guest::interrupt`].
    pub fn try_run(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), String> {
        if let Some(st) = self.poll_exit() {
            return Err(describe_exit(st));
        }
        self.seq += 1;
        let n = self.seq;
        // The quotes split the markers, so the text we send never matches them.
        let line = format!("echo __VSB\"\"EGIN_{n}; {cmd}\necho __VSE\"\"ND_{n}_$?\n");
        let begin = format!("__VSBEGIN_{n}");
        let end = format!("__VSEND_{n}_");
        {
            let stdin = self.stdin.as_mut().ok_or("console closed")?;
            stdin
                .write_all(line.as_bytes())
                .and_then(|_| stdin.flush())
                .map_err(|e| format!("write to console: {e}"))?;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((code, output, consumed)) = self.parse_reply(&begin, &end) {
                self.cursor += consumed;
                return Ok((code, output));
            }
            if let Some(st) = self.poll_exit() {
                // The reader may still hold the last bytes; look once more.
                thread::sleep(Duration::from_millis(100));
                if let Some((code, output, consumed)) = self.parse_reply(&begin, &end) {
                    self.cursor += consumed;
                    return Ok((code, output));
                }
                return Err(format!(
                    "QEMU exited while running the command: {}",
                    describe_exit(st)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("no answer within {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Looks for `begin`...`end<digits>` after the cursor; returns the exit code,
    /// the output between the markers and the bytes consumed.
    fn parse_reply(&self, begin: &str, end: &str) -> Option<(i32, String, usize)> {
        let bytes = self.console.lock().unwrap();
        let raw = &bytes[self.cursor.min(bytes.len())..];
        let b = find_bytes(raw, begin.as_bytes())?;
        let body_start = b + find_bytes(&raw[b..], b"\n")? + 1;
        let e = body_start + find_bytes(&raw[body_start..], end.as_bytes())?;
        let digits_start = e + end.len();
        let digits = raw[digits_start..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        // Need the byte after the digits too, so the number is complete.
        if digits == 0 || raw.len() <= digits_start + digits {
            return None;
        }
        let code = std::str::from_utf8(&raw[digits_start..digits_start + digits])
            .ok()?
            .parse()
            .unwrap_or(-1);
        let mut output = String::from_utf8_lossy(&raw[body_start..e]).replace('\r', "");
        // The shell prompts before reading the `echo END` line, right after the
        // command's own output.
        if output.ends_with(PROMPT) {
            output.truncate(output.len() - PROMPT.len());
        }
        Some((code, output, digits_start + digits))
    }

    /// Sends Ctrl-C to the guest shell's foreground job.
    pub fn interrupt(&mut self) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(b"\x03\n");
            let _ = stdin.flush();
        }
    }

    /// Stops QEMU with SIGTERM (like a management stack would), waits for it and
    /// returns its exit status; falls back to SIGKILL after 10 s.
    pub fn quit(&mut self) -> ExitStatus {
        if let Some(st) = self.poll_exit() {
            return st;
        }
        super::signal(self.child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.poll_exit() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let st = self.child.wait().expect("wait qemu");
                self.exit = Some(st);
                return st;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Path of the console log file.
    pub fn console_log_path(&self) -> &Path {
        &self.console_path
    }

    /// Stops the guest's tcpsink (the listener and every connection it is
    /// serving) and waits until no tcpsink process is left.
    pub fn stop_sink(&mut self) {
        self.run_ok(STOP_SINK_CMD, Duration::from_secs(30));
    }

    /// (Re)starts the guest's tcpsink as `tcpsink -D -p SINK_PORT ARGS` (see
    /// `tests/tools/guest/tcpsink.c` for the options) after stopping any
    /// running one, and waits until it listens.
    pub fn restart_sink(&mut self, args: &str) {
        self.stop_sink();
        self.run_ok(
            &format!(
                "tcpsink -D -p {SINK_PORT} {args} && n=0; \
                 while ! netstat -ltn | grep -q ':{SINK_PORT} ' && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done; \
                 netstat -ltn | grep -q ':{SINK_PORT} '"
            ),
            Duration::from_secs(30),
        );
    }

    /// Applies `sysctl -w key=value` in the guest for each pair (new TCP
    /// connections pick the values up) and returns `sysctl -n` of each key
    /// afterwards, in order.
    pub fn sysctl(&mut self, settings: &[(&str, &str)]) -> Vec<String> {
        let mut values = Vec::new();
        for (key, value) in settings {
            let out = self.run_ok(
                &format!("sysctl -w {key}='{value}' >/dev/null && sysctl -n {key}"),
                Duration::from_secs(30),
            );
            values.push(out.trim().to_string());
        }
        values
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill(); // SIGKILL to QEMU's own PID
            let _ = self.child.wait();
        }
        self.stdin.take();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Explains a QEMU exit status; SIGSEGV / 139 is the QEMU 7.2 TCG vhost-user
/// MSI-X crash (kvm_virtio_pci_irqfd_use), which looks like a hung guest.
pub fn describe_exit(st: ExitStatus) -> String {
    if st.signal() == Some(libc::SIGSEGV) || st.code() == Some(139) {
        format!(
            "QEMU CRASHED ({st}, exit 139/SIGSEGV): QEMU 7.2 under TCG segfaults in \
             kvm_virtio_pci_irqfd_use when a vhost-user NIC uses MSI-X; the device needs vectors=0"
        )
    } else if let Some(sig) = st.signal() {
        format!("QEMU killed by signal {sig} ({st})")
    } else {
        format!("QEMU exited ({st})")
    }
}

/// Runs `f` on a new thread that has entered `ns`'s network namespace, so the
/// sockets it opens live there. The root namespace is never touched.
pub fn in_netns<T, F>(ns: &Netns, f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/var/run/netns/{}", ns.name);
    thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns only changes this thread's network namespace; the fd is valid.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
        f()
    })
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Result of one hashed transfer.
#[derive(Debug)]
pub struct Transfer {
    pub bytes: usize,
    pub sender_sha256: String,
    pub receiver_sha256: String,
    pub elapsed: Duration,
}

impl Transfer {
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// First 64-hex-digit word in `text` (a `sha256sum` line).
pub fn find_sha256(text: &str) -> Option<String> {
    text.split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string)
}

/// What a host-side transfer thread returned; panics with what the guest
/// said and its diagnostics when the thread failed.
fn host_side<T>(
    handle: thread::JoinHandle<Result<T, String>>,
    what: &str,
    guest_said: &str,
    guest: &mut Guest,
) -> T {
    match handle.join() {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!(
            "{what} failed: {e}\nguest said: {guest_said}\n{}",
            guest.diagnostics()
        ),
        Err(_) => panic!("{what}: the host thread panicked\n{}", guest.diagnostics()),
    }
}

/// The byte count (a line `bytes=N`) and SHA-256 the guest reported.
fn guest_received(out: &str) -> (usize, String) {
    let bytes = out
        .lines()
        .find_map(|l| l.strip_prefix("bytes="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no byte count from the guest: {out}"));
    let sha = find_sha256(out).unwrap_or_else(|| panic!("no sha256 from the guest: {out}"));
    (bytes, sha)
}

/// A listener on [`HOST_IP`]:`port` inside `ns` (usable from any thread).
fn listen_in(ns: &Netns, port: u16) -> TcpListener {
    let addr: SocketAddr = format!("{HOST_IP}:{port}").parse().unwrap();
    in_netns(ns, move || TcpListener::bind(addr))
        .join()
        .expect("bind thread")
        .unwrap_or_else(|e| panic!("bind {addr} in the namespace: {e}"))
}

/// The first connection to `listener` before `deadline`, blocking, with
/// the time left as its read and write timeout.
fn accept_until(listener: &TcpListener, deadline: Instant) -> Result<TcpStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    stream.set_read_timeout(Some(left)).ok();
    stream.set_write_timeout(Some(left)).ok();
    Ok(stream)
}

/// A download the guest starts: busybox `wget` fetches `size` random bytes
/// from a one-shot HTTP server on [`HOST_IP`]:`port` in `ns` into /tmp, then
/// reports `wc -c` and `sha256sum`. The connection is the guest's (its SYN
/// comes first); the data flows toward it.
pub fn download_to_guest(
    ns: &Netns,
    guest: &mut Guest,
    port: u16,
    size: usize,
    timeout: Duration,
) -> Transfer {
    let mut data = vec![0u8; size];
    rand::thread_rng().fill_bytes(&mut data);
    let sender_sha256 = sha256_hex(&data);
    let listener = listen_in(ns, port);
    let deadline = Instant::now() + timeout;
    let server = thread::spawn(move || -> Result<Duration, String> {
        let mut stream = accept_until(&listener, deadline)?;
        let start = Instant::now();
        // The request head, then the whole body and the end of the stream.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while find_bytes(&head, b"\r\n\r\n").is_none() && head.len() < 16 * 1024 {
            match stream.read(&mut buf) {
                Ok(0) => return Err("the guest closed before its request".into()),
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("request: {e}")),
            }
        }
        let reply = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        );
        stream
            .write_all(reply.as_bytes())
            .and_then(|_| stream.write_all(&data))
            .map_err(|e| format!("send: {e}"))?;
        stream.shutdown(Shutdown::Write).ok();
        // Until the guest closes: everything was read by then.
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        Ok(start.elapsed())
    });
    let f = "/tmp/vsnoop-dl.bin";
    let (code, out) = guest.run(
        &format!(
            "wget -q -O {f} http://{HOST_IP}:{port}/blob; echo wget=$?; \
             echo bytes=$(wc -c <{f}); sha256sum {f}; rm -f {f}"
        ),
        timeout + Duration::from_secs(30),
    );
    let elapsed = host_side(server, "download to the guest", &out, guest);
    assert!(
        code == 0 && out.contains("wget=0"),
        "guest wget: {out}\n{}",
        guest.diagnostics()
    );
    let (bytes, receiver_sha256) = guest_received(&out);
    Transfer {
        bytes,
        sender_sha256,
        receiver_sha256,
        elapsed,
    }
}

/// Sends `size` random bytes from the namespace to the guest (guest: busybox
/// `nc -l` into /tmp, then `wc -c` and `sha256sum`). Completion is detected on
/// both sides: the host writes everything and half-closes, the guest `nc` exits
/// on EOF and the guest reports the byte count and the hash.
pub fn send_to_guest(
    ns: &Netns,
    guest: &mut Guest,
    port: u16,
    size: usize,
    timeout: Duration,
) -> Transfer {
    if port == SINK_PORT {
        // The guest's /init runs tcpsink on SINK_PORT; nc needs that port to
        // itself, and the sender below must not reach the sink instead.
        guest.stop_sink();
    }
    let mut data = vec![0u8; size];
    rand::thread_rng().fill_bytes(&mut data);
    let sender_sha256 = sha256_hex(&data);
    let addr: SocketAddr = format!("{GUEST_IP}:{port}").parse().unwrap();
    let deadline = Instant::now() + timeout;
    let sender = in_netns(ns, move || -> Result<Duration, String> {
        // The guest's nc may not be listening yet: retry refused connections.
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(format!("connect {addr}: {e}")),
            }
        };
        let start = Instant::now();
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        stream.set_write_timeout(Some(left)).ok();
        stream.set_read_timeout(Some(left)).ok();
        stream.write_all(&data).map_err(|e| format!("send: {e}"))?;
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        // Wait for the guest to close its side (its nc exits after our EOF).
        let mut sink = [0u8; 1024];
        loop {
            match stream.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(format!("waiting for the guest to close: {e}")),
            }
        }
        Ok(start.elapsed())
    });
    let f = "/tmp/vsnoop-rx.bin";
    let out = guest.run(
        &format!(
            "nc -l -p {port} </dev/null >{f}; echo nc=$?; echo bytes=$(wc -c <{f}); sha256sum {f}; rm -f {f}"
        ),
        timeout + Duration::from_secs(30),
    );
    let elapsed = host_side(sender, "host->guest transfer", &out.1, guest);
    let (bytes, receiver_sha256) = guest_received(&out.1);
    Transfer {
        bytes,
        sender_sha256,
        receiver_sha256,
        elapsed,
    }
}

/// Has the guest send `size` bytes of /dev/urandom to a listener in the
/// namespace (`HOST_IP:port`); the host reads to EOF and hashes. The guest
/// writes the file to /tmp first so that its hash is computed before sending.
pub fn receive_from_guest(
    ns: &Netns,
    guest: &mut Guest,
    port: u16,
    size: usize,
    timeout: Duration,
) -> Transfer {
    let f = "/tmp/vsnoop-tx.bin";
    let prep = guest.run_ok(
        &format!("head -c {size} /dev/urandom >{f} && wc -c <{f} && sha256sum {f}"),
        timeout,
    );
    let sender_sha256 =
        find_sha256(&prep).unwrap_or_else(|| panic!("no sha256 from the guest: {prep}"));
    let listener = listen_in(ns, port);
    let deadline = Instant::now() + timeout;
    let receiver = thread::spawn(move || -> Result<(usize, String, Duration), String> {
        let mut stream = accept_until(&listener, deadline)?;
        let start = Instant::now();
        let mut hasher = Sha256::new();
        let mut total = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    total += n;
                }
                Err(e) => return Err(format!("receive after {total} bytes: {e}")),
            }
        }
        let elapsed = start.elapsed();
        drop(stream); // lets the guest's nc exit
        Ok((total, hex(&hasher.finalize()), elapsed))
    });
    let (code, out) = guest.run(
        &format!("nc {HOST_IP} {port} <{f} >/dev/null; echo nc=$?; rm -f {f}"),
        timeout + Duration::from_secs(30),
    );
    let (bytes, receiver_sha256, elapsed) =
        host_side(receiver, "guest->host transfer", &out, guest);
    assert_eq!(code, 0, "guest nc: {out}");
    Transfer {
        bytes,
        sender_sha256,
        receiver_sha256,
        elapsed,
    }
}

/// Receiver throughput in Mbit/s from `iperf3 -f m` text output.
pub fn iperf_mbits(output: &str) -> Option<f64> {
    let line = output.lines().rfind(|l| l.contains("receiver"))?;
    let toks: Vec<&str> = line.split_whitespace().collect();
    let i = toks.iter().position(|t| *t == "Mbits/sec")?;
    toks.get(i.checked_sub(1)?)?.parse().ok()
}

/// (min, avg, max) round-trip time in ms and the packet loss line from busybox
/// or iputils `ping` output.
pub fn ping_rtt_ms(output: &str) -> Option<(f64, f64, f64)> {
    let line = output.lines().find(|l| l.contains("min/avg/max"))?;
    let nums = line.split('=').nth(1)?.trim();
    let mut it = nums
        .split_whitespace()
        .next()?
        .split('/')
        .map(|v| v.parse::<f64>());
    Some((it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?))
}

/// Gives the tap in `ns` the host address and fixed MAC and brings it up.
pub fn configure_host_tap(ns: &Netns, tap: &str) {
    ns.exec(&["ip", "link", "set", tap, "address", HOST_MAC]);
    ns.exec(&[
        "ip",
        "addr",
        "replace",
        &format!("{HOST_IP}/24"),
        "dev",
        tap,
    ]);
    ns.exec(&["ip", "link", "set", tap, "up"]);
}

/// A bridge in `ns` that carries the host address and MAC (instead of a
/// tap, see [`configure_host_tap`]) with `tap` as its first port. It learns
/// no addresses (ageing time 0: every frame is flooded to every port), so a
/// guest that moves to another port (live migration to a second backend)
/// is reached at once, without waiting for an announcement. Returns its name.
pub fn host_bridge(ns: &Netns, tap: &str) -> String {
    let bridge = super::unique("vbr");
    ns.exec(&[
        "ip",
        "link",
        "add",
        &bridge,
        "address",
        HOST_MAC,
        "type",
        "bridge",
        "ageing_time",
        "0",
    ]);
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{HOST_IP}/24"),
        "dev",
        &bridge,
    ]);
    join_bridge(ns, &bridge, tap);
    ns.exec(&["ip", "link", "set", &bridge, "up"]);
    bridge
}

/// Makes `tap` a port of `bridge` and brings it up.
pub fn join_bridge(ns: &Netns, bridge: &str, tap: &str) {
    ns.exec(&["ip", "link", "set", tap, "master", bridge]);
    ns.exec(&["ip", "link", "set", tap, "up"]);
}

/// QEMU arguments that serve QMP on the unix socket `path`.
pub fn qmp_args(path: &Path) -> [String; 2] {
    [
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path.display()),
    ]
}

/// Pings the guest from the namespace until one reply arrives (or panics).
pub fn wait_ping_guest(ns: &Netns, timeout: Duration) -> Duration {
    require_tool("busybox");
    let start = Instant::now();
    loop {
        let (ok, _) = ns.try_exec(&["busybox", "ping", "-c", "1", "-W", "1", GUEST_IP]);
        if ok {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "guest {GUEST_IP} never answered a ping within {timeout:?}"
        );
    }
}
