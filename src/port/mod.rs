//! The host side of the device: where guest frames go and host frames come from.

pub mod tap;

pub use tap::{Tap, TapError};
