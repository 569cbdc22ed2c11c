//! `EncryptedFs`: POSIX semantics over a backing directory, in plain Rust. The FUSE adapter
//! (`mount`) only translates requests to these methods; tests call them directly.
//!
//! Every known inode is reached through an O_PATH descriptor of its backing object, so
//! nothing ever follows a symlink in the backing tree and no path is resolved twice. The
//! descriptors live in a bounded cache (`fd_cache`); an inode whose descriptor was closed
//! is found again by its `Locator`: a kernel file handle, or a name in a parent that is
//! itself found again, checked to still be the same object.

mod backing_names;
mod fd_cache;
mod inodes;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirEntryExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::audit::Requester;
use crate::content::Content;
use crate::crypto::FileKey;
use crate::envelope_file::EnvelopeFile;
use crate::error::{Error, Result};
use crate::journal::{Journal, Target};
use crate::names::BackingName;
use crate::sys;
use crate::volume::{is_reserved, Volume};

pub const ROOT_INO: u64 = 1;

/// Attributes as the filesystem reports them (sizes are plaintext sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Type and permission bits, as in `st_mode`.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl Attr {
    /// The attributes of nothing (a negative entry carries them).
    pub fn absent() -> Self {
        Attr {
            ino: 0,
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            mode: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 0,
        }
    }
}

/// Who asked, from the FUSE request: new objects are owned by the caller, and key
/// operations are audited as theirs. pid 0 is the kernel itself (writeback).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Caller {
    fn requester(self) -> Requester {
        Requester { uid: self.uid, pid: self.pid }
    }
}

/// A time to set: a given instant or "now".
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    At(SystemTime),
    Now,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub fh: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    /// Type bits (`S_IFMT`) of the entry.
    pub kind: u32,
    pub name: OsString,
    /// The entry's name in the backing directory (the same, with plaintext names).
    pub backing: OsString,
}

#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

struct ContentState {
    /// The file's key while any handle has it open (and while it is empty: `None`).
    key: Option<Arc<FileKey>>,
    opens: usize,
}

/// How the inode table finds a backing object again once its descriptor was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileHandles {
    /// File handles where the kernel grants them (root, CAP_DAC_READ_SEARCH), else names.
    Auto,
    /// File handles, or the mount fails.
    Always,
    /// By parent and name, checked against the object's device, inode number and type.
    Never,
}

impl std::str::FromStr for FileHandles {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(format!("{s:?}: expected auto, always or never")),
        }
    }
}

/// The descriptors the inode table keeps open when not told otherwise, before the limit
/// of the process caps it (see `EncryptedFs::with_inode_fds`).
pub const DEFAULT_MAX_INODE_FDS: usize = 512;

/// Names an object may be found again by, newest first; a hard-linked object seen under
/// more names keeps this many.
const MAX_NAMES: usize = 8;

/// How a known inode is found again once its descriptor is no longer cached.
enum Locator {
    Root,
    Handle(sys::FileHandle),
    Names(Mutex<Vec<(Arc<Inode>, OsString)>>),
}

/// What the filesystem keeps with each known inode (the table keeps number and lookups).
struct InodeData {
    /// Unique for the life of the mount: the descriptor cache's key.
    id: u64,
    locator: Locator,
    /// The descriptor of an object the mount removed the last name of while the kernel
    /// still knows it (open, or with times to write back): it can no longer be found
    /// again, so it is held until the kernel forgets the inode.
    pinned: Mutex<Option<Arc<OwnedFd>>>,
    fmt: u32,
    /// Readers share it; writes, truncates and allocations take it alone.
    content: RwLock<ContentState>,
}

type Inode = inodes::Node<InodeData>;

impl InodeData {
    fn is_symlink(&self) -> bool {
        self.fmt == libc::S_IFLNK
    }

    fn add_name(&self, parent: &Arc<Inode>, name: &OsStr) {
        if let Locator::Names(names) = &self.locator {
            let mut names = names.lock().unwrap();
            names.retain(|(p, n)| !(p.id == parent.id && n == name));
            names.insert(0, (parent.clone(), name.to_owned()));
            names.truncate(MAX_NAMES);
        }
    }

    fn has_name(&self, parent: &Inode, name: &OsStr) -> bool {
        match &self.locator {
            Locator::Names(names) => names.lock().unwrap().iter().any(|(p, n)| p.id == parent.id && n == name),
            _ => false,
        }
    }

    /// Forget `name` in `parent`, which the mount just moved elsewhere; returns whether
    /// the object is left without a name it can be found again by.
    fn drop_name_only(&self, parent: &Inode, name: &OsStr) -> bool {
        match &self.locator {
            Locator::Names(names) => {
                let mut names = names.lock().unwrap();
                names.retain(|(p, n)| !(p.id == parent.id && n == name));
                names.is_empty()
            }
            _ => false,
        }
    }

    /// Forget `name` in `parent`, which the mount just removed; `fd` is the object's
    /// descriptor, kept if that was the last name.
    fn drop_name(&self, parent: &Inode, name: &OsStr, fd: &Arc<OwnedFd>) {
        let nameless = self.drop_name_only(parent, name);
        if nameless || sys::fstat(fd.as_raw_fd()).is_ok_and(|st| st.st_nlink == 0) {
            *self.pinned.lock().unwrap() = Some(fd.clone());
        }
    }
}

struct FileHandle {
    inode: Arc<Inode>,
    file: File,
    writable: bool,
    /// Who opened it: the kernel's later writeback through it is theirs.
    opener: Caller,
}

impl FileHandle {
    fn describe(&self) -> String {
        sys::describe_fd(self.file.as_raw_fd())
    }

    /// The requester of a write through this handle: the caller, or for the kernel's own
    /// writeback (pid 0), whoever opened the handle.
    fn writer(&self, caller: Caller) -> Caller {
        if caller.pid == 0 {
            self.opener
        } else {
            caller
        }
    }
}

struct DirHandle {
    inode: Arc<Inode>,
    entries: Vec<DirEntry>,
}

