//! The `envelopefs` command line: parse (see [`args`]), harden the process, fold the mount
//! options, start logging, and run the command. The binary's `main` only calls [`run`]
//! and turns an error into its exit code with [`exit_code`].

pub mod args;
mod commands;
pub mod helper_args;
mod key_args;
mod keys;
mod mount;
mod slots;

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;
use tracing::warn;

pub use args::Cli;
use args::{Cmd, ServiceCmd};

use crate::daemon::options;
use crate::daemon::process;
use crate::error::EXIT_STATUS;

/// Run one command. `argv` is the argument list `cli` was parsed from (after
/// [`crate::cli::helper_args::rewrite`]): a daemonizing mount starts its child with it.
pub fn run(cli: Cli, argv: &[OsString]) -> Result<ExitCode> {
    // Before any secret is read, in every command: no core dumps, no ptrace by others, and
    // pages locked in RAM (a mount may opt out with --no-mlock; others warn nowhere).
    let lock = !matches!(&cli.cmd, Cmd::Mount(m) if m.no_mlock);
    let hardened = process::harden_memory(lock);
    let mount = match &cli.cmd {
        Cmd::Mount(m) => Some(options::resolve(m.settings(), m.config.as_deref(), &m.options)?),
        _ => None,
    };
    init_logging(mount.as_ref().and_then(|m| m.log_file.as_deref()))?;
    if let (Err(e), Some(_)) = (&hardened, &mount) {
        warn!("{e}");
    }
    match (cli.cmd, mount) {
        (Cmd::Mount(m), Some(settings)) => mount::mount(settings, m.foreground, argv),
        (Cmd::Mount(_), None) => unreachable!("resolved above"),
        (Cmd::Key(k), _) => keys::key_cmd(k),
        (Cmd::Service(ServiceCmd::Install { name, backing, mountpoint, options, root, force, exe }), _) => {
            let exe = match exe {
                Some(e) => std::path::absolute(e)?,
                None => invoked_as(argv).map_or_else(std::env::current_exe, Ok)?,
            };
            // The options must be what `mount` takes: checked now, not at the first start.
            let mut settings = options::MountSettings::default();
            for word in options::split_words(&options) {
                options::apply_word(&mut settings, &word)?;
            }
            let mountpoint = std::path::absolute(&mountpoint)?;
            let install = crate::daemon::service::Install {
                name: &name,
                backing: &backing,
                mountpoint: &mountpoint,
                options: &options,
                root: &root,
                exe: &exe,
                force,
            };
            crate::daemon::service::install(&install, &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        (Cmd::Service(ServiceCmd::Uninstall { name, root }), _) => {
            crate::daemon::service::uninstall(&name, &root, &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        (Cmd::Service(ServiceCmd::List { root }), _) => {
            crate::daemon::service::list(&root, &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        (Cmd::Umount { mountpoint, lazy }, _) => {
            crate::daemon::umount::umount(&mountpoint, lazy)?;
            Ok(ExitCode::SUCCESS)
        }
        (Cmd::Completions { shell }, _) => {
            clap_complete::generate(shell, &mut Cli::command(), "envelopefs", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        (Cmd::Man { dir: None }, _) => {
            std::io::Write::write_all(&mut std::io::stdout(), &man_page()?)?;
            Ok(ExitCode::SUCCESS)
        }
        (Cmd::Man { dir: Some(dir) }, _) => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(man_command(), &dir)?;
            // The top page carries the EXIT STATUS section.
            std::fs::write(dir.join("envelopefs.1"), man_page()?)?;
            println!("man pages written to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        (cmd, _) => commands::run(cmd),
    }
}

/// The exit code of a failure: its class, where the library gave one (see the man page's
/// EXIT STATUS); 1 otherwise.
/// The error as one line for a person: each cause once (an error's own text may already
/// end with its source's), control characters escaped.
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    crate::error::printable(&out).into_owned()
}

/// The binary's path as it was run (found through PATH when given bare), symlinks kept: a
/// unit naming `/usr/local/bin/envelopefs` follows that link when the binary is upgraded.
fn invoked_as(args: &[OsString]) -> Option<std::path::PathBuf> {
    let argv0 = std::path::Path::new(args.first()?);
    if argv0.components().count() > 1 {
        return std::path::absolute(argv0).ok();
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(argv0)).find(|p| p.is_file())
}

pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain()
        .filter_map(|c| c.downcast_ref::<crate::error::Error>())
        .find_map(|e| e.class())
        .map_or(1, |c| c.exit_code())
}

/// The command as the man pages show it: `help` is clap's, not a page of its own.
fn man_command() -> clap::Command {
    Cli::command().disable_help_subcommand(true)
}

/// The man page (roff): what clap knows, with an EXIT STATUS section before the notes.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(man_command()).render(&mut page)?;
    let mut section = String::from(".SH \"EXIT STATUS\"\n");
    for (code, what) in EXIT_STATUS {
        section.push_str(&format!(".TP\n\\fB{code}\\fR\n{}\n", roff_escape(what)));
    }
    let text = String::from_utf8_lossy(&page).into_owned();
    let at = ["\n.SH EXTRA", "\n.SH VERSION"].iter().find_map(|h| text.find(h)).map_or(text.len(), |i| i + 1);
    let mut out = text[..at].to_owned();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&section);
    out.push_str(&text[at..]);
    Ok(out.into_bytes())
}

/// Text safe inside a roff paragraph: backslashes doubled, no line starting with a
/// control character.
fn roff_escape(s: &str) -> String {
    let s = s.replace('\\', "\\\\").replace('-', "\\-");
    if s.starts_with(['.', '\'']) {
        format!("\\&{s}")
    } else {
        s
    }
}

/// What is logged unless RUST_LOG says otherwise.
const DEFAULT_LOG_FILTER: &str = "info";

/// Targets kept quiet even under a RUST_LOG that does not name them. The cryptoki crate
/// logs an ERROR for every mechanism a token lists that it does not know (about 30 against
/// SoftHSM2, on every command): noise for anyone who alerts on ERROR; PKCS#11 failures that
/// matter reach the log through envelopefs's own errors, naming the module. fuser logs
/// every errno reply, which the adapter already logs once with the file named.
const QUIET_TARGETS: [(&str, &str); 2] = [("fuser", "error"), ("cryptoki", "off")];

/// The filter for RUST_LOG (`None`: unset): the user's directives, then the quiet targets
/// the user did not name.
fn log_filter(rust_log: Option<&str>) -> String {
    let user = rust_log.map(str::trim).filter(|s| !s.is_empty()).unwrap_or(DEFAULT_LOG_FILTER);
    let names = |target: &str| {
        user.split(',').any(|d| {
            let d = d.trim();
            d.strip_prefix(target).is_some_and(|rest| rest.is_empty() || rest.starts_with(['=', '[', ':']))
        })
    };
    let mut filter = user.to_owned();
    for (target, level) in QUIET_TARGETS.iter().filter(|(t, _)| !names(t)) {
        filter.push_str(&format!(",{target}={level}"));
    }
    filter
}

fn init_logging(log_file: Option<&Path>) -> Result<()> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(rust_log.as_deref()))
        .unwrap_or_else(|_| log_filter(None).into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match log_file {
        Some(p) => {
            let f = process::LogFile::open(p).with_context(|| format!("opening log file {}", p.display()))?;
            builder.with_ansi(false).with_writer(process::Escaping(f)).init();
        }
        None if std::env::var_os("ENVELOPEFS_NOTIFY_PARENT").is_some() => {
            builder.with_ansi(false).with_writer(process::Escaping(process::StderrThenSyslog)).init()
        }
        // No colours: their escapes would be indistinguishable from escaped names.
        None => builder.with_ansi(false).with_writer(process::Escaping(std::io::stderr)).init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::helper_args::SUBCOMMANDS;
    use crate::daemon::options::MountSettings;
    use crate::error::{Class, Error};

    #[test]
    fn the_man_page_has_an_exit_status_section_with_every_code() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        let at = page.find(".SH \"EXIT STATUS\"").expect("an EXIT STATUS section");
        let section = &page[at..];
        let section = &section[..section[1..].find("\n.SH ").map_or(section.len(), |i| i + 1)];
        for (code, _) in EXIT_STATUS {
            assert!(section.contains(&format!("\\fB{code}\\fR")), "exit code {code} missing: {section}");
        }
        for class in Class::ALL {
            assert!(section.contains(&format!("\\fB{}\\fR", class.exit_code())), "{class:?}");
        }
        assert!(page.starts_with(".ie") || page.contains(".TH envelopefs"));
    }

    #[test]
    fn quiet_targets_stay_quiet_unless_rust_log_names_them() {
        assert_eq!(log_filter(None), "info,fuser=error,cryptoki=off");
        assert_eq!(log_filter(Some("")), "info,fuser=error,cryptoki=off");
        assert_eq!(log_filter(Some("debug")), "debug,fuser=error,cryptoki=off");
        assert_eq!(log_filter(Some("info,cryptoki=debug")), "info,cryptoki=debug,fuser=error");
        assert_eq!(log_filter(Some("fuser::request=trace")), "fuser::request=trace,cryptoki=off");
        // A target that only starts with the same letters is another target.
        assert_eq!(log_filter(Some("fuserx=info")), "fuserx=info,fuser=error,cryptoki=off");
    }

    #[test]
    fn help_lists_every_exit_code() {
        let help = Cli::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for (code, _) in EXIT_STATUS {
            assert!(help.contains(&format!(" {code} ")), "--help does not mention exit code {code}");
        }
    }

    #[test]
    fn an_error_is_described_with_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOTDIR);
        let e = anyhow::Error::from(Error::io(io, "reading a/envelopefs.toml")).context("opening the volume");
        assert_eq!(describe(&e), "opening the volume: reading a/envelopefs.toml: Not a directory (os error 20)");
    }

    #[test]
    fn exit_codes_follow_the_class_anywhere_in_the_chain() {
        let plain = anyhow::anyhow!("no class");
        assert_eq!(exit_code(&plain), 1);
        for class in Class::ALL {
            let e = anyhow::Error::from(Error::new(libc::EIO, "x").with_class(class)).context("outer");
            assert_eq!(exit_code(&e), class.exit_code(), "{class:?}");
        }
        let unclassed = anyhow::Error::from(Error::new(libc::EIO, "x"));
        assert_eq!(exit_code(&unclassed), 1);
    }

    #[test]
    fn the_helper_knows_every_subcommand() {
        let mut clap: Vec<String> = Cli::command().get_subcommands().map(|c| c.get_name().to_owned()).collect();
        let mut ours: Vec<String> = SUBCOMMANDS.iter().map(|s| s.to_string()).collect();
        clap.sort();
        ours.sort();
        assert_eq!(clap, ours);
    }

    #[test]
    fn mount_flags_default_to_the_library_defaults() {
        let cli = Cli::parse_from(["envelopefs", "mount", "/b", "/m"]);
        let Cmd::Mount(m) = cli.cmd else { panic!("not a mount") };
        let want = MountSettings { backing: Some("/b".into()), mountpoint: Some("/m".into()), ..Default::default() };
        assert_eq!(m.settings(), want);
        let cli =
            Cli::parse_from(["envelopefs", "mount", "--threads", "9", "--key-file", "/k", "-o", "ro", "/b", "/m"]);
        let Cmd::Mount(m) = cli.cmd else { panic!("not a mount") };
        let s = options::resolve(m.settings(), None, &m.options).unwrap();
        assert_eq!((s.threads, s.read_only, s.secret.key_file.as_deref()), (9, true, Some(Path::new("/k"))));
    }
}
