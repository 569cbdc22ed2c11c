//! `service install`: the systemd unit template, the instance's config for
//! `mount --config`, and the `mount.fuse.envelopefs` helper link.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::volume::VolumeConfig;

const UNIT_TEMPLATE: &str = include_str!("../../systemd/envelopefs@.service");
/// Where the template names the binary.
const TEMPLATE_EXE: &str = "/usr/local/bin/envelopefs";

fn io(e: std::io::Error, what: String) -> Error {
    Error::new(e.raw_os_error().unwrap_or(libc::EIO), format!("{what}: {e}"))
}

/// An instance name is part of a file name and a systemd instance: letters, digits, '-',
/// '_' and '.'.
pub fn check_instance_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(Error::new(libc::EINVAL, format!("instance name {name:?}: use letters, digits, '-', '_' and '.'")));
    }
    Ok(())
}

/// What `/etc/envelopefs/NAME.toml` holds.
pub fn instance_config(name: &str, backing: &Path, mountpoint: &Path, options: &str) -> String {
    format!(
        "# envelopefs@{name}.service: `envelopefs mount --config` reads this.\nbacking = {:?}\nmountpoint = {:?}\noptions = {:?}\n",
        backing.display().to_string(),
        mountpoint.display().to_string(),
        options
    )
}

/// What `service install` writes an instance from.
pub struct Install<'a> {
    pub name: &'a str,
    pub backing: &'a Path,
    /// Absolute (the unit runs from /).
    pub mountpoint: &'a Path,
    /// Checked by the caller: words `mount -o` takes.
    pub options: &'a str,
    /// `/` for the host.
    pub root: &'a Path,
    /// The binary the unit runs.
    pub exe: &'a Path,
    /// Replace an existing instance config.
    pub force: bool,
}

fn config_path(root: &Path, name: &str) -> PathBuf {
    root.join(format!("etc/envelopefs/{name}.toml"))
}

/// Install an instance, and say what was written and what to run next on `out`.
pub fn install(i: &Install<'_>, out: &mut dyn Write) -> Result<()> {
    let (name, root, exe) = (i.name, i.root, i.exe);
    check_instance_name(name)?;
    VolumeConfig::load(i.backing)?;
    let say = |out: &mut dyn Write, line: String| writeln!(out, "{line}").map_err(|e| io(e, "writing".into()));
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    let write = |out: &mut dyn Write, path: PathBuf, text: &str, mode: u32| -> Result<()> {
        let parent = path.parent().expect("a file under root");
        std::fs::create_dir_all(parent).map_err(|e| io(e, format!("creating {}", parent.display())))?;
        std::fs::write(&path, text).map_err(|e| io(e, format!("writing {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io(e, format!("setting the mode of {}", path.display())))?;
        say(out, format!("wrote {}", path.display()))
    };
    if !i.mountpoint.is_absolute() {
        return Err(crate::error::usage(format!("mount point {}: give an absolute path", i.mountpoint.display())));
    }
    let canon = std::fs::canonicalize(i.backing).map_err(|e| io(e, format!("resolving {}", i.backing.display())))?;
    let conf = instance_config(name, &canon, i.mountpoint, i.options);
    let conf_path = config_path(root, name);
    if let Ok(old) = std::fs::read_to_string(&conf_path) {
        if old != conf && !i.force {
            // One line: error output escapes newlines.
            let settings: Vec<&str> = old.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).collect();
            return Err(crate::error::usage(format!(
                "instance {name} exists ({}) with other settings: {}; replace it with --force",
                conf_path.display(),
                settings.join(", ")
            )));
        }
    }
    write(out, conf_path, &conf, 0o600)?;
    let unit = UNIT_TEMPLATE.replace(TEMPLATE_EXE, &exe.display().to_string());
    write(out, under("/etc/systemd/system/envelopefs@.service"), &unit, 0o644)?;
    let helper = under("/sbin/mount.fuse.envelopefs");
    let parent = helper.parent().expect("a file under root");
    std::fs::create_dir_all(parent).map_err(|e| io(e, format!("creating {}", parent.display())))?;
    let _ = std::fs::remove_file(&helper);
    std::os::unix::fs::symlink(exe, &helper).map_err(|e| io(e, format!("linking {}", helper.display())))?;
    say(out, format!("linked {} -> {}", helper.display(), exe.display()))?;
    say(out, format!("Now: systemctl daemon-reload && systemctl enable --now envelopefs@{name}"))?;
    say(out, format!("Units that need it: RequiresMountsFor={}", i.mountpoint.display()))
}

/// The installed instances under `root`: (name, backing, mount point).
pub fn instances(root: &Path) -> Result<Vec<(String, String, String)>> {
    let dir = root.join("etc/envelopefs");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(out) };
    for e in entries.flatten() {
        let p = e.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".toml")) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        let Ok(v) = toml::from_str::<toml::Table>(&text) else { continue };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_owned();
        out.push((name.to_owned(), field("backing"), field("mountpoint")));
    }
    out.sort();
    Ok(out)
}

