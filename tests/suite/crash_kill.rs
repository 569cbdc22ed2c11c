//! kill -9 of the daemon in the middle of real work, then a remount: writers doing creates,
//! appends, mid-block overwrites and rename-replaces, each followed by fsync, record every
//! operation that completed (outside the mount). After each kill and remount, every
//! completed operation's content is exact, the one in flight reads as its old or new bytes
//! (an append's tail may be missing), nothing in the tree reads as EIO, and fsck is clean.
//!
//! `ENVELOPEFS_KILLS` sets the number of kills (CI runs a few; the recorded run 200+).

use crate::common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{cli, pattern, Rng, TestVolume};

/// What a file may hold now.
#[derive(Clone)]
enum Expect {
    Exact(Vec<u8>),
    /// An operation was in flight: each byte old or new, length between the two.
    Either {
        old: Vec<u8>,
        new: Vec<u8>,
    },
    /// A rename-replace was in flight: all old or all new.
    OneOf {
        old: Vec<u8>,
        new: Vec<u8>,
    },
}

impl std::fmt::Debug for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Exact(c) => write!(f, "exactly {} bytes", c.len()),
            Expect::Either { old, new } => write!(f, "each byte of {} old or {} new bytes", old.len(), new.len()),
            Expect::OneOf { old, new } => write!(f, "all {} old or all {} new bytes", old.len(), new.len()),
        }
    }
}

type Model = Arc<Mutex<BTreeMap<String, Expect>>>;

/// Every version each file had, for the failure report: (what made it, its content).
type History = Arc<Mutex<BTreeMap<String, Vec<(String, Vec<u8>)>>>>;

fn history() -> &'static History {
    static H: std::sync::OnceLock<History> = std::sync::OnceLock::new();
    H.get_or_init(Default::default)
}

fn remember(name: &str, what: &str, content: &[u8]) {
    history().lock().unwrap().entry(name.to_owned()).or_default().push((what.to_owned(), content.to_vec()));
}

/// Which earlier versions of `name` `got` is (newest first).
fn matches_history(name: &str, got: &[u8]) -> String {
    let h = history().lock().unwrap();
    let list = h.get(name).map(|v| v.as_slice()).unwrap_or_default();
    let tail: Vec<String> = list
        .iter()
        .rev()
        .take(8)
        .enumerate()
        .map(|(i, (w, c))| format!("-{i} {w} {} bytes{}", c.len(), if c == got { " <= this" } else { "" }))
        .collect();
    tail.join("; ")
}

fn current(m: &Model, name: &str) -> Vec<u8> {
    match m.lock().unwrap().get(name) {
        Some(Expect::Exact(c)) => c.clone(),
        other => panic!("{name}: writer sees {other:?}"),
    }
}

/// One writer's loop over its own files, until the mount goes away.
fn writer(mnt: PathBuf, id: usize, model: Model, mut rng: Rng, stop: Arc<AtomicBool>) -> u64 {
    let mut done = 0;
    let files: Vec<String> = (0..4).map(|k| format!("w{id}-{k}")).collect();
    while !stop.load(Ordering::Relaxed) {
        let name = &files[rng.below(files.len() as u64) as usize];
        let path = mnt.join(name);
        let exists = model.lock().unwrap().contains_key(name);
        let op = if exists { 1 + rng.below(3) } else { 0 };
        let old = if exists { current(&model, name) } else { Vec::new() };
        let mut new = old.clone();
        let res: std::io::Result<()> = (|| {
            match op {
                0 => {
                    new = pattern(rng.next(), rng.below(20_000) as usize);
                    model.lock().unwrap().insert(name.clone(), Expect::Either { old: old.clone(), new: new.clone() });
                    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
                    f.write_all(&new)?;
                    f.sync_all()?;
                }
                1 => {
                    let add = pattern(rng.next(), 1 + rng.below(9000) as usize);
                    new.extend_from_slice(&add);
                    model.lock().unwrap().insert(name.clone(), Expect::Either { old: old.clone(), new: new.clone() });
                    let mut f = OpenOptions::new().append(true).open(&path)?;
                    f.write_all(&add)?;
                    f.sync_all()?;
                }
                2 => {
                    let off = rng.below(old.len() as u64 + 1) as usize;
                    let data = pattern(rng.next(), 1 + rng.below(3000) as usize);
                    if new.len() < off + data.len() {
                        new.resize(off + data.len(), 0);
                    }
                    new[off..off + data.len()].copy_from_slice(&data);
                    model.lock().unwrap().insert(name.clone(), Expect::Either { old: old.clone(), new: new.clone() });
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.write_all_at(&data, off as u64)?;
                    f.sync_all()?;
                }
                _ => {
                    new = pattern(rng.next(), rng.below(30_000) as usize);
                    model.lock().unwrap().insert(name.clone(), Expect::OneOf { old: old.clone(), new: new.clone() });
                    let tmp = mnt.join(format!("{name}.tmp"));
                    let mut f = fs::File::create(&tmp)?;
                    f.write_all(&new)?;
                    f.sync_all()?;
                    fs::rename(&tmp, &path)?;
                    fs::File::open(&mnt)?.sync_all()?;
                }
            }
            Ok(())
        })();
        match res {
            Ok(()) => {
                remember(name, ["create", "append", "overwrite", "replace"][op as usize], &new);
                model.lock().unwrap().insert(name.clone(), Expect::Exact(new));
                done += 1;
            }
            // The daemon is gone (ENOTCONN, ECONNABORTED): the operation stays in flight.
            Err(_) => return done,
        }
    }
    done
}

