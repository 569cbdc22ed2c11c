//! Thin, checked wrappers over the directory-fd-relative syscalls the filesystem uses.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    let fd = cvt(fd, || format!("open {:?}", name))?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An O_PATH handle on `name` in `dir`, never following a final symlink.
pub fn open_path(dir: RawFd, name: &CStr) -> Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Reopen an O_PATH handle for I/O.
pub fn reopen(fd: &OwnedFd, flags: i32) -> Result<File> {
    let p = proc_path(fd.as_raw_fd());
    let f = openat(libc::AT_FDCWD, &p, flags, 0)?;
    Ok(File::from(f))
}

pub fn fstat(fd: RawFd) -> Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(
        unsafe { libc::fstatat(fd, EMPTY.as_ptr(), &mut st, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) },
        || "fstat".into(),
    )?;
    Ok(st)
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
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }, || format!("mkdir {name:?}")).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    cvt(unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev) }, || format!("mknod {name:?}")).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> Result<()> {
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }, || format!("symlink {name:?}")).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: i32) -> Result<()> {
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }, || format!("unlink {name:?}")).map(drop)
}

pub fn renameat2(od: RawFd, on: &CStr, nd: RawFd, nn: &CStr, flags: u32) -> Result<()> {
    cvt(unsafe { libc::renameat2(od, on.as_ptr(), nd, nn.as_ptr(), flags) }, || format!("rename {on:?} to {nn:?}"))
        .map(drop)
}

/// Hard link the object behind an O_PATH handle (needs CAP_DAC_READ_SEARCH: the daemon is root).
pub fn linkat_fd(fd: RawFd, nd: RawFd, nn: &CStr) -> Result<()> {
    cvt(unsafe { libc::linkat(fd, EMPTY.as_ptr(), nd, nn.as_ptr(), libc::AT_EMPTY_PATH) }, || format!("link {nn:?}"))
        .map(drop)
}

pub fn readlinkat(fd: RawFd) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = unsafe { libc::readlinkat(fd, EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(crate::error::last_os("readlink"));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// chown without following symlinks; `u32::MAX` leaves an id unchanged.
pub fn fchown_fd(fd: RawFd, uid: u32, gid: u32) -> Result<()> {
    cvt(
        unsafe { libc::fchownat(fd, EMPTY.as_ptr(), uid, gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) },
        || "chown".into(),
    )
    .map(drop)
}

pub fn chmod_fd(fd: RawFd, mode: u32) -> Result<()> {
    let p = proc_path(fd);
    cvt(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode, 0) }, || "chmod".into()).map(drop)
}

/// Set times; `is_symlink` decides between the /proc path (follows to the object) and
/// AT_EMPTY_PATH on the handle itself.
pub fn utimens_fd(fd: RawFd, is_symlink: bool, times: &[libc::timespec; 2]) -> Result<()> {
    let r = if is_symlink {
        unsafe { libc::utimensat(fd, EMPTY.as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH) }
    } else {
        let p = proc_path(fd);
        unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }
    };
    cvt(r, || "utimensat".into()).map(drop)
}

pub fn fstatvfs(fd: RawFd) -> Result<libc::statvfs> {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatvfs(fd, &mut st) }, || "statvfs".into())?;
    Ok(st)
}

pub fn setxattr(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> Result<()> {
    let p = proc_path(fd);
    cvt(unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) }, || {
        format!("setxattr {name:?}")
    })
    .map(drop)
}

/// Size of the value when `size` is 0, else the value (ERANGE when it does not fit).
pub fn getxattr(fd: RawFd, name: &CStr, size: usize) -> Result<Vec<u8>> {
    let p = proc_path(fd);
    let mut buf = vec![0u8; size];
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

pub fn listxattr(fd: RawFd) -> Result<Vec<u8>> {
    let p = proc_path(fd);
    let n = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(crate::error::last_os("listxattr"));
    }
    let mut buf = vec![0u8; n as usize];
    let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(crate::error::last_os("listxattr"));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn removexattr(fd: RawFd, name: &CStr) -> Result<()> {
    let p = proc_path(fd);
    cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }, || format!("removexattr {name:?}")).map(drop)
}

/// Where an O_PATH handle points now, for log lines (best effort).
pub fn describe_fd(fd: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("fd {fd}"))
}