/// `service list`: one line per instance.
pub fn list(root: &Path, out: &mut dyn Write) -> Result<()> {
    for (name, backing, mnt) in instances(root)? {
        let state =
            if crate::daemon::process::mount_source(Path::new(&mnt)).is_some() { "mounted" } else { "not mounted" };
        writeln!(out, "{name}\t{backing}\t{mnt}\t{state}").map_err(|e| io(e, "writing".into()))?;
    }
    Ok(())
}

/// `service uninstall`: the instance's config goes; the unit template and the mount helper
/// go too once no instance is left.
pub fn uninstall(name: &str, root: &Path, out: &mut dyn Write) -> Result<()> {
    check_instance_name(name)?;
    let conf = config_path(root, name);
    std::fs::remove_file(&conf).map_err(|e| io(e, format!("removing {}", conf.display())))?;
    writeln!(out, "removed {}", conf.display()).map_err(|e| io(e, "writing".into()))?;
    if instances(root)?.is_empty() {
        for p in ["etc/systemd/system/envelopefs@.service", "sbin/mount.fuse.envelopefs"] {
            let p = root.join(p);
            if std::fs::remove_file(&p).is_ok() {
                writeln!(out, "removed {}", p.display()).map_err(|e| io(e, "writing".into()))?;
            }
        }
    }
    writeln!(out, "Stop it first if it runs: systemctl disable --now envelopefs@{name}")
        .map_err(|e| io(e, "writing".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::testing::volume;

    #[test]
    fn instance_names() {
        for ok in ["a", "web-1", "db_2.prod", ".."] {
            check_instance_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "a/b", "a b", "x@y", "ü", "a\nb"] {
            assert!(check_instance_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn installs_the_unit_config_and_helper_under_a_root() {
        let d = tempfile::tempdir().unwrap();
        let (backing, _) = volume(d.path());
        let root = d.path().join("root");
        let exe = Path::new("/opt/envelopefs/bin/envelopefs");
        let mut out = Vec::new();
        let web = |options, force| Install {
            name: "web",
            backing: &backing,
            mountpoint: Path::new("/mnt/web"),
            options,
            root: &root,
            exe,
            force,
        };
        install(&web(r"key_file=/k\,1,ro", false), &mut out).unwrap();
        let conf = std::fs::read_to_string(root.join("etc/envelopefs/web.toml")).unwrap();
        let parsed: toml::Value = toml::from_str(&conf).unwrap();
        assert_eq!(parsed["backing"].as_str(), backing.canonicalize().unwrap().to_str());
        assert_eq!(parsed["mountpoint"].as_str(), Some("/mnt/web"));
        assert_eq!(parsed["options"].as_str(), Some(r"key_file=/k\,1,ro"));
        let mode = std::fs::metadata(root.join("etc/envelopefs/web.toml")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let unit = std::fs::read_to_string(root.join("etc/systemd/system/envelopefs@.service")).unwrap();
        assert!(unit.contains("/opt/envelopefs/bin/envelopefs") && !unit.contains(TEMPLATE_EXE), "{unit}");
        assert_eq!(std::fs::read_link(root.join("sbin/mount.fuse.envelopefs")).unwrap(), exe);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("enable --now envelopefs@web") && text.contains("RequiresMountsFor=/mnt/web"), "{text}");
        // Again, the same: nothing to refuse. Different: only with --force.
        install(&web(r"key_file=/k\,1,ro", false), &mut Vec::new()).unwrap();
        let e = install(&web("ro", false), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("--force") && e.to_string().contains("key_file=/k"), "{e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
        install(&web("ro", true), &mut Vec::new()).unwrap();
        let mut listed = Vec::new();
        list(&root, &mut listed).unwrap();
        let listed = String::from_utf8(listed).unwrap();
        assert!(listed.starts_with("web\t") && listed.contains("/mnt/web\tnot mounted"), "{listed}");
        uninstall("web", &root, &mut Vec::new()).unwrap();
        assert!(!root.join("etc/envelopefs/web.toml").exists());
        assert!(!root.join("etc/systemd/system/envelopefs@.service").exists(), "no instance is left");
        // Not a volume, or a bad name, or a relative mount point: nothing is written.
        let other = d.path().join("other-root");
        let (here, rel) = (d.path().to_path_buf(), PathBuf::from("rel/m"));
        for (name, vol, mnt) in
            [("web", &here, Path::new("/m")), ("a/b", &backing, Path::new("/m")), ("web", &backing, &*rel)]
        {
            let i = Install { name, backing: vol, mountpoint: mnt, options: "", root: &other, exe, force: false };
            assert!(install(&i, &mut Vec::new()).is_err(), "{name} {} {}", vol.display(), mnt.display());
        }
        assert!(!other.exists());
    }
}
