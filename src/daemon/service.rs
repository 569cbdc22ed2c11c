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

/// Install instance `name` under `root` (`/` for the host), for the binary `exe`, and say
/// what was written and what to run next on `out`.
pub fn install(
    name: &str,
    backing: &Path,
    mountpoint: &Path,
    options: &str,
    root: &Path,
    exe: &Path,
    out: &mut dyn Write,
) -> Result<()> {
    check_instance_name(name)?;
    VolumeConfig::load(backing)?;
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
    let canon = std::fs::canonicalize(backing).map_err(|e| io(e, format!("resolving {}", backing.display())))?;
    let conf = instance_config(name, &canon, mountpoint, options);
    write(out, under(&format!("/etc/envelopefs/{name}.toml")), &conf, 0o600)?;
    let unit = UNIT_TEMPLATE.replace(TEMPLATE_EXE, &exe.display().to_string());
    write(out, under("/etc/systemd/system/envelopefs@.service"), &unit, 0o644)?;
    let helper = under("/sbin/mount.fuse.envelopefs");
    let parent = helper.parent().expect("a file under root");
    std::fs::create_dir_all(parent).map_err(|e| io(e, format!("creating {}", parent.display())))?;
    let _ = std::fs::remove_file(&helper);
    std::os::unix::fs::symlink(exe, &helper).map_err(|e| io(e, format!("linking {}", helper.display())))?;
    say(out, format!("linked {} -> {}", helper.display(), exe.display()))?;
    say(out, format!("Now: systemctl daemon-reload && systemctl enable --now envelopefs@{name}"))?;
    say(out, format!("Units that need it: RequiresMountsFor={}", mountpoint.display()))
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
        install("web", &backing, Path::new("/mnt/web"), r"key_file=/k\,1,ro", &root, exe, &mut out).unwrap();
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
        // Again: the link is replaced, not refused.
        install("web", &backing, Path::new("/mnt/web"), "", &root, exe, &mut Vec::new()).unwrap();
        // Not a volume, or a bad name: nothing is written.
        let other = d.path().join("other-root");
        assert!(install("web", d.path(), Path::new("/m"), "", &other, exe, &mut Vec::new()).is_err());
        assert!(install("a/b", &backing, Path::new("/m"), "", &other, exe, &mut Vec::new()).is_err());
        assert!(!other.exists());
    }
}