fn read_all(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    fs::File::open(p)?.read_to_end(&mut v)?;
    Ok(v)
}

/// Check every file against the model; the model then holds what was found.
fn check(mnt: &Path, model: &Model, kill: usize) -> Vec<String> {
    let mut bad = Vec::new();
    let mut m = model.lock().unwrap();
    let mut lost = Vec::new();
    for (name, want) in m.iter_mut() {
        let got = match read_all(&mnt.join(name)) {
            Ok(g) => g,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A create in flight may not have happened.
                if matches!(want, Expect::Either { old, .. } if old.is_empty()) {
                    *want = Expect::Exact(Vec::new());
                    continue;
                }
                bad.push(format!("kill {kill}: {name}: missing"));
                lost.push(name.clone());
                continue;
            }
            Err(e) => {
                bad.push(format!("kill {kill}: {name}: {e}"));
                lost.push(name.clone());
                continue;
            }
        };
        let ok = match &*want {
            Expect::Exact(c) => got == *c,
            Expect::OneOf { old, new } => got == *old || got == *new,
            Expect::Either { old, new } => {
                let (lo, hi) = (old.len().min(new.len()), old.len().max(new.len()));
                (lo..=hi).contains(&got.len())
                    && (0..got.len()).all(|p| old.get(p) == Some(&got[p]) || new.get(p) == Some(&got[p]))
            }
        };
        if !ok {
            let first = match &*want {
                Expect::Exact(c) | Expect::OneOf { new: c, .. } | Expect::Either { new: c, .. } => {
                    (0..got.len().min(c.len())).find(|&p| got[p] != c[p])
                }
            };
            bad.push(format!(
                "kill {kill}: {name}: {} bytes, not what {want:?} allows (first difference {first:?}); history: {}",
                got.len(),
                matches_history(name, &got)
            ));
        }
        if !matches!(want, Expect::Exact(c) if *c == got) {
            remember(name, "found after a kill", &got);
        }
        *want = Expect::Exact(got);
    }
    // A file that failed is reported once, then made anew by the writers.
    for name in lost {
        m.remove(&name);
        let _ = fs::remove_file(mnt.join(&name));
    }
    // Everything else (temporaries of rename-replaces in flight) must read too.
    for e in fs::read_dir(mnt).unwrap() {
        let p = e.unwrap().path();
        if let Err(e) = read_all(&p) {
            bad.push(format!("kill {kill}: {}: {e}", p.display()));
            let _ = fs::remove_file(&p);
        }
    }
    bad
}

/// `ENVELOPEFS_KILL_JOURNAL=off` runs the storm without the journal (the reproduction).
fn mount_args() -> Vec<&'static str> {
    match std::env::var("ENVELOPEFS_KILL_JOURNAL").as_deref() {
        Ok("off") => vec!["--journal", "off"],
        Ok("sync") => vec!["--journal", "sync"],
        _ => vec![],
    }
}

