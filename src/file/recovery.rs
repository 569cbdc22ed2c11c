//! Crash recovery: what the journal (`journal`) left after a crash is put right before the
//! volume is used again, by the next mount or by `fsck --repair`. For each file it names,
//! the newest change is finished (an overwrite is written again), cut back (an append is
//! cut before its first chunk that did not arrive whole) or redone (a truncate). Each file
//! touched is reported with what was done and why.
//!
//! The journal is host state (never in the backing directory), so its records are acted
//! on as they stand. On a shared volume other hosts may have written the file since the
//! crash: a change is then put right only where the file does not read back whole (a
//! block that does not authenticate, a torn length), under a lock of the range, so that
//! no later write of another host is undone. A file is acted on only once it is known to be the one recorded: its
//! header names the recorded file id (a header being created, which has no id to read
//! yet, must be at the recorded path and inode both).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::file::journal::{self, FileId, Pending, Recorded};
use crate::file::Finding;
use crate::format::decode_region;
use crate::volume::tree::{open_regular, Tree};
use crate::volume::Volume;

/// What recovery would do, without doing it (fsck without `--repair`): only the files a
/// crash left half changed.
pub fn describe_pending(vol: &Volume) -> Result<Vec<Finding>> {
    let mut out = run(vol, false)?;
    for t in &mut out {
        t.what = format!("{} (not yet done: the next mount or `fsck --repair` does it)", t.what);
    }
    Ok(out)
}

fn summary(c: &Recorded) -> String {
    match c {
        Recorded::Overwrite { offset, bytes, .. } => format!("an overwrite of {} bytes at {offset}", bytes.len()),
        Recorded::Append { offset, chunks, .. } => format!("an append of {} chunks at {offset}", chunks.len()),
        Recorded::SetLen { len } => format!("a truncate to {len} bytes"),
    }
}

/// Put right every file the journal names, make the result durable, then drop the journal.
/// Nothing to do (and `Ok(vec![])`) when there is no journal.
pub fn recover(vol: &Volume) -> Result<Vec<Finding>> {
    // A journal left behind means the last mount did not end cleanly: temporaries it was
    // writing (long-name side files, stored targets) may be left too. Its originals are
    // intact, so they go. Only then: a walk of the whole tree is no price for every mount.
    let crashed = journal_names(vol).iter().any(|n| journal::exists(&vol.journal_dir(), n));
    let out = run(vol, true)?;
    for t in &out {
        tracing::warn!("crash recovery: {}: {}", t.path.display(), t.what);
    }
    if crashed {
        let n = crate::volume::tree::remove_stale_temporaries(vol)?;
        if n > 0 {
            tracing::info!("crash recovery: removed {n} temporary file(s) the crash left");
        }
    }
    Ok(out)
}

/// The journal names this volume may have here (its own, and the one of earlier releases).
fn journal_names(vol: &Volume) -> Vec<String> {
    std::iter::once(journal::name_of(vol)).chain(journal::legacy_name_of(vol)).collect()
}

/// Find each file the journal names and settle its newest change (`act`), or say what
/// settling it would do.
fn run(vol: &Volume, act: bool) -> Result<Vec<Finding>> {
    let flags = if act { libc::O_RDWR } else { libc::O_RDONLY };
    let dir = vol.journal_dir();
    let id = &vol.config.volume_id;
    let names = journal_names(vol);
    let names: Vec<&String> = names.iter().filter(|n| journal::exists(&dir, n)).collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut pending = Vec::new();
    for n in &names {
        pending.extend(journal::read(&dir, n, id)?);
    }
    let tree = Tree::open(vol)?;
    let mut out = Vec::new();
    let mut unplaced: HashMap<u64, Vec<Pending>> = HashMap::new();
    for p in pending {
        match by_path(vol, &tree, &p, flags) {
            Some((file, path)) => out.extend(settle(vol, &file, &path, &p, act)),
            None => unplaced.entry(p.ino).or_default().push(p),
        }
    }
    if !unplaced.is_empty() {
        // Renamed since it was recorded: found by inode number, then checked by file id.
        let mut found: HashMap<FileId, (File, PathBuf)> = HashMap::new();
        tree.walk(&mut |e| {
            let Ok(st) = crate::sys::fstatat_nofollow(e.dir, e.name) else { return };
            let Some(list) = unplaced.get(&st.st_ino) else { return };
            if let Ok(Some((file, _))) = open_regular(e.dir, e.name, flags) {
                let rel = e.path.strip_prefix(&vol.root).unwrap_or(e.path).to_owned();
                if let Some(fid) = header_file_id(vol, &file).filter(|f| list.iter().any(|p| p.file_id == *f)) {
                    found.insert(fid, (file, rel));
                }
            }
        })?;
        for list in unplaced.into_values() {
            for p in list {
                match found.get(&p.file_id) {
                    Some((file, path)) => out.extend(settle(vol, file, path, &p, act)),
                    None => tracing::info!(
                        "crash journal: file id {} ({}) is no longer in the volume; nothing to recover",
                        hex::encode(p.file_id),
                        String::from_utf8_lossy(&p.path)
                    ),
                }
            }
        }
    }
    if act {
        for n in &names {
            journal::remove(&journal::paths(&dir, n))?;
        }
    }
    Ok(out)
}

