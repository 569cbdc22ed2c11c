//! Small files the volume and the host own (config, keyring, trust records), read and
//! replaced without following symlinks: the backing directory is untrusted, so a link
//! planted at `NAME` or `NAME.tmp` must never redirect a read or a write elsewhere.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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

/// The temporary name `replace` writes first.
pub fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Replace `path` atomically with `bytes`: a fresh temp file (O_EXCL|O_NOFOLLOW, so a planted
/// link or file at the temp name is removed, never written through), fsync, rename, fsync
/// of the directory. A crash leaves the old file or the new one.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_name(path);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let written = f.write_all(bytes).and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|_| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
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
