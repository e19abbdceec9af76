//! A minimal QMP client (QEMU's JSON monitor on a unix socket): connect,
//! read the greeting, `qmp_capabilities`, then one command at a time. QMP
//! sends one JSON object per line; asynchronous events arriving between a
//! command and its reply are kept in [`Qmp::events`].

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen so far (`{"event": ...}` objects), oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to QEMU's `-qmp unix:PATH,server=on,wait=off` socket,
    /// retrying until `timeout` (QEMU creates it during start-up).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("connect {}: {e}", path.display()))
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        };
        // A TCG guest on a busy machine can keep QEMU's main loop slow.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| format!("QMP read timeout: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("no QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP: QEMU closed the monitor".into());
        }
        serde_json::from_str(line.trim()).map_err(|e| format!("QMP: bad JSON ({e}): {line}"))
    }

    /// Runs `command` with `arguments`; `Ok` is its `return` value, `Err` the
    /// error QEMU gave (class and description) or an I/O problem.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(format!("{command}: QEMU error {err}"));
            }
            return Err(format!("{command}: unexpected QMP reply {reply}"));
        }
    }
}
