//! The synchronisation primitives of the state that concurrency tests explore. Built with
//! `--features shuttle` they are shuttle's (which runs a test under many thread
//! interleavings, each reproducible from a seed), for `cargo test --features shuttle --lib
//! fs::inodes`; otherwise std's. With the feature on, only shuttle tests may run.

#[cfg(feature = "shuttle")]
pub use shuttle::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};
#[cfg(not(feature = "shuttle"))]
pub use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};
