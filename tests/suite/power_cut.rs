//! Power cuts, simulated: every backing write of a workload (the journal's and the
//! envelopes') is recorded in order, then replayed onto a copy of the volume taken before
//! the workload and cut at every sector (512-byte) boundary inside every write, as storage
//! that persists writes in order leaves them. Each cut state is recovered like the next
//! mount does, then every file must read without EIO, every completed change exactly, and
//! the change that was cut as its old or its new bytes (the tail of an append may be
//! missing).
//!
//! The same replay without the journal shows what the journal is for: some cut states
//! leave a block that reads as EIO.
//!
//! `ENVELOPEFS_CUT_OPS` sets the number of workload steps (CI runs a short workload).

use crate::common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::{open_options, pattern, Rng, TestVolume, ROOT};
use envelopefs::file::journal::{self, Journal, Mode, Observed};
use envelopefs::fs::{EncryptedFs, SetAttr, ROOT_INO};
use envelopefs::volume::trust::TrustStore;
use envelopefs::volume::{OpenOptions as VolOpts, Volume};

const SECTOR: u64 = 512;
const FILES: usize = 4;

#[derive(Clone)]
enum Op {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

/// A backing write: which file (relative to the backing root, or a journal file's name).
#[derive(Clone)]
struct Event {
    file: Target,
    op: Op,
    /// The workload step it belongs to.
    step: usize,
}

#[derive(Clone, PartialEq)]
enum Target {
    Backing(PathBuf),
    Journal(String),
}

struct Recorder {
    backing: PathBuf,
    journal_dir: PathBuf,
    step: Mutex<Option<usize>>,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    fn observe(&self, f: &File, o: Observed<'_>) {
        let Some(step) = *self.step.lock().unwrap() else { return };
        let path = fs::read_link(format!("/proc/self/fd/{}", std::os::unix::io::AsRawFd::as_raw_fd(f))).unwrap();
        let file = if let Ok(rel) = path.strip_prefix(&self.backing) {
            Target::Backing(rel.to_owned())
        } else {
            let rel = path.strip_prefix(&self.journal_dir).expect("a write outside the volume and its journal");
            Target::Journal(rel.to_string_lossy().into_owned())
        };
        let op = match o {
            Observed::Write { offset, bytes } => Op::Write { offset, bytes: bytes.to_vec() },
            Observed::SetLen(l) => Op::SetLen(l),
        };
        self.events.lock().unwrap().push(Event { file, op, step });
    }
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &t);
        } else {
            fs::copy(e.path(), &t).unwrap();
        }
    }
}

fn name(i: usize) -> String {
    format!("f{i}")
}

/// The recorded run: the volume before the workload (backing tree and this volume's
/// files of the trust dir), the writes, and each file's content after each step.
struct Run {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    base_trust: PathBuf,
    key: PathBuf,
    volume_id: String,
    /// The journal's name at the recorded volume's place.
    journal_name: String,
    events: Vec<Event>,
    /// models[s][i]: content of file i after step s (models[0]: before the workload).
    models: Vec<Vec<Vec<u8>>>,
}

