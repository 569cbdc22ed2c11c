//! What both transports (fuser's /dev/fuse loop and the io_uring queues) do with a request:
//! the `EncryptedFs` call, the request's timer, the TTLs and negative entries, and the one
//! log line of a failure. A transport only decodes the request and encodes the reply.
//!
//! Each method returns the result with the request's timer: keep the timer until the reply
//! is sent (`let (r, _timer) = ...`), so latencies include the reply, as they always did.

use std::ffi::OsStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing::{debug, warn};

use crate::error::Error;
use crate::fs::RequestTimer;
use crate::fs::{Attr, Caller, DirEntry, EncryptedFs, SetAttr, StatFs};

use super::MountOptions;

/// A result and the request's timer (see the module's comment). Errors are errnos.
pub type Done<'a, T> = (Result<T, i32>, RequestTimer<'a>);

/// A name's entry as the kernel caches it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub attr: Attr,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
}

/// A getxattr or listxattr answer: the size asked for (size 0), or the bytes.
pub enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

/// The shared half of the adapter: the filesystem, how the mount behaves, and the notifier
/// that drops a file's pages when a user is granted its lock (shared volumes).
#[derive(Clone)]
pub struct Core {
    pub fs: Arc<EncryptedFs>,
    pub opts: MountOptions,
    pub notifier: Arc<OnceLock<fuser::Notifier>>,
}

/// What a request was about, described (from the backing store) only when it fails.
#[derive(Clone, Copy)]
pub enum On<'a> {
    Ino(u64),
    Name(u64, &'a OsStr),
}

impl Core {
    /// Log a failure once, where it is replied, naming what it concerned, and count the
    /// faults for `status`.
    fn errno(&self, op: &str, on: On<'_>, e: &Error) -> i32 {
        let what = || match on {
            On::Ino(ino) => self.fs.describe(ino),
            On::Name(parent, name) => format!("{name:?} in {}", self.fs.describe(parent)),
        };
        self.fs.stats.errno(e);
        if e.level() == crate::error::Level::Fault {
            warn!("{op} {} failed: {e}", what());
            self.fs.stats.error(format!("{op} {}: {e}", what()));
        } else {
            debug!("{op} {}: {e}", what());
        }
        e.errno()
    }

