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

/// The header region of volumes made with the default geometry (`InitOptions`).
pub const HEADER: u64 = 4096;
/// Bytes a stored 4 KiB block takes (nonce and tag around it).
pub const STORED: u64 = 4096 + envelopefs::format::BLOCK_OVERHEAD;
/// Root, as the FUSE adapter passes a request's caller to the library.
pub const ROOT: envelopefs::fs::Caller = envelopefs::fs::Caller { uid: 0, gid: 0, pid: 1 };

/// Exit codes the binary promises to scripts (`envelopefs man`, EXIT STATUS).
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_UNTRUSTED: i32 = 15;
pub const EXIT_TAMPERED: i32 = 16;

/// The host trust store of the running test (the daemons and CLI runs it starts get it
/// through ENVELOPEFS_TRUST_DIR), so tests never touch the machine's own, nor each other's:
/// the suites share one process, and a volume's places are recorded per store. One per test
/// thread; a thread a test spawns must be given the path, not call this.
pub fn trust_dir() -> PathBuf {
    thread_local! {
        static DIR: TempDir = tempfile::Builder::new().prefix("envelopefs-trust").tempdir().unwrap();
    }
    DIR.with(|d| d.path().to_path_buf())
}

/// The library's view of the same store.
pub fn test_trust() -> envelopefs::volume::trust::TrustStore {
    envelopefs::volume::trust::TrustStore::at(&trust_dir())
}

/// Open options for library opens in tests: default, with the test trust store.
pub fn open_options() -> OpenOptions {
    OpenOptions { trust: test_trust(), ..OpenOptions::default() }
}

/// The binary, with this test process's trust store.
pub fn bin() -> Command {
    let mut c = Command::new(BIN);
    c.env("ENVELOPEFS_TRUST_DIR", trust_dir());
    c
}

/// A fresh random key file `volume.key` in `dir`, mode 0600 like a real one.
pub fn new_key_file(dir: &Path) -> PathBuf {
    let key = dir.join("volume.key");
    let mut k = [0u8; 32];
    getrandom::getrandom(&mut k).unwrap();
    fs::write(&key, k).unwrap();
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    key
}

/// A volume in a temp dir, unlocked by a key file.
pub struct TestVolume {
    pub dir: TempDir,
    pub backing: PathBuf,
    pub key: PathBuf,
}

impl TestVolume {
    /// A plaintext-names volume (format 2): most tests reach into the backing directory
    /// by name.
    pub fn new(block_size: u32) -> Self {
        Self::with_format(block_size, envelopefs::volume::config::PLAINTEXT_NAMES_FORMAT)
    }

    /// A hidden-names volume (format 4, the default of `init`).
    pub fn hidden(block_size: u32) -> Self {
        Self::with_format(block_size, envelopefs::volume::config::NAMES_FORMAT)
    }

    pub fn with_format(block_size: u32, format: u32) -> Self {
        let dir = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
        let backing = dir.path().join("backing");
        fs::create_dir(&backing).unwrap();
        let key = new_key_file(dir.path());
        let opts = InitOptions { block_size, format, trust: test_trust(), ..InitOptions::default() };
        volume::init(&backing, &Self::source_for(&key), &opts).unwrap();
        Self { dir, backing, key }
    }

    pub fn source_for(key: &Path) -> SecretSource {
        SecretSource { key_file: Some(key.to_owned()), ..Default::default() }
    }

    pub fn open(&self) -> Arc<Volume> {
        Arc::new(Volume::open(&self.backing, &Self::source_for(&self.key), &open_options()).unwrap())
    }

    pub fn fs(&self) -> EncryptedFs {
        envelopefs::daemon::process::unmask_modes();
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
        Self::start_trusting(&trust_dir(), backing, secret_flag, secret, mnt, extra, |_| {})
    }

