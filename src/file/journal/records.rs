//! The journal's records on disk (docs/FORMAT.md §8): framing, the encoding of a change,
//! and reading a journal back after a crash (up to the first torn record).

use super::*;

pub(super) fn record_head(seq: u64, kind: u8, file_id: &FileId) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&seq.to_le_bytes());
    b.push(kind);
    b.extend_from_slice(file_id);
    b
}

/// length (u32, of what follows) ‖ CRC-32 of the body ‖ body.
pub(super) fn frame(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32 + 4).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
}

pub(super) fn encode_change(b: &mut Vec<u8>, c: &Change<'_>) {
    let end = c.offset + c.bytes.len() as u64;
    let result_len = c.then_len.unwrap_or(c.old_len.max(end));
    b.extend_from_slice(&c.offset.to_le_bytes());
    b.extend_from_slice(&result_len.to_le_bytes());
    if c.bytes.is_empty() {
        b.push(0);
        b.extend_from_slice(&0u32.to_le_bytes());
    } else if c.offset < c.old_len {
        b.push(KEEPS_BYTES);
        b.extend_from_slice(&(c.bytes.len() as u32).to_le_bytes());
        b.extend_from_slice(c.bytes);
    } else {
        b.push(0);
        b.extend_from_slice(&(c.chunks.len() as u32).to_le_bytes());
        let mut pos = 0;
        for &n in c.chunks {
            b.extend_from_slice(&(n as u32).to_le_bytes());
            b.extend_from_slice(&crc32fast::hash(&c.bytes[pos..pos + n]).to_le_bytes());
            pos += n;
        }
    }
}

pub(super) fn decode_record(body: &[u8]) -> Option<Rec> {
    let mut c = crate::format::Reader::new(body);
    let seq = c.u64()?;
    let kind = c.u8()?;
    let file_id: FileId = c.take(FILE_ID_LEN)?.try_into().ok()?;
    let rec = match kind {
        KIND_FILE => {
            let ino = c.u64()?;
            let n = c.u16()? as usize;
            Rec::File { seq, file_id, ino, path: c.take(n)?.to_vec() }
        }
        KIND_CHANGE => {
            let offset = c.u64()?;
            let result_len = c.u64()?;
            let flags = c.u8()?;
            let n = c.u32()? as usize;
            let change = if flags == KEEPS_BYTES {
                Recorded::Overwrite { offset, bytes: c.take(n)?.to_vec(), result_len }
            } else if n == 0 {
                Recorded::SetLen { len: result_len }
            } else {
                let mut chunks = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    chunks.push((c.u32()?, c.u32()?));
                }
                Recorded::Append { offset, chunks, result_len }
            };
            Rec::Change { seq, file_id, change }
        }
        _ => return None,
    };
    c.is_done().then_some(rec)
}

/// The records of one journal file, in order, up to the first that is torn or damaged (a
/// crash while it was written: its change had not begun).
pub(super) fn read_file(path: &Path, volume_id: &[u8]) -> Result<Vec<Rec>> {
    let mut raw = Vec::new();
    match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
        Ok(mut f) => f.read_to_end(&mut raw).map_err(|e| io(e, "reading", path))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e, "opening", path)),
    };
    decode_file(&raw, volume_id).map_err(|e| e.context(path.display()))
}

/// The records of one journal file's bytes, up to the first that is torn or unknown.
pub(super) fn decode_file(raw: &[u8], volume_id: &[u8]) -> Result<Vec<Rec>> {
    if raw.len() < HEADER_LEN as usize || &raw[..8] != MAGIC {
        return Err(Error::corrupt("not an envelopefs crash journal"));
    }
    if raw[8..8 + volume_id.len().min(16)] != volume_id[..volume_id.len().min(16)] {
        return Err(Error::corrupt("the crash journal of another volume"));
    }
    let mut c = crate::format::Reader::new(&raw[HEADER_LEN as usize..]);
    let mut out = Vec::new();
    while let Some(len) = c.u32() {
        let Some(crc) = c.u32() else { break };
        let Some(body) = (len as usize).checked_sub(4).and_then(|n| c.take(n)) else { break };
        if crc32fast::hash(body) != crc {
            break;
        }
        match decode_record(body) {
            Some(r) => out.push(r),
            None => break,
        }
    }
    Ok(out)
}

/// What the journal of a volume (left by a crash) asks of recovery: each file's newest
/// change, oldest file first. Empty when there is no journal.
pub fn read(dir: &Path, name: &str, volume_id: &str) -> Result<Vec<Pending>> {
    let id = hex::decode(volume_id).map_err(|_| Error::new(libc::EINVAL, "volume id is not hex"))?;
    let mut recs = Vec::new();
    for p in paths(dir, name) {
        recs.extend(read_file(&p, &id)?);
    }
    Ok(pending(recs))
}

/// Each file's newest change, from records in any order.
pub(super) fn pending(mut recs: Vec<Rec>) -> Vec<Pending> {
    recs.sort_by_key(|r| match r {
        Rec::File { seq, .. } | Rec::Change { seq, .. } => *seq,
    });
    let mut out: Vec<Pending> = Vec::new();
    let mut whereabouts: std::collections::HashMap<FileId, (u64, Vec<u8>)> = std::collections::HashMap::new();
    for r in recs {
        match r {
            Rec::File { file_id, ino, path, .. } => {
                whereabouts.insert(file_id, (ino, path));
            }
            Rec::Change { file_id, change, .. } => {
                let (ino, path) = whereabouts.get(&file_id).cloned().unwrap_or_default();
                out.retain(|p| p.file_id != file_id);
                out.push(Pending { file_id, ino, path, change });
            }
        }
    }
    out
}

/// The journal decoders on arbitrary bytes, for the fuzz target: a whole file (its volume
/// id taken from its own header), and one record body without its CRC. Never panics;
/// returns how many files the file's records name as pending.
pub fn decode_for_fuzzing(raw: &[u8]) -> usize {
    let _ = decode_record(raw);
    let id = raw.get(8..24).unwrap_or(&[]);
    match decode_file(raw, id) {
        Ok(recs) => pending(recs).len(),
        Err(_) => 0,
    }
}

/// Whether a volume has journal files on this host.
pub fn exists(dir: &Path, name: &str) -> bool {
    paths(dir, name).iter().any(|p| p.symlink_metadata().is_ok())
}
