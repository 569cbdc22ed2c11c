//! One envelope on disk, and the rules for it that every user applies the same way: the
//! mount (`fs`), `rekey` and `fsck`. Reading a header (with the block-0 rule), making one
//! lazily (with its rollback), the file's key, its content, re-wrapping, re-encrypting and
//! verifying all live here, so a file gets one verdict whoever asks.
//!
//! The mount holds the file's content lock; the offline tools hold the volume lock or work
//! on headers only (re-wrap's two-slot protocol). On a shared volume other hosts make and
//! re-wrap headers too: the header region is read under a shared OFD lock and written
//! under an exclusive one, and a header is made only by whoever finds the file empty with
//! that lock held, so concurrent first writes agree on one header.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::crypto::FileKey;
use crate::error::{Error, Result};
use crate::file::content::Content;
use crate::file::journal::{self, Change, Target};
use crate::file::Finding;
use crate::format::{decode_region, is_hole, Header, SizeError, SlotError, BLOCK_OVERHEAD};
use crate::sys::range_lock::{self, Held, Kind};
use crate::volume::audit::Requester;
use crate::volume::Volume;

/// An open backing file of the volume, seen as an envelope.
#[derive(Clone, Copy)]
pub struct EnvelopeFile<'a> {
    pub vol: &'a Volume,
    pub file: &'a File,
    /// Names the file in messages and the audit log (computed only when needed).
    pub describe: &'a dyn Fn() -> String,
    /// Who the key operations are for (None: this process).
    pub who: Option<Requester>,
}

/// A header that authenticated and belongs to its content.
pub struct Loaded {
    pub key: Arc<FileKey>,
    pub header: Header,
    /// The slot it came from.
    pub slot: usize,
    /// The whole header region as read.
    pub region: Vec<u8>,
}

/// The reason block 0 refuses a header that otherwise verifies.
pub const PASTED_HEADER: &str =
    "block 0 does not authenticate under this header's key: a tampered block, or a header pasted from another file";

/// What verifying an envelope found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub findings: Vec<Finding>,
    /// The header, when it authenticated (fsck compares file ids across files).
    pub header: Option<Header>,
    pub blocks: u64,
    pub holes: u64,
}

