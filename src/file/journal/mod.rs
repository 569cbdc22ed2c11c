//! The crash journal. Before the mount changes an envelope's backing bytes it writes one
//! record of the change here, so that a change a crash cut short is finished or cut back
//! at the next mount (`recovery`) instead of leaving a block that reads as EIO.
//!
//! A stored block is rewritten in place; a write torn between pages (a fatal signal inside
//! one `pwrite`, or a power cut) leaves it half old, half new, and no key opens it. So:
//! - an **overwrite** (any change that starts inside the file) is kept whole: its sealed
//!   bytes and the length the file has after it. Recovery writes them again.
//! - an **append** (a change that starts at or past the end) keeps only the CRC of each
//!   stored chunk (the header region, then each block). Recovery keeps the chunks that
//!   arrived whole and cuts the file before the first that did not.
//! - a **length change** keeps the new length.
//!
//! Changes to one file are serialised by its content lock, so only the newest change of a
//! file can have been cut short; recovery looks at that one alone.
//!
//! The journal is host state, kept beside the trust records (`TrustStore::dir`), never in
//! the backing directory: whoever can write the backing directory cannot write it, so
//! recovery can act on it without authenticating it, and the backing directory's format
//! does not change. Two files alternate: a checkpoint moves new records to the other file,
//! waits for the changes recorded in the old one, `syncfs`es the backing filesystem (every
//! change in the old file is then durable) and empties it.

mod records;

pub use records::{decode_for_fuzzing, exists, read};
use records::{encode_change, frame, record_head};

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};
use crate::format::FILE_ID_LEN;

pub const MAGIC: &[u8; 8] = b"EFSJRNL1";
/// magic (8) ‖ volume id (16) ‖ zeros (8).
const HEADER_LEN: u64 = 32;
/// A journal file this long is checkpointed (in the background; writers go on in the other).
pub const DEFAULT_LIMIT: u64 = 64 << 20;
const KIND_FILE: u8 = 1;
const KIND_CHANGE: u8 = 2;
const KEEPS_BYTES: u8 = 1;

pub use crate::format::FileId;

/// How the mount keeps the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// No journal: a crash inside a write can leave a block that reads as EIO.
    Off,
    /// Each record is written before its change, without a flush: complete after a kill
    /// of the daemon, and after a power cut on storage that persists writes in order.
    #[default]
    Ordered,
    /// Each record is flushed (`fdatasync`) before its change: complete after a power cut
    /// on any storage, at the cost of a flush per change.
    Sync,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Mode::Off),
            "ordered" => Ok(Mode::Ordered),
            "sync" => Ok(Mode::Sync),
            _ => Err(crate::error::usage(format!("journal mode {s:?}: expected ordered, sync or off"))),
        }
    }
}

/// One backing change as it is about to be made.
pub struct Change<'a> {
    pub offset: u64,
    pub bytes: &'a [u8],
    /// Lengths of the stored chunks `bytes` is made of (CRC'd one by one for an append).
    pub chunks: &'a [usize],
    /// The backing length before the change.
    pub old_len: u64,
    /// The length after it, when the change ends with a truncate.
    pub then_len: Option<u64>,
}

/// A change as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Write `bytes` at `offset`, then make the file `result_len` bytes long.
    Overwrite { offset: u64, bytes: Vec<u8>, result_len: u64 },
    /// Chunks (length, CRC-32) appended from `offset`.
    Append { offset: u64, chunks: Vec<(u32, u32)>, result_len: u64 },
    /// `ftruncate` to `len`.
    SetLen { len: u64 },
}

/// Which backing file a change is for: its file id (from its header), and where it was.
pub struct FileRef<'a> {
    pub file_id: FileId,
    pub ino: u64,
    /// Its path relative to the backing root (asked for once per file and journal file).
    pub path: &'a dyn Fn() -> Vec<u8>,
}

/// A file the journal names, as recovery sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub file_id: FileId,
    pub ino: u64,
    pub path: Vec<u8>,
    /// Its newest change.
    pub change: Recorded,
}

/// A backing write as it happens (what a power-cut simulation replays).
pub enum Observed<'a> {
    Write { offset: u64, bytes: &'a [u8] },
    SetLen(u64),
}