fn kills() -> usize {
    std::env::var("ENVELOPEFS_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(8)
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn kill_9_storms_leave_every_file_readable_and_every_fsync_kept() {
    let vol = TestVolume::new(4096);
    let model: Model = Arc::new(Mutex::new(BTreeMap::new()));
    let mut rng = Rng(0x5DEE_CE66_D1CE_4E5B);
    let mut failures = Vec::new();
    let mut recovered = 0;
    let mut ops = 0;
    for kill in 0..kills() {
        let m = vol.mount(&mount_args());
        let bad = check(&m.mnt, &model, kill);
        if !bad.is_empty() {
            let log = m.log_text();
            eprintln!(
                "kill {kill}: {bad:?}\nrecovery said:\n{}",
                log.lines().filter(|l| l.contains("recover")).collect::<Vec<_>>().join("\n")
            );
        }
        failures.extend(bad);
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|id| {
                let (mnt, model, r, stop) = (m.mnt.clone(), model.clone(), Rng(rng.next() | 1), stop.clone());
                std::thread::spawn(move || writer(mnt, id, model, r, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30 + rng.below(400)));
        let mut m = m;
        m.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            ops += w.join().unwrap();
        }
        drop(m);
    }
    let m = vol.mount(&mount_args());
    failures.extend(check(&m.mnt, &model, kills()));
    // One log file for every mount of the run.
    recovered += m.log_text().matches("crash recovery: ").count();
    m.unmount();
    eprintln!(
        "{} kills, {ops} operations completed, {recovered} files recovered from the journal, {} failures",
        kills(),
        failures.len()
    );
    let out = cli(&[&"fsck", &"--key-file", &vol.key, &vol.backing]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains(": 0 problems"), "fsck after the kills: {text}");
    assert!(ops >= kills() as u64, "only {ops} operations completed: the writers hardly ran");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A SQLite database in WAL mode under a write load: after every kill it opens and passes
/// `PRAGMA integrity_check`, and holds every transaction whose commit returned.
#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn sqlite_wal_survives_kill_9() {
    let vol = TestVolume::new(4096);
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let mut committed = 0u64;
    let rounds = kills().div_ceil(2).max(3);
    const LOAD: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
n = db.execute("SELECT count(*) FROM t").fetchone()[0]
while True:
    db.execute("BEGIN")
    for _ in range(20):
        db.execute("INSERT INTO t (v) VALUES (randomblob(700))")
    db.execute("UPDATE t SET v = randomblob(300) WHERE id % 7 = ?", (n % 7,))
    db.execute("COMMIT")
    n += 20
    print(n, flush=True)
"#;
    const CHECK: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
# A load killed before its first commit leaves no table: no rows (checked against those committed).
made = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 't'").fetchone()[0]
rows = db.execute("SELECT count(*) FROM t").fetchone()[0] if made else 0
print(db.execute("PRAGMA integrity_check").fetchone()[0], rows)
"#;
    for round in 0..=rounds {
        let m = vol.mount(&[]);
        let db = m.path("db.sqlite");
        if round > 0 {
            let out = std::process::Command::new("python3").arg("-c").arg(CHECK).arg(&db).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut it = text.split_whitespace();
            assert_eq!(
                it.next(),
                Some("ok"),
                "round {round} ({committed} rows committed): integrity_check: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let rows: u64 = it.next().unwrap().parse().unwrap();
            assert!(rows >= committed, "round {round}: {rows} rows, but {committed} were committed");
        }
        if round == rounds {
            m.unmount();
            break;
        }
        let mut load = std::process::Command::new("python3")
            .arg("-c")
            .arg(LOAD)
            .arg(&db)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = load.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut last = 0u64;
            for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
                match line.ok().and_then(|l| l.trim().parse().ok()) {
                    Some(n) => last = n,
                    None => break,
                }
            }
            last
        });
        std::thread::sleep(Duration::from_millis(200 + rng.below(600)));
        let mut m = m;
        m.kill9();
        let _ = load.kill();
        let _ = load.wait();
        drop(m);
        committed = committed.max(reader.join().unwrap());
    }
    assert!(committed > 0, "the load committed nothing: the test did not test");
    let out = cli(&[&"fsck", &"--key-file", &vol.key, &vol.backing]);
    assert!(out.status.success(), "fsck: {}", String::from_utf8_lossy(&out.stdout));
}