fn record(steps: usize, seed: u64) -> Run {
    let vol = TestVolume::new(4096);
    let tmp = tempfile::tempdir().unwrap();
    let trust = tmp.path().join("trust");
    fs::create_dir(&trust).unwrap();
    let opts = VolOpts { trust: TrustStore::at(&trust), ..open_options() };
    let v = Arc::new(Volume::open(&vol.backing, &TestVolume::source_for(&vol.key), &opts).unwrap());
    let volume_id = v.config.volume_id.clone();
    let rec = Arc::new(Recorder {
        backing: fs::canonicalize(&vol.backing).unwrap(),
        journal_dir: fs::canonicalize(&trust).unwrap(),
        step: Mutex::new(None),
        events: Mutex::new(Vec::new()),
    });
    let r2 = rec.clone();
    let observer: journal::Observer = Arc::new(move |f: &File, o: Observed<'_>| r2.observe(f, o));
    let journal_name = journal::name_for(&volume_id, &fs::canonicalize(&vol.backing).unwrap());
    let j = Journal::create(&trust, &journal_name, &volume_id, &vol.backing, Mode::Ordered, u64::MAX, Some(observer))
        .unwrap();
    let efs = EncryptedFs::new(v).unwrap().with_journal(j);
    let mut rng = Rng(seed);
    let mut model = vec![Vec::new(); FILES];
    let mut fhs = Vec::new();
    for (i, m) in model.iter_mut().enumerate() {
        let (attr, fh) = efs.create(ROOT_INO, OsStr::new(&name(i)), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
        let init = pattern(seed + i as u64, [0, 3000, 10000, 8192][i % 4]);
        efs.write(fh, 0, &init, ROOT).unwrap();
        efs.fsync(fh, true).unwrap();
        *m = init;
        fhs.push((attr.ino, fh));
    }
    let base = tmp.path().join("base");
    copy_tree(&vol.backing, &base);
    let base_trust = tmp.path().join("base-trust");
    copy_tree(&trust, &base_trust);
    let mut models = vec![model.clone()];
    for step in 0..steps {
        *rec.step.lock().unwrap() = Some(step);
        let i = rng.below(FILES as u64) as usize;
        let (ino, fh) = fhs[i];
        let len = model[i].len() as u64;
        match rng.below(10) {
            // Appends, small and block-crossing.
            0..=3 => {
                let n = 1 + rng.below(9000) as usize;
                let data = pattern(rng.next(), n);
                efs.write(fh, len, &data, ROOT).unwrap();
                model[i].extend_from_slice(&data);
            }
            // Overwrites inside the file (some run past its end).
            4..=7 => {
                let off = rng.below(len + 1);
                let n = 1 + rng.below(6000) as usize;
                let data = pattern(rng.next(), n);
                efs.write(fh, off, &data, ROOT).unwrap();
                let end = off as usize + n;
                if model[i].len() < end {
                    model[i].resize(end, 0);
                }
                model[i][off as usize..end].copy_from_slice(&data);
            }
            // Truncates, down and up.
            _ => {
                let to = rng.below(len + 5000);
                efs.setattr(ino, SetAttr { size: Some(to), fh: Some(fh), ..Default::default() }, ROOT).unwrap();
                model[i].resize(to as usize, 0);
            }
        }
        if rng.below(3) == 0 {
            efs.fsync(fh, true).unwrap();
        }
        models.push(model.clone());
    }
    *rec.step.lock().unwrap() = None;
    let events = rec.events.lock().unwrap().clone();
    let key = tmp.path().join("key");
    fs::copy(&vol.key, &key).unwrap();
    Run { _tmp: tmp, base, base_trust, key, volume_id, journal_name, events, models }
}

fn apply(root: &Path, trust: &Path, e: &Event, cut: Option<u64>) {
    let path = match &e.file {
        Target::Backing(rel) => root.join(rel),
        Target::Journal(n) => trust.join(n),
    };
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    match &e.op {
        Op::Write { offset, bytes } => {
            let n = cut.map_or(bytes.len() as u64, |c| c - offset) as usize;
            f.write_all_at(&bytes[..n], *offset).unwrap();
        }
        Op::SetLen(l) => f.set_len(*l).unwrap(),
    }
}

/// Sector boundaries strictly inside a write (the cut points of a torn write).
fn cuts(e: &Event) -> Vec<u64> {
    match &e.op {
        Op::Write { offset, bytes } => {
            let end = offset + bytes.len() as u64;
            let first = (offset / SECTOR + 1) * SECTOR;
            (first..end).step_by(SECTOR as usize).collect()
        }
        Op::SetLen(_) => Vec::new(),
    }
}

/// Open the cut state like the next mount (recovery first, unless `journal` is false and
/// the journal is thrown away), read every file, and say what is wrong with it.
fn check_state(run: &Run, root: &Path, trust: &Path, step: usize, journal: bool) -> Vec<String> {
    let store = TrustStore::at(trust);
    if !journal {
        journal::remove(&journal::paths(trust, &run.journal_name)).unwrap();
    }
    // The cut state is the recorded volume after its power cut, only in another directory:
    // its journal and its trust record go with it, as they would stay with a disk.
    let place = fs::canonicalize(root).unwrap();
    let here = journal::name_for(&run.volume_id, &place);
    for (from, to) in journal::paths(trust, &run.journal_name).iter().zip(journal::paths(trust, &here).iter()) {
        if from.exists() {
            fs::rename(from, to).unwrap();
        }
    }
    let mut rec = store.get(&run.volume_id).unwrap().unwrap();
    rec.add_place(&place);
    store.put(&rec).unwrap();
    let opts = VolOpts { trust: store, ..open_options() };
    let vol = Arc::new(Volume::open(root, &TestVolume::source_for(&run.key), &opts).unwrap());
    let touched = envelopefs::file::recovery::recover(&vol).unwrap();
    let mut bad: Vec<String> = touched.iter().filter(|t| !t.repaired).map(|t| t.what.clone()).collect();
    let efs = EncryptedFs::new(vol).unwrap();
    let (before, after) = (&run.models[step], &run.models[step + 1]);
    for i in 0..FILES {
        let attr = efs.lookup(ROOT_INO, OsStr::new(&name(i))).unwrap();
        let fh = match efs.open(attr.ino, libc::O_RDONLY, ROOT) {
            Ok(fh) => fh,
            Err(e) => {
                bad.push(format!("{}: open gives errno {}: {e}", name(i), e.errno()));
                continue;
            }
        };
        let got = match efs.read(fh, 0, 1 << 20) {
            Ok(g) => g,
            Err(e) => {
                bad.push(format!("{}: read gives errno {}: {e}", name(i), e.errno()));
                efs.release(fh);
                continue;
            }
        };
        efs.release(fh);
        let (old, new) = (&before[i], &after[i]);
        let (lo, hi) = (old.len().min(new.len()), old.len().max(new.len()));
        if got.len() < lo || got.len() > hi {
            bad.push(format!("{}: {} bytes, not between {lo} and {hi}", name(i), got.len()));
            continue;
        }
        if let Some(p) = (0..got.len()).find(|&p| old.get(p) != Some(&got[p]) && new.get(p) != Some(&got[p])) {
            bad.push(format!("{}: byte {p} is neither its old nor its new value", name(i)));
        }
    }
    bad
}

/// Every cut state of the run: (event, cut) pairs, with the full application of each
/// event as well (a cut between writes).
fn replay(run: &Run, journal: bool, mut on_bad: impl FnMut(usize, Option<u64>, Vec<String>)) -> usize {
    let work = tempfile::tempdir().unwrap();
    let mut states = 0;
    for (k, e) in run.events.iter().enumerate() {
        let mut points: Vec<Option<u64>> = cuts(e).into_iter().map(Some).collect();
        points.push(None);
        for cut in points {
            states += 1;
            let root = work.path().join(format!("s{states}"));
            let trust = work.path().join(format!("t{states}"));
            copy_tree(&run.base, &root);
            copy_tree(&run.base_trust, &trust);
            for prior in &run.events[..k] {
                apply(&root, &trust, prior, None);
            }
            apply(&root, &trust, e, cut);
            // Steps before this event's are complete; its own may be cut anywhere.
            let bad = check_state(run, &root, &trust, e.step, journal);
            if !bad.is_empty() {
                on_bad(k, cut, bad);
            }
            fs::remove_dir_all(&root).unwrap();
            fs::remove_dir_all(&trust).unwrap();
        }
    }
    states
}

fn steps() -> usize {
    std::env::var("ENVELOPEFS_CUT_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(24)
}

#[test]
fn every_cut_state_reads_back_with_the_journal() {
    for seed in [0x9E37_79B9_7F4A_7C15u64, 0xD1B5_4A32_D192_ED03] {
        let run = record(steps(), seed);
        let mut failures = BTreeMap::new();
        let states = replay(&run, true, |k, cut, bad| {
            failures.insert((k, cut), bad);
        });
        assert!(states > 100, "only {states} cut states: the workload is too small to mean anything");
        assert!(failures.is_empty(), "seed {seed:#x}: {} of {states} cut states fail: {failures:#?}", failures.len());
        eprintln!("seed {seed:#x}: {states} cut states over {} writes, all read back", run.events.len());
    }
}

#[test]
fn without_the_journal_some_cut_state_reads_as_eio() {
    let run = record(steps(), 0x2545_F491_4F6C_DD1D);
    let mut eio = 0;
    let states = replay(&run, false, |_, _, bad| {
        if bad.iter().any(|b| b.contains(&format!("errno {}", libc::EIO))) {
            eio += 1;
        }
    });
    eprintln!("without the journal: {eio} of {states} cut states read as EIO");
    assert!(eio > 0, "no cut state tore a block: the simulation is not cutting inside writes");
}

/// A header re-wrap writes one slot, flushes, then the other. Cut each of those writes at
/// every sector boundary, and persist its sectors in every order a device might: the file
/// always opens, with the old or a new generation, and its content is unchanged.
#[test]
fn a_header_rewrap_cut_anywhere_opens_with_the_old_or_a_new_generation() {
    use envelopefs::file::envelope_file::EnvelopeFile;
    let vol = TestVolume::new(4096);
    let content = pattern(77, 10_000);
    {
        let efs = vol.fs();
        let (_, fh) = efs.create(ROOT_INO, OsStr::new("f"), 0o644, 0, libc::O_RDWR, ROOT).unwrap();
        efs.write(fh, 0, &content, ROOT).unwrap();
        efs.release(fh);
    }
    let out = common::cli(&[&"key", &"rotate", &"--key-file", &vol.key, &vol.backing]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let backing = vol.backing.join("f");
    let region = |f: &File| {
        let mut r = vec![0u8; 4096];
        f.read_exact_at(&mut r, 0).unwrap();
        r
    };
    let f = OpenOptions::new().read(true).write(true).open(&backing).unwrap();
    let before = region(&f);
    let v = vol.open();
    let generation = |r: &[u8]| {
        v.keys.open_header_for(r, &|| "f".into(), None, &|_| Ok(true)).map(|(o, _)| (o.header.generation, o.slot))
    };
    let (g0, newest) = generation(&before).unwrap();
    let describe = || "f".to_string();
    let env = EnvelopeFile { vol: &v, file: &f, describe: &describe, who: None };
    assert!(env.rewrap().unwrap(), "the rotation left the header stale");
    let after = region(&f);
    // The first write is the other slot, the second the one that was newest.
    let half = 2048;
    let slot = |r: &[u8], s: usize| r[s * half..(s + 1) * half].to_vec();
    let mut middle = before.clone();
    middle[(1 - newest) * half..(2 - newest) * half].copy_from_slice(&slot(&after, 1 - newest));
    let sectors = half / SECTOR as usize;
    let mut states = 0;
    for (from, to, s) in [(&before, &middle, 1 - newest), (&middle, &after, newest)] {
        for mask in 0u32..(1 << sectors) {
            let mut r = from.clone();
            for k in 0..sectors {
                if mask & (1 << k) != 0 {
                    let at = s * half + k * SECTOR as usize;
                    r[at..at + SECTOR as usize].copy_from_slice(&to[at..at + SECTOR as usize]);
                }
            }
            f.write_all_at(&r, 0).unwrap();
            let (g, _) = generation(&r).unwrap_or_else(|e| panic!("slot {s}, sectors {mask:#06b}: {e}"));
            assert!((g0..=g0 + 2).contains(&g), "generation {g} (was {g0})");
            let efs = vol.fs();
            let attr = efs.lookup(ROOT_INO, OsStr::new("f")).unwrap();
            let fh = efs.open(attr.ino, libc::O_RDONLY, ROOT).unwrap();
            assert_eq!(efs.read(fh, 0, 1 << 20).unwrap(), content, "slot {s}, sectors {mask:#06b}");
            efs.release(fh);
            states += 1;
        }
    }
    assert_eq!(states, 2 << sectors);
}
