//! Helpers shared by the integration tests: volumes in temp dirs, and real mounts run by
//! the real binary that are always unmounted and stopped, even when a test fails.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envelopefs::fs::EncryptedFs;
use envelopefs::keys::secret::SecretSource;
use envelopefs::volume::{self, InitOptions, OpenOptions, Volume};
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_envelopefs");

/// A volume in a temp dir, unlocked by a key file.
pub struct TestVolume {
    pub dir: TempDir,
    pub backing: PathBuf,
    pub key: PathBuf,
}

impl TestVolume {
    pub fn new(block_size: u32) -> Self {
        let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
        let backing = dir.path().join("backing");
        fs::create_dir(&backing).unwrap();
        let key = dir.path().join("volume.key");
        let mut k = [0u8; 32];
        getrandom::getrandom(&mut k).unwrap();
        fs::write(&key, k).unwrap();
        let opts = InitOptions { block_size, ..InitOptions::default() };
        volume::init(&backing, &Self::source_for(&key), &opts).unwrap();
        Self { dir, backing, key }
    }

    pub fn source_for(key: &Path) -> SecretSource {
        SecretSource { key_file: Some(key.to_owned()), ..Default::default() }
    }

    pub fn open(&self) -> Arc<Volume> {
        Arc::new(Volume::open(&self.backing, &Self::source_for(&self.key), &OpenOptions::default()).unwrap())
    }

    pub fn fs(&self) -> EncryptedFs {
        EncryptedFs::new(self.open()).unwrap()
    }

    pub fn mount(&self, extra: &[&str]) -> Mounted {
        Mounted::start(&self.backing, &self.key, &self.dir.path().join("mnt"), extra)
    }
}

/// A running `envelopefs mount --foreground`. Dropping it unmounts and stops the daemon.
pub struct Mounted {
    pub mnt: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

pub fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

impl Mounted {
    pub fn start(backing: &Path, key: &Path, mnt: &Path, extra: &[&str]) -> Self {
        Self::start_with(backing, "--key-file", key, mnt, extra)
    }

    /// Mount with a given secret flag (`--key-file` or `--passphrase-file`).
    pub fn start_with(backing: &Path, secret_flag: &str, secret: &Path, mnt: &Path, extra: &[&str]) -> Self {
        fs::create_dir_all(mnt).unwrap();
        let mnt = fs::canonicalize(mnt).unwrap();
        let log = mnt.with_extension("log");
        let child = Command::new(BIN)
            .arg("mount")
            .arg("--foreground")
            .arg(secret_flag)
            .arg(secret)
            .arg("--log-file")
            .arg(&log)
            .args(extra)
            .arg(backing)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = Mounted { mnt, log, child: Some(child) };
        let start = Instant::now();
        while !is_mounted(&m.mnt) {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                let out = m.child.take().unwrap().wait_with_output().unwrap();
                panic!("mount exited with {status}: {}", String::from_utf8_lossy(&out.stderr));
            }
            assert!(start.elapsed() < Duration::from_secs(20), "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Unmount and wait for the daemon to exit by itself; returns its exit status.
    pub fn unmount(self) -> std::process::ExitStatus {
        let out = Command::new(BIN).arg("umount").arg(&self.mnt).output().unwrap();
        assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
        self.wait_exit()
    }

    /// Wait (bounded) for the daemon to exit by itself.
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("daemon did not exit after unmount");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()) {
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Run the CLI to completion.
pub fn cli(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(BIN);
    for a in args {
        c.arg(a);
    }
    c.stdin(Stdio::null()).output().unwrap()
}

/// Deterministic, incompressible-looking test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 token directory for this test process. SoftHSM reads SOFTHSM2_CONF once per
/// process, so every test in a binary shares it (each test uses its own token); daemons
/// started by the tests inherit the variable.
pub fn softhsm() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        assert!(Path::new(SOFTHSM_MODULE).exists(), "SoftHSM2 is not installed (apt-get install softhsm2)");
        let dir = tempfile::Builder::new().prefix("envelopefs-softhsm").tempdir().unwrap().keep();
        fs::create_dir(dir.join("tokens")).unwrap();
        let conf = dir.join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        std::env::set_var("SOFTHSM2_CONF", &conf);
        fs::write(dir.join("pin"), "1234\n").unwrap();
        fs::write(dir.join("wrong-pin"), "9999\n").unwrap();
        // A process sees only the tokens that exist when it first initialises the module,
        // so every token a test may use is made up front.
        for label in SOFTHSM_TOKENS {
            let out = Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", label, "--so-pin", "12345678", "--pin", "1234"])
                .output()
                .unwrap();
            assert!(out.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&out.stderr));
        }
        dir
    })
}

/// Tokens available to tests (user PIN 1234). One per test, so tests stay independent.
pub const SOFTHSM_TOKENS: [&str; 8] = ["contract", "errors", "attrs", "mount", "rotate", "pin", "deleted", "spare"];

/// The PIN file of a prepared token.
pub fn softhsm_token(label: &str) -> PathBuf {
    assert!(SOFTHSM_TOKENS.contains(&label), "add {label} to SOFTHSM_TOKENS");
    softhsm().join("pin")
}
