//! Arbitrary bytes from a "frontend": the relay's message reader and its
//! fixes (ring-enable reordering, memory-region add counting) must never
//! panic, whatever arrives.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vsnoop::vhost_user::shim::{read_message, FrontendFixes};

fuzz_target!(|data: &[u8]| {
    let Ok((mut tx, mut rx)) = UnixStream::pair() else {
        return;
    };
    // Stay below the socket buffer so the write never blocks.
    let data = &data[..data.len().min(100_000)];
    if tx.write_all(data).is_err() {
        return;
    }
    drop(tx);
    let mut fixes = FrontendFixes::default();
    while let Ok(Some(msg)) = read_message(&mut rx) {
        let _ = fixes.on_frontend_message(&msg);
    }
});