#[derive(Clone)]
enum Handle {
    File(Arc<FileHandle>),
    Dir(Arc<DirHandle>),
}

/// The FUSE requests the adapter serves, as `status` counts them. fuser hands a
/// BATCH_FORGET over as one `forget` per inode, so that is how forgets are counted.
pub const OPCODES: [&str; 31] = [
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
];

/// Counters the filesystem and the adapter keep for `status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<(SystemTime, String)>>,
    requests: [AtomicU64; OPCODES.len()],
}

impl Stats {
    /// Count one request of `op` (one of `OPCODES`).
    pub fn request(&self, op: &str) {
        if let Some(i) = OPCODES.iter().position(|o| *o == op) {
            self.requests[i].fetch_add(1, Ordering::Relaxed);
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

pub struct EncryptedFs {
    /// Error counters for `envelopefs status`.
    pub stats: Stats,
    vol: Arc<Volume>,
    root_dev: u64,
    /// A readable descriptor of the root, for statfs, and the mount descriptor for file
    /// handles (which the kernel does not take as O_PATH).
    root_dir: File,
    /// The root's O_PATH descriptor, always open.
    root_fd: Arc<OwnedFd>,
    table: inodes::InodeTable<InodeData>,
    next_ino: AtomicU64,
    next_id: AtomicU64,
    fds: fd_cache::FdCache,
    /// Whether new inodes get a file handle (else they are found again by name).
    by_handle: bool,
    handles: RwLock<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Where every change to an envelope is recorded before it is made (None: no journal).
    journal: Option<Arc<Journal>>,
    /// Held while a long name's entry and side file change, so a listing never takes a
    /// side file written for an entry about to be made for an orphan.
    long_names: Mutex<()>,
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs((-sec) as u64) + Duration::from_nanos(nsec as u64)
    }
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        Some(SetTime::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        Some(SetTime::At(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 },
            Err(e) => {
                let d = e.duration();
                let (mut s, mut n) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if n < 0 {
                    s -= 1;
                    n += 1_000_000_000;
                }
                libc::timespec { tv_sec: s, tv_nsec: n }
            }
        },
    }
}

impl EncryptedFs {
    /// Serve `vol`. Sets the process umask to 0: modes arrive from the kernel already
    /// masked by the caller's umask and must reach the backing store unchanged.
    pub fn new(vol: Arc<Volume>) -> Result<Self> {
        // SAFETY: umask only sets the process file-mode mask; it cannot fail.
        unsafe { libc::umask(0) };
        let root = sys::cstr(vol.root.as_os_str())?;
        let fd = sys::openat(libc::AT_FDCWD, &root, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| e.context(format!("opening backing directory {}", vol.root.display())))?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let root_dir = sys::reopen(&fd, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let root = InodeData {
            id: 0,
            locator: Locator::Root,
            pinned: Mutex::new(None),
            fmt: libc::S_IFDIR,
            content: RwLock::new(ContentState { key: None, opens: 0 }),
        };
        let table = inodes::InodeTable::new(ROOT_INO, (st.st_dev, st.st_ino), root);
        let fs = Self {
            stats: Default::default(),
            vol,
            root_dev: st.st_dev,
            root_dir,
            root_fd: Arc::new(fd),
            table,
            next_ino: AtomicU64::new(1 << 63),
            next_id: AtomicU64::new(1),
            fds: fd_cache::FdCache::new(1),
            by_handle: false,
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            journal: None,
            long_names: Mutex::new(()),
        };
        fs.with_inode_fds(FileHandles::Auto, DEFAULT_MAX_INODE_FDS)
    }

    /// Keep at most `max_fds` descriptors of known inodes open (and at most half the
    /// process's RLIMIT_NOFILE, so that files held open through the mount fit beside
    /// them), finding the others again as `handles` says.
    pub fn with_inode_fds(mut self, handles: FileHandles, max_fds: usize) -> Result<Self> {
        let limit = usize::try_from(sys::nofile_limit()).unwrap_or(usize::MAX);
        self.fds = fd_cache::FdCache::new(max_fds.min(limit / 2).max(1));
        self.by_handle = match handles {
            FileHandles::Never => false,
            FileHandles::Auto => self.handles_work().is_ok(),
            FileHandles::Always => {
                self.handles_work().map_err(|e| e.context("--file-handles always: the kernel grants none here"))?;
                true
            }
        };
        Ok(self)
    }

    /// File handles need the backing filesystem's support and CAP_DAC_READ_SEARCH.
    fn handles_work(&self) -> Result<()> {
        let h = sys::name_to_handle(self.root_fd.as_raw_fd())?;
        sys::open_by_handle(self.root_dir.as_raw_fd(), &h, libc::O_PATH).map(drop)
    }

    /// How inodes are kept, for the mount's log.
    pub fn inode_fds_summary(&self) -> String {
        format!(
            "inode table: finds inodes by {}, keeps at most {} descriptors open (RLIMIT_NOFILE {})",
            if self.by_handle { "file handle" } else { "parent and name" },
            self.fds.capacity(),
            sys::nofile_limit()
        )
    }

    /// The O_PATH descriptor of `inode`: cached, or found again and cached.
    fn fd(&self, inode: &Inode) -> Result<Arc<OwnedFd>> {
        if matches!(inode.locator, Locator::Root) {
            return Ok(self.root_fd.clone());
        }
        if let Some(fd) = self.fds.get(inode.id) {
            return Ok(fd);
        }
        if let Some(fd) = inode.pinned.lock().unwrap().clone() {
            return Ok(fd);
        }
        let fd = Arc::new(self.find_again(inode)?);
        self.fds.put(inode.id, fd.clone());
        Ok(fd)
    }

    /// Open `inode`'s object anew. A name is taken only if what it holds now has the
    /// object's device, inode number and type, so a rename behind the mount's back never
    /// redirects an inode to another file; it gives ESTALE instead.
    fn find_again(&self, inode: &Inode) -> Result<OwnedFd> {
        let stale = || {
            Error::new(
                libc::ESTALE,
                format!("inode {} is not at any name the mount knows (changed behind its back)", inode.ino),
            )
        };
        match &inode.locator {
            Locator::Root => sys::path_handle(self.root_fd.as_raw_fd()),
            Locator::Handle(h) => sys::open_by_handle(self.root_dir.as_raw_fd(), h, libc::O_PATH).map_err(|e| {
                if e.errno() == libc::EMFILE {
                    e
                } else {
                    stale().context(e)
                }
            }),
            Locator::Names(names) => {
                let names = names.lock().unwrap().clone();
                for (parent, name) in names {
                    let Ok(dir) = self.fd(&parent) else { continue };
                    let fd = match sys::open_path(dir.as_raw_fd(), &sys::cstr(&name)?) {
                        Ok(fd) => fd,
                        Err(e) if e.errno() == libc::EMFILE => return Err(e),
                        Err(_) => continue,
                    };
                    let st = sys::fstat(fd.as_raw_fd())?;
                    if (st.st_dev, st.st_ino) == inode.key && st.st_mode & libc::S_IFMT == inode.fmt {
                        return Ok(fd);
                    }
                }
                // No name leads to it any more, but a file open through the mount still does.
                let open = self.handles.read().unwrap().values().find_map(|h| match h {
                    Handle::File(f) if f.inode.id == inode.id => Some(f.clone()),
                    _ => None,
                });
                match open {
                    Some(f) => sys::path_handle(f.file.as_raw_fd()),
                    None => Err(stale()),
                }
            }
        }
    }

    /// A path for messages: where `inode`'s object is now, or its number.
    fn describe_inode(&self, inode: &Inode) -> String {
        self.fd(inode).map_or_else(|_| format!("inode {}", inode.ino), |fd| sys::describe_fd(fd.as_raw_fd()))
    }

    /// Record every change in `journal` before making it (see `journal`).
    pub fn with_journal(mut self, journal: Arc<Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Run `f` with where changes to `inode` are recorded.
    fn journaled<R>(&self, inode: &Inode, f: impl FnOnce(Option<&Target<'_>>) -> R) -> R {
        let Some(journal) = &self.journal else {
            return f(None);
        };
        let path = || {
            let raw = self.fd(inode).map_or(-1, |fd| fd.as_raw_fd());
            let full = std::fs::read_link(format!("/proc/self/fd/{raw}")).unwrap_or_default();
            full.strip_prefix(&self.vol.root).unwrap_or(&full).as_os_str().as_encoded_bytes().to_vec()
        };
        f(Some(&Target { journal, ino: inode.key.1, path: &path }))
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    fn inode(&self, ino: u64) -> Result<Arc<Inode>> {
        self.table.get(ino).ok_or_else(|| Error::new(libc::ESTALE, format!("unknown inode {ino}")))
    }

    /// The inode of the object `fd` (with stat `st`) opened as `name` in `parent`.
    ///
    /// Inode numbers are the backing inode numbers where that is unambiguous, so `stat`
    /// and `readdir` agree; others (another device, 1, or a backing number reused while the
    /// kernel still knows the object that had it) get numbers from the top half.
    fn intern(&self, fd: OwnedFd, st: &libc::stat, parent: &Arc<Inode>, name: &OsStr) -> Arc<Inode> {
        let fmt = st.st_mode & libc::S_IFMT;
        let handle =
            (self.by_handle && st.st_dev == self.root_dev).then(|| sys::name_to_handle(fd.as_raw_fd()).ok()).flatten();
        // A known node is this object if its handle matches, or if its descriptor is still
        // open (which keeps the backing number from being reused), or if it was known by
        // this very name (which just led to an object of that number), or if one of its
        // other names still does.
        let same = |n: &Inode| {
            n.fmt == fmt
                && match (&n.locator, &handle) {
                    (Locator::Root, _) => true,
                    (Locator::Handle(a), Some(b)) => a == b,
                    (Locator::Names(_), None) => {
                        self.fds.contains(n.id) || n.has_name(parent, name) || self.find_again(n).is_ok()
                    }
                    _ => false,
                }
        };
        let preferred =
            (st.st_dev == self.root_dev && st.st_ino > ROOT_INO && st.st_ino < (1 << 63)).then_some(st.st_ino);
        let make = || InodeData {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            locator: match handle.clone() {
                Some(h) => Locator::Handle(h),
                None => Locator::Names(Mutex::new(Vec::new())),
            },
            pinned: Mutex::new(None),
            fmt,
            content: RwLock::new(ContentState { key: None, opens: 0 }),
        };
        let fresh = || self.next_ino.fetch_add(1, Ordering::Relaxed);
        let node = self.table.intern((st.st_dev, st.st_ino), same, preferred, fresh, make);
        node.add_name(parent, name);
        if !matches!(node.locator, Locator::Root) {
            self.fds.put(node.id, Arc::new(fd));
        }
        node
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if let Some(gone) = self.table.forget(ino, n) {
            self.fds.remove(gone.id);
            // A node may outlive this in its children's names, but not its descriptor.
            gone.pinned.lock().unwrap().take();
        }
    }

    /// The backing object behind an inode, for messages: its path as the kernel sees it
    /// now, or the inode number if it is no longer known.
    pub fn describe(&self, ino: u64) -> String {
        self.inode(ino).map_or_else(|_| format!("inode {ino}"), |i| self.describe_inode(&i))
    }

    /// Descriptors of known inodes open now, and the most it keeps (for tests and status).
    pub fn inode_fds(&self) -> (usize, usize) {
        (self.fds.len(), self.fds.capacity())
    }

    /// Open regular-file handles (for status).
    pub fn open_files(&self) -> u64 {
        self.handles.read().unwrap().values().filter(|h| matches!(h, Handle::File(_))).count() as u64
    }

    /// Number of inodes the kernel holds references to (for tests and status).
    pub fn inode_count(&self) -> usize {
        self.table.len()
    }

    fn attr_of(&self, ino: u64, st: &libc::stat) -> Attr {
        let mut size = st.st_size as u64;
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            size = match self.vol.geometry.plain_size(size) {
                Ok(s) => s,
                Err(e) => e.readable_size(),
            };
        } else if st.st_mode & libc::S_IFMT == libc::S_IFLNK && self.vol.names().is_some() {
            size = crate::names::target_len(size);
        }
        // (A spilled target's length is in its marker: `attr_at` reads it.)
        Attr {
            ino,
            size,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: self.vol.geometry.block_size as u32,
        }
    }

    /// `attr_of` for the object open at `fd`, with the length of a spilled symlink target
    /// read from its marker.
    fn attr_at(&self, ino: u64, st: &libc::stat, fd: RawFd) -> Attr {
        let mut attr = self.attr_of(ino, st);
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK
            && self.vol.names().is_some()
            && st.st_size as u64 == crate::names::MARKER_LEN
        {
            if let Some((len, _)) = sys::readlinkat(fd).ok().as_deref().and_then(crate::names::parse_marker) {
                attr.size = len;
            }
        }
        attr
    }

    /// The backing name of a name to make, change or remove in `parent`. With plaintext
    /// names the volume's own files are out of reach; encrypted names never meet them.
    fn backing_name(&self, parent: u64, name: &OsStr) -> Result<BackingName> {
        if self.vol.names().is_none() && is_reserved(name, parent == ROOT_INO) {
            return Err(Error::new(libc::EPERM, format!("{name:?} is reserved for the volume's own files")));
        }
        backing_names::resolve(self.vol.names(), name)
    }

    /// Hold the long-name lock if `names` has a long one.
    fn long_name_guard(&self, names: &[&BackingName]) -> Option<std::sync::MutexGuard<'_, ()>> {
        names.iter().any(|b| b.side.is_some()).then(|| self.long_names.lock().unwrap())
    }

    /// Make the entry of `b` in `dir` with `make`, its side file first if it is long.
    fn make_named(&self, dir: RawFd, b: &BackingName, make: impl FnOnce(&std::ffi::CStr) -> Result<()>) -> Result<()> {
        let _g = self.long_name_guard(&[b]);
        backing_names::put_side(dir, b)?;
        let made = make(&sys::cstr(&b.main)?);
        if made.is_err() {
            let _ = backing_names::drop_side(dir, b);
        }
        made
    }

    fn lookup_fd(&self, parent: &Arc<Inode>, backing: &OsStr) -> Result<Attr> {
        let c = sys::cstr(backing)?;
        let fd = sys::open_path(self.fd(parent)?.as_raw_fd(), &c)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let attr = self.attr_at(0, &st, fd.as_raw_fd());
        let inode = self.intern(fd, &st, parent, backing);
        Ok(Attr { ino: inode.ino, ..attr })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        if name == "." || name == ".." {
            // Only sent for NFS export, which is off; never step above the backing root.
            return Err(Error::new(libc::ENOENT, "no lookup of . or .."));
        }
        let b = match self.vol.names() {
            None if is_reserved(name, parent == ROOT_INO) => return Err(Error::new(libc::ENOENT, "reserved name")),
            names => backing_names::resolve(names, name)?,
        };
        let p = self.inode(parent)?;
        self.lookup_fd(&p, &b.main)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let inode = self.inode(ino)?;
        let fd = self.fd(&inode)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        Ok(self.attr_at(ino, &st, fd.as_raw_fd()))
    }

    /// Owner of a new object: the caller, with the group inherited from a set-gid parent.
    fn owner_for(&self, parent: RawFd, caller: Caller) -> Result<(u32, u32)> {
        let pst = sys::fstat(parent)?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 { pst.st_gid } else { caller.gid };
        Ok((caller.uid, gid))
    }

    /// Look up what `make` just created as the caller (see `sys::FsIds`). Nothing is
    /// chowned or chmodded by name: an object swapped into the name in between keeps its
    /// owner and mode, and is refused unless it is of the kind made and the caller's.
    fn finish_new(&self, parent: &Arc<Inode>, dir: RawFd, name: &OsStr, caller: Caller, kind: u32) -> Result<Attr> {
        let fd = sys::open_path(dir, &sys::cstr(name)?)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != kind || st.st_uid != caller.uid {
            return Err(Error::new(libc::EAGAIN, format!("{name:?} was replaced while it was being created")));
        }
        let attr = self.attr_at(0, &st, fd.as_raw_fd());
        let inode = self.intern(fd, &st, parent, name);
        Ok(Attr { ino: inode.ino, ..attr })
    }

    /// Make an object with this thread's filesystem ids set to the caller's: it is theirs
    /// from the moment it exists (group and set-gid directories by the kernel's rule for a
    /// set-gid parent, set-id bits as asked).
    fn make_as(caller: Caller, make: impl FnOnce() -> Result<()>) -> Result<()> {
        let _ids = sys::FsIds::switch(caller.uid, caller.gid)?;
        make()
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, umask: u32, caller: Caller) -> Result<Attr> {
        let b = self.backing_name(parent, name)?;
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        let mode = mode & !umask & 0o7777;
        self.make_named(dir.as_raw_fd(), &b, |c| Self::make_as(caller, || sys::mkdirat(dir.as_raw_fd(), c, mode)))?;
        self.finish_new(&p, dir.as_raw_fd(), &b.main, caller, libc::S_IFDIR)
    }

    /// Regular files, fifos, sockets and device nodes. A regular file starts empty, with
    /// no header: its first write creates one.
    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, umask: u32, rdev: u32, caller: Caller) -> Result<Attr> {
        let b = self.backing_name(parent, name)?;
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        let perm = mode & !umask & 0o7777;
        self.make_named(dir.as_raw_fd(), &b, |c| {
            Self::make_as(caller, || sys::mknodat(dir.as_raw_fd(), c, (mode & libc::S_IFMT) | perm, rdev as u64))
        })?;
        self.finish_new(&p, dir.as_raw_fd(), &b.main, caller, mode & libc::S_IFMT)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, caller: Caller) -> Result<Attr> {
        let b = self.backing_name(parent, name)?;
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        let t = match self.vol.names() {
            Some(c) => {
                let mut enc = c.encrypt_target(target.as_bytes());
                if enc.len() > crate::names::BACKING_TARGET_MAX {
                    enc = crate::names::spill_target(self.root_fd.as_raw_fd(), target.len(), &enc)?;
                }
                std::ffi::CString::new(enc).expect("base64 has no NUL")
            }
            None => sys::cstr(target)?,
        };
        self.make_named(dir.as_raw_fd(), &b, |c| Self::make_as(caller, || sys::symlinkat(&t, dir.as_raw_fd(), c)))?;
        self.finish_new(&p, dir.as_raw_fd(), &b.main, caller, libc::S_IFLNK)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        let stored = sys::readlinkat(self.fd(&inode)?.as_raw_fd())?;
        match self.vol.names() {
            Some(c) => crate::names::stored_target(self.root_fd.as_raw_fd(), stored)
                .and_then(|enc| c.decrypt_target(&enc))
                .map_err(|e| e.context(self.describe_inode(&inode))),
            None => Ok(stored),
        }
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        let b = self.backing_name(newparent, newname)?;
        let inode = self.inode(ino)?;
        let np = self.inode(newparent)?;
        let fd = self.fd(&inode)?;
        let newdir = self.fd(&np)?;
        self.make_named(newdir.as_raw_fd(), &b, |c| sys::linkat_fd(fd.as_raw_fd(), newdir.as_raw_fd(), c))?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let inode = self.table.add_lookup(&inode);
        inode.add_name(&np, &b.main);
        Ok(self.attr_at(inode.ino, &st, fd.as_raw_fd()))
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, 0)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, libc::AT_REMOVEDIR)
    }

    fn remove(&self, parent: u64, name: &OsStr, flags: i32) -> Result<()> {
        let b = self.backing_name(parent, name)?;
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        let c = sys::cstr(&b.main)?;
        let _g = self.long_name_guard(&[&b]);
        let gone = self.known_at(dir.as_raw_fd(), &c);
        sys::unlinkat(dir.as_raw_fd(), &c, flags)?;
        backing_names::drop_side_after(dir.as_raw_fd(), &b);
        if let Some((node, fd)) = gone {
            node.drop_name(&p, &b.main, &fd);
        }
        Ok(())
    }

    /// The known inode at `name` in `dir`, with its descriptor, before the mount changes
    /// that name: its names follow the change, and if it loses its last name the
    /// descriptor is kept for as long as the kernel knows the inode.
    fn known_at(&self, dir: RawFd, name: &std::ffi::CStr) -> Option<(Arc<Inode>, Arc<OwnedFd>)> {
        let st = sys::fstatat_nofollow(dir, name).ok()?;
        let node = self.table.find((st.st_dev, st.st_ino))?;
        let fd = self.fd(&node).ok()?;
        Some((node, fd))
    }

    /// `flags`: RENAME_NOREPLACE and RENAME_EXCHANGE pass through; RENAME_WHITEOUT is refused.
    /// A long name's side file is written before the rename and the old one removed after
    /// it (see `backing_names`); an exchange keeps both names, so both side files stay.
    pub fn rename(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32) -> Result<()> {
        let from = self.backing_name(parent, name)?;
        let to = self.backing_name(newparent, newname)?;
        let (name, newname) = (from.main.as_os_str(), to.main.as_os_str());
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(Error::new(libc::EINVAL, "unsupported rename flags"));
        }
        let p = self.inode(parent)?;
        let np = self.inode(newparent)?;
        let (dir, newdir) = (self.fd(&p)?, self.fd(&np)?);
        let (c, newc) = (sys::cstr(name)?, sys::cstr(newname)?);
        let _g = self.long_name_guard(&[&from, &to]);
        let moved = self.known_at(dir.as_raw_fd(), &c);
        let other = self.known_at(newdir.as_raw_fd(), &newc);
        backing_names::put_side(newdir.as_raw_fd(), &to)?;
        if let Err(e) = sys::renameat2(dir.as_raw_fd(), &c, newdir.as_raw_fd(), &newc, flags) {
            let _ = backing_names::drop_side(newdir.as_raw_fd(), &to);
            return Err(e);
        }
        backing_names::drop_side_after(dir.as_raw_fd(), &from);
        // Found again by name, a moved inode follows its new name. Renaming a directory
        // changes no name beneath it: children name their parent's inode, not a path.
        if let Some((n, _)) = moved {
            n.drop_name_only(&p, name);
            n.add_name(&np, newname);
        }
        if let Some((n, fd)) = other {
            if flags & libc::RENAME_EXCHANGE != 0 {
                n.drop_name_only(&np, newname);
                n.add_name(&p, name);
            } else {
                n.drop_name(&np, newname, &fd);
            }
        }
        Ok(())
    }

