//! Small files the volume and the host own (config, keyring, trust records), read and
//! replaced without following symlinks: the backing directory is untrusted, so a link
//! planted at `NAME` or `NAME.tmp` must never redirect a read or a write elsewhere.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Read a whole file, refusing a symlink in the last component (ELOOP) and anything but a
/// regular file (EINVAL), which is never opened: a FIFO planted there cannot wedge a reader.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let name = crate::sys::cstr(path.as_os_str()).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let opened = crate::sys::open_regular(libc::AT_FDCWD, &name, libc::O_RDONLY).map_err(|e| {
        // ELOOP for a symlink, as an O_NOFOLLOW open says it.
        io::Error::from_raw_os_error(e.errno())
    })?;
    let Some((mut f, _)) = opened else {
        let link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        return Err(io::Error::from_raw_os_error(if link { libc::ELOOP } else { libc::EINVAL }));
    };
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// The temporary name releases before this one wrote first: a leftover there is removed.
pub fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Replace `path` atomically with `bytes` (`sys::write_new_at`: a fresh temporary, synced,
/// renamed over it, so a link or FIFO planted at `path` is replaced, never written
/// through), then fsync the directory. A crash leaves the old file or the new one.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    match fs::remove_file(temp_name(path)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dir = File::open(dir)?;
    let os = |e: crate::error::Error| io::Error::from_raw_os_error(e.errno());
    let name = crate::sys::cstr(name).map_err(os)?;
    crate::sys::write_new_at(dir.as_raw_fd(), &name, bytes, mode).map_err(os)?;
    dir.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_never_writes_through_a_planted_link() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let target = d.path().join("cfg");
        std::os::unix::fs::symlink(&victim, temp_name(&target)).unwrap();
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        replace(&target, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(fs::symlink_metadata(&target).unwrap().is_file());
        assert_eq!(read(&target).unwrap(), b"new");
        assert!(!temp_name(&target).exists());
    }

    #[test]
    fn read_refuses_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("real"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
        assert_eq!(read(&d.path().join("link")).unwrap_err().raw_os_error(), Some(libc::ELOOP));
    }
}
