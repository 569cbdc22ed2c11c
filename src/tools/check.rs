//! `inspect` and `fsck`: read envelopes straight from the backing directory, no mount.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::file::envelope_file::EnvelopeFile;
use crate::file::Finding;
use crate::format::decode_region;
use crate::volume::tree::{is_temporary, open_regular, Found, Tree};
use crate::volume::{Volume, VolumeConfig, CONFIG_NAME};

/// The volume root above `path`: the nearest directory holding `envelopefs.toml`.
pub fn find_root(path: &Path) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(path).map_err(|e| Error::io(e, format!("{}", path.display())))?;
    let mut dir = abs.parent();
    while let Some(d) = dir {
        if d.join(CONFIG_NAME).is_file() {
            return Ok(d.to_owned());
        }
        dir = d.parent();
    }
    Err(Error::new(
        libc::ENOENT,
        format!("{} is not inside an envelopefs volume (no {CONFIG_NAME} above it)", path.display()),
    ))
}

/// Print what a header says, without unwrapping anything.
pub fn inspect(path: &Path, out: &mut impl Write) -> Result<()> {
    let root = find_root(path)?;
    let cfg = VolumeConfig::load(&root)?;
    let geo = cfg.geometry()?;
    let f = File::open(path).map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let len = f.metadata().map_err(|e| Error::io(e, "fstat"))?.len();
    let w = |e: std::io::Error| Error::io(e, "writing output");
    writeln!(out, "file:            {}", path.display()).map_err(w)?;
    writeln!(out, "volume:          {} ({})", root.display(), cfg.volume_id).map_err(w)?;
    writeln!(out, "backing size:    {len}").map_err(w)?;
    match geo.plain_size(len) {
        Ok(s) => writeln!(out, "plaintext size:  {s}"),
        Err(e) => writeln!(out, "plaintext size:  {} (damaged: {e})", e.readable_size()),
    }
    .map_err(w)?;
    if len == 0 {
        writeln!(out, "header:          none yet (empty file)").map_err(w)?;
        return Ok(());
    }
    let mut region = vec![0u8; geo.header_size as usize];
    let n = f.read_at(&mut region, 0).map_err(|e| Error::io(e, "reading header"))?;
    region.truncate(n);
    region.resize(geo.header_size as usize, 0);
    let mut slots = decode_region(&region);
    slots.sort_by_key(|(i, _)| *i);
    for (i, s) in slots {
        match s {
            Ok(v) => {
                let h = v.header;
                writeln!(
                    out,
                    "header copy {i}:   generation {}, file id {}, block size {}",
                    h.generation,
                    hex::encode(h.file_id),
                    h.block_size
                )
                .map_err(w)?;
                for r in h.records {
                    writeln!(
                        out,
                        "  key record:    provider {}, KEK {:?} version {}, wrapped DEK {} bytes",
                        r.provider.name(),
                        r.kek_id,
                        r.kek_version,
                        r.wrapped.len()
                    )
                    .map_err(w)?;
                }
            }
            Err(e) => writeln!(out, "header copy {i}:   {e}").map_err(w)?,
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
pub struct FsckReport {
    pub files: u64,
    pub blocks: u64,
    pub holes: u64,
    pub problems: Vec<Finding>,
    /// File id → the first file met with it, and that file's (dev, ino).
    ids: std::collections::HashMap<[u8; 16], (PathBuf, (u64, u64))>,
}

/// Check that every header and every block of every envelope authenticates. Without
/// `repair` nothing is written. With it: a damaged header copy is rewritten from the good
/// one, a torn trailing fragment is cut off, and a last block that does not authenticate
/// (a torn append) is cut. Other blocks that do not authenticate are only reported.
/// The caller makes sure the volume is not mounted when repairing.
/// Files are checked as the walk meets them, each opened relative to its directory's
/// descriptor (see `tree::Tree`): nothing swapped into the backing directory meanwhile can
/// lead a repair outside the volume.
pub fn fsck(vol: &Volume, repair: bool) -> Result<FsckReport> {
    let mut report = FsckReport::default();
    if vol.config.upgrading {
        let what =
            "an `envelopefs upgrade` to format 6 did not finish: run it again (the volume does not mount until then)";
        report.problems.push(Finding { path: vol.root.clone(), what: what.into(), repaired: false });
    }
    Tree::open(vol)?.walk(&mut |e| {
        if !is_temporary(e.path) {
            return check_file(vol, e, repair, &mut report);
        }
        // Left by a re-encryption or a name write that was cut short: the original is
        // intact, so it only takes space. Only a regular file is removed.
        let repaired = repair && crate::sys::unlinkat(e.dir, e.name, 0).is_ok();
        let what = "a temporary left by an interrupted re-encryption or name write (the original is intact; harmless)";
        report.problems.push(Finding { path: e.path.to_owned(), what: what.into(), repaired });
    })?;
    if vol.names().is_some() {
        for p in &mut report.problems {
            p.what = format!("{} [in the volume: {}]", p.what, crate::tools::name_paths::describe(vol, &p.path));
        }
        for n in crate::tools::name_paths::check_names(vol, repair)? {
            report.problems.push(n);
        }
    }
    Ok(report)
}

fn check_file(vol: &Volume, e: &Found<'_>, repair: bool, rep: &mut FsckReport) {
    let path = e.path;
    let flags = if repair { libc::O_RDWR } else { libc::O_RDONLY };
    let opened = open_regular(e.dir, e.name, flags);
    if let Ok(None) = opened {
        return; // no longer a regular file: not one of the volume's files
    }
    rep.files += 1;
    let mut problem =
        |what: String, repaired: bool| rep.problems.push(Finding { path: path.to_owned(), what, repaired });
    let (f, st) = match opened {
        Ok(Some(o)) => o,
        Ok(None) => return,
        Err(e) => return problem(format!("cannot open: {e}"), false),
    };
    let describe = || path.display().to_string();
    let verdict = EnvelopeFile { vol, file: &f, describe: &describe, who: None }.verify(path, repair);
    rep.blocks += verdict.blocks;
    rep.holes += verdict.holes;
    for f in verdict.findings {
        problem(f.what, f.repaired);
    }
    let empty = f.metadata().is_ok_and(|m| m.len() == 0);
    if empty || verdict.header.is_some() {
        let id = verdict.header.as_ref().map(|h| h.file_id);
        for what in check_xattrs(vol, &f, id) {
            problem(what, false);
        }
    }
    // A copy of a backing file keeps its file id and so its data key: the two files' blocks
    // can be swapped for each other undetected, and the key is used twice. (Hard links are
    // one file.)
    let Some(header) = verdict.header else { return };
    let id = header.file_id;
    match rep.ids.get(&id) {
        Some((first, dev_ino)) if *dev_ino != (st.st_dev, st.st_ino) => {
            let what = format!(
                "shares file id {} (and so its data key) with {}: one is a copy of the other; \
                 give this one its own key with `envelopefs rekey --reencrypt BACKING {}`",
                hex::encode(id),
                first.display(),
                path.display()
            );
            rep.problems.push(Finding { path: path.to_owned(), what, repaired: false });
        }
        Some(_) => {}
        None => {
            rep.ids.insert(id, (path.to_owned(), (st.st_dev, st.st_ino)));
        }
    }
}

/// Format 6: every `user.*` value of a regular file (`file_id`: from its header, `None`:
/// empty) authenticates bound to it. What does not is named (and left alone).
fn check_xattrs(vol: &Volume, f: &File, file_id: Option<[u8; 16]>) -> Vec<String> {
    use crate::names::XattrBinding;
    use std::os::unix::io::AsRawFd;
    let (true, Some(names)) = (vol.config.features().bound_xattrs, vol.names()) else { return Vec::new() };
    let fd = f.as_raw_fd();
    let listed = match crate::sys::listxattr(fd) {
        Ok(l) => l,
        Err(e) => return vec![format!("cannot list its xattrs: {e}")],
    };
    let mut out = Vec::new();
    for n in listed.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        let shown = names.decrypt_xattr_name(n).unwrap_or_else(|| n.to_vec());
        let shown = String::from_utf8_lossy(&shown);
        let c = std::ffi::CString::new(n).expect("split at NUL");
        let stored = crate::sys::getxattr(fd, &c, 65536);
        let ok = match (file_id, &stored) {
            (Some(id), Ok(v)) => names.open_xattr_value(XattrBinding::File(id), n, v).is_ok(),
            _ => false,
        };
        if !ok {
            let why = if file_id.is_none() { "on an empty file with no header" } else { "bound to another file" };
            out.push(format!("xattr {shown} does not authenticate ({why}, or changed): it reads as EIO"));
        }
    }
    out
}

/// How many file headers use each KEK version of the volume's provider.
#[derive(Debug, Default)]
pub struct KeyUsage {
    /// By the newest slot (what opens use).
    pub files: std::collections::BTreeMap<u32, u64>,
    /// By either slot (what must still unwrap should the newest slot be torn).
    pub any_slot: std::collections::BTreeMap<u32, u64>,
    pub empty: u64,
    pub unreadable: u64,
    /// Files whose newest header wraps under another KEK than the current one (KMS `--to-key`).
    pub other_key: u64,
    /// Files whose newest header has a record for each key slot, in policy order.
    pub per_slot: Vec<u64>,
    /// Files whose newest header still has a record of a slot no longer in the policy.
    pub removed_slot: u64,
}

/// What reading a regular file's header region found.
pub enum HeaderRead<'a> {
    /// A file with no header yet.
    Empty,
    /// It could not be opened or its header region read.
    Unreadable,
    /// Shorter than a header region: not an envelope.
    Short,
    /// The header region, and the file it was read from.
    Region(&'a [u8], &'a std::fs::File),
}

/// Call `f` with each regular file's backing path and header region (temporaries of an
/// interrupted re-encryption are skipped). No key is unwrapped.
pub fn walk_headers(vol: &Volume, f: &mut dyn FnMut(&Path, HeaderRead<'_>)) -> Result<()> {
    let mut region = vec![0u8; vol.geometry.header_size as usize];
    Tree::open(vol)?.walk(&mut |e| {
        if is_temporary(e.path) {
            return;
        }
        let file = match open_regular(e.dir, e.name, libc::O_RDONLY) {
            Ok(Some((file, _))) => file,
            Ok(None) => return,
            Err(_) => return f(e.path, HeaderRead::Unreadable),
        };
        let len = match file.metadata() {
            Ok(m) => m.len(),
            Err(_) => return f(e.path, HeaderRead::Unreadable),
        };
        if len == 0 {
            return f(e.path, HeaderRead::Empty);
        }
        if len < region.len() as u64 {
            return f(e.path, HeaderRead::Short);
        }
        match file.read_exact_at(&mut region, 0) {
            Ok(()) => f(e.path, HeaderRead::Region(&region, &file)),
            Err(_) => f(e.path, HeaderRead::Unreadable),
        }
    })
}

/// Count headers by KEK version (the newest slot that decodes; no key is unwrapped).
pub fn key_usage(vol: &Volume) -> Result<KeyUsage> {
    let policy: Vec<_> = vol.config.policy().cloned().collect();
    let mut usage = KeyUsage { per_slot: vec![0; policy.len()], ..KeyUsage::default() };
    let primary = &policy[0];
    let current_id = vol.keys.primary().kek_id();
    walk_headers(vol, &mut |_, read| {
        let region = match read {
            HeaderRead::Empty => return usage.empty += 1,
            HeaderRead::Unreadable | HeaderRead::Short => return usage.unreadable += 1,
            HeaderRead::Region(r, _) => r,
        };
        let slots = decode_region(region);
        match slots.first() {
            Some((_, Ok(v))) => {
                for r in v.header.records.iter().filter(|r| primary.claims(r)) {
                    if r.kek_id == current_id {
                        *usage.files.entry(r.kek_version).or_default() += 1;
                    } else {
                        usage.other_key += 1;
                    }
                }
                for (i, p) in policy.iter().enumerate() {
                    if v.header.records.iter().any(|r| p.claims(r)) {
                        usage.per_slot[i] += 1;
                    }
                }
                if v.header.records.iter().any(|r| !policy.iter().any(|p| p.claims(r))) {
                    usage.removed_slot += 1;
                }
            }
            _ => usage.unreadable += 1,
        }
        let mut seen = std::collections::BTreeSet::new();
        for (_, s) in &slots {
            if let Ok(v) = s {
                seen.extend(v.header.records.iter().filter(|r| primary.claims(r)).map(|r| r.kek_version));
            }
        }
        for v in seen {
            *usage.any_slot.entry(v).or_default() += 1;
        }
    })?;
    Ok(usage)
}