    /// Mount as on a host whose trust store is `trust`, with `adjust` applied to the
    /// daemon's command first (limits, environment).
    pub fn start_trusting(
        trust: &Path,
        backing: &Path,
        secret_flag: &str,
        secret: &Path,
        mnt: &Path,
        extra: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        fs::create_dir_all(mnt).unwrap();
        let mnt = fs::canonicalize(mnt).unwrap();
        let log = mnt.with_extension("log");
        let mut cmd = Command::new(BIN);
        cmd.env("ENVELOPEFS_TRUST_DIR", trust);
        cmd.arg("mount").arg("--foreground");
        if !secret_flag.is_empty() {
            cmd.arg(secret_flag).arg(secret);
        }
        adjust(&mut cmd);
        // The whole mount suite over io_uring: ENVELOPEFS_TEST_IO_URING=1 (and enable_uring=Y),
        // but for tests that choose their transport themselves.
        let forced = std::env::var_os("ENVELOPEFS_TEST_IO_URING").is_some()
            && !extra.iter().any(|a| a.contains("io-uring") || a.contains("io_uring"));
        if forced {
            cmd.arg("--io-uring");
        }
        let child = cmd
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
        // Over io_uring, it says so before it answers (see fuse::uring), or it fell back.
        while forced && !m.log_text().contains("over io_uring") {
            assert!(!m.log_text().contains("over /dev/fuse"), "not over io_uring: {}", m.log_text());
            assert!(start.elapsed() < Duration::from_secs(20), "no io_uring: {}", m.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    /// Take charge of a mount some other command started (a daemonized `mount`), so that it
    /// is unmounted when this is dropped.
    pub fn adopt(mnt: &Path) -> Self {
        let mnt = fs::canonicalize(mnt).unwrap();
        Mounted { log: mnt.with_extension("log"), mnt, child: None }
    }

    /// Take charge of a mount served by `child` (a daemon started by a test's own command
    /// line), so that it is unmounted and stopped when this is dropped.
    pub fn adopt_child(mnt: &Path, child: Child) -> Self {
        let mnt = fs::canonicalize(mnt).unwrap();
        Mounted { log: mnt.with_extension("log"), mnt, child: Some(child) }
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
        // Another test's fork holds copies of this process's descriptors, files open on
        // this mount among them, until its exec: a busy mount for a moment.
        let start = Instant::now();
        loop {
            let out = bin().arg("umount").arg(&self.mnt).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                break;
            }
            assert!(err.contains("is busy") && start.elapsed() < Duration::from_secs(5), "umount: {err}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_exit()
    }

    /// kill -9 the daemon (a crash). The dead mount stays attached (every access to it
    /// fails with ENOTCONN) until this is dropped: detached earlier, a writer still running
    /// would go on in the bare mount point directory beneath it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
    cli_with_trust(&trust_dir(), args)
}

/// Run the CLI as on another host: with its own trust store.
pub fn cli_with_trust(trust: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(BIN);
    c.env("ENVELOPEFS_TRUST_DIR", trust);
    for a in args {
        c.arg(a);
    }
    c.stdin(Stdio::null()).output().unwrap()
}

/// Deterministic, incompressible-looking test data.
/// A copy of the tree at `from` (a fixture) made at `to`, symlinks as symlinks.
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            copy_tree(&e.path(), &dst);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path()).unwrap(), &dst).unwrap();
        } else {
            fs::copy(e.path(), &dst).unwrap();
        }
    }
}

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

/// Tokens available to tests (user PIN 1234). One per test, so tests stay independent: the
/// suites share one process, and so one token directory.
pub const SOFTHSM_TOKENS: [&str; 18] = [
    "contract",
    "errors",
    "attrs",
    "mount",
    "rotate",
    "pin",
    "deleted",
    "spare",
    "trust",
    "pins",
    "stale",
    "fresh",
    "retire",
    "slot-spare",
    "trust-pins",
    "dotdot",
    "canon",
    "downgrade",
];

/// The PIN file of a prepared token.
pub fn softhsm_token(label: &str) -> PathBuf {
    assert!(SOFTHSM_TOKENS.contains(&label), "add {label} to SOFTHSM_TOKENS");
    softhsm().join("pin")
}