/// Sees every write to the journal and through it, in order (tests replay them).
pub type Observer = Arc<dyn Fn(&File, Observed<'_>) + Send + Sync>;

struct State {
    len: [u64; 2],
    /// How much of each file is known flushed (sync mode).
    synced: [u64; 2],
    active: usize,
    seq: u64,
    /// Changes recorded in each file whose backing write has not finished.
    inflight: [usize; 2],
    /// Files whose path record is in each journal file.
    known: [HashSet<FileId>; 2],
    checkpointing: bool,
}

pub struct Journal {
    paths: [PathBuf; 2],
    files: [File; 2],
    /// Held by the one writer flushing for everyone (sync mode's group commit); true once a
    /// flush failed.
    flushing: Mutex<bool>,
    flushes: std::sync::atomic::AtomicU64,
    mode: Mode,
    limit: u64,
    /// The backing root, for `syncfs`.
    root: OwnedFd,
    state: Mutex<State>,
    drained: Condvar,
    observer: Option<Observer>,
}

/// The journal's files for a volume in `dir`. `name` says which volume and where
/// (`Volume::journal_name`): two copies of a volume never share a journal.
pub fn paths(dir: &Path, name: &str) -> [PathBuf; 2] {
    let id = name.to_ascii_lowercase();
    [dir.join(format!("{id}.journal.0")), dir.join(format!("{id}.journal.1"))]
}

/// The name of `vol`'s journal on this host: its id and its place, so two copies of a
/// volume (a restored backup beside the original) never share one.
pub fn name_of(vol: &crate::volume::Volume) -> String {
    name_for(&vol.config.volume_id, vol.place())
}

/// The journal name of releases that keyed it by volume id alone: recovered at the
/// volume's first accepted place, where that release ran.
pub fn legacy_name_of(vol: &crate::volume::Volume) -> Option<String> {
    vol.at_first_place().then(|| vol.config.volume_id.to_ascii_lowercase())
}

/// The journal name of volume `volume_id` at `place` (its canonical backing path).
pub fn name_for(volume_id: &str, place: &Path) -> String {
    let h = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, place.as_os_str().as_encoded_bytes());
    format!("{}-{}", volume_id.to_ascii_lowercase(), hex::encode(&h.as_ref()[..8]))
}

fn io(e: std::io::Error, what: &str, path: &Path) -> Error {
    Error::io(e, format!("{what} crash journal {}", path.display()))
}

/// Make the backing filesystem's every completed write durable.
pub fn syncfs(root: &OwnedFd) -> Result<()> {
    rustix::fs::syncfs(root).map_err(|e| Error::io(e.into(), "syncfs of the backing filesystem"))
}

impl Journal {
    /// Start new journal files for a volume. Any earlier ones must have been recovered
    /// (`read`) first: they are replaced.
    pub fn create(
        dir: &Path,
        name: &str,
        volume_id: &str,
        root: &Path,
        mode: Mode,
        limit: u64,
        observer: Option<Observer>,
    ) -> Result<Arc<Self>> {
        let paths = paths(dir, name);
        let id = hex::decode(volume_id).map_err(|_| Error::new(libc::EINVAL, "volume id is not hex"))?;
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..8 + id.len().min(16)].copy_from_slice(&id[..id.len().min(16)]);
        let mut files = Vec::new();
        for p in &paths {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(p)
                .map_err(|e| io(e, "creating", p))?;
            f.write_all_at(&header, 0).and_then(|_| f.sync_all()).map_err(|e| io(e, "writing", p))?;
            files.push(f);
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(e, "syncing the directory of", &paths[0]))?;
        let root = crate::sys::openat(
            libc::AT_FDCWD,
            &crate::sys::cstr(root.as_os_str())?,
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        let files: [File; 2] = files.try_into().map_err(|_| Error::new(libc::EIO, "journal files"))?;
        let state = State {
            len: [HEADER_LEN; 2],
            synced: [HEADER_LEN; 2],
            active: 0,
            seq: 0,
            inflight: [0; 2],
            known: [HashSet::new(), HashSet::new()],
            checkpointing: false,
        };
        Ok(Arc::new(Self {
            paths,
            files,
            flushing: Mutex::new(false),
            flushes: Default::default(),
            mode,
            limit,
            root,
            state: Mutex::new(state),
            drained: Condvar::new(),
            observer,
        }))
    }

    /// Flushes of records (sync mode) since the journal started (for the metrics endpoint).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records written since the journal started (for the metrics endpoint).
    pub fn records(&self) -> u64 {
        self.state.lock().unwrap().seq
    }

    pub fn observer(&self) -> Option<&Observer> {
        self.observer.as_ref()
    }

