//! Listen or connect, serve one frontend at a time, survive disconnects.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::GuestMemory;
use anyhow::{bail, Context, Result};
use log::{info, warn};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::attribution::hook::AttributionHook;
use crate::config::Config;
use crate::export::capture::CaptureSlot;
use crate::metrics::format_report;
use crate::offload::OffloadPort;
use crate::port::Tap;
use crate::state::Shared;
use crate::timing::{DataPathHook, HookChain};
use crate::vhost_user::shim::Relay;
use crate::vhost_user::{tap_event_id, timer_event_id, NetBackend};

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(config: Config) -> Result<()> {
    let tap = Tap::open(&config.tap, config.queue_pairs)?;
    let listener = if config.client {
        None
    } else {
        Some(bind_server_socket(&config.socket)?)
    };
    let settings = crate::export::capture::CaptureSettings::from_config(&config)?;
    let capture = Arc::new(CaptureSlot::with_settings(settings));
    if let Some(path) = &config.capture {
        capture.start(path, config.capture_snaplen)?;
    }
    let attribution =
        cfg!(feature = "timing").then(|| Arc::new(AttributionHook::new(config.attribution)));
    let mut hooks: Vec<Arc<dyn DataPathHook>> = Vec::new();
    if let Some(a) = &attribution {
        hooks.push(a.clone());
        hooks.push(capture.clone());
    } else if config.capture.is_some() || config.control.is_some() {
        warn!("built without the `timing` feature: no timestamps, attribution or capture");
    }
    let hook = (!hooks.is_empty()).then(|| Arc::new(HookChain(hooks)) as Arc<dyn DataPathHook>);
    let offload = Arc::new(OffloadPort::new(config.offload, config.queue_pairs));
    let backend = NetBackend::new(tap, config.queue_size, hook, offload.clone())
        .context("creating the worker timers")?;
    let shared = Arc::new(Shared {
        started: Instant::now(),
        tap: backend.tap().name().to_string(),
        queues: backend.metrics().to_vec(),
        attribution,
        capture,
        offload,
        connections: AtomicU64::new(0),
        connected: AtomicBool::new(false),
    });
    if let Some(path) = &config.control {
        crate::export::control::start(path, shared.clone())?;
        info!("control socket on {}", path.display());
    }
    if let Some(addr) = config.metrics {
        crate::export::prometheus::start(addr, shared.clone())?;
        info!("metrics on http://{addr}/metrics");
    }
    install_signal_handlers(
        shared.clone(),
        listener.as_ref().map(|_| config.socket.clone()),
        config.control.clone(),
        config.shutdown_drain,
    )?;
    info!(
        "tap {} attached with {} queue pair(s)",
        backend.tap().name(),
        backend.queue_pairs()
    );
    match &listener {
        Some(_) => info!("listening on {}", config.socket.display()),
        None => info!("connecting to {}", config.socket.display()),
    }
    let mut generation = 0u64;
    loop {
        let frontend = match &listener {
            Some(l) => l.accept().context("accepting a vhost-user connection")?.0,
            None => connect_with_retry(&config.socket),
        };
        generation += 1;
        info!("frontend connected (connection {generation})");
        shared.connections.store(generation, Ordering::Relaxed);
        shared.connected.store(true, Ordering::Relaxed);
        if let Err(e) = serve_connection(&backend, frontend, generation) {
            warn!("connection {generation} ended with an error: {e:#}");
        }
        shared.connected.store(false, Ordering::Relaxed);
        info!("frontend disconnected; waiting for the next connection");
        eprint!("{}", format_report(backend.metrics()));
    }
}

/// Serves one frontend connection to its end.
fn serve_connection(backend: &NetBackend, frontend: UnixStream, generation: u64) -> Result<()> {
    let mem = GuestMemoryAtomic::new(GuestMemory::new());
    let backend = backend.for_connection(generation, mem.clone());
    let mut daemon = VhostUserDaemon::new("vsnoop-vhost-user".into(), backend.clone(), mem)
        .map_err(|e| anyhow::anyhow!("creating the vhost-user daemon: {e:?}"))?;
    let tap_id = tap_event_id(backend.num_queues());
    for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        handler
            .register_listener(
                backend.tap().queue_fd(i),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                tap_id,
            )
            .context("registering the tap with the worker")?;
        handler
            .register_listener(
                backend.timer_fd(i),
                EventSet::IN,
                timer_event_id(backend.num_queues()),
            )
            .context("registering the timer with the worker")?;
    }
    let backend_side = connect_daemon(&mut daemon)?;
    let relay = Relay::start(frontend, backend_side).context("starting the message relay")?;
    let result = daemon.wait();
    relay.close();
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    relay.join();
    backend.reset_connection();
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_),
        )) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

