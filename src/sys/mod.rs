//! Thin, checked wrappers over the directory-fd-relative syscalls the filesystem uses.

pub mod atomic_file;
pub mod fuse_ring;
pub mod probe;
pub mod range_lock;
pub mod sync;

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::error::{cvt, Error, Result};

pub fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Error::new(libc::EINVAL, "name contains a NUL byte"))
}

const EMPTY: &CStr = c"";

/// `/proc/self/fd/N`: reopens an O_PATH descriptor with real access, the way libfuse's
/// passthrough does.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap()
}

pub fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    owned(fd, || format!("open {:?}", name))
}

/// Own a descriptor a syscall just returned, naming the descriptor limit when that is why
/// there is none.
fn owned(fd: libc::c_int, what: impl FnOnce() -> String) -> Result<OwnedFd> {
    let fd = cvt(fd, what).map_err(|e| match e.errno() {
        libc::EMFILE => e.context(format!(
            "the daemon is at its descriptor limit (RLIMIT_NOFILE {}): files held open through the mount \
             count against it, and the inode table keeps at most --max-inode-fds more; raise LimitNOFILE \
             or lower --max-inode-fds",
            nofile_limit()
        )),
        _ => e,
    })?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether a syscall on a FUSE mount failed because its daemon is gone: ENOTCONN, or
/// ECONNABORTED for a request that was waiting on an io_uring queue when the daemon died
/// (the kernel ends those when it tears the queues down; the next request gets ENOTCONN).
pub fn is_dead_fuse(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::NOTCONN || e == rustix::io::Errno::CONNABORTED
}

/// The process's soft RLIMIT_NOFILE.
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// A kernel file handle: names an inode (with its generation) on one filesystem, for as
/// long as the inode lives, whatever its names become.
#[derive(Clone, PartialEq, Eq)]
pub struct FileHandle {
    kind: i32,
    bytes: Box<[u8]>,
}

const MAX_HANDLE_SZ: usize = 128;

#[repr(C)]
struct RawHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// The file handle of the object behind `fd` (any kind of descriptor, O_PATH included).
pub fn name_to_handle(fd: RawFd) -> Result<FileHandle> {
    let mut raw = RawHandle { handle_bytes: MAX_HANDLE_SZ as u32, handle_type: 0, f_handle: [0; MAX_HANDLE_SZ] };
    let mut mount_id: libc::c_int = 0;
    cvt(
        // SAFETY: EMPTY is NUL-terminated; `raw` is a writable file_handle with room for
        // MAX_HANDLE_SZ bytes, as its handle_bytes says; `mount_id` is writable.
        unsafe {
            libc::name_to_handle_at(
                fd,
                EMPTY.as_ptr(),
                (&mut raw as *mut RawHandle).cast(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        },
        || "name_to_handle_at".into(),
    )?;
    let n = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok(FileHandle { kind: raw.handle_type, bytes: raw.f_handle[..n].into() })
}

/// Open the object a file handle names, on the filesystem of `mount_fd`. Needs
/// CAP_DAC_READ_SEARCH; a handle whose inode is gone gives ESTALE.
pub fn open_by_handle(mount_fd: RawFd, h: &FileHandle, flags: i32) -> Result<OwnedFd> {
    let mut raw = RawHandle { handle_bytes: h.bytes.len() as u32, handle_type: h.kind, f_handle: [0; MAX_HANDLE_SZ] };
    raw.f_handle[..h.bytes.len()].copy_from_slice(&h.bytes);
    // SAFETY: `raw` is a valid file_handle holding handle_bytes bytes; the kernel only reads it.
    let fd = unsafe { libc::open_by_handle_at(mount_fd, (&mut raw as *mut RawHandle).cast(), flags | libc::O_CLOEXEC) };
    owned(fd, || "open_by_handle_at".into())
}

/// An O_PATH handle on `name` in `dir`, never following a final symlink.
pub fn open_path(dir: RawFd, name: &CStr) -> Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Open `name` in `dir` for I/O only if it is a regular file, with no side effect on
/// anything else planted there: an O_PATH handle that does not follow a symlink (opening
/// it wakes no FIFO writer, no device driver, takes no controlling terminal), `fstat` of
/// that handle, then that same inode reopened with `flags` and O_NONBLOCK | O_NOCTTY.
/// `None` when it is something else. Creating or truncating flags are refused: files the
/// daemon writes are made anew (`write_new_at`), never opened over what is there.
pub fn open_regular(dir: RawFd, name: &CStr, flags: i32) -> Result<Option<(File, libc::stat)>> {
    if flags & (libc::O_CREAT | libc::O_TRUNC) != 0 {
        return Err(Error::new(libc::EINVAL, "open_regular never creates or truncates"));
    }
    let fd = open_path(dir, name)?;
    let st = fstat(fd.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(None);
    }
    Ok(Some((reopen(&fd, flags | libc::O_NONBLOCK | libc::O_NOCTTY)?, st)))
}

/// Make `name` in `dir` hold exactly `bytes`, without ever opening what is there: a fresh
/// temporary (O_CREAT | O_EXCL | O_NOFOLLOW) written and synced, then renamed over `name`.
/// A hard link, symlink or FIFO planted at `name` is replaced, never written through.
pub fn write_new_at(dir: RawFd, name: &CStr, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let tmp = temporary_name()?;
    let fd = openat(dir, &tmp, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW, mode)?;
    let mut f = File::from(fd);
    let res = f
        .write_all(bytes)
        .and_then(|_| f.sync_data())
        .map_err(|e| Error::io(e, format!("writing {name:?}")))
        .and_then(|_| renameat2(dir, &tmp, dir, name, 0));
    if res.is_err() {
        let _ = unlinkat(dir, &tmp, 0);
    }
    res
}

/// The suffix of every temporary the volume's tools and daemon make in the backing
/// directory: one left by a crash is removed by `fsck --repair` and `rekey`, and never
/// listed.
pub const TEMP_SUFFIX: &str = ".envelopefs-reencrypt";

/// A fresh temporary name of fixed length (so it fits wherever any name does).
pub fn temporary_name() -> Result<CString> {
    let mut r = [0u8; 8];
    getrandom::getrandom(&mut r).map_err(|e| Error::new(libc::EIO, format!("getrandom: {e}")))?;
    cstr(OsStr::new(&format!(".{}{TEMP_SUFFIX}", hex::encode(r))))
}

/// Reopen an O_PATH handle for I/O.
pub fn reopen(fd: &OwnedFd, flags: i32) -> Result<File> {
    let p = proc_path(fd.as_raw_fd());
    let f = openat(libc::AT_FDCWD, &p, flags, 0)?;
    Ok(File::from(f))
}

pub fn fstat(fd: RawFd) -> Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(
        // SAFETY: EMPTY is NUL-terminated and `st` is a valid, writable `stat`.
        unsafe { libc::fstatat(fd, EMPTY.as_ptr(), &mut st, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) },
        || "fstat".into(),
    )?;
    Ok(st)
}

/// Have the kernel ask the filesystem for `fd`'s attributes now, not from its cache: on a
/// shared filesystem other hosts change them (the next `fstat` then sees what it got).
pub fn sync_attrs(fd: RawFd) -> Result<()> {
    use rustix::fs::{AtFlags, StatxFlags};
    // SAFETY: `fd` is open for the duration of the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW | AtFlags::STATX_FORCE_SYNC;
    rustix::fs::statx(fd, "", flags, StatxFlags::BASIC_STATS).map(drop).map_err(|e| Error::io(e.into(), "statx"))
}

/// `fstatat` of `name` in `dir`, not following a final symlink.
pub fn fstatat_nofollow(dir: RawFd, name: &CStr) -> Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `st` is a valid, writable `stat`.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }, || format!("stat {name:?}"))?;
    Ok(st)
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }, || format!("mkdir {name:?}")).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    cvt(unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev) }, || format!("mknod {name:?}")).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> Result<()> {
    // SAFETY: `target` and `name` are NUL-terminated and outlive the call.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }, || format!("symlink {name:?}")).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: i32) -> Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }, || format!("unlink {name:?}")).map(drop)
}