    /// Record `change` of `file`, before making it. The change is covered until the
    /// returned guard is dropped, which the caller does once the backing write is done.
    pub fn record(self: &Arc<Self>, file: &FileRef<'_>, change: &Change<'_>) -> Result<InFlight> {
        let mut out = Vec::with_capacity(96 + if change.offset < change.old_len { change.bytes.len() } else { 0 });
        let mut st = self.state.lock().unwrap();
        let idx = st.active;
        if !st.known[idx].contains(&file.file_id) {
            let path = (file.path)();
            st.seq += 1;
            let mut body = record_head(st.seq, KIND_FILE, &file.file_id);
            body.extend_from_slice(&file.ino.to_le_bytes());
            body.extend_from_slice(&(path.len() as u16).to_le_bytes());
            body.extend_from_slice(&path[..path.len().min(u16::MAX as usize)]);
            frame(&mut out, &body);
            st.known[idx].insert(file.file_id);
        }
        st.seq += 1;
        let mut body = record_head(st.seq, KIND_CHANGE, &file.file_id);
        encode_change(&mut body, change);
        frame(&mut out, &body);
        let at = st.len[idx];
        let f = &self.files[idx];
        if let Some(obs) = &self.observer {
            obs(f, Observed::Write { offset: at, bytes: &out });
        }
        // Records go in one after another, under the lock: the file never has a gap.
        f.write_all_at(&out, at).map_err(|e| io(e, "writing", &self.paths[idx]))?;
        st.len[idx] += out.len() as u64;
        let end = st.len[idx];
        st.inflight[idx] += 1;
        let checkpoint = st.len[idx] > self.limit && !st.checkpointing;
        if checkpoint {
            st.checkpointing = true;
        }
        drop(st);
        let held = InFlight { journal: self.clone(), idx, checkpoint };
        if self.mode == Mode::Sync {
            self.flush_to(idx, end)?;
        }
        Ok(held)
    }

    /// Make file `idx` durable up to `end`. Writers that arrive while one flushes wait,
    /// then find their records covered by it, or flush once for all who came meanwhile
    /// (group commit): one fdatasync per round of writers, not per record.
    fn flush_to(&self, idx: usize, end: u64) -> Result<()> {
        let mut broken = self.flushing.lock().unwrap();
        // After a failed flush the kernel reports the error once: a later flush would say
        // records durable that may not be. The journal stays failed.
        if *broken {
            return Err(Error::new(libc::EIO, format!("{}: an earlier flush failed", self.paths[idx].display())));
        }
        let target = {
            let st = self.state.lock().unwrap();
            if st.synced[idx] >= end {
                return Ok(());
            }
            st.len[idx]
        };
        if let Err(e) = self.files[idx].sync_data() {
            *broken = true;
            return Err(io(e, "flushing", &self.paths[idx]));
        }
        self.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut st = self.state.lock().unwrap();
        st.synced[idx] = st.synced[idx].max(target);
        Ok(())
    }

    fn finished(self: &Arc<Self>, idx: usize, checkpoint: bool) {
        let mut st = self.state.lock().unwrap();
        st.inflight[idx] -= 1;
        drop(st);
        self.drained.notify_all();
        if checkpoint {
            let j = self.clone();
            std::thread::spawn(move || {
                if let Err(e) = j.checkpoint() {
                    tracing::warn!("crash journal checkpoint failed (the journal keeps growing): {e}");
                }
            });
        }
    }

    /// Move new records to the other file, then empty this one once every change it
    /// records is durable. The caller has set `checkpointing`.
    fn checkpoint(&self) -> Result<()> {
        let old = {
            let mut st = self.state.lock().unwrap();
            let old = st.active;
            st.active = 1 - old;
            old
        };
        let res = self.empty(old);
        self.state.lock().unwrap().checkpointing = false;
        res
    }

    fn empty(&self, idx: usize) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        while st.inflight[idx] > 0 {
            st = self.drained.wait(st).unwrap();
        }
        drop(st);
        syncfs(&self.root)?;
        let mut st = self.state.lock().unwrap();
        let f = &self.files[idx];
        if let Some(obs) = &self.observer {
            obs(f, Observed::SetLen(HEADER_LEN));
        }
        f.set_len(HEADER_LEN).and_then(|_| f.sync_data()).map_err(|e| io(e, "emptying", &self.paths[idx]))?;
        st.len[idx] = HEADER_LEN;
        st.synced[idx] = HEADER_LEN;
        st.known[idx].clear();
        Ok(())
    }

    /// End of the mount: once every change is done and durable, the journal goes.
    pub fn close(&self) -> Result<()> {
        for idx in 0..2 {
            let mut st = self.state.lock().unwrap();
            while st.inflight[idx] > 0 || st.checkpointing {
                st = self.drained.wait_timeout(st, std::time::Duration::from_millis(50)).unwrap().0;
            }
        }
        syncfs(&self.root)?;
        remove(&self.paths)
    }
}

