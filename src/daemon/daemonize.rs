//! A mount without --foreground: ask for the secret on this terminal (if the volume needs
//! one and none was given), start the same command with --foreground in a new session,
//! hand it the secret on its stdin, and wait until it says the mount is ready or exits
//! with an error (which it has printed on our stderr).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

use crate::daemon::process::READY_LINE;
use crate::error::{Error, Result};
use crate::keys::secret::SecretSource;
use crate::volume::VolumeConfig;

/// The child's arguments: ours (without argv0), in the foreground, and told to read the
/// secret from stdin when we prompted for it.
pub fn child_args(args: &[OsString], prompted: bool) -> Vec<OsString> {
    let mut out: Vec<OsString> = args.iter().skip(1).cloned().collect();
    out.push("--foreground".into());
    if prompted {
        out.push("--secret-stdin".into());
    }
    out
}

/// Whether `p` names this process's standard input.
fn is_stdin(p: &Path) -> bool {
    ["/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"].iter().any(|s| p == Path::new(s))
}

fn io(e: std::io::Error, what: &str) -> Error {
    Error::new(e.raw_os_error().unwrap_or(libc::EIO), format!("{what}: {e}"))
}

/// Run the mount of `backing` as a daemon; `args` is this process's argv (after helper
/// rewriting). Returns the exit code for this process: 0 once the mount answers, else the
/// daemon's own (at least 1).
pub fn daemonize(backing: &Path, secret: &SecretSource, args: &[OsString]) -> Result<u8> {
    let cfg = VolumeConfig::load(backing)?;
    let terminal = std::io::stdin().is_terminal();
    let prompt = cfg
        .provider
        .secret_kind()
        .filter(|_| secret.recovery_key.is_none())
        .and_then(|k| secret.would_prompt(k, terminal));
    // A secret file that is this process's stdin (`--passphrase-file /dev/stdin`) is read
    // here: the daemon's own stdin is not the caller's. It gets the bytes on its stdin,
    // where its `--passphrase-file /dev/stdin` then finds them.
    let stdin_file =
        [secret.passphrase_file.as_deref(), secret.pin_file.as_deref()].into_iter().flatten().any(is_stdin);
    let passphrase = match prompt {
        Some(p) => {
            Some(Zeroizing::new(rpassword::prompt_password(p).map_err(|e| io(e, "reading secret"))?.into_bytes()))
        }
        None if stdin_file => {
            use std::io::Read;
            let mut raw = Zeroizing::new(Vec::new());
            std::io::stdin().read_to_end(&mut raw).map_err(|e| io(e, "reading the secret from stdin"))?;
            Some(raw)
        }
        None => None,
    };
    let exe = std::env::current_exe().map_err(|e| io(e, "finding this program"))?;
    let mut cmd = Command::new(exe);
    cmd.args(child_args(args, prompt.is_some()))
        .env("ENVELOPEFS_NOTIFY_PARENT", "1")
        .stdin(if passphrase.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and calls only setsid,
    // which is async-signal-safe; it allocates nothing and touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| io(e, "starting the mount daemon"))?;
    if let Some(pw) = passphrase {
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(&pw).map_err(|e| io(e, "passing the passphrase to the daemon"))?;
    }
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        if line.map(|l| l == READY_LINE).unwrap_or(false) {
            return Ok(0);
        }
    }
    let status = child.wait().map_err(|e| io(e, "waiting for the mount daemon"))?;
    Ok(status.code().unwrap_or(1).clamp(1, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_runs_in_the_foreground_and_reads_a_prompted_secret_from_stdin() {
        let args: Vec<OsString> = ["envelopefs", "mount", "/b", "/m"].map(OsString::from).to_vec();
        assert_eq!(child_args(&args, false), ["mount", "/b", "/m", "--foreground"].map(OsString::from).to_vec());
        assert_eq!(
            child_args(&args, true),
            ["mount", "/b", "/m", "--foreground", "--secret-stdin"].map(OsString::from).to_vec()
        );
    }
}
