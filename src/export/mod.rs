//! Getting data out of the daemon: packet capture (pcapng), the control
//! socket (JSON) and the Prometheus endpoint.

pub mod capture;
pub mod control;
pub mod prometheus;