/// Remove a volume's journal files (after recovery, or at the end of a mount).
pub fn remove(paths: &[PathBuf; 2]) -> Result<()> {
    for p in paths {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e, "removing", p)),
        }
    }
    if let Some(dir) = paths[0].parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(e, "syncing the directory of", &paths[0]))?;
    }
    Ok(())
}

/// Where a change to one open envelope is recorded: the mount's journal and the file.
pub struct Target<'a> {
    pub journal: &'a Arc<Journal>,
    /// The backing inode number.
    pub ino: u64,
    pub path: &'a dyn Fn() -> Vec<u8>,
}

/// Make `change` to `file` (the envelope `file_id`): make sure of its backing space,
/// record it in the journal if there is one, write its bytes, then truncate if it ends so.
///
/// A full disk must never cost a byte that was already durable. A stored block is
/// rewritten in place, so a write that runs out of space part-way would leave a block
/// half old, half new, which no key opens. Space is therefore reserved before anything is
/// touched (an ENOSPC then changes nothing), and where the filesystem cannot reserve, the
/// part past the old end is written first and cut back if it fails.
pub fn apply(file: &File, target: Option<&Target<'_>>, file_id: &FileId, change: &Change<'_>) -> Result<()> {
    let end = change.offset + change.bytes.len() as u64;
    let reserved = !change.bytes.is_empty() && reserve(file, change.offset, change.bytes.len() as u64)?;
    let _covered = match target {
        Some(t) => Some(t.journal.record(&FileRef { file_id: *file_id, ino: t.ino, path: t.path }, change)?),
        None => None,
    };
    let observer = target.and_then(|t| t.journal.observer());
    if !change.bytes.is_empty() {
        // Without a reservation, the bytes past the old end go first: if they find no
        // space, cutting back to the old length undoes them and nothing else was touched.
        let split = if reserved || end <= change.old_len { 0 } else { change.old_len.saturating_sub(change.offset) };
        for (at, bytes) in
            [(change.offset + split, &change.bytes[split as usize..]), (change.offset, &change.bytes[..split as usize])]
        {
            if bytes.is_empty() {
                continue;
            }
            if let Some(obs) = observer {
                obs(file, Observed::Write { offset: at, bytes });
            }
            if let Err(e) = file.write_all_at(bytes, at) {
                let err = Error::io(e, format!("writing {} bytes at {at}", bytes.len()));
                if at >= change.old_len {
                    // Nothing before the old end was touched yet: drop the partial tail.
                    if let Err(cut) = file.set_len(change.old_len) {
                        tracing::warn!("cutting a failed write back to {} bytes: {cut}", change.old_len);
                    }
                }
                return Err(err);
            }
        }
    }
    if let Some(len) = change.then_len {
        if let Some(obs) = observer {
            obs(file, Observed::SetLen(len));
        }
        file.set_len(len).map_err(|e| Error::io(e, format!("truncating to {len}")))?;
    }
    Ok(())
}

/// Reserve backing space for `len` bytes at `offset` without changing the file's length.
/// `Ok(false)` where the filesystem cannot reserve space; ENOSPC and EDQUOT are errors.
fn reserve(file: &File, offset: u64, len: u64) -> Result<bool> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(file, FallocateFlags::KEEP_SIZE, offset, len) {
        Ok(()) => Ok(true),
        Err(e)
            if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS || e == rustix::io::Errno::INVAL =>
        {
            Ok(false)
        }
        Err(e) => Err(Error::io(e.into(), format!("reserving {len} bytes at {offset} before writing them"))),
    }
}

/// Held while a recorded change is being made.
pub struct InFlight {
    journal: Arc<Journal>,
    idx: usize,
    checkpoint: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.journal.finished(self.idx, self.checkpoint);
    }
}

enum Rec {
    File { seq: u64, file_id: FileId, ino: u64, path: Vec<u8> },
    Change { seq: u64, file_id: FileId, change: Recorded },
}

#[cfg(test)]
mod tests;