    pub fn setattr(&self, ino: u64, set: SetAttr, caller: Caller) -> Result<Attr> {
        let inode = self.inode(ino)?;
        let fd = self.fd(&inode)?;
        if let Some(mode) = set.mode {
            if !inode.is_symlink() {
                sys::chmod_fd(fd.as_raw_fd(), mode & 0o7777)?;
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            sys::fchown_fd(fd.as_raw_fd(), set.uid.unwrap_or(u32::MAX), set.gid.unwrap_or(u32::MAX))?;
        }
        if let Some(size) = set.size {
            self.truncate(&inode, &fd, size, set.fh, caller)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            sys::utimens_fd(fd.as_raw_fd(), inode.is_symlink(), &[timespec(set.atime), timespec(set.mtime)])?;
        }
        let st = sys::fstat(fd.as_raw_fd())?;
        Ok(self.attr_at(ino, &st, fd.as_raw_fd()))
    }

    fn truncate(&self, inode: &Arc<Inode>, fd: &OwnedFd, size: u64, fh: Option<u64>, caller: Caller) -> Result<()> {
        match inode.fmt {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(Error::new(libc::EISDIR, "truncate of a directory")),
            _ => return Err(Error::new(libc::EINVAL, "truncate of a special file")),
        }
        let handle = fh.and_then(|fh| self.file_handle(fh).ok()).filter(|h| h.writable);
        let own;
        let file = match &handle {
            Some(h) => &h.file,
            None => {
                own = sys::reopen(fd, libc::O_RDWR)?;
                &own
            }
        };
        let mut st = inode.content.write().unwrap();
        if size == 0 && (st.key.is_some() || file.metadata().is_ok_and(|m| m.len() > 0)) {
            // An emptied file gets a new data key at its next write: without one to give,
            // emptying it would leave content that can no longer be written.
            self.vol.can_make_keys(&|| sys::describe_fd(file.as_raw_fd()))?;
        }
        let who = handle.as_ref().map_or(caller, |h| h.writer(caller));
        self.journaled(inode, |journal| {
            let describe = || sys::describe_fd(file.as_raw_fd());
            let key = self.key_for_write(&mut st, file, size > 0, who, journal).map_err(|e| e.context(describe()))?;
            if key.is_none() {
                return Ok(()); // empty, headerless, and staying empty
            }
            let c = Content { file, geo: self.vol.geometry, key: key.as_deref(), journal };
            c.truncate(size).map_err(|e| e.context(describe()))
        })
    }

    /// The key for a change to `file` (see `EnvelopeFile::key_for_write`), kept in the
    /// inode while it is open.
    fn key_for_write(
        &self,
        st: &mut ContentState,
        file: &File,
        needs_header: bool,
        who: Caller,
        journal: Option<&Target<'_>>,
    ) -> Result<Option<Arc<FileKey>>> {
        let describe = || sys::describe_fd(file.as_raw_fd());
        let env = EnvelopeFile { vol: &self.vol, file, describe: &describe, who: Some(who.requester()) };
        let key = env.key_for_write(st.key.as_ref(), needs_header, journal)?;
        if st.opens > 0 && st.key.is_none() {
            st.key.clone_from(&key);
        }
        Ok(key)
    }

    /// The key of a non-empty envelope (see `EnvelopeFile::load`).
    fn load_key(&self, file: &File, len: u64, who: Caller) -> Result<Arc<FileKey>> {
        let describe = || sys::describe_fd(file.as_raw_fd());
        let env = EnvelopeFile { vol: &self.vol, file, describe: &describe, who: Some(who.requester()) };
        Ok(env.load(len)?.key)
    }

    fn handle(&self, fh: u64) -> Result<Handle> {
        self.handles.read().unwrap().get(&fh).cloned().ok_or_else(|| Error::new(libc::EBADF, "unknown handle"))
    }

    fn file_handle(&self, fh: u64) -> Result<Arc<FileHandle>> {
        match self.handle(fh)? {
            Handle::File(h) => Ok(h),
            Handle::Dir(_) => Err(Error::new(libc::EISDIR, "handle is a directory")),
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().unwrap().insert(fh, h);
        fh
    }

    fn open_inode(&self, inode: Arc<Inode>, flags: i32, file: Option<File>, caller: Caller) -> Result<u64> {
        if inode.fmt != libc::S_IFREG {
            return Err(Error::new(
                if inode.fmt == libc::S_IFDIR { libc::EISDIR } else { libc::EINVAL },
                "not a regular file",
            ));
        }
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        // Partial-block writes read the block first, so writers always get read access.
        let file = match file {
            Some(f) => f,
            None => sys::reopen(&*self.fd(&inode)?, if writable { libc::O_RDWR } else { libc::O_RDONLY })?,
        };
        let trunc = writable && flags & libc::O_TRUNC != 0;
        {
            let mut st = inode.content.write().unwrap();
            if st.key.is_none() {
                let len = file.metadata().map_err(|e| Error::io(e, "fstat"))?.len();
                if len > 0 {
                    st.key = Some(
                        self.load_key(&file, len, caller).map_err(|e| e.context(sys::describe_fd(file.as_raw_fd())))?,
                    );
                }
            }
            // Content written to an empty file needs a new data key.
            if writable && (trunc || st.key.is_none()) {
                self.vol.can_make_keys(&|| sys::describe_fd(file.as_raw_fd()))?;
            }
            st.opens += 1;
        }
        let path = if trunc { Some(sys::path_handle(file.as_raw_fd())?) } else { None };
        let handle = FileHandle { inode: inode.clone(), file, writable, opener: caller };
        let fh = self.add_handle(Handle::File(Arc::new(handle)));
        if let Some(path) = path {
            if let Err(e) = self.truncate(&inode, &path, 0, Some(fh), caller) {
                self.release(fh);
                return Err(e);
            }
        }
        Ok(fh)
    }

    pub fn open(&self, ino: u64, flags: i32, caller: Caller) -> Result<u64> {
        let inode = self.inode(ino)?;
        self.open_inode(inode, flags, None, caller)
    }

    /// Create and open a regular file. It starts without a header (see `mknod`).
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64)> {
        let b = self.backing_name(parent, name)?;
        let name = b.main.as_os_str();
        let p = self.inode(parent)?;
        let dir = self.fd(&p)?;
        let perm = mode & !umask & 0o7777;
        self.vol.can_make_keys(&|| format!("{}/{}", sys::describe_fd(dir.as_raw_fd()), name.to_string_lossy()))?;
        let mut made = None;
        let res = self.make_named(dir.as_raw_fd(), &b, |c| {
            made = Some(sys::openat(
                dir.as_raw_fd(),
                c,
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW,
                perm,
            )?);
            Ok(())
        });
        match res.map(|()| made.expect("made on success")) {
            Ok(fd) => {
                // Owner and mode go to the descriptor just created, never to whatever the
                // name holds by now.
                let (uid, gid) = self.owner_for(dir.as_raw_fd(), caller)?;
                sys::fchown_fd(fd.as_raw_fd(), uid, gid)?;
                let st = sys::fstat(fd.as_raw_fd())?;
                // chown clears set-id bits of executables even for root: put them back.
                if st.st_mode & 0o7777 != perm {
                    sys::fchmod(fd.as_raw_fd(), perm)?;
                }
                let st = sys::fstat(fd.as_raw_fd())?;
                let inode = self.intern(sys::path_handle(fd.as_raw_fd())?, &st, &p, name);
                let attr = self.attr_of(inode.ino, &st);
                // The reply carries a lookup only on success: give it back on failure.
                let fh = self
                    .open_inode(inode, flags & !libc::O_TRUNC, Some(File::from(fd)), caller)
                    .inspect_err(|_| self.forget(attr.ino, 1))?;
                Ok((attr, fh))
            }
            // The kernel asked to create because it believed the name absent; something
            // arrived since. Opening it here would skip the caller's permission check (the
            // kernel makes it, with supplementary groups the daemon never sees). ESTALE makes
            // the kernel look the name up again and open it as any existing file.
            Err(e) if e.errno() == libc::EEXIST && flags & libc::O_EXCL == 0 => {
                Err(Error::new(libc::ESTALE, "the name exists by now: the kernel looks it up again"))
            }
            Err(e) => Err(e),
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.file_handle(fh)?;
        let st = h.inode.content.read().unwrap();
        let c = Content { file: &h.file, geo: self.vol.geometry, key: st.key.as_deref(), journal: None };
        c.read(offset, size as usize).map_err(|e| e.context(h.describe()))
    }

    /// Write at `offset`. For O_APPEND the kernel has already resolved the offset against
    /// the file size (and pages of shared mappings come back at their own offsets through
    /// any handle), so the offset is always taken as given.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], caller: Caller) -> Result<u32> {
        let h = self.file_handle(fh)?;
        if !h.writable {
            return Err(Error::new(libc::EBADF, "handle is read-only"));
        }
        self.change_content(&h, caller, |c| c.write(offset, data))?;
        Ok(data.len() as u32)
    }

    /// Run `change` on the content behind handle `h` with the file's content lock held
    /// alone, its key (a header made if it had none) and the journal.
    fn change_content(
        &self,
        h: &FileHandle,
        caller: Caller,
        change: impl FnOnce(&Content<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut st = h.inode.content.write().unwrap();
        self.journaled(&h.inode, |journal| {
            let key = self
                .key_for_write(&mut st, &h.file, true, h.writer(caller), journal)
                .map_err(|e| e.context(h.describe()))?;
            let c = Content { file: &h.file, geo: self.vol.geometry, key: key.as_deref(), journal };
            change(&c).map_err(|e| e.context(h.describe()))
        })
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32, caller: Caller) -> Result<()> {
        if mode != 0 {
            return Err(Error::new(libc::EOPNOTSUPP, "only fallocate mode 0 is supported"));
        }
        let h = self.file_handle(fh)?;
        self.change_content(&h, caller, |c| c.allocate(offset, len))
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.file_handle(fh)?;
        let r = if datasync { h.file.sync_data() } else { h.file.sync_all() };
        r.map_err(|e| Error::io(e, format!("fsync {}", h.describe())))
    }

    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.write().unwrap().remove(&fh) else {
            return;
        };
        if let Handle::File(h) = h {
            let mut st = h.inode.content.write().unwrap();
            st.opens = st.opens.saturating_sub(1);
            if st.opens == 0 {
                // The cache keeps it for its TTL; the inode does not outlive the opens.
                st.key = None;
            }
        }
    }

    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let inode = self.inode(ino)?;
        let dir = sys::reopen(&*self.fd(&inode)?, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let describe = || sys::describe_fd(dir.as_raw_fd());
        let mut entries = vec![
            DirEntry { ino, kind: libc::S_IFDIR, name: ".".into(), backing: ".".into() },
            DirEntry { ino: ROOT_INO, kind: libc::S_IFDIR, name: "..".into(), backing: "..".into() },
        ];
        let mut raw = Vec::new();
        for e in std::fs::read_dir(&path).map_err(|e| Error::io(e, format!("readdir {}", describe())))? {
            let e = e.map_err(|e| Error::io(e, format!("readdir {}", describe())))?;
            let name = e.file_name();
            if is_reserved(&name, ino == ROOT_INO) {
                continue;
            }
            if self.vol.names().is_some() && crate::names::classify(&name) == crate::names::EntryKind::Side {
                raw.push((name, (0, 0)));
                continue;
            }
            let ft = e.file_type().map_err(|e| Error::io(e, "readdir"))?;
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_dir() {
                libc::S_IFDIR
            } else if ft.is_symlink() {
                libc::S_IFLNK
            } else if ft.is_fifo() {
                libc::S_IFIFO
            } else if ft.is_socket() {
                libc::S_IFSOCK
            } else if ft.is_char_device() {
                libc::S_IFCHR
            } else if ft.is_block_device() {
                libc::S_IFBLK
            } else {
                libc::S_IFREG
            };
            raw.push((name, (e.ino(), kind)));
        }
        match self.vol.names() {
            None => entries.extend(raw.into_iter().map(|(name, (ino, kind))| DirEntry {
                ino,
                kind,
                backing: name.clone(),
                name,
            })),
            Some(c) => {
                let listed = backing_names::list(c, dir.as_raw_fd(), raw, &self.long_names, &describe);
                entries.extend(listed.into_iter().map(|l| DirEntry {
                    ino: l.with.0,
                    kind: l.with.1,
                    name: l.name,
                    backing: l.backing,
                }));
            }
        }
        Ok(self.add_handle(Handle::Dir(Arc::new(DirHandle { inode, entries }))))
    }

    /// Entries from position `offset` on; an entry's position is its index + 1.
    pub fn readdir(&self, fh: u64, offset: u64, mut add: impl FnMut(&DirEntry, u64) -> bool) -> Result<()> {
        let Handle::Dir(dir) = self.handle(fh)? else {
            return Err(Error::new(libc::ENOTDIR, "not a directory handle"));
        };
        for (i, e) in dir.entries.iter().enumerate().skip(offset as usize) {
            if add(e, i as u64 + 1) {
                break;
            }
        }
        Ok(())
    }

    /// Entries with their attributes (READDIRPLUS: saves a lookup per entry). Every entry
    /// handed out counts as a lookup, except `.` and `..`, which the kernel ignores; an
    /// entry that no longer fits the reply is given back.
    pub fn readdirplus(&self, fh: u64, offset: u64, mut add: impl FnMut(&DirEntry, u64, &Attr) -> bool) -> Result<()> {
        let Handle::Dir(dir) = self.handle(fh)? else {
            return Err(Error::new(libc::ENOTDIR, "not a directory handle"));
        };
        let dir_attr = self.attr_of(dir.inode.ino, &sys::fstat(self.fd(&dir.inode)?.as_raw_fd())?);
        let mut added = 0;
        for (i, e) in dir.entries.iter().enumerate().skip(offset as usize) {
            if e.name == "." || e.name == ".." {
                if add(e, i as u64 + 1, &Attr { ino: e.ino, ..dir_attr }) {
                    break;
                }
                added += 1;
                continue;
            }
            let attr = match self.lookup_fd(&dir.inode, &e.backing) {
                Ok(a) => a,
                Err(err) if err.errno() == libc::ENOENT => continue, // removed since opendir
                // Hand back what is already in the reply; the next call starts at this entry
                // and reports the error (EMFILE, EIO…) instead of silently skipping it.
                Err(_) if added > 0 => break,
                Err(err) => return Err(err.context(format!("readdirplus of {}", self.describe_inode(&dir.inode)))),
            };
            if add(e, i as u64 + 1, &attr) {
                self.forget(attr.ino, 1);
                break;
            }
            added += 1;
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.write().unwrap().remove(&fh);
    }

    pub fn fsyncdir(&self, ino: u64) -> Result<()> {
        let inode = self.inode(ino)?;
        sys::reopen(&*self.fd(&inode)?, libc::O_RDONLY | libc::O_DIRECTORY)?
            .sync_all()
            .map_err(|e| Error::io(e, "fsync directory"))
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let s = sys::fstatvfs(self.root_dir.as_raw_fd())?;
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: if self.vol.names().is_some() { crate::names::NAME_MAX as u32 } else { s.f_namemax as u32 },
            frsize: s.f_frsize as u32,
        })
    }