pub fn renameat2(od: RawFd, on: &CStr, nd: RawFd, nn: &CStr, flags: u32) -> Result<()> {
    // SAFETY: both names are NUL-terminated and outlive the call.
    cvt(unsafe { libc::renameat2(od, on.as_ptr(), nd, nn.as_ptr(), flags) }, || format!("rename {on:?} to {nn:?}"))
        .map(drop)
}

/// Hard link the object behind an O_PATH handle (needs CAP_DAC_READ_SEARCH: the daemon is root).
pub fn linkat_fd(fd: RawFd, nd: RawFd, nn: &CStr) -> Result<()> {
    // SAFETY: EMPTY and `nn` are NUL-terminated and outlive the call.
    cvt(unsafe { libc::linkat(fd, EMPTY.as_ptr(), nd, nn.as_ptr(), libc::AT_EMPTY_PATH) }, || format!("link {nn:?}"))
        .map(drop)
}

pub fn readlinkat(fd: RawFd) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for `buf.len()` bytes; readlinkat writes at most that.
    let n = unsafe { libc::readlinkat(fd, EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(crate::error::last_os("readlink"));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `capget`/`capset` data, version 3 (two 32-bit words per set).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

fn thread_caps() -> Result<[CapData; 2]> {
    let mut hdr = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) with a version-3 header (pid 0: this thread) writes two CapData
    // records, which `data` provides.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr as *mut CapHeader, data.as_mut_ptr()) };
    if r != 0 {
        return Err(crate::error::last_os("capget"));
    }
    Ok(data)
}

fn set_thread_caps(data: &[CapData; 2]) -> Result<()> {
    let mut hdr = CapHeader { version: CAP_VERSION_3, pid: 0 };
    // SAFETY: capset(2) with a version-3 header (pid 0: this thread) reads two CapData
    // records from `data`.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if r != 0 {
        return Err(crate::error::last_os("capset"));
    }
    Ok(())
}

