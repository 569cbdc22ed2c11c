//! `EncryptedFs`: POSIX semantics over a backing directory, in plain Rust. The FUSE adapter
//! (`mount`) only translates requests to these methods; tests call them directly.
//!
//! Every known inode is reached through an O_PATH descriptor of its backing object, so
//! nothing ever follows a symlink in the backing tree and no path is resolved twice. The
//! descriptors live in a bounded cache (`fd_cache`); an inode whose descriptor was closed
//! is found again by its `Locator`: a kernel file handle, or a name in a parent that is
//! itself found again, checked to still be the same object.

mod attr;
mod dir;
mod fd_cache;
mod file;
mod inodes;
mod locate;
mod locks;
mod namespace;
mod prefetch;
mod stats;
mod xattr;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::crypto::FileKey;

use crate::error::{Error, Result};
use crate::file::content::Content;
use crate::file::envelope_file::EnvelopeFile;
use crate::file::journal::{Journal, Target};
use crate::names::{backing, BackingName};
use crate::sys;
use crate::volume::audit::Requester;
use crate::volume::{is_reserved, Volume};

pub use prefetch::{PrefetchConfig, PrefetchStats};
pub use stats::{Labels, RequestTimer, Stats, OPCODES};

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
    /// On a shared volume, an open of the backing file made when a user was last granted a
    /// lock on it: reads go through it, so they see what other hosts wrote before.
    fresh: Option<Arc<File>>,
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
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(crate::error::usage(format!("{s:?}: expected auto, always or never"))),
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
    /// The directory a regular file was last looked up in: where to unwrap keys ahead.
    parent: Mutex<std::sync::Weak<Inode>>,
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
        // A backing filesystem may drop a removed object at once (JuiceFS): ENOENT.
        let gone = |r: Result<libc::stat>| r.map_or_else(|e| e.errno() == libc::ENOENT, |st| st.st_nlink == 0);
        if nameless || gone(sys::fstat(fd.as_raw_fd())) {
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
    long_names: backing::LongNames,
    /// A daemon that is not root cannot give objects away: they are its own user's, as on
    /// any unprivileged FUSE mount (None: root, objects belong to their creator).
    own_ids: Option<(u32, u32)>,
    /// Locks taken through the mount of a shared volume (`locks`).
    locks: locks::Owners,
    /// Unwraps keys ahead of opens in a scan (off unless `with_prefetch`).
    prefetch: prefetch::Prefetcher,
}

impl EncryptedFs {
    /// Serve `vol`. Modes given to it are applied as given, so the process umask must be
    /// 0 (the daemon's `process::unmask_modes`).
    pub fn new(vol: Arc<Volume>) -> Result<Self> {
        if vol.config.upgrading {
            // Values are bound to their files one by one: some of each kind until it ends.
            return Err(Error::new(
                libc::EBUSY,
                format!(
                    "{}: an `envelopefs upgrade` to format 6 did not finish: run it again before mounting",
                    vol.root.display()
                ),
            )
            .with_class(crate::error::Class::Busy));
        }
        let root = sys::cstr(vol.root.as_os_str())?;
        let fd = sys::openat(libc::AT_FDCWD, &root, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| e.context(format!("opening backing directory {}", vol.root.display())))?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let root_dir = sys::reopen(&fd, libc::O_RDONLY | libc::O_DIRECTORY)?;
        // Long names are changed under a lock every host of a shared volume sees.
        let fleet = match vol.config.shared {
            true => crate::volume::lock::open_lock_file(&vol.root)?,
            false => None,
        };
        let root = InodeData {
            id: 0,
            locator: Locator::Root,
            pinned: Mutex::new(None),
            fmt: libc::S_IFDIR,
            parent: Mutex::new(std::sync::Weak::new()),
            content: RwLock::new(ContentState { key: None, opens: 0, fresh: None }),
        };
        let table = inodes::InodeTable::new(ROOT_INO, (st.st_dev, st.st_ino), root);
        let fs = Self {
            stats: Default::default(),
            vol: vol.clone(),
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
            long_names: backing::LongNames::new(fleet),
            own_ids: match (rustix::process::geteuid(), rustix::process::getegid()) {
                (uid, _) if uid.is_root() => None,
                (uid, gid) => Some((uid.as_raw(), gid.as_raw())),
            },
            locks: Default::default(),
            prefetch: prefetch::Prefetcher::new(vol.clone(), PrefetchConfig::OFF),
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

    /// Record every change in `journal` before making it (see `journal`).
    pub fn with_journal(mut self, journal: Arc<Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Unwrap keys ahead of the opens of a scan (see `prefetch`).
    pub fn with_prefetch(mut self, cfg: PrefetchConfig) -> Self {
        self.prefetch = prefetch::Prefetcher::new(self.vol.clone(), cfg);
        self
    }

    /// What unwrapping ahead is set to and has done (for status and metrics).
    pub fn prefetch(&self) -> (PrefetchConfig, &PrefetchStats) {
        (self.prefetch.config(), self.prefetch.stats())
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

    /// An inode for the log and `status` (host-side only): its plaintext path in the mount
    /// and its backing path as the kernel sees it now (the backing path alone with plaintext
    /// names, or where a name does not decrypt), or the inode number if it is unknown.
    pub fn describe(&self, ino: u64) -> String {
        let Ok(inode) = self.inode(ino) else { return format!("inode {ino}") };
        let backing = self.describe_inode(&inode);
        let Some(names) = self.vol.names() else { return backing };
        match names.plain_path(self.vol.place(), std::path::Path::new(&backing)) {
            Ok(plain) if ino == ROOT_INO || !plain.as_os_str().is_empty() => {
                format!("/{} (backing {backing})", plain.display())
            }
            _ => backing,
        }
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
}