/// Hands the vhost-user request handler its end of the relay: it connects to
/// a private socket (in a 0700 directory) that we accept on.
fn connect_daemon(daemon: &mut VhostUserDaemon<NetBackend>) -> Result<UnixStream> {
    let dir = std::env::temp_dir().join(format!("vsnoop-{}", std::process::id()));
    if !dir.exists() {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let path = dir.join("handler.sock");
    let _ = fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    let path_str = path
        .to_str()
        .context("temporary directory path is not UTF-8")?;
    daemon
        .start_client(path_str)
        .map_err(|e| anyhow::anyhow!("starting the vhost-user handler: {e:?}"))?;
    let (stream, _) = listener
        .accept()
        .context("accepting the handler's connection")?;
    let _ = fs::remove_file(&path);
    let _ = fs::remove_dir(&dir);
    Ok(stream)
}

/// Binds the server socket, refusing a path another process is serving and
/// replacing a stale one.
pub(crate) fn bind_server_socket(path: &Path) -> Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            bail!("{} exists and is not a socket", path.display())
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => bail!("socket {} is in use by another process", path.display()),
            Err(_) => fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))
}

fn connect_with_retry(path: &Path) -> UnixStream {
    let mut logged = false;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                if !logged {
                    info!("waiting for a VMM to listen on {} ({e})", path.display());
                    logged = true;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn install_signal_handlers(
    shared: Arc<Shared>,
    socket: Option<PathBuf>,
    control: Option<PathBuf>,
    drain: Duration,
) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1])
        .context("installing signal handlers")?;
    thread::Builder::new()
        .name("vsnoop-signals".into())
        .spawn(move || {
            let mut exiting = false;
            for signal in signals.forever() {
                if signal == SIGUSR1 {
                    eprint!("{}", format_report(&shared.queues));
                    // SIGUSR1 also makes the capture file complete up to now.
                    shared.capture.flush();
                    continue;
                }
                if exiting {
                    info!("signal {signal} again: exiting now");
                    exit(&shared, &socket, &control);
                }
                exiting = true;
                info!("exiting on signal {signal}");
                let (s, sock, ctl) = (shared.clone(), socket.clone(), control.clone());
                // The drain waits for the data path; signals stay served.
                let spawned =
                    thread::Builder::new()
                        .name("vsnoop-shutdown".into())
                        .spawn(move || {
                            drain_offload(&s.offload, drain);
                            exit(&s, &sock, &ctl);
                        });
                if let Err(e) = spawned {
                    warn!("cannot start the shutdown thread ({e}): exiting now");
                    exit(&shared, &socket, &control);
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Stops early ACKs and waits up to `limit` until the guest has
/// acknowledged every byte acknowledged on its behalf: custody dies with the
/// process, so bytes still owed could not be re-delivered afterwards.
fn drain_offload(offload: &crate::offload::OffloadPort, limit: Duration) {
    let owed = offload.owed_bytes();
    if owed == 0 {
        info!("shutdown: nothing acknowledged early is still owed by the guest");
        return;
    }
    // Off: no new early ACKs; owing flows keep being served (rule 16).
    offload.set_enabled(false);
    info!(
        "shutdown: waiting up to {limit:?} for the guest to acknowledge {owed} early-ACKed bytes"
    );
    let start = Instant::now();
    loop {
        let owed = offload.owed_bytes();
        if owed == 0 {
            info!(
                "shutdown: the guest acknowledged every early-ACKed byte in {:.1?}",
                start.elapsed()
            );
            return;
        }
        if start.elapsed() >= limit {
            warn!(
                "shutdown: {owed} early-ACKed bytes still owed after {limit:?}; they are in guest \
                 memory, but no backend can re-deliver them if the guest drops them"
            );
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The report and capture flushed, the sockets removed: exit.
fn exit(shared: &Shared, socket: &Option<PathBuf>, control: &Option<PathBuf>) -> ! {
    eprint!("{}", format_report(&shared.queues));
    shared.capture.flush();
    for path in socket.iter().chain(control.iter()) {
        let _ = fs::remove_file(path);
    }
    info!("exiting");
    std::process::exit(0);
}