/// The file at the recorded path, if it is the recorded one.
fn by_path(vol: &Volume, tree: &Tree, p: &Pending, flags: i32) -> Option<(File, PathBuf)> {
    if p.path.is_empty() {
        return None;
    }
    let path = vol.root.join(OsStr::from_bytes(&p.path));
    let (dir, name) = tree.resolve(&path).ok()?;
    let (file, st) = open_regular(std::os::unix::io::AsRawFd::as_raw_fd(&dir), &name, flags).ok()??;
    let ok = match header_file_id(vol, &file) {
        Some(fid) => fid == p.file_id,
        // A header that was being written has no id to read: path and inode must agree.
        None => st.st_ino == p.ino && matches!(p.change, Recorded::Append { offset: 0, .. }),
    };
    ok.then(|| (file, PathBuf::from(OsStr::from_bytes(&p.path))))
}

/// The file id a header slot names (read without a key: the CRC vouches for the slot).
fn header_file_id(vol: &Volume, file: &File) -> Option<FileId> {
    let mut region = vec![0u8; vol.geometry.header_size as usize];
    file.read_exact_at(&mut region, 0).ok()?;
    decode_region(&region).into_iter().find_map(|(_, s)| s.ok().map(|v| v.header.file_id))
}

/// Finish or cut back the newest change of one file.
fn settle(vol: &Volume, file: &File, path: &Path, p: &Pending, act: bool) -> Option<Finding> {
    let touched = |what: String, repaired: bool| Finding { path: path.to_owned(), what, repaired };
    let shared = if vol.config.shared {
        // The whole file, header included: recovery is rare. (A second lock of the header,
        // through another open, would wait for this one.)
        let len = crate::file::content::CONTENT_LOCKS_END;
        match crate::sys::range_lock::hold(file, crate::sys::range_lock::Kind::Write, 0, len) {
            Ok(held)
                if crate::sys::range_lock::reopen_fresh(file, 0, 0).is_ok_and(|f| reads_whole(vol, &f, &p.change)) =>
            {
                drop(held);
                return None;
            }
            Ok(held) => Some(held),
            Err(e) => return Some(touched(format!("{} could not be locked: {e}", summary(&p.change)), false)),
        }
    } else {
        None
    };
    let _held = shared;
    match apply(vol, file, &p.change, act) {
        Ok(None) => None,
        Ok(Some(what)) if !act => Some(touched(what, false)),
        Ok(Some(what)) => match file.sync_data() {
            Ok(()) => Some(touched(what, true)),
            Err(e) => Some(touched(format!("{what}, but flushing it failed: {e}"), false)),
        },
        Err(e) => Some(touched(format!("{} could not be recovered: {e}", summary(&p.change)), false)),
    }
}

