//! `key retire`: take an old KEK version out of service for good, but only when nothing
//! can still need it.

use crate::error::{Error, Result};
use crate::file::envelope_file::EnvelopeFile;
use crate::format::{decode_region, ProviderKind};
use crate::tools::check::{walk_headers, HeaderRead};
use crate::volume::Volume;

/// Refuse to retire `version` while the volume key's record uses it, while any header
/// that authenticates references it (in either slot: the older slot is what opens should
/// the newest be torn), or while some files could not be read (they might need it).
///
/// What does not authenticate cannot block a retirement: a compromised KEK version must
/// be erasable even when someone planted junk or forged records in the backing directory.
/// Those files are logged and left alone; they never opened under this volume's keys.
pub fn retire_guard(vol: &Volume, version: u32, force: bool) -> Result<()> {
    let refuse = |msg: String| Err(Error::new(libc::EBUSY, msg));
    if vol.config.volume_key.as_ref().is_some_and(|k| k.kek_version == version) {
        return refuse(format!("KEK version {version} still wraps the volume key: run `envelopefs key rotate` first"));
    }
    let primary = vol.config.provider.clone();
    let (mut referencing, mut unreadable, mut ignored) = (0u64, Vec::new(), 0u64);
    let mut failure = None;
    walk_headers(vol, &mut |path, read| {
        let (region, file) = match read {
            HeaderRead::Empty | HeaderRead::Short => return,
            HeaderRead::Unreadable => return unreadable.push(path.to_owned()),
            HeaderRead::Region(r, f) => (r, f),
        };
        let uses = decode_region(region).iter().any(|(_, s)| {
            s.as_ref().is_ok_and(|v| v.header.records.iter().any(|r| primary.claims(r) && r.kek_version == version))
        });
        if !uses || failure.is_some() {
            return;
        }
        let describe = || path.display().to_string();
        let env = EnvelopeFile { vol, file, describe: &describe, who: None };
        // A header that authenticates but was pasted onto other content (an old header
        // copied in) is not a file of the volume either.
        match env.backing_len().and_then(|len| env.load(len)) {
            Ok(_) => referencing += 1,
            // Refused by the key store, or a tag or block 0 that does not verify: never this
            // volume's file.
            Err(e) if e.errno() == libc::EACCES || is_verdict(&e) => {
                tracing::warn!(
                    "{}: names KEK version {version} but does not authenticate ({e}); it does not hold back the retirement",
                    crate::error::printable(&path.display().to_string())
                );
                ignored += 1;
            }
            Err(e) => failure = Some(e.context(path.display())),
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if referencing > 0 && !force {
        return refuse(format!(
            "KEK version {version} is still referenced by {referencing} file headers: run `envelopefs rekey --rewrap` \
             first (or, for a compromised version, `--force`: files with no other record become unreadable)"
        ));
    }
    if !unreadable.is_empty() && !force {
        return refuse(format!(
            "{} files could not be read, so they might need version {version} (first: {}): run fsck first, \
             or retire anyway with --force",
            unreadable.len(),
            crate::error::printable(&unreadable[0].display().to_string())
        ));
    }
    if force && (referencing > 0 || !unreadable.is_empty()) {
        tracing::warn!(
            "retiring KEK version {version} by force: {referencing} headers still reference it and {} files could not be read",
            unreadable.len()
        );
    }
    if ignored > 0 {
        tracing::warn!("{ignored} headers name KEK version {version} without authenticating: left as they are");
    }
    Ok(())
}

/// A verdict on content (EIO with no OS error behind it), not an I/O failure.
fn is_verdict(e: &Error) -> bool {
    e.errno() == libc::EIO && e.class().is_none() && std::error::Error::source(e).is_none()
}

/// Retire `version` once [`retire_guard`] allows it, and record the change in the config.
pub fn retire(vol: &mut Volume, version: u32, force: bool) -> Result<()> {
    let Some(store) = vol.keys.primary().retirement() else {
        return Err(crate::error::usage(match vol.keys.primary().kind() {
            ProviderKind::AwsKms => {
                "KMS keeps every rotation of a key; retire the whole key in KMS (disable it or schedule its \
                 deletion) instead"
            }
            _ => "this key store has no versions to retire; remove its slot instead (`envelopefs key slot remove`)",
        }));
    };
    retire_guard(vol, version, force)?;
    store.retire(version)?;
    vol.update_config(|_| {})
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::sync::Arc;

    use super::*;
    use crate::fs::{Caller, EncryptedFs, ROOT_INO};
    use crate::tools::rekey;
    use crate::volume::testing::{open, volume};

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
        let e = retire_guard(&vol, 1, false).unwrap_err();
        assert!(e.to_string().contains("still wraps the volume key"), "{e}");

        assert_eq!(vol.keys.primary().rotation().unwrap().rotate().unwrap(), 2);
        vol.update_config(|_| {}).unwrap();
        let e = retire(&mut vol, 1, false).unwrap_err();
        assert!(e.to_string().contains("referenced by 1 file headers"), "{e}");

        let files = crate::volume::tree::volume_files(&vol).unwrap();
        let sum = rekey::run(&vol, rekey::Mode::Rewrap, files, 1, &|_| {});
        assert!(sum.failed.is_empty(), "{:?}", sum.failed);
        // Junk of a header's size names no version and cannot block the retirement.
        std::fs::write(backing.join("junk"), vec![0xA5; 8192]).unwrap();
        retire_guard(&vol, 1, false).unwrap();
        std::fs::remove_file(backing.join("junk")).unwrap();

        retire(&mut vol, 1, false).unwrap();
        assert!(vol.keys.primary().versions().unwrap().iter().any(|v| v.version == 1 && v.retired));
        // The volume still opens, and its file still reads.
        let fs = EncryptedFs::new(Arc::new(open(d.path()))).unwrap();
        let attr = fs.lookup(ROOT_INO, OsStr::new("f")).unwrap();
        let fh = fs.open(attr.ino, libc::O_RDONLY, ROOT).unwrap();
        assert_eq!(fs.read(fh, 0, 16).unwrap(), b"data");
        fs.release(fh);
    }
}