    /// Only `user.*` extended attributes pass through: as they are with plaintext names,
    /// else with names and values encrypted (see `names`).
    fn xattr_name(&self, name: &OsStr) -> Result<std::ffi::CString> {
        if !name.as_bytes().starts_with(b"user.") {
            return Err(Error::new(libc::EOPNOTSUPP, "only user.* extended attributes are supported"));
        }
        match self.vol.names() {
            Some(c) => Ok(std::ffi::CString::new(c.encrypt_xattr_name(name.as_bytes())?).expect("base64 has no NUL")),
            None => sys::cstr(name),
        }
    }

    /// The stored name of an xattr to read or remove: one too long to encrypt was never
    /// stored (ENODATA, as for any absent name).
    fn stored_xattr_name(&self, name: &OsStr) -> Result<std::ffi::CString> {
        self.xattr_name(name).map_err(|e| {
            if e.errno() == libc::ERANGE {
                Error::new(libc::ENODATA, "no such attribute")
            } else {
                e
            }
        })
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let inode = self.inode(ino)?;
        if inode.is_symlink() {
            return Err(Error::new(libc::EPERM, "no user xattrs on symlinks"));
        }
        let stored = self.xattr_name(name)?;
        let sealed;
        let value = match self.vol.names() {
            Some(c) => {
                if value.len() + crate::names::XATTR_VALUE_OVERHEAD > 65536 {
                    return Err(Error::new(libc::E2BIG, "an xattr value this long does not fit once encrypted"));
                }
                sealed = c.seal_xattr_value(stored.as_bytes(), value)?;
                &sealed[..]
            }
            None => value,
        };
        sys::setxattr(self.fd(&inode)?.as_raw_fd(), &stored, value, flags)
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if !name.as_bytes().starts_with(b"user.") || inode.is_symlink() {
            return Err(Error::new(libc::ENODATA, "no such attribute"));
        }
        let fd = self.fd(&inode)?;
        let Some(c) = self.vol.names() else {
            return sys::getxattr(fd.as_raw_fd(), &sys::cstr(name)?, size as usize);
        };
        let stored = self.stored_xattr_name(name)?;
        let len = sys::getxattr(fd.as_raw_fd(), &stored, 0)?.len();
        let value = c
            .open_xattr_value(stored.as_bytes(), &sys::getxattr(fd.as_raw_fd(), &stored, len.max(1))?)
            .map_err(|e| e.context(format!("xattr {name:?} of {}", self.describe_inode(&inode))))?;
        match size as usize {
            0 => Ok(vec![0u8; value.len()]),
            n if n < value.len() => Err(Error::new(libc::ERANGE, "xattr value larger than the buffer")),
            _ => Ok(value),
        }
    }

    /// The NUL-separated list of `user.*` names.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if inode.is_symlink() {
            return Ok(Vec::new());
        }
        let all = sys::listxattr(self.fd(&inode)?.as_raw_fd())?;
        let mut out = Vec::new();
        for n in all.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
            match self.vol.names() {
                None => out.extend_from_slice(n),
                Some(c) => match c.decrypt_xattr_name(n) {
                    Some(plain) => out.extend_from_slice(&plain),
                    None => {
                        tracing::warn!(
                            "{}: xattr {:?} is not one this volume encrypted: left out",
                            self.describe_inode(&inode),
                            OsStr::from_bytes(n)
                        );
                        continue;
                    }
                },
            }
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        let inode = self.inode(ino)?;
        if inode.is_symlink() {
            return Err(Error::new(libc::EPERM, "no user xattrs on symlinks"));
        }
        sys::removexattr(self.fd(&inode)?.as_raw_fd(), &self.stored_xattr_name(name)?)
    }
}