/// This thread's filesystem ids as another user's, for as long as the guard lives: an
/// object the thread creates meanwhile is owned by that user (group: `gid`, or the
/// parent's for a set-gid parent, by the kernel's own rule) from the moment it exists, so
/// nothing can be swapped into its name before it is handed over. On Linux `setfsuid` and
/// `setfsgid` act on the calling thread only, so other FUSE worker threads are unaffected.
///
/// Changing the fsuid away from 0 drops the filesystem capabilities from the effective set;
/// they are raised again (as they were), so the backing store checks nothing the kernel has
/// not already checked on the mount with the caller's full credentials (supplementary
/// groups included, which the daemon does not know), and set-id bits are kept as asked.
pub struct FsIds {
    saved: Option<(u32, u32, [CapData; 2])>,
}

impl FsIds {
    pub fn switch(uid: u32, gid: u32) -> Result<Self> {
        // SAFETY: setfsuid/setfsgid with -1 (an invalid id) change nothing and return the
        // current value.
        let (cur_uid, cur_gid) = unsafe { (libc::setfsuid(u32::MAX) as u32, libc::setfsgid(u32::MAX) as u32) };
        if (cur_uid, cur_gid) == (uid, gid) {
            return Ok(Self { saved: None });
        }
        let caps = thread_caps()?;
        let guard = Self { saved: Some((cur_uid, cur_gid, caps)) };
        // Group first: while the fsuid is still ours the change is allowed.
        // SAFETY: plain syscalls on this thread's credentials; the guard restores them.
        let ok = unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
            (libc::setfsuid(u32::MAX) as u32, libc::setfsgid(u32::MAX) as u32) == (uid, gid)
        };
        if !ok {
            return Err(Error::new(libc::EPERM, format!("cannot create as uid {uid} gid {gid}")));
        }
        set_thread_caps(&caps)?;
        Ok(guard)
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        if let Some((uid, gid, caps)) = self.saved.take() {
            // SAFETY: restores this thread's own filesystem ids saved by `switch`.
            let back = unsafe {
                libc::setfsuid(uid);
                libc::setfsgid(gid);
                (libc::setfsuid(u32::MAX) as u32, libc::setfsgid(u32::MAX) as u32) == (uid, gid)
            };
            let caps = set_thread_caps(&caps);
            if !back || caps.is_err() {
                // A worker left with another user's credentials would act as that user: stop.
                tracing::error!("restoring this thread's credentials after a create failed: {caps:?}");
                std::process::abort();
            }
        }
    }
}