/// moto's KMS server on a free loopback port, with the fault-injection proxy in front.
/// Both are stopped when this is dropped (and die with the test process).
pub struct Kms {
    moto: Child,
    proxy: Child,
    pub moto_url: String,
    pub proxy_url: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn die_with_parent(c: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

impl Kms {
    pub fn start() -> Self {
        // Static test credentials; the real credential chain reads them from the environment.
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_DEFAULT_REGION", "us-east-1");
        let port = free_port();
        let moto = die_with_parent(Command::new("moto_server").args(["-H", "127.0.0.1", "-p", &port.to_string()]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install moto flask flask-cors)");
        let moto_url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/kms_proxy.py");
        let mut proxy = die_with_parent(Command::new("python3").arg(script).args(["--upstream", &moto_url]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(proxy.stdout.take().unwrap()), &mut line).unwrap();
        let proxy_url = format!("http://127.0.0.1:{}", line.trim());
        Kms { moto, proxy, moto_url, proxy_url }
    }

    /// Create a symmetric key (and an alias); returns its ARN.
    pub fn create_key(&self, alias: &str) -> String {
        let code = format!(
            "import boto3; c = boto3.client('kms', endpoint_url='{}'); \
             k = c.create_key()['KeyMetadata']; c.create_alias(AliasName='alias/{alias}', TargetKeyId=k['KeyId']); \
             print(k['Arn'])",
            self.moto_url
        );
        let out = Command::new("python3").args(["-c", &code]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Change what the proxy does: {"mode": "ok"|"disabled"|"down", "latency_ms": N, "throttle": N}.
    pub fn proxy(&self, json: &str) {
        let port: u16 = self.proxy_url.rsplit(':').next().unwrap().parse().unwrap();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let req = format!(
            "POST /__proxy HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
            json.len()
        );
        std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
        let mut resp = String::new();
        std::io::Read::read_to_string(&mut s, &mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"), "{resp}");
    }

    /// Calls the proxy has seen per KMS operation.
    pub fn calls(&self, op: &str) -> u64 {
        self.proxy_state(&["calls", op])
    }

    /// A number from the proxy's state (GET /__proxy), 0 if absent.
    pub fn proxy_state(&self, path: &[&str]) -> u64 {
        let port: u16 = self.proxy_url.rsplit(':').next().unwrap().parse().unwrap();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut s, b"GET /__proxy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut resp = String::new();
        std::io::Read::read_to_string(&mut s, &mut resp).unwrap();
        let body = resp.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        path.iter().fold(&v, |v, k| &v[k]).as_u64().unwrap_or(0)
    }
}

impl Drop for Kms {
    fn drop(&mut self) {
        for c in [&mut self.moto, &mut self.proxy] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The contract every key provider meets. `versioned_keys`: each KEK version is its own
/// key, so an unknown version cannot unwrap (KMS hides versions behind one key id).
pub fn provider_contract(p: std::sync::Arc<dyn envelopefs::keys::KeyProvider>, versioned_keys: bool) {
    use envelopefs::keys::KeyContext;
    const VOL: [u8; 16] = [0x11; 16];
    let f1 = [1u8; 16];
    let f2 = [2u8; 16];
    let ctx = KeyContext { volume_id: &VOL, file_id: &f1 };
    let v1 = p.current_version().unwrap();

    let (dek, rec) = p.generate(&ctx).unwrap();
    assert_eq!(rec.provider, p.kind());
    assert_eq!(rec.kek_version, v1);
    assert_eq!(p.unwrap(&rec, &ctx).unwrap().expose(), dek.expose());
    let (dek_b, _) = p.generate(&ctx).unwrap();
    assert_ne!(dek.expose(), dek_b.expose());

    let other_file = KeyContext { volume_id: &VOL, file_id: &f2 };
    assert_eq!(p.unwrap(&rec, &other_file).unwrap_err().errno(), libc::EACCES);
    let other_vol = KeyContext { volume_id: &[0x22; 16], file_id: &f1 };
    assert_eq!(p.unwrap(&rec, &other_vol).unwrap_err().errno(), libc::EACCES);

    let mut bad = rec.clone();
    let last = bad.wrapped.len() - 1;
    bad.wrapped[last] ^= 1;
    assert_eq!(p.unwrap(&bad, &ctx).unwrap_err().errno(), libc::EACCES);
    if versioned_keys {
        let mut missing = rec.clone();
        missing.kek_version = 999;
        assert_eq!(p.unwrap(&missing, &ctx).unwrap_err().errno(), libc::EACCES);
    }

    let v2 = p.rotation().expect("the store rotates").rotate().unwrap();
    assert_eq!(v2, v1 + 1);
    assert_eq!(p.current_version().unwrap(), v2);
    let (_, rec2) = p.generate(&ctx).unwrap();
    assert_eq!(rec2.kek_version, v2);
    assert_eq!(p.unwrap(&rec, &ctx).unwrap().expose(), dek.expose());
    let moved = p.rewrap(&rec, &ctx).unwrap();
    assert_eq!(moved.kek_version, v2);
    assert_eq!(p.unwrap(&moved, &ctx).unwrap().expose(), dek.expose());
    let versions = p.versions().unwrap();
    assert!(versions.iter().any(|v| v.version == v1 && !v.current));
    assert!(versions.iter().any(|v| v.version == v2 && v.current));
    assert_eq!(versions.iter().filter(|v| v.current).count(), 1);

    // A new file's id and key, as creates get them.
    let (fid, k, r) = envelopefs::keys::new_file_key(&*p, &VOL).unwrap();
    assert_eq!(p.unwrap(&r, &KeyContext { volume_id: &VOL, file_id: &fid }).unwrap().expose(), k.expose());

    std::thread::scope(|s| {
        for t in 0..8u8 {
            let p = p.clone();
            let rec = rec.clone();
            let dek = dek.expose().to_vec();
            s.spawn(move || {
                for i in 0..10u8 {
                    let fid = [t, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    let c = KeyContext { volume_id: &VOL, file_id: &fid };
                    let (k, r) = p.generate(&c).unwrap();
                    assert_eq!(p.unwrap(&r, &c).unwrap().expose(), k.expose());
                    assert_eq!(&p.unwrap(&rec, &ctx).unwrap().expose()[..], &dek[..]);
                }
            });
        }
    });
}

/// The error opening `p` once the kernel has released earlier handles. A file's key stays
/// with its inode while any handle is open, and the kernel sends RELEASE after close
/// returns: until then an open still succeeds. What it reads is then the true content,
/// or, where the damage is in the blocks themselves, the same error a failed open gives.
pub fn open_fails_once_released(p: &Path, content: &[u8]) -> std::io::Error {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::File::open(p) {
            Err(e) => return e,
            Ok(mut f) => {
                let mut got = Vec::new();
                if let Err(e) = f.read_to_end(&mut got) {
                    return e;
                }
                assert_eq!(got, content, "a handle still open reads the true content");
                assert!(Instant::now() < deadline, "{} still opens", p.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A fresh volume made by the binary on a prepared SoftHSM2 token, key `object`:
/// (temp dir, backing dir, PIN file, init's output).
pub fn pkcs11_volume(token: &str, object: &str) -> (TempDir, PathBuf, PathBuf, String) {
    let pin = softhsm_token(token);
    let d = tempfile::Builder::new().prefix("envelopefs-test").tempdir().unwrap();
    let backing = d.path().join("backing");
    fs::create_dir(&backing).unwrap();
    let uri = format!("pkcs11:token={token};object={object}");
    let args: [&dyn AsRef<std::ffi::OsStr>; 11] = [
        &"init",
        &"--plaintext-names",
        &"--provider",
        &"pkcs11",
        &"--module",
        &SOFTHSM_MODULE,
        &"--key",
        &uri,
        &"--pin-file",
        &pin,
        &backing,
    ];
    let out = cli(&args);
    assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
    (d, backing, pin, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A small xorshift, so a failing randomized run can be replayed from its seed.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
