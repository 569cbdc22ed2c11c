//! How a mount behaves towards the kernel: caching, threads, read-ahead, locks.

use std::io;
use std::time::Duration;

/// How the mount behaves towards the kernel.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let every user reach the mount (`allow_other`); permissions are then checked by the
    /// kernel (`default_permissions` is always on).
    pub allow_other: bool,
    pub threads: usize,
    pub attr_timeout: Duration,
    pub entry_timeout: Duration,
    /// FUSE writeback cache: the kernel batches small writes into pages (on by default; see
    /// docs/PERFORMANCE.md for what the benchmark does and does not show).
    pub writeback_cache: bool,
    pub read_only: bool,
    pub max_write: u32,
    /// Read-ahead of the mount in KiB, set after mounting (0: leave the kernel's 128).
    pub read_ahead_kb: u32,
    pub fsname: String,
    /// A shared volume's mount: byte-range and whole-file locks go to the daemon, which
    /// takes them on the backing file (`EncryptedFs::set_lock`).
    pub shared_locks: bool,
    /// Serve requests over io_uring queues (FUSE_OVER_IO_URING) where the kernel allows it,
    /// else over /dev/fuse.
    pub io_uring: bool,
}

/// Large sequential reads reach the daemon in requests this large (the kernel's 128 KiB
/// default costs a round trip per 128 KiB; docs/PERFORMANCE.md).
pub const DEFAULT_READ_AHEAD_KB: u32 = 1024;

/// Set the read-ahead of the mount whose device is `dev` (needs root: it is the backing
/// device info's sysfs file).
pub fn set_read_ahead(dev: u64, kb: u32) -> io::Result<()> {
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    std::fs::write(&path, format!("{kb}\n")).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

impl MountOptions {
    /// For a shared volume (docs/SHARING.md): other hosts change files, so the kernel
    /// caches no names, attributes or dirty pages, and locks are the backing file's.
    pub fn shared(self) -> Self {
        Self {
            attr_timeout: Duration::ZERO,
            entry_timeout: Duration::ZERO,
            writeback_cache: false,
            shared_locks: true,
            ..self
        }
    }
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            allow_other: false,
            threads: 4,
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            writeback_cache: true,
            read_only: false,
            max_write: 1 << 20,
            read_ahead_kb: DEFAULT_READ_AHEAD_KB,
            fsname: "envelopefs".into(),
            shared_locks: false,
            io_uring: false,
        }
    }
}