impl EnvelopeFile<'_> {
    /// The backing file's length.
    pub fn backing_len(&self) -> Result<u64> {
        crate::file::backing_len(self.file, self.vol.config.shared)
    }

    /// Read and authenticate the header of a non-empty envelope of backing length `len`,
    /// then check that it belongs to this content: a header pasted from another file
    /// unwraps and verifies, but its key does not open this file's first block.
    pub fn load(&self, len: u64) -> Result<Loaded> {
        match self.lock_header(Kind::Read)? {
            // Other hosts may have grown block 0 since `len` was read.
            Some((_held, fresh)) => {
                let this = EnvelopeFile { file: &fresh, ..*self };
                this.load_held(this.backing_len()?)
            }
            None => self.load_held(len),
        }
    }

    /// `load`, by a caller that holds the file's header lock (or all of the file) itself.
    pub fn load_held(&self, len: u64) -> Result<Loaded> {
        match self.load_header(len)? {
            (loaded, true) => Ok(loaded),
            (_, false) => Err(Error::integrity(crate::error::Integrity::Header, PASTED_HEADER)),
        }
    }

    /// The header: the first slot that authenticates under its own key and whose key opens
    /// block 0; else the first that authenticates, flagged false (pasted, or a torn append
    /// of the only block).
    fn load_header(&self, len: u64) -> Result<(Loaded, bool)> {
        let geo = self.vol.geometry;
        if len < geo.header_size {
            return Err(Error::corrupt(format!("backing file is {len} bytes, shorter than its header region")));
        }
        let mut region = vec![0u8; geo.header_size as usize];
        self.file.read_exact_at(&mut region, 0).map_err(|e| Error::io(e, "reading header"))?;
        let block0 = self.block0(len)?;
        let belongs = |key: &FileKey| -> Result<bool> {
            Ok(match &block0 {
                None => true,
                Some(stored) => {
                    let mut out = vec![0u8; stored.len() - BLOCK_OVERHEAD as usize];
                    key.open_block(0, stored, &mut out).is_ok()
                }
            })
        };
        let (opened, ok) = self.vol.keys.open_header_for(&region, self.describe, self.who, &belongs)?;
        Ok((Loaded { key: opened.key, header: opened.header, slot: opened.slot, region }, ok))
    }

    /// Block 0 as stored, unless it is a hole or absent (then any key fits).
    fn block0(&self, len: u64) -> Result<Option<Vec<u8>>> {
        let geo = self.vol.geometry;
        let first = (len - geo.header_size).min(geo.stored_block_size());
        if first <= BLOCK_OVERHEAD {
            return Ok(None);
        }
        let mut stored = vec![0u8; first as usize];
        self.file.read_exact_at(&mut stored, geo.header_size).map_err(|e| Error::io(e, "reading block 0"))?;
        Ok((!is_hole(&stored)).then_some(stored))
    }

    /// On a shared volume, lock the header region and block 0 (read to check the header
    /// belongs, while another host may be rewriting it); and a new open of the file to
    /// work on them through (see `range_lock::reopen_fresh`).
    fn lock_header(&self, kind: Kind) -> Result<Option<(Held<'_, File>, File)>> {
        if !self.vol.config.shared {
            return Ok(None);
        }
        let len = self.vol.geometry.block_offset(1);
        let held = range_lock::hold(self.file, kind, 0, len)?;
        let fresh = range_lock::reopen_fresh(self.file, 0, len)?;
        Ok(Some((held, fresh)))
    }

    /// Write a new header (fresh file id and DEK) to an empty envelope. If the write fails
    /// the file is put back to 0 bytes, a valid empty envelope, never a stub shorter than
    /// its header. With a journal the header is recorded as an append: a crash inside
    /// its write is cut back to 0 bytes by recovery.
    pub fn create_header(&self, journal: Option<&Target<'_>>) -> Result<Arc<FileKey>> {
        let (region, key) = self.vol.keys.new_header_for(self.describe, self.who)?;
        let change = Change { offset: 0, bytes: &region, chunks: &[region.len()], old_len: 0, then_len: None };
        if let Err(e) = journal::apply(self.file, journal, &key.file_id, &change) {
            let _ = self.file.set_len(0);
            return Err(e.context("writing header"));
        }
        Ok(key)
    }

    /// The key for a change to the file: `loaded` if the caller has it, else the header's,
    /// else (an empty file about to get content, `needs_header`) a new header's. `None`:
    /// the file is empty and stays so.
    pub fn key_for_write(
        &self,
        loaded: Option<&Arc<FileKey>>,
        needs_header: bool,
        journal: Option<&Target<'_>>,
    ) -> Result<Option<Arc<FileKey>>> {
        if let Some(k) = loaded {
            return Ok(Some(k.clone()));
        }
        let len = self.backing_len()?;
        if len > 0 {
            Ok(Some(self.load(len)?.key))
        } else if needs_header {
            let held = self.lock_header(Kind::Write)?;
            let this = match &held {
                Some((_, fresh)) => EnvelopeFile { file: fresh, ..*self },
                None => EnvelopeFile { ..*self },
            };
            // Another host may have made it since the length was read.
            match this.backing_len()? {
                0 => {
                    let key = this.create_header(journal)?;
                    // Other hosts read it once the lock goes: flushed first (see `content`).
                    if held.is_some() {
                        this.file.sync_data().map_err(|e| Error::io(e, "flushing a new header"))?;
                    }
                    Ok(Some(key))
                }
                len => Ok(Some(this.load_held(len)?.key)),
            }
        } else {
            Ok(None)
        }
    }

    /// The content, through `key` (None only for an empty file).
    pub fn content<'k>(&'k self, key: Option<&'k FileKey>) -> Content<'k> {
        Content { file: self.file, geo: self.vol.geometry, key, journal: None, shared: self.vol.config.shared }
    }

    /// Re-wrap the header under the current KEK version. Writes the older slot (at
    /// generation + 1) and fsyncs, then the other (at generation + 2) and fsyncs: at every
    /// instant one slot that verifies holds the DEK. Returns whether anything changed.
    pub fn rewrap(&self) -> Result<bool> {
        let len = self.backing_len()?;
        if len == 0 {
            return Ok(false); // no header yet: it will be made under the current KEK
        }
        let vol = self.vol;
        let held = self.lock_header(Kind::Write)?;
        let this = match &held {
            Some((_, fresh)) => EnvelopeFile { file: fresh, ..*self },
            None => EnvelopeFile { ..*self },
        };
        let l = this.load_held(this.backing_len()?)?;
        let h = &l.header;
        let wanted = vol.keys.records_for_policy(vol.config.policy(), h, &l.key, self.describe, self.who)?;
        let other = 1 - l.slot;
        let other_current = match decode_region(&l.region).into_iter().find(|(i, _)| *i == other) {
            Some((_, Ok(v))) => v.header.records == h.records && l.key.verify_header_tag(&v.authenticated, &v.tag),
            _ => false,
        };
        if wanted.is_none() && other_current {
            return Ok(false);
        }
        let records = wanted.unwrap_or_else(|| h.records.clone());
        let half = vol.geometry.slot_size();
        for (step, slot) in [(1, other), (2, l.slot)] {
            let newer = Header { generation: h.generation + step, records: records.clone(), ..h.clone() };
            let bytes = newer.encode_slot(half, |b| l.key.header_tag(b))?;
            this.file
                .write_all_at(&bytes, (slot * half) as u64)
                .and_then(|_| this.file.sync_data())
                .map_err(|e| Error::io(e, format!("writing header copy {slot}")))?;
        }
        Ok(true)
    }

    /// Check that the header and every block authenticate: the same rules as the mount's.
    /// With `repair`: a damaged header copy is rewritten from its good twin, a torn
    /// trailing fragment is cut, and a last block that does not authenticate (a torn
    /// append) is cut. Other blocks that fail are only reported.
    pub fn verify(&self, path: &Path, repair: bool) -> Verdict {
        let mut v = Verdict::default();
        let finding = |what: String, repaired: bool| Finding { path: path.to_owned(), what, repaired };
        let mut found = |what: String, repaired: bool| v.findings.push(finding(what, repaired));
        let geo = self.vol.geometry;
        let len = match self.backing_len() {
            Ok(l) => l,
            Err(e) => {
                found(format!("cannot stat: {e}"), false);
                return v;
            }
        };
        if len == 0 {
            return v;
        }
        // A torn trailing fragment is cut only once the header shows the file is an
        // envelope of this volume (a hard link to an outside file is never cut).
        let (size, torn) = match geo.plain_size(len) {
            Ok(s) => (s, None),
            Err(SizeError::ShortHeader) => {
                found(format!("{len} bytes: shorter than the header region"), false);
                return v;
            }
            Err(e @ SizeError::TornBlock { plain }) => (plain, Some(e)),
        };
        let len = geo.backing_size(size);
        let (loaded, belongs) = match self.load_header(len) {
            Ok(l) => l,
            Err(e) => {
                found(format!("header: {e}"), false);
                return v;
            }
        };
        if let Some(e) = torn {
            let fixed = repair && self.file.set_len(len).is_ok();
            found(format!("{e} (a crash mid-append?); readable size {size}"), fixed);
        }
        // No slot that authenticates opens block 0 (a slot that does was taken first).
        if !belongs {
            if geo.block_count(size) == 1 {
                // Block 0 is also the last block: a torn append looks the same as a pasted
                // header here, and cutting it loses only bytes that read as EIO anyway.
                let fixed = repair && self.file.set_len(geo.header_size).and_then(|_| self.file.sync_data()).is_ok();
                found(format!("{PASTED_HEADER}; or a torn append of its only block: cutting it leaves 0 bytes"), fixed);
            } else {
                found(format!("header: {PASTED_HEADER}"), false);
            }
            return v;
        }
        // The other slot should hold a valid header too (its generation may be older).
        let half = geo.slot_size();
        let other = 1 - loaded.slot;
        let other_ok = match decode_region(&loaded.region).into_iter().find(|(i, _)| *i == other) {
            Some((_, Ok(s))) => loaded.key.verify_header_tag(&s.authenticated, &s.tag),
            Some((_, Err(SlotError::Empty))) | Some((_, Err(_))) | None => false,
        };
        if !other_ok {
            let good = &loaded.region[loaded.slot * half..(loaded.slot + 1) * half];
            let fixed = repair
                && self.file.write_all_at(good, (other * half) as u64).and_then(|_| self.file.sync_data()).is_ok();
            found(format!("header copy {other} is damaged; copy {} is good", loaded.slot), fixed);
        }
        self.verify_blocks(path, &loaded.key, size, repair, &mut v);
        v.header = Some(loaded.header);
        v
    }

    fn verify_blocks(&self, path: &Path, key: &FileKey, size: u64, repair: bool, v: &mut Verdict) {
        let finding = |what: String, repaired: bool| Finding { path: path.to_owned(), what, repaired };
        let geo = self.vol.geometry;
        let mut stored = Vec::new();
        let mut out = Vec::new();
        let count = geo.block_count(size);
        for i in 0..count {
            let blen = geo.block_len(i, size) as usize;
            stored.resize(blen + BLOCK_OVERHEAD as usize, 0);
            out.resize(blen, 0);
            v.blocks += 1;
            if let Err(e) = self.file.read_exact_at(&mut stored, geo.block_offset(i)) {
                v.findings.push(finding(format!("block {i}: {e}"), false));
                return;
            }
            if is_hole(&stored) {
                v.holes += 1;
            } else if key.open_block(i, &stored, &mut out).is_err() {
                if i + 1 == count {
                    // A crash mid-append leaves a partly written last block. Cutting it keeps
                    // every block that still authenticates; its bytes were unreadable anyway.
                    let cut = geo.block_offset(i);
                    let fixed = repair && self.file.set_len(cut).and_then(|_| self.file.sync_data()).is_ok();
                    let what = format!(
                        "last block {i} does not authenticate and no crash journal on this host covers it \
                         (tampering, or a crash with journal=off or on another host); cutting it leaves {} bytes",
                        i * geo.block_size
                    );
                    v.findings.push(finding(what, fixed));
                } else {
                    v.findings.push(finding(format!("block {i} does not authenticate"), false));
                }
            }
        }
    }
}
