//! The FUSE adapter: a thin wrapper that turns requests into `EncryptedFs` calls and results
//! into replies. `ops` holds what every transport shares (errors logged there, once, where
//! they are replied); this file is fuser's /dev/fuse transport, `uring` the io_uring one.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, Session, SessionACL, TimeOrNow, WriteFlags,
};
use tracing::warn;

use crate::fs::{Attr, Caller, DirEntry, EncryptedFs, SetAttr, SetTime};

mod ops;
mod options;
mod uring;

use ops::{Core, Xattr};
pub use options::{set_read_ahead, MountOptions, DEFAULT_READ_AHEAD_KB};

pub struct FuseFs {
    core: Core,
    uring: uring::InitHook,
}

/// A live mount: fuser's session, and the io_uring queues when they serve it.
pub struct Mounted {
    session: Session<FuseFs>,
    queues: uring::Queues,
}

impl Mounted {
    pub fn unmount_callable(&mut self) -> fuser::SessionUnmounter {
        self.session.unmount_callable()
    }

    /// "io_uring" or "/dev/fuse".
    pub fn transport(&self) -> &'static str {
        self.queues.transport()
    }

    /// Serve until unmounted; the queue threads end with the connection.
    pub fn run(self) -> io::Result<()> {
        let served = self.session.run();
        self.queues.join(Duration::from_secs(5));
        served
    }
}

/// Mount `fs` at `mountpoint`. The mount is live when this returns; run it to serve.
pub fn mount(fs: Arc<EncryptedFs>, mountpoint: &Path, opts: MountOptions) -> io::Result<Mounted> {
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
    // Over the ring a granted lock's page invalidation can wait on a write queued behind
    // the very thread that asked (and each blocking lock takes a ring entry of its own):
    // locks reach the daemon only on shared volumes, which stay on /dev/fuse.
    let io_uring = opts.io_uring && !opts.shared_locks;
    if opts.io_uring && opts.shared_locks {
        warn!("io_uring: a shared volume is served over /dev/fuse (its locks are not safe over the ring yet)");
    }
    let (plan, hook) = uring::Plan::new(io_uring, opts.threads, opts.max_write);
    let core = Core { fs, opts: opts.clone(), notifier: Arc::new(OnceLock::new()) };
    let ffs = FuseFs { core: core.clone(), uring: hook };
    let session =
        match crate::sys::mount_fuse(mountpoint, &opts.fsname, "envelopefs", opts.read_only, opts.allow_other)? {
            Some(fd) => Session::from_fd(ffs, fd, config.acl, config),
            None => Session::new(ffs, mountpoint, &config),
        }?;
    let _ = core.notifier.set(session.notifier());
    // Without allow_other only the mount's owner gets in (fuser checks the same).
    let owner = (!opts.allow_other).then(|| rustix::process::geteuid().as_raw());
    let queues = plan.start(&session, &core, owner);
    let _ = core.fs.stats.transport.set(queues.transport());
    Ok(Mounted { session, queues })
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

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid(), pid: req.pid() }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