/// Whether the blocks `change` touched, as they stand, authenticate under the file's
/// header, and its length is whole: the change completed, never began, or another host
/// has written there since. Either way there is nothing to put right.
fn reads_whole(vol: &Volume, file: &File, change: &Recorded) -> bool {
    let geo = vol.geometry;
    let Ok(len) = crate::sys::range_lock::fresh_len(file) else { return false };
    if len == 0 {
        return true;
    }
    let Ok(size) = geo.plain_size(len) else { return false };
    let describe = || "a file of the crash journal".to_owned();
    let env = crate::file::envelope_file::EnvelopeFile { vol, file, describe: &describe, who: None };
    let Ok(loaded) = env.load_held(len) else { return false };
    let index = |stored: u64| stored.saturating_sub(geo.header_size) / geo.stored_block_size();
    let (first, last) = match change {
        Recorded::Overwrite { offset, bytes, .. } => (index(*offset), index(offset + bytes.len() as u64 - 1)),
        Recorded::Append { offset, .. } => (index(*offset), u64::MAX),
        Recorded::SetLen { len } => (index(*len).saturating_sub(1), u64::MAX),
    };
    let last = last.min(geo.block_count(size).saturating_sub(1));
    let mut out = Vec::new();
    (first..=last).filter(|i| *i < geo.block_count(size)).all(|i| {
        let blen = geo.block_len(i, size) as usize;
        let Some(stored) = read_at(file, geo.block_offset(i), blen + crate::format::BLOCK_OVERHEAD as usize, len)
        else {
            return false;
        };
        out.resize(blen, 0);
        crate::format::is_hole(&stored) || loaded.key.open_block(i, &stored, &mut out).is_ok()
    })
}

fn read_at(file: &File, offset: u64, len: usize, file_len: u64) -> Option<Vec<u8>> {
    if offset + len as u64 > file_len {
        return None;
    }
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}

/// Whether a stored chunk at file offset `at` holds a whole sector of zeros: a sector that
/// was never written (a sealed block has one with probability 2^-4096). A torn append is
/// one that stops early (the file is short) or leaves such a sector; a block that is whole
/// and wrong was changed by someone else.
fn has_unwritten_sector(chunk: &[u8], at: u64) -> bool {
    const SECTOR: u64 = 512;
    let first = at.div_ceil(SECTOR) * SECTOR;
    let end = at + chunk.len() as u64;
    (first..end)
        .step_by(SECTOR as usize)
        .take_while(|s| s + SECTOR <= end)
        .any(|s| chunk[(s - at) as usize..(s - at + SECTOR) as usize].iter().all(|&b| b == 0))
}

/// What was done to `file` for `change`; `None` when the change had completed.
/// With `act` false nothing is written: the answer says what would be done.
fn apply(vol: &Volume, file: &File, change: &Recorded, act: bool) -> Result<Option<String>> {
    let len = file.metadata().map_err(|e| Error::io(e, "fstat"))?.len();
    let io = |e: std::io::Error| Error::io(e, "recovery write");
    let write_at = |bytes: &[u8], at: u64| if act { file.write_all_at(bytes, at).map_err(io) } else { Ok(()) };
    let set_len = |l: u64| if act { file.set_len(l).map_err(io) } else { Ok(()) };
    let geo = vol.geometry;
    let plain =
        |l: u64| geo.plain_size(l).map(|s| format!("{s} bytes")).unwrap_or_else(|_| format!("{l} stored bytes"));
    match change {
        Recorded::Overwrite { offset, bytes, result_len } => {
            let same = read_at(file, *offset, bytes.len(), len).is_some_and(|b| b == *bytes);
            if same && len == *result_len {
                return Ok(None);
            }
            if !same {
                write_at(bytes, *offset)?;
            }
            set_len(*result_len)?;
            Ok(Some(format!(
                "an overwrite of {} bytes at stored offset {offset} was cut short by a crash; \
                 finished from the journal (the file is {})",
                bytes.len(),
                plain(*result_len)
            )))
        }
        Recorded::Append { offset, chunks, .. } => {
            let mut pos = *offset;
            for &(n, crc) in chunks {
                let Some(bytes) = read_at(file, pos, n as usize, len) else { break };
                if crc32fast::hash(&bytes) != crc {
                    if pos > 0 && !has_unwritten_sector(&bytes, pos) {
                        // Whole and unlike what was written: not a crash's doing. Left as it
                        // is, it reads as EIO and fsck reports it.
                        return Err(Error::corrupt(format!(
                            "the block at stored offset {pos} is whole but differs from what was written: \
                             changed by someone else, left as it is"
                        )));
                    }
                    break;
                }
                pos += n as u64;
            }
            if len <= pos {
                return Ok(None);
            }
            set_len(pos)?;
            let what = if pos == 0 {
                "its header was being written when a crash cut it short; cut back to an empty file".to_owned()
            } else {
                format!(
                    "an append was cut short by a crash; cut back to its last whole block (the file is {})",
                    plain(pos)
                )
            };
            Ok(Some(what))
        }
        Recorded::SetLen { len: want } => {
            if len == *want {
                return Ok(None);
            }
            set_len(*want)?;
            Ok(Some(format!("a truncate to {} was cut short by a crash; redone", plain(*want))))
        }
    }
}
