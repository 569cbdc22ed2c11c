//! `key retire`: take an old KEK version out of service for good, but only when nothing
//! can still need it.

use crate::check::key_usage;
use crate::error::{Error, Result};
use crate::volume::Volume;

/// Refuse to retire `version` while the volume key's record uses it, while any header
/// references it (in either slot: the older slot is what opens should the newest be
/// torn), or while some headers cannot be read (they might need it).
pub fn retire_guard(vol: &Volume, version: u32) -> Result<()> {
    let refuse = |msg: String| Err(Error::new(libc::EBUSY, msg));
    if vol.config.volume_key.as_ref().is_some_and(|k| k.kek_version == version) {
        return refuse(format!("KEK version {version} still wraps the volume key: run `envelopefs key rotate` first"));
    }
    let usage = key_usage(vol)?;
    if let Some(n) = usage.any_slot.get(&version) {
        return refuse(format!(
            "KEK version {version} is still referenced by {n} file headers: run `envelopefs rekey --rewrap` first"
        ));
    }
    if usage.unreadable > 0 {
        return refuse(format!(
            "{} file headers could not be read, so they might need version {version}: run fsck first",
            usage.unreadable
        ));
    }
    Ok(())
}

/// Retire `version` once [`retire_guard`] allows it, and record the change in the config.
pub fn retire(vol: &mut Volume, version: u32) -> Result<()> {
    retire_guard(vol, version)?;
    vol.provider.retire(version)?;
    vol.update_config(|_| {})
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::sync::Arc;

    use super::*;
    use crate::fs::{Caller, EncryptedFs, ROOT_INO};
    use crate::rekey;
    use crate::test_support::{open, volume};

    const ROOT: Caller = Caller { uid: 0, gid: 0, pid: 1 };

    fn write_file(dir: &std::path::Path, name: &str) {
        let fs = EncryptedFs::new(Arc::new(open(dir))).unwrap();
        let (_, fh) = fs.create(ROOT_INO, OsStr::new(name), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
        fs.write(fh, 0, b"data", ROOT).unwrap();
        fs.release(fh);
    }

    #[test]
    fn refuses_while_anything_uses_the_version() {
        let d = tempfile::tempdir().unwrap();
        let (backing, _) = volume(d.path());
        write_file(d.path(), "f");
        let mut vol = open(d.path());
        let e = retire_guard(&vol, 1).unwrap_err();
        assert!(e.to_string().contains("still wraps the volume key"), "{e}");

        assert_eq!(vol.provider.rotate().unwrap(), 2);
        vol.update_config(|_| {}).unwrap();
        let e = retire(&mut vol, 1).unwrap_err();
        assert!(e.to_string().contains("referenced by 1 file headers"), "{e}");

        let files = crate::tree::volume_files(&vol.root).unwrap();
        let sum = rekey::run(&vol, rekey::Mode::Rewrap, files, 1, &|_| {});
        assert!(sum.failed.is_empty(), "{:?}", sum.failed);
        // A header nobody can read might need the version.
        std::fs::write(backing.join("junk"), vec![0xA5; 8192]).unwrap();
        let e = retire_guard(&vol, 1).unwrap_err();
        assert!(e.to_string().contains("could not be read"), "{e}");
        std::fs::remove_file(backing.join("junk")).unwrap();

        retire(&mut vol, 1).unwrap();
        assert!(vol.provider.versions().unwrap().iter().any(|v| v.version == 1 && v.retired));
        // The volume still opens, and its file still reads.
        let fs = EncryptedFs::new(Arc::new(open(d.path()))).unwrap();
        let attr = fs.lookup(ROOT_INO, OsStr::new("f")).unwrap();
        let fh = fs.open(attr.ino, libc::O_RDONLY, ROOT).unwrap();
        assert_eq!(fs.read(fh, 0, 16).unwrap(), b"data");
        fs.release(fh);
    }
}
