//! Counters the filesystem and the FUSE adapter keep: requests and latency by opcode,
//! errors by errno, integrity failures by cause (for `status` and the metrics endpoint).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::error::Error;

/// The FUSE requests the adapter serves, as `status` counts them. fuser hands a
/// BATCH_FORGET over as one `forget` per inode, so that is how forgets are counted.
pub const OPCODES: [&str; 33] = [
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "readdirplus",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
    "fallocate",
    "getlk",
    "setlk",
];

/// A metric's labels, as the metrics endpoint shows them.
pub type Labels = Vec<(&'static str, String)>;

/// Counters the filesystem and the adapter keep for `status` and the metrics endpoint.
#[derive(Debug)]
pub struct Stats {
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<(SystemTime, String)>>,
    requests: [AtomicU64; OPCODES.len()],
    /// Seconds each request took to answer, by opcode (as `OPCODES`): an array, so the
    /// hot path neither allocates a label nor looks one up.
    latency: [Histogram; OPCODES.len()],
    /// Errors replied, by errno.
    pub errnos: Family<Labels, Counter>,
    /// Replies that were EIO because something did not authenticate, by what.
    pub integrity: Family<Labels, Counter>,
    /// What serves the mount's requests: "/dev/fuse" or "io_uring" (set once mounted).
    pub transport: std::sync::OnceLock<&'static str>,
    /// Requests that came over io_uring (`--io-uring`).
    pub ring_requests: AtomicU64,
}

fn latency_histogram() -> Histogram {
    // 10 µs to about 40 s.
    Histogram::new(exponential_buckets(1e-5, 4.0, 12))
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| latency_histogram()),
            errnos: Family::default(),
            integrity: Family::default(),
            transport: std::sync::OnceLock::new(),
            ring_requests: AtomicU64::new(0),
        }
    }
}

/// Times one request; observed when it is dropped, once the reply is sent.
pub struct RequestTimer<'a> {
    histogram: Option<&'a Histogram>,
    start: std::time::Instant,
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.histogram {
            h.observe(self.start.elapsed().as_secs_f64());
        }
    }
}

impl Stats {
    /// Count one request of `op` (one of `OPCODES`) and time it until the timer drops.
    pub fn request(&self, op: &'static str) -> RequestTimer<'_> {
        let i = OPCODES.iter().position(|o| *o == op);
        if let Some(i) = i {
            self.requests[i].fetch_add(1, Ordering::Relaxed);
        }
        RequestTimer { histogram: i.map(|i| &self.latency[i]), start: std::time::Instant::now() }
    }

    /// Count one request that came over io_uring.
    pub fn ring_request(&self) {
        self.ring_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Request latencies by opcode, for those sent at least once.
    pub fn latencies(&self) -> impl Iterator<Item = (&'static str, &Histogram)> + '_ {
        OPCODES
            .iter()
            .zip(&self.requests)
            .zip(&self.latency)
            .filter(|((_, n), _)| n.load(Ordering::Relaxed) > 0)
            .map(|((o, _), h)| (*o, h))
    }

    /// Count one error reply.
    pub fn errno(&self, e: &Error) {
        self.errnos.get_or_create(&vec![("errno", errno_name(e.errno()))]).inc();
        if let Some(kind) = e.integrity_kind() {
            self.integrity.get_or_create(&vec![("cause", kind.name().to_owned())]).inc();
        }
    }

    /// Requests served so far, by opcode (those never sent left out).
    pub fn requests(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        OPCODES.iter().zip(&self.requests).map(|(o, n)| (*o, n.load(Ordering::Relaxed))).filter(|(_, n)| *n > 0)
    }

    pub fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap() = Some((SystemTime::now(), what));
    }
}

fn errno_name(errno: i32) -> String {
    match errno {
        libc::ENOENT => "ENOENT".into(),
        libc::EIO => "EIO".into(),
        libc::EACCES => "EACCES".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENOSPC => "ENOSPC".into(),
        libc::EEXIST => "EEXIST".into(),
        libc::ENOTEMPTY => "ENOTEMPTY".into(),
        libc::ESTALE => "ESTALE".into(),
        libc::ENODATA => "ENODATA".into(),
        libc::EROFS => "EROFS".into(),
        libc::EMFILE => "EMFILE".into(),
        n => n.to_string(),
    }
}
