//! Getting data out of the daemon: packet capture (pcapng).

pub mod capture;