/// A new O_PATH handle on the object behind `fd` (any kind of descriptor).
pub fn path_handle(fd: RawFd) -> Result<OwnedFd> {
    openat(libc::AT_FDCWD, &proc_path(fd), libc::O_PATH, 0)
}

/// chown without following symlinks; `u32::MAX` leaves an id unchanged.
pub fn fchown_fd(fd: RawFd, uid: u32, gid: u32) -> Result<()> {
    cvt(
        // SAFETY: EMPTY is NUL-terminated; a plain syscall on a descriptor the caller holds.
        unsafe { libc::fchownat(fd, EMPTY.as_ptr(), uid, gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) },
        || "chown".into(),
    )
    .map(drop)
}

/// fchmod of a descriptor opened for I/O (not O_PATH).
pub fn fchmod(fd: RawFd, mode: u32) -> Result<()> {
    // SAFETY: a plain syscall on a descriptor the caller owns.
    cvt(unsafe { libc::fchmod(fd, mode) }, || "fchmod".into()).map(drop)
}

pub fn chmod_fd(fd: RawFd, mode: u32) -> Result<()> {
    let p = proc_path(fd);
    // SAFETY: `p` is NUL-terminated and outlives the call.
    cvt(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode, 0) }, || "chmod".into()).map(drop)
}

/// Set times; `is_symlink` decides between the /proc path (follows to the object) and
/// AT_EMPTY_PATH on the handle itself.
pub fn utimens_fd(fd: RawFd, is_symlink: bool, times: &[libc::timespec; 2]) -> Result<()> {
    let r = if is_symlink {
        // SAFETY: EMPTY is NUL-terminated and `times` points to two timespecs.
        unsafe { libc::utimensat(fd, EMPTY.as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH) }
    } else {
        let p = proc_path(fd);
        // SAFETY: `p` is NUL-terminated and `times` points to two timespecs.
        unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }
    };
    cvt(r, || "utimensat".into()).map(drop)
}

/// `futimens` of an open (not O_PATH) descriptor.
pub fn futimens(fd: RawFd, times: &[libc::timespec; 2]) -> Result<()> {
    // SAFETY: `times` points to two timespecs.
    cvt(unsafe { libc::futimens(fd, times.as_ptr()) }, || "futimens".into()).map(drop)
}

pub fn fstatvfs(fd: RawFd) -> Result<libc::statvfs> {
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `statvfs`.
    cvt(unsafe { libc::fstatvfs(fd, &mut st) }, || "statvfs".into())?;
    Ok(st)
}

pub fn setxattr(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> Result<()> {
    let p = proc_path(fd);
    // SAFETY: `p` and `name` are NUL-terminated; `value` is readable for its length.
    cvt(unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) }, || {
        format!("setxattr {name:?}")
    })
    .map(drop)
}

