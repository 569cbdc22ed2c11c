//! The block layer: plaintext reads, writes, truncates and allocations of one envelope,
//! translated into sealed blocks of its backing file. The caller holds the file's content
//! lock (shared for reads, exclusive for the rest), which orders this host's changes.
//!
//! On a shared volume other hosts change the file too. Each change then holds an OFD lock
//! on the backing range it reads and rewrites: the blocks it touches, or, when it may
//! change the file's length, everything from the first of them on. So no host rewrites a
//! block from a read another host's write has made stale, and no host takes another's
//! append in progress for a torn one. Reads take no lock: a block that does not
//! authenticate is read again under a shared lock before it is called damaged. Under a
//! lock the file is read and written through a new open (`range_lock::reopen_fresh`), and
//! a change is flushed before its lock goes (`publish`): a shared filesystem's client may
//! otherwise serve what it read before, or keep what it was given to write.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::crypto::{fill_random, FileKey};
use crate::error::{Error, Result};
use crate::file::journal::{self, Change, Target};
use crate::format::{is_hole, Geometry, SizeError, BLOCK_OVERHEAD, NONCE_LEN};
use crate::sys::range_lock::{self, Held, Kind};

/// Locks on stored content lie below this backing offset ("to the end" stops here); the
/// locks users take through the mount lie above it (`fs::locks`), so the two never meet.
pub const CONTENT_LOCKS_END: u64 = 1 << 62;

/// One envelope's content, seen through its key.
#[derive(Clone, Copy)]
pub struct Content<'a> {
    pub file: &'a File,
    pub geo: Geometry,
    /// `None` only while the backing file is empty (no header yet).
    pub key: Option<&'a FileKey>,
    /// Where changes are recorded before they are made (the mount's crash journal).
    pub journal: Option<&'a Target<'a>>,
    /// Other hosts change the file too (a shared volume): lock what is changed.
    pub shared: bool,
}

/// What a change holds on a shared volume: the range it rewrites, a new open of the file
/// to work through, and whether that range reaches the end of the file (only then may it
/// change the length).
struct Range<'a> {
    _held: Option<Held<'a, File>>,
    fresh: Option<File>,
    to_end: bool,
}

impl<'a> Content<'a> {
    /// This content through the range's new open, if it has one.
    fn through<'b>(&self, range: &'b Range<'_>) -> Content<'b>
    where
        'a: 'b,
    {
        Content { file: range.fresh.as_ref().unwrap_or(self.file), ..*self }
    }
}

