//! The FUSE adapter: a thin wrapper that turns fuser requests into `EncryptedFs` calls and
//! results into replies. Errors are logged here, once, where they are replied.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::time::Duration;

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, Session, SessionACL, TimeOrNow, WriteFlags,
};
use tracing::{debug, warn};

use crate::error::{Error, Level};
use crate::fs::{Attr, Caller, EncryptedFs, SetAttr, SetTime};

mod options;

pub use options::{set_read_ahead, MountOptions, DEFAULT_READ_AHEAD_KB};

pub struct FuseFs {
    fs: std::sync::Arc<EncryptedFs>,
    opts: MountOptions,
    /// To drop the kernel's pages of a file whose lock a user was granted (shared volumes).
    notifier: std::sync::Arc<std::sync::OnceLock<fuser::Notifier>>,
}

/// Mount `fs` at `mountpoint`. The mount is live when this returns; run the session to serve.
pub fn mount(fs: std::sync::Arc<EncryptedFs>, mountpoint: &Path, opts: MountOptions) -> io::Result<Session<FuseFs>> {
    let mut mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("envelopefs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if opts.read_only {
        mount_options.push(MountOption::RO);
    }
    let mut config = fuser::Config::default();
    config.mount_options = mount_options;
    config.acl = if opts.allow_other { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = opts.threads > 1;
    // As root the mount is made here, typed `fuse.envelopefs` (fuser's own mount(2) says
    // `fuse`), so `findmnt -t fuse.envelopefs` and `umount -a -t fuse.envelopefs` find it.
    // Elsewhere fusermount3 makes it, with the subtype.
    let notifier = std::sync::Arc::new(std::sync::OnceLock::new());
    let ffs = FuseFs { fs, opts: opts.clone(), notifier: notifier.clone() };
    let session =
        match crate::sys::mount_fuse(mountpoint, &opts.fsname, "envelopefs", opts.read_only, opts.allow_other)? {
            Some(fd) => Session::from_fd(ffs, fd, config.acl, config),
            None => Session::new(ffs, mountpoint, &config),
        }?;
    let _ = notifier.set(session.notifier());
    Ok(session)
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

impl FuseFs {
    /// Log a failure once, where it is replied, naming what it concerned, and count the
    /// faults for `status`.
    fn errno(&self, op: &str, on: On<'_>, e: &Error) -> Errno {
        let what = || match on {
            On::Ino(ino) => self.fs.describe(ino),
            On::Name(parent, name) => format!("{name:?} in {}", self.fs.describe(parent)),
        };
        self.fs.stats.errno(e);
        if e.level() == Level::Fault {
            warn!("{op} {} failed: {e}", what());
            self.fs.stats.error(format!("{op} {}: {e}", what()));
        } else {
            debug!("{op} {}: {e}", what());
        }
        Errno::from_i32(e.errno())
    }
}

/// What a request was about, described (from the backing store) only when it fails.
#[derive(Clone, Copy)]
enum On<'a> {
    Ino(u64),
    Name(u64, &'a OsStr),
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid(), pid: req.pid() }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

impl FuseFs {
    fn entry(&self, reply: ReplyEntry, op: &str, on: On<'_>, r: crate::error::Result<Attr>) {
        match r {
            Ok(a) => {
                reply.entry_with_ttls(&self.opts.attr_timeout, &self.opts.entry_timeout, &fuse_attr(&a), Generation(0))
            }
            Err(e) => reply.error(self.errno(op, on, &e)),
        }
    }

    fn empty(&self, reply: ReplyEmpty, op: &str, on: On<'_>, r: crate::error::Result<()>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.errno(op, on, &e)),
        }
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(self.opts.max_write);
        let _ = config.set_max_readahead(1 << 20);
        let mut want = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO;
        if self.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        if self.opts.shared_locks {
            // Pages cached of a file another host changed are dropped when its size or
            // mtime is seen to change.
            want |= InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS | InitFlags::FUSE_AUTO_INVAL_DATA;
        }
        if let Err(missing) = config.add_capabilities(want) {
            warn!("kernel lacks FUSE capabilities {missing:?}");
            want.remove(missing);
            let _ = config.add_capabilities(want);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.fs.stats.request("lookup");
        match self.fs.lookup(parent.0, name) {
            // A negative entry (inode 0): the kernel caches "no such name" for the entry
            // timeout instead of asking again (searches along PATH, imports, build tools).
            Err(e) if e.errno() == libc::ENOENT && !self.opts.entry_timeout.is_zero() => {
                let none = FileAttr { ino: INodeNo(0), ..fuse_attr(&Attr::absent()) };
                reply.entry_with_ttls(&Duration::ZERO, &self.opts.entry_timeout, &none, Generation(0))
            }
            r => self.entry(reply, "lookup", On::Name(parent.0, name), r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _timer = self.fs.stats.request("forget");
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.fs.stats.request("getattr");
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.opts.attr_timeout, &fuse_attr(&a)),
            Err(e) => reply.error(self.errno("getattr", On::Ino(ino.0), &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _timer = self.fs.stats.request("setattr");
        let set = SetAttr { mode, uid, gid, size, atime: set_time(atime), mtime: set_time(mtime), fh: fh.map(|f| f.0) };
        match self.fs.setattr(ino.0, set, caller(req)) {
            Ok(a) => reply.attr(&self.opts.attr_timeout, &fuse_attr(&a)),
            Err(e) => reply.error(self.errno("setattr", On::Ino(ino.0), &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.fs.stats.request("readlink");
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(self.errno("readlink", On::Ino(ino.0), &e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let _timer = self.fs.stats.request("mknod");
        self.entry(
            reply,
            "mknod",
            On::Name(parent.0, name),
            self.fs.mknod(parent.0, name, mode, umask, rdev, caller(req)),
        );
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let _timer = self.fs.stats.request("mkdir");
        self.entry(reply, "mkdir", On::Name(parent.0, name), self.fs.mkdir(parent.0, name, mode, umask, caller(req)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.fs.stats.request("unlink");
        self.empty(reply, "unlink", On::Name(parent.0, name), self.fs.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.fs.stats.request("rmdir");
        self.empty(reply, "rmdir", On::Name(parent.0, name), self.fs.rmdir(parent.0, name));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let _timer = self.fs.stats.request("symlink");
        self.entry(
            reply,
            "symlink",
            On::Name(parent.0, link_name),
            self.fs.symlink(parent.0, link_name, target.as_os_str(), caller(req)),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.fs.stats.request("rename");
        self.empty(
            reply,
            "rename",
            On::Name(parent.0, name),
            self.fs.rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let _timer = self.fs.stats.request("link");
        self.entry(reply, "link", On::Ino(ino.0), self.fs.link(ino.0, newparent.0, newname));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.fs.stats.request("open");
        match self.fs.open(ino.0, flags.0, caller(req)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(self.errno("open", On::Ino(ino.0), &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _timer = self.fs.stats.request("read");
        match self.fs.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(self.errno("read", On::Ino(ino.0), &e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _timer = self.fs.stats.request("write");
        match self.fs.write(fh.0, offset, data, caller(req)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(self.errno("write", On::Ino(ino.0), &e)),
        }
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        let _timer = self.fs.stats.request("flush");
        if self.opts.shared_locks {
            // A close drops the closing process's locks on the file (POSIX).
            self.fs.drop_locks(ino.0, lock_owner.0);
            return reply.ok();
        }
        // Writes reach the backing file synchronously, so there is nothing to flush here.
        // ENOSYS tells the kernel to stop sending FLUSH (one round trip less per close); it
        // still writes back its own dirty pages on close before that.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.fs.stats.request("release");
        // The last close of a description drops its flock.
        if let Some(owner) = lock_owner.filter(|_| self.opts.shared_locks) {
            self.fs.drop_locks(ino.0, owner.0);
        }
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let _timer = self.fs.stats.request("fsync");
        self.empty(reply, "fsync", On::Ino(ino.0), self.fs.fsync(fh.0, datasync));
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let _timer = self.fs.stats.request("getlk");
        match self.fs.get_lock(ino.0, lock_owner.0, start, end, typ) {
            // The holder may be on another host: there is no pid to give.
            Ok(Some((typ, start, end))) => reply.locked(start, end, typ, 0),
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(self.errno("getlk", On::Ino(ino.0), &e)),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let timer = self.fs.stats.request("setlk");
        // Once granted, what other hosts wrote before they let go is read, not the pages
        // this kernel kept (as NFS does at a lock).
        let notifier = self.notifier.clone();
        let invalidate = move || {
            if typ != libc::F_UNLCK {
                if let Some(Err(e)) = notifier.get().map(|n| n.inval_inode(ino, 0, 0)) {
                    debug!("dropping cached pages of inode {}: {e}", ino.0);
                }
            }
        };
        if !sleep {
            let r = self.fs.set_lock(ino.0, lock_owner.0, start, end, typ, false).inspect(|()| invalidate());
            return self.empty(reply, "setlk", On::Ino(ino.0), r);
        }
        // A wait may last as long as another host holds the lock: not on a worker thread.
        drop(timer);
        let fs = self.fs.clone();
        std::thread::spawn(move || match fs.set_lock(ino.0, lock_owner.0, start, end, typ, true) {
            Ok(()) => {
                invalidate();
                reply.ok()
            }
            Err(e) => {
                debug!("setlk on inode {}: {e}", ino.0);
                reply.error(Errno::from_i32(e.errno()))
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.fs.stats.request("opendir");
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(self.errno("opendir", On::Ino(ino.0), &e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let _timer = self.fs.stats.request("readdir");
        let r = self.fs.readdir(fh.0, offset, |e, next| reply.add(INodeNo(e.ino), next, file_type(e.kind), &e.name));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.errno("readdir", On::Ino(ino.0), &e)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let _timer = self.fs.stats.request("readdirplus");
        let ttl = self.opts.entry_timeout;
        let r = self.fs.readdirplus(fh.0, offset, |e, next, a| {
            reply.add(INodeNo(a.ino), next, &e.name, &ttl, &fuse_attr(a), Generation(0))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.errno("readdirplus", On::Ino(ino.0), &e)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        let _timer = self.fs.stats.request("releasedir");
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let _timer = self.fs.stats.request("fsyncdir");
        self.empty(reply, "fsyncdir", On::Ino(ino.0), self.fs.fsyncdir(ino.0));
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.fs.stats.request("statfs");
        match self.fs.statfs() {
            Ok(s) => reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize),
            Err(e) => reply.error(self.errno("statfs", On::Ino(ino.0), &e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _timer = self.fs.stats.request("setxattr");
        self.empty(reply, "setxattr", On::Ino(ino.0), self.fs.setxattr(ino.0, name, value, flags, caller(req)));
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = self.fs.stats.request("getxattr");
        match self.fs.getxattr(ino.0, name, size, caller(req)) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(self.errno("getxattr", On::Ino(ino.0), &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = self.fs.stats.request("listxattr");
        match self.fs.listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(self.errno("listxattr", On::Ino(ino.0), &e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.fs.stats.request("removexattr");
        self.empty(reply, "removexattr", On::Ino(ino.0), self.fs.removexattr(ino.0, name));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _timer = self.fs.stats.request("access");
        // default_permissions is always on: the kernel has checked already.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _timer = self.fs.stats.request("create");
        match self.fs.create(parent.0, name, mode, umask, flags, caller(req)) {
            Ok((a, fh)) => reply.created(
                &self.opts.entry_timeout,
                &fuse_attr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(self.errno("create", On::Name(parent.0, name), &e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _timer = self.fs.stats.request("fallocate");
        self.empty(reply, "fallocate", On::Ino(ino.0), self.fs.fallocate(fh.0, offset, length, mode, caller(req)));
    }
}
