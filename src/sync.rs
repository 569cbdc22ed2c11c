//! The synchronisation primitives of the state that concurrency tests explore. In the
//! library's own unit tests they are shuttle's (which runs a test under many thread
//! interleavings, each one reproducible from a seed); everywhere else they are std's.
//! Only modules whose unit tests run inside `shuttle::check_*` may use this shim.

#[cfg(test)]
pub use shuttle::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};
#[cfg(not(test))]
pub use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};
