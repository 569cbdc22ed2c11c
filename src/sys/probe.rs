//! A stat of the daemon's own mount point from a child process.
//!
//! A thread of the daemon that waits on its own mount can never finish if the daemon is
//! killed meanwhile: once its request was read, the kernel waits for an answer only the
//! dead daemon could give, and the daemon cannot exit while one of its threads waits. The
//! mount then stays hung. A child process that holds none of the daemon's descriptors is
//! not the daemon: when the daemon dies its connection is torn down and the child's stat
//! fails (ENOTCONN) instead.

use std::ffi::CString;
use std::mem::{size_of, zeroed};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Error, Result};

/// `stat(path)` as a child process sees it.
pub fn stat_in_child(path: &Path) -> Result<libc::stat> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::new(libc::EINVAL, "NUL in a path"))?;
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a writable array of two descriptors.
    crate::error::cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, || "pipe".into())?;
    let (r, w) = (fds[0], fds[1]);
    // SAFETY: fork in a threaded process. The child touches only memory made before the fork
    // and calls only async-signal-safe functions (stat, write, _exit).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above; `st` is a valid writable stat, `c` NUL-terminated.
        unsafe {
            // Only the pipe stays open (as 0): a child holding the daemon's /dev/fuse
            // descriptor would keep a dead daemon's connection alive, and its own stat
            // waiting on it.
            libc::dup2(w, 0);
            if libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32) != 0 {
                // Kernels before 5.9 have no close_range.
                for fd in 1..65536 {
                    libc::close(fd);
                }
            }
            let w = 0;
            let mut st: libc::stat = zeroed();
            if libc::stat(c.as_ptr(), &mut st) == 0 {
                libc::write(w, (&st as *const libc::stat).cast(), size_of::<libc::stat>());
                libc::_exit(0);
            }
            let errno = *libc::__errno_location();
            libc::write(w, (&errno as *const i32).cast(), size_of::<i32>());
            libc::_exit(1);
        }
    }
    // SAFETY: `w` is ours; the child has its own copy.
    unsafe { libc::close(w) };
    // SAFETY: `r` is the pipe's read end, owned here from now on.
    let mut reader = std::fs::File::from(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r) });
    if pid < 0 {
        return Err(Error::io(std::io::Error::last_os_error(), "fork"));
    }
    let mut got = Vec::new();
    let read = std::io::Read::read_to_end(&mut reader, &mut got);
    let mut status = 0;
    // SAFETY: reaps the child started above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    read.map_err(|e| Error::io(e, "reading the probe's answer"))?;
    if got.len() == size_of::<libc::stat>() {
        // SAFETY: the child wrote a whole `stat`, a plain C struct valid for any bytes.
        let mut st: libc::stat = unsafe { zeroed() };
        // SAFETY: `got` holds exactly size_of::<stat>() bytes.
        unsafe { std::ptr::copy_nonoverlapping(got.as_ptr(), (&mut st as *mut libc::stat).cast(), got.len()) };
        return Ok(st);
    }
    let errno = got.get(..4).map_or(libc::EIO, |b| i32::from_ne_bytes(b.try_into().unwrap()));
    Err(Error::new(errno, format!("stat {}: {}", path.display(), std::io::Error::from_raw_os_error(errno))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_stat_does() {
        let d = tempfile::tempdir().unwrap();
        let st = stat_in_child(d.path()).unwrap();
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(d.path()).unwrap();
        assert_eq!((st.st_dev, st.st_ino), (md.dev(), md.ino()));
        assert_eq!(stat_in_child(&d.path().join("absent")).unwrap_err().errno(), libc::ENOENT);
    }
}