impl Content<'_> {
    fn backing_len(&self) -> Result<u64> {
        crate::file::backing_len(self.file, self.shared)
    }

    /// Plaintext size. A torn last block (a crash mid-append) is left out: the file reads
    /// up to the blocks before it, and the next write or truncate overwrites it.
    pub fn size(&self) -> Result<u64> {
        self.size_of(self.backing_len()?)
    }

    fn size_of(&self, len: u64) -> Result<u64> {
        match self.geo.plain_size(len) {
            Ok(s) => Ok(s),
            Err(SizeError::TornBlock { plain }) => Ok(plain),
            Err(e) => Err(size_error(e, len)),
        }
    }

    fn key(&self) -> Result<&FileKey> {
        self.key.ok_or_else(|| Error::corrupt("envelope has no key loaded"))
    }

    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        match self.read_once(offset, len) {
            // Another host's write of the block was in flight: read it again once that
            // write is done.
            Err(e) if self.shared && e.integrity_kind().is_some() => {
                let from = self.geo.block_offset(offset / self.geo.block_size);
                let _held = range_lock::hold(self.file, Kind::Read, from, CONTENT_LOCKS_END - from)?;
                let fresh = range_lock::reopen_fresh(self.file, from, 0)?;
                Content { file: &fresh, ..*self }.read_once(offset, len)
            }
            r => r,
        }
    }

    fn read_once(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = self.size()?;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        let bs = self.geo.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let stored = self.read_stored(first, last, size)?;
        let key = self.key()?;
        let mut out = vec![0u8; (end - offset) as usize];
        let mut scratch = Vec::new();
        let mut pos = 0usize;
        for i in first..=last {
            let blen = self.geo.block_len(i, size) as usize;
            let s = &stored[pos..pos + blen + BLOCK_OVERHEAD as usize];
            pos += s.len();
            let bstart = i * bs;
            let from = offset.max(bstart) - bstart;
            let to = end.min(bstart + blen as u64) - bstart;
            let dst = &mut out[(bstart + from - offset) as usize..(bstart + to - offset) as usize];
            if is_hole(s) {
                continue; // already zeros
            }
            if from == 0 && to as usize == blen {
                key.open_block(i, s, dst).map_err(|_| bad_block(i))?;
            } else {
                scratch.resize(blen, 0);
                key.open_block(i, s, &mut scratch).map_err(|_| bad_block(i))?;
                dst.copy_from_slice(&scratch[from as usize..to as usize]);
            }
        }
        Ok(out)
    }

    /// Stored bytes of blocks `first..=last` of a file of `size` plaintext bytes.
    fn read_stored(&self, first: u64, last: u64, size: u64) -> Result<Vec<u8>> {
        let start = self.geo.block_offset(first);
        let end = self.geo.block_offset(last) + self.geo.block_len(last, size) + BLOCK_OVERHEAD;
        let mut buf = vec![0u8; (end - start) as usize];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(|e| Error::io(e, format!("reading blocks {first}..={last}")))?;
        Ok(buf)
    }

    /// Plaintext of block `i` as it stands in a file of `size` bytes (zeros for holes and
    /// for blocks past the end).
    fn block_plain(&self, i: u64, size: u64) -> Result<Vec<u8>> {
        let blen = self.geo.block_len(i, size) as usize;
        let mut out = vec![0u8; blen];
        if blen == 0 {
            return Ok(out);
        }
        let stored = self.read_stored(i, i, size)?;
        if !is_hole(&stored) {
            self.key()?.open_block(i, &stored, &mut out).map_err(|_| bad_block(i))?;
        }
        Ok(out)
    }

    /// Seal consecutive plaintext blocks starting at block `first` and write them with one
    /// pwrite (then truncate to `then_len`, if given) in a file now `old_len` bytes long.
    /// Each block gets a fresh random nonce.
    fn write_blocks(&self, first: u64, blocks: &[&[u8]], old_len: u64, then_len: Option<u64>) -> Result<()> {
        let key = self.key()?;
        let total: usize = blocks.iter().map(|b| b.len() + BLOCK_OVERHEAD as usize).sum();
        let mut nonces = vec![0u8; blocks.len() * NONCE_LEN];
        fill_random(&mut nonces)?;
        let mut out = vec![0u8; total];
        let mut chunks = Vec::with_capacity(blocks.len());
        let mut pos = 0;
        for (k, plain) in blocks.iter().enumerate() {
            let n = plain.len() + BLOCK_OVERHEAD as usize;
            let nonce: &[u8; NONCE_LEN] = nonces[k * NONCE_LEN..(k + 1) * NONCE_LEN].try_into().unwrap();
            key.seal_block(first + k as u64, plain, nonce, &mut out[pos..pos + n]);
            chunks.push(n);
            pos += n;
        }
        let change = Change { offset: self.geo.block_offset(first), bytes: &out, chunks: &chunks, old_len, then_len };
        journal::apply(self.file, self.journal, &key.file_id, &change)
            .map_err(|e| e.context(format!("writing blocks from {first}")))
    }

    /// Truncate the backing file from `old_len` to `len` (recorded like any change).
    fn set_len(&self, old_len: u64, len: u64) -> Result<()> {
        let change = Change { offset: len, bytes: &[], chunks: &[], old_len, then_len: Some(len) };
        match self.key {
            Some(k) => journal::apply(self.file, self.journal, &k.file_id, &change),
            None => journal::apply(self.file, None, &[0; 16], &change),
        }
    }

    /// Before the file grows past its current partial last block, that block is sealed
    /// again at its new length (the bytes it gains are zeros).
    fn grow_tail(&self, size: u64, new_size: u64) -> Result<()> {
        let bs = self.geo.block_size;
        if size % bs == 0 || new_size <= size {
            return Ok(());
        }
        let i = size / bs;
        let mut plain = self.block_plain(i, size)?;
        plain.resize(self.geo.block_len(i, new_size) as usize, 0);
        self.write_blocks(i, &[&plain], self.geo.backing_size(size), None)
    }

    /// On a shared volume, lock the stored blocks from `first` on for a change: through
    /// `last` when they lie before the last block of the file, else to the end. Without
    /// sharing nothing is locked and the change may reach the end.
    fn lock_blocks(&self, first: u64, last: Option<u64>) -> Result<Range<'_>> {
        if !self.shared {
            return Ok(Range { _held: None, fresh: None, to_end: true });
        }
        let bs = self.geo.block_size;
        // The file's length may change until the lock is held: check the range fits after.
        let needs = |size: u64| -> (u64, Option<u64>) {
            match last {
                Some(l) if (l + 1) * bs <= size - size % bs => (first, Some(l)),
                _ => (first.min(size / bs), None),
            }
        };
        let mut want = needs(self.size()?);
        loop {
            let from = self.geo.block_offset(want.0);
            let len = want.1.map_or(CONTENT_LOCKS_END - from, |l| self.geo.block_offset(l + 1) - from);
            let held = range_lock::hold(self.file, Kind::Write, from, len)?;
            let fresh = range_lock::reopen_fresh(self.file, from, want.1.map_or(0, |_| len))?;
            let now = needs(Content { file: &fresh, ..*self }.size()?);
            let covered = now.0 >= want.0
                && match (now.1, want.1) {
                    (_, None) => true,
                    (Some(n), Some(w)) => n <= w,
                    (None, Some(_)) => false,
                };
            if covered {
                return Ok(Range { _held: Some(held), fresh: Some(fresh), to_end: want.1.is_none() });
            }
            drop(held);
            want = now;
        }
    }

    /// Cut a torn trailing fragment (see `size`) before the file changes, so it can never
    /// end up inside a block that is no longer the last. Only a change that holds the end
    /// of the file may: elsewhere it is another host's append in flight.
    fn settle(&self, range: &Range<'_>) -> Result<u64> {
        let len = self.backing_len()?;
        let size = self.size_of(len)?;
        if range.to_end && len > 0 && len != self.geo.backing_size(size) {
            self.set_len(len, self.geo.backing_size(size)).map_err(|e| e.context("cutting a torn last block"))?;
        }
        Ok(size)
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let bs = self.geo.block_size;
        let range = self.lock_blocks(offset / bs, Some((end - 1) / bs))?;
        let c = self.through(&range);
        c.publish(c.write_locked(offset, data, &range))
    }

    fn write_locked(&self, offset: u64, data: &[u8], range: &Range<'_>) -> Result<()> {
        let end = offset + data.len() as u64;
        let bs = self.geo.block_size;
        let size = self.settle(range)?;
        let new_size = size.max(end);
        let (first, last) = (offset / bs, (end - 1) / bs);
        let mut old_len = self.geo.backing_size(size);
        if size % bs != 0 && size / bs < first {
            self.grow_tail(size, new_size)?;
            old_len = self.geo.backing_size(self.geo.block_count(size) * bs);
        }
        let mut edge: Vec<(u64, Vec<u8>)> = Vec::new();
        for i in [first, last] {
            let bstart = i * bs;
            let blen = self.geo.block_len(i, new_size);
            let covered = offset <= bstart && end >= bstart + blen;
            if !covered && !edge.iter().any(|(j, _)| *j == i) {
                let mut plain = self.block_plain(i, size)?;
                plain.resize(blen as usize, 0);
                let from = offset.max(bstart) - bstart;
                let to = end.min(bstart + blen) - bstart;
                plain[from as usize..to as usize]
                    .copy_from_slice(&data[(bstart + from - offset) as usize..(bstart + to - offset) as usize]);
                edge.push((i, plain));
            }
        }
        let mut blocks: Vec<&[u8]> = Vec::with_capacity((last - first + 1) as usize);
        for i in first..=last {
            if let Some((_, p)) = edge.iter().find(|(j, _)| *j == i) {
                blocks.push(p);
            } else {
                let bstart = i * bs;
                let blen = self.geo.block_len(i, new_size);
                blocks.push(&data[(bstart - offset) as usize..(bstart + blen - offset) as usize]);
            }
        }
        self.write_blocks(first, &blocks, old_len, None)
    }

    pub fn truncate(&self, new_size: u64) -> Result<()> {
        let range = self.lock_blocks(new_size / self.geo.block_size, None)?;
        let c = self.through(&range);
        c.publish(c.truncate_locked(new_size, &range))
    }

    /// On a shared volume, make a change other hosts' reads see before its lock goes:
    /// a shared filesystem's client may hold written bytes until a flush (JuiceFS does).
    fn publish(&self, change: Result<()>) -> Result<()> {
        change?;
        if self.shared {
            self.file.sync_data().map_err(|e| Error::io(e, "flushing a change for other hosts"))?;
        }
        Ok(())
    }

    fn truncate_locked(&self, new_size: u64, range: &Range<'_>) -> Result<()> {
        let size = self.settle(range)?;
        let bs = self.geo.block_size;
        if new_size > size {
            self.grow_tail(size, new_size)?;
        } else if new_size < size && new_size % bs != 0 {
            let i = new_size / bs;
            let mut plain = self.block_plain(i, size)?;
            plain.truncate((new_size % bs) as usize);
            let old_len = self.geo.backing_size(size);
            // One change: a crash between the write and the truncate is finished by recovery.
            return self.write_blocks(i, &[&plain], old_len, Some(self.geo.backing_size(new_size)));
        }
        let len = self.backing_len()?;
        if new_size != size || len != self.geo.backing_size(new_size) {
            self.set_len(len, self.geo.backing_size(new_size)).map_err(|e| e.context("ftruncate"))?;
        }
        Ok(())
    }

    /// fallocate mode 0: grow to `offset + len` if shorter (the new range reads as zeros)
    /// and reserve backing space for the stored blocks of the range.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| Error::new(libc::EFBIG, "fallocate range overflows"))?;
        let range = self.lock_blocks(offset / self.geo.block_size, None)?;
        let c = self.through(&range);
        let size = c.settle(&range)?;
        if end > size {
            c.publish(c.truncate_locked(end, &range))?;
        }
        let from = self.geo.block_offset(offset / self.geo.block_size);
        let to = self.geo.backing_size(end.max(size));
        if to > from {
            rustix::fs::fallocate(c.file, rustix::fs::FallocateFlags::empty(), from, to - from)
                .map_err(|e| Error::io(e.into(), "fallocate"))?;
        }
        Ok(())
    }
}

fn bad_block(i: u64) -> Error {
    Error::integrity(
        crate::error::Integrity::Block,
        format!("block {i} does not authenticate (tampered, or moved from another position or file)"),
    )
}

fn size_error(e: SizeError, len: u64) -> Error {
    Error::corrupt(format!("backing file length {len} is impossible for an envelope: {e}"))
}