fn entry(reply: ReplyEntry, r: Result<ops::Entry, i32>) {
    match r {
        Ok(e) => reply.entry_with_ttls(&e.attr_ttl, &e.entry_ttl, &fuse_attr(&e.attr), Generation(0)),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), i32>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

fn attr(reply: ReplyAttr, r: Result<(Attr, Duration), i32>) {
    match r {
        Ok((a, ttl)) => reply.attr(&ttl, &fuse_attr(&a)),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

fn data(reply: ReplyData, r: Result<Vec<u8>, i32>) {
    match r {
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

fn opened(reply: ReplyOpen, r: Result<u64, i32>) {
    match r {
        Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

fn xattr(reply: ReplyXattr, r: Result<Xattr, i32>) {
    match r {
        Ok(Xattr::Size(n)) => reply.size(n),
        Ok(Xattr::Data(v)) => reply.data(&v),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(self.core.opts.max_write);
        let _ = config.set_max_readahead(1 << 20);
        let mut want = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO;
        if self.core.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        if self.core.opts.shared_locks {
            // Pages cached of a file another host changed are dropped when its size or
            // mtime is seen to change.
            want |= InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS | InitFlags::FUSE_AUTO_INVAL_DATA;
        }
        if let Err(missing) = config.add_capabilities(want) {
            warn!("kernel lacks FUSE capabilities {missing:?}");
            want.remove(missing);
            let _ = config.add_capabilities(want);
        }
        self.uring.init(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (r, _timer) = self.core.lookup(parent.0, name);
        entry(reply, r)
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (r, _timer) = self.core.getattr(ino.0);
        attr(reply, r)
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
        let set = SetAttr { mode, uid, gid, size, atime: set_time(atime), mtime: set_time(mtime), fh: fh.map(|f| f.0) };
        let (r, _timer) = self.core.setattr(ino.0, set, caller(req));
        attr(reply, r)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let (r, _timer) = self.core.readlink(ino.0);
        data(reply, r)
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let (r, _timer) = self.core.mknod(parent.0, name, mode, umask, rdev, caller(req));
        entry(reply, r)
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (r, _timer) = self.core.mkdir(parent.0, name, mode, umask, caller(req));
        entry(reply, r)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (r, _timer) = self.core.unlink(parent.0, name);
        empty(reply, r)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (r, _timer) = self.core.rmdir(parent.0, name);
        empty(reply, r)
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (r, _timer) = self.core.symlink(parent.0, link_name, target.as_os_str(), caller(req));
        entry(reply, r)
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
        let (r, _timer) = self.core.rename(parent.0, name, newparent.0, newname, flags.bits());
        empty(reply, r)
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let (r, _timer) = self.core.link(ino.0, newparent.0, newname);
        entry(reply, r)
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (r, _timer) = self.core.open(ino.0, flags.0, caller(req));
        opened(reply, r)
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
        let (r, _timer) = self.core.read(ino.0, fh.0, offset, size);
        data(reply, r)
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
        match self.core.write(ino.0, fh.0, offset, data, caller(req)) {
            (Ok(n), _timer) => reply.written(n),
            (Err(e), _timer) => reply.error(Errno::from_i32(e)),
        }
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        let (r, _timer) = self.core.flush(ino.0, lock_owner.0);
        empty(reply, r)
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
        let (r, _timer) = self.core.release(ino.0, fh.0, lock_owner.map(|o| o.0));
        empty(reply, r)
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let (r, _timer) = self.core.fsync(ino.0, fh.0, datasync);
        empty(reply, r)
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
        match self.core.getlk(ino.0, lock_owner.0, start, end, typ) {
            (Ok((typ, start, end)), _timer) => reply.locked(start, end, typ, 0),
            (Err(e), _timer) => reply.error(Errno::from_i32(e)),
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
        if !sleep {
            let (r, _timer) = self.core.setlk(ino.0, lock_owner.0, start, end, typ);
            return empty(reply, r);
        }
        // A wait may last as long as another host holds the lock: not on a worker thread.
        let core = self.core.clone();
        std::thread::spawn(move || empty(reply, core.setlkw(ino.0, lock_owner.0, start, end, typ)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let (r, _timer) = self.core.opendir(ino.0);
        opened(reply, r)
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let add = |e: &DirEntry, next| reply.add(INodeNo(e.ino), next, file_type(e.kind), &e.name);
        let (r, _timer) = self.core.readdir(ino.0, fh.0, offset, add);
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let add = |e: &DirEntry, next, a: &ops::Entry| {
            reply.add(INodeNo(a.attr.ino), next, &e.name, &a.entry_ttl, &fuse_attr(&a.attr), Generation(0))
        };
        let (r, _timer) = self.core.readdirplus(ino.0, fh.0, offset, add);
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        let (r, _timer) = self.core.releasedir(fh.0);
        empty(reply, r)
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let (r, _timer) = self.core.fsyncdir(ino.0);
        empty(reply, r)
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs(ino.0) {
            (Ok(s), _timer) => {
                reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize)
            }
            (Err(e), _timer) => reply.error(Errno::from_i32(e)),
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
        let (r, _timer) = self.core.setxattr(ino.0, name, value, flags, caller(req));
        empty(reply, r)
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let (r, _timer) = self.core.getxattr(ino.0, name, size, caller(req));
        xattr(reply, r)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let (r, _timer) = self.core.listxattr(ino.0, size);
        xattr(reply, r)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (r, _timer) = self.core.removexattr(ino.0, name);
        empty(reply, r)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let (r, _timer) = self.core.access();
        empty(reply, r)
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
        match self.core.create(parent.0, name, mode, umask, flags, caller(req)) {
            (Ok((e, fh)), _timer) => {
                reply.created(&e.entry_ttl, &fuse_attr(&e.attr), Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            (Err(e), _timer) => reply.error(Errno::from_i32(e)),
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
        let (r, _timer) = self.core.fallocate(ino.0, fh.0, offset, length, mode, caller(req));
        empty(reply, r)
    }
}