    fn done<T>(&self, op: &'static str, on: On<'_>, f: impl FnOnce() -> crate::error::Result<T>) -> Done<'_, T> {
        let timer = self.fs.stats.request(op);
        (f().map_err(|e| self.errno(op, on, &e)), timer)
    }

    fn entry(&self, op: &'static str, on: On<'_>, f: impl FnOnce() -> crate::error::Result<Attr>) -> Done<'_, Entry> {
        let (r, t) = self.done(op, on, f);
        let (attr_ttl, entry_ttl) = (self.opts.attr_timeout, self.opts.entry_timeout);
        (r.map(|attr| Entry { attr, attr_ttl, entry_ttl }), t)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Done<'_, Entry> {
        let timer = self.fs.stats.request("lookup");
        let r = match self.fs.lookup(parent, name) {
            Ok(attr) => Ok(Entry { attr, attr_ttl: self.opts.attr_timeout, entry_ttl: self.opts.entry_timeout }),
            // A negative entry (inode 0): the kernel caches "no such name" for the entry
            // timeout instead of asking again (searches along PATH, imports, build tools).
            Err(e) if e.errno() == libc::ENOENT && !self.opts.entry_timeout.is_zero() => Ok(Entry {
                attr: Attr { ino: 0, ..Attr::absent() },
                attr_ttl: Duration::ZERO,
                entry_ttl: self.opts.entry_timeout,
            }),
            Err(e) => Err(self.errno("lookup", On::Name(parent, name), &e)),
        };
        (r, timer)
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        let _timer = self.fs.stats.request("forget");
        self.fs.forget(ino, nlookup);
    }

    /// Attributes and how long the kernel may cache them.
    pub fn getattr(&self, ino: u64) -> Done<'_, (Attr, Duration)> {
        let (r, t) = self.done("getattr", On::Ino(ino), || self.fs.getattr(ino));
        (r.map(|a| (a, self.opts.attr_timeout)), t)
    }

    pub fn setattr(&self, ino: u64, set: SetAttr, caller: Caller) -> Done<'_, (Attr, Duration)> {
        let (r, t) = self.done("setattr", On::Ino(ino), || self.fs.setattr(ino, set, caller));
        (r.map(|a| (a, self.opts.attr_timeout)), t)
    }

    pub fn readlink(&self, ino: u64) -> Done<'_, Vec<u8>> {
        self.done("readlink", On::Ino(ino), || self.fs.readlink(ino))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: Caller,
    ) -> Done<'_, Entry> {
        self.entry("mknod", On::Name(parent, name), || self.fs.mknod(parent, name, mode, umask, rdev, caller))
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, umask: u32, caller: Caller) -> Done<'_, Entry> {
        self.entry("mkdir", On::Name(parent, name), || self.fs.mkdir(parent, name, mode, umask, caller))
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Done<'_, ()> {
        self.done("unlink", On::Name(parent, name), || self.fs.unlink(parent, name))
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Done<'_, ()> {
        self.done("rmdir", On::Name(parent, name), || self.fs.rmdir(parent, name))
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, caller: Caller) -> Done<'_, Entry> {
        self.entry("symlink", On::Name(parent, name), || self.fs.symlink(parent, name, target, caller))
    }

    pub fn rename(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32) -> Done<'_, ()> {
        self.done("rename", On::Name(parent, name), || self.fs.rename(parent, name, newparent, newname, flags))
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Done<'_, Entry> {
        self.entry("link", On::Ino(ino), || self.fs.link(ino, newparent, newname))
    }

    pub fn open(&self, ino: u64, flags: i32, caller: Caller) -> Done<'_, u64> {
        self.done("open", On::Ino(ino), || self.fs.open(ino, flags, caller))
    }

    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Done<'_, Vec<u8>> {
        self.done("read", On::Ino(ino), || self.fs.read(fh, offset, size))
    }

    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8], caller: Caller) -> Done<'_, u32> {
        self.done("write", On::Ino(ino), || self.fs.write(fh, offset, data, caller))
    }

    pub fn flush(&self, ino: u64, lock_owner: u64) -> Done<'_, ()> {
        let timer = self.fs.stats.request("flush");
        if self.opts.shared_locks {
            // A close drops the closing process's locks on the file (POSIX).
            self.fs.drop_locks(ino, lock_owner);
            return (Ok(()), timer);
        }
        // Writes reach the backing file synchronously, so there is nothing to flush here.
        // ENOSYS tells the kernel to stop sending FLUSH (one round trip less per close); it
        // still writes back its own dirty pages on close before that.
        (Err(libc::ENOSYS), timer)
    }

    pub fn release(&self, ino: u64, fh: u64, lock_owner: Option<u64>) -> Done<'_, ()> {
        let timer = self.fs.stats.request("release");
        // The last close of a description drops its flock.
        if let Some(owner) = lock_owner.filter(|_| self.opts.shared_locks) {
            self.fs.drop_locks(ino, owner);
        }
        self.fs.release(fh);
        (Ok(()), timer)
    }

    pub fn fsync(&self, ino: u64, fh: u64, datasync: bool) -> Done<'_, ()> {
        self.done("fsync", On::Ino(ino), || self.fs.fsync(fh, datasync))
    }

    /// The lock that would conflict, as (type, start, end); F_UNLCK when none would.
    pub fn getlk(&self, ino: u64, owner: u64, start: u64, end: u64, typ: i32) -> Done<'_, (i32, u64, u64)> {
        // The holder may be on another host: there is no pid to give.
        let (r, t) = self.done("getlk", On::Ino(ino), || self.fs.get_lock(ino, owner, start, end, typ));
        (r.map(|held| held.unwrap_or((libc::F_UNLCK, start, end))), t)
    }

    /// Once granted, what other hosts wrote before they let go is read, not the pages this
    /// kernel kept (as NFS does at a lock).
    fn lock_granted(&self, ino: u64, typ: i32) {
        if typ != libc::F_UNLCK {
            if let Some(Err(e)) = self.notifier.get().map(|n| n.inval_inode(fuser::INodeNo(ino), 0, 0)) {
                debug!("dropping cached pages of inode {ino}: {e}");
            }
        }
    }

    /// A lock taken or refused at once (F_SETLK).
    pub fn setlk(&self, ino: u64, owner: u64, start: u64, end: u64, typ: i32) -> Done<'_, ()> {
        self.done("setlk", On::Ino(ino), || {
            self.fs.set_lock(ino, owner, start, end, typ, false).inspect(|()| self.lock_granted(ino, typ))
        })
    }

    /// F_SETLKW: a wait may last as long as another host holds the lock, so the caller runs
    /// this on a thread of its own, never on a worker. Its request is counted, not timed.
    pub fn setlkw(&self, ino: u64, owner: u64, start: u64, end: u64, typ: i32) -> Result<(), i32> {
        drop(self.fs.stats.request("setlk"));
        match self.fs.set_lock(ino, owner, start, end, typ, true) {
            Ok(()) => {
                self.lock_granted(ino, typ);
                Ok(())
            }
            Err(e) => {
                debug!("setlk on inode {ino}: {e}");
                Err(e.errno())
            }
        }
    }

    pub fn opendir(&self, ino: u64) -> Done<'_, u64> {
        self.done("opendir", On::Ino(ino), || self.fs.opendir(ino))
    }

    /// `add(entry, next offset)` returns true once the reply is full.
    pub fn readdir(&self, ino: u64, fh: u64, offset: u64, add: impl FnMut(&DirEntry, u64) -> bool) -> Done<'_, ()> {
        self.done("readdir", On::Ino(ino), || self.fs.readdir(fh, offset, add))
    }

    /// `add(entry, next offset, its entry)` returns true once the reply is full.
    pub fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, u64, &Entry) -> bool,
    ) -> Done<'_, ()> {
        let ttl = self.opts.entry_timeout;
        self.done("readdirplus", On::Ino(ino), || {
            self.fs
                .readdirplus(fh, offset, |e, next, a| add(e, next, &Entry { attr: *a, attr_ttl: ttl, entry_ttl: ttl }))
        })
    }

    pub fn releasedir(&self, fh: u64) -> Done<'_, ()> {
        let timer = self.fs.stats.request("releasedir");
        self.fs.releasedir(fh);
        (Ok(()), timer)
    }

    pub fn fsyncdir(&self, ino: u64) -> Done<'_, ()> {
        self.done("fsyncdir", On::Ino(ino), || self.fs.fsyncdir(ino))
    }

    pub fn statfs(&self, ino: u64) -> Done<'_, StatFs> {
        self.done("statfs", On::Ino(ino), || self.fs.statfs())
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32, caller: Caller) -> Done<'_, ()> {
        self.done("setxattr", On::Ino(ino), || self.fs.setxattr(ino, name, value, flags, caller))
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32, caller: Caller) -> Done<'_, Xattr> {
        let (r, t) = self.done("getxattr", On::Ino(ino), || self.fs.getxattr(ino, name, size, caller));
        (r.map(|v| if size == 0 { Xattr::Size(v.len() as u32) } else { Xattr::Data(v) }), t)
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Done<'_, Xattr> {
        let (r, t) = self.done("listxattr", On::Ino(ino), || self.fs.listxattr(ino));
        let r = r.and_then(|v| match size {
            0 => Ok(Xattr::Size(v.len() as u32)),
            _ if v.len() > size as usize => Err(libc::ERANGE),
            _ => Ok(Xattr::Data(v)),
        });
        (r, t)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Done<'_, ()> {
        self.done("removexattr", On::Ino(ino), || self.fs.removexattr(ino, name))
    }

    /// default_permissions is always on: the kernel has checked already.
    pub fn access(&self) -> Done<'_, ()> {
        (Ok(()), self.fs.stats.request("access"))
    }

    /// The new file's entry (its attributes cached for the entry timeout) and handle.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> Done<'_, (Entry, u64)> {
        let ttl = self.opts.entry_timeout;
        let (r, t) =
            self.done("create", On::Name(parent, name), || self.fs.create(parent, name, mode, umask, flags, caller));
        (r.map(|(attr, fh)| (Entry { attr, attr_ttl: ttl, entry_ttl: ttl }, fh)), t)
    }

    pub fn fallocate(&self, ino: u64, fh: u64, offset: u64, length: u64, mode: i32, caller: Caller) -> Done<'_, ()> {
        self.done("fallocate", On::Ino(ino), || self.fs.fallocate(fh, offset, length, mode, caller))
    }
}