/// Size of the value when `size` is 0, else the value (ERANGE when it does not fit).
pub fn getxattr(fd: RawFd, name: &CStr, size: usize) -> Result<Vec<u8>> {
    let p = proc_path(fd);
    let mut buf = vec![0u8; size];
    // SAFETY: `p` and `name` are NUL-terminated; `buf` is writable for `size` bytes.
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), size) };
    if n < 0 {
        return Err(crate::error::last_os(format!("getxattr {name:?}")));
    }
    if size == 0 {
        return Ok(vec![0u8; n as usize]);
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The names of `fd`'s extended attributes; none on a filesystem without them (JuiceFS
/// by default answers ENOTSUP).
pub fn listxattr(fd: RawFd) -> Result<Vec<u8>> {
    let p = proc_path(fd);
    // SAFETY: `p` is NUL-terminated; a null buffer of size 0 only asks for the length.
    let n = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        let e = crate::error::last_os("listxattr");
        return if e.errno() == libc::ENOTSUP { Ok(Vec::new()) } else { Err(e) };
    }
    let mut buf = vec![0u8; n as usize];
    // SAFETY: `p` is NUL-terminated; `buf` is writable for its length.
    let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(crate::error::last_os("listxattr"));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn removexattr(fd: RawFd, name: &CStr) -> Result<()> {
    let p = proc_path(fd);
    // SAFETY: `p` and `name` are NUL-terminated and outlive the call.
    cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }, || format!("removexattr {name:?}")).map(drop)
}

/// One entry of a directory: its name, inode number and file type bits (`S_IFMT`).
pub struct Entry {
    pub name: std::ffi::OsString,
    pub ino: u64,
    pub kind: u32,
}

/// The entries of the directory open at `dir` (".." and "." left out), read from the
/// descriptor: no path is resolved. A type the filesystem does not report comes from
/// `fstatat` without following the entry.
pub fn list_dir(dir: RawFd, what: &dyn Fn() -> String) -> Result<Vec<Entry>> {
    use std::os::unix::ffi::OsStringExt;
    let err = |e: rustix::io::Errno| Error::io(e.into(), format!("listing {}", what()));
    // SAFETY: the caller's descriptor stays open for this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(dir) };
    let mut out = Vec::new();
    for e in rustix::fs::Dir::read_from(fd).map_err(err)? {
        let e = e.map_err(err)?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match e.file_type() {
            rustix::fs::FileType::Unknown => {
                rustix::fs::statat(fd, e.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW).map_err(err)?.st_mode
                    & libc::S_IFMT
            }
            t => t.as_raw_mode(),
        };
        out.push(Entry { name: std::ffi::OsString::from_vec(name.to_vec()), ino: e.ino(), kind });
    }
    Ok(out)
}

/// Where an O_PATH handle points now, for log lines (best effort).
pub fn describe_fd(fd: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("fd {fd}"))
}

/// Send later log lines to syslog, as "envelopefs[PID]", facility daemon.
pub fn openlog() {
    // SAFETY: a static NUL-terminated identity string, which openlog keeps a pointer to.
    unsafe { libc::openlog(c"envelopefs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
}

/// One line to syslog (NUL bytes become spaces).
pub fn syslog(line: &str) {
    if let Ok(c) = CString::new(line.replace('\0', " ")) {
        // SAFETY: a constant "%s" format with one NUL-terminated argument that lives across
        // the call.
        unsafe { libc::syslog(libc::LOG_DAEMON | libc::LOG_NOTICE, c"%s".as_ptr(), c.as_ptr()) };
    }
}

/// Mount a FUSE connection at `mountpoint` as type `fuse.SUBTYPE` with `source` as its
/// device, with default_permissions, nosuid and nodev: the /dev/fuse descriptor that
/// serves it, or `None` when this process may not mount (not root: fusermount3's job).
pub fn mount_fuse(
    mountpoint: &Path,
    source: &str,
    subtype: &str,
    read_only: bool,
    allow_other: bool,
) -> std::io::Result<Option<OwnedFd>> {
    use rustix::mount::{mount, MountFlags};
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
    let root_mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
        dev.as_raw_fd(),
        root_mode,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw()
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    let data = CString::new(data).expect("no NUL in mount options");
    match mount(source, mountpoint, format!("fuse.{subtype}").as_str(), flags, Some(data.as_c_str())) {
        Ok(()) => Ok(Some(dev.into())),
        Err(rustix::io::Errno::PERM) => Ok(None),
        Err(e) => Err(std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("mount(2) at {}: {e}", mountpoint.display()),
        )),
    }
}
