//! The QEMU versions the real-QEMU tasks run against: the system's (Debian 12's 7.2), 10.0 from
//! Debian's `bookworm-backports` and 11.1 from Debian sid, each fetched through apt from Debian's
//! archive once, cached under `target/qemu-versions/`, and run through a generated wrapper script.
//!
//! # Why wrappers
//!
//! - 10.0 is unpacked (`apt-get download` + `dpkg -x`) into `target/qemu-versions/10.0/prefix`.
//!   It runs on Debian 12's libraries, but loads its modules from the system's module directory
//!   (`/usr/lib/x86_64-linux-gnu/qemu`, 7.2's) and aborts on the first one ("Only modules from
//!   the same build can be loaded"). The wrapper runs it in a private mount namespace where its
//!   own module directory is bind-mounted over the system's, with its own data directory (`-L`).
//! - 11.1 needs sid's libraries: `debootstrap` makes a sid root in
//!   `target/qemu-versions/11.1/root`, and the wrapper runs `/usr/bin/qemu-system-x86_64`
//!   chrooted there, in a private mount namespace with the host's `/tmp`, `/dev`, `/proc`,
//!   `/sys`, `/home`, `/root` and this workspace (and the working directory, when the root has no
//!   such directory) bound in, so socket paths, files under `/tmp` or the workspace (the Linux
//!   test guest's cache under `target/`) and inherited fds (our socketpairs) work as on the host.
//!
//! Each wrapper `exec`s all the way down, so QEMU keeps the wrapper's pid (pidfds, signals and
//! the parent-death signal stay right) and inherits exactly the fds the wrapper was given. The
//! namespace and its mounts vanish with the process. As root the wrapper uses `unshare --mount`;
//! as another user it asks for a user namespace as well (`--map-root-user`), so only building a
//! cache needs root (`cargo xtask qemu VERSION` builds without running anything else).
//!
//! # Caching
//!
//! Each version is built in `target/qemu-versions/.NAME.tmp-PID`, renamed into place, and
//! removed again unless its wrapper then answers `--version`; a failed or interrupted build
//! leaves no half-built cache (leftover temp dirs of dead builds are removed by the next build).
//! When two builds race, the first rename wins and the other build is discarded.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A QEMU to run the suite against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// `$QEMU`, or `qemu-system-x86_64` on PATH (installed from Debian's archive when missing).
    System,
    /// 10.0 from `bookworm-backports`, unpacked under `target/qemu-versions/10.0`.
    V10_0,
    /// 11.1 from sid, in a root made by `debootstrap` under `target/qemu-versions/11.1`.
    V11_1,
    /// A binary (or wrapper) given by path.
    Path(PathBuf),
}

impl Choice {
    /// Parses `system`, `10.0`, `11.1` or a path; `all` gives the three versions.
    pub fn parse_list(text: &str) -> Vec<Choice> {
        match text {
            "all" => vec![Choice::System, Choice::V10_0, Choice::V11_1],
            "system" => vec![Choice::System],
            "10.0" => vec![Choice::V10_0],
            "11.1" => vec![Choice::V11_1],
            path => vec![Choice::Path(PathBuf::from(path))],
        }
    }

    /// A short label: `system`, `10.0`, `11.1` or the path.
    pub fn label(&self) -> String {
        match self {
            Choice::System => "system".to_string(),
            Choice::V10_0 => "10.0".to_string(),
            Choice::V11_1 => "11.1".to_string(),
            Choice::Path(path) => path.display().to_string(),
        }
    }

    /// The binary to run for this choice, building its cache first when needed.
    pub fn ensure(&self) -> Result<PathBuf, String> {
        match self {
            Choice::System => {
                crate::qemu::ensure_installed()?;
                Ok(crate::qemu::binary())
            }
            Choice::V10_0 => ensure_backports(),
            Choice::V11_1 => ensure_sid(),
            Choice::Path(path) => {
                crate::qemu::version(path)?;
                Ok(path.clone())
            }
        }
    }
}

/// `cargo xtask qemu [system|10.0|11.1|all|PATH]` (default `all`): builds what is missing and
/// prints each binary's path and version (e.g. for `QEMU=$(...) qemu-machine run`).
pub fn run(args: &[String]) -> Result<(), String> {
    let choices = match args {
        [] => Choice::parse_list("all"),
        [one] => Choice::parse_list(one),
        [_, extra, ..] => return Err(format!("unexpected argument `{extra}`")),
    };
    for choice in choices {
        let qemu = choice.ensure()?;
        let line = crate::qemu::version(&qemu)?;
        println!("{}\t{}", qemu.display(), crate::qemu::version_number(&line));
    }
    Ok(())
}

/// `target/qemu-versions` of this workspace.
fn cache_root() -> PathBuf {
    crate::workspace_root().join("target/qemu-versions")
}

/// The Debian mirror (apt's and debootstrap's).
const MIRROR: &str = "http://deb.debian.org/debian";
/// The keyring Debian's archive is signed with (package `debian-archive-keyring`).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The packages that make QEMU 10.0 for x86 (the rest of its dependencies are in Debian 12).
const BACKPORTS_PACKAGES: [&str; 3] = [
    "qemu-system-x86/bookworm-backports",
    "qemu-system-common/bookworm-backports",
    "qemu-system-data/bookworm-backports",
];
/// The wrapper's file name inside a version's cache directory.
const WRAPPER: &str = "qemu-system-x86_64";

/// The wrapper of 10.0, building `target/qemu-versions/10.0` first if it is missing.
fn ensure_backports() -> Result<PathBuf, String> {
    ensure_cached("10.0", backports_wrapper, |dir| {
        let prefix = dir.join("prefix");
        let apt = dir.join("apt");
        let debs = dir.join("debs");
        for sub in ["lists/partial", "cache/archives/partial"] {
            create_dir_all(&apt.join(sub))?;
        }
        create_dir_all(&debs)?;
        // A private apt configuration: only the backports suite, lists and cache in the build
        // directory, so the system's apt sources and state stay as they are.
        let sources = apt.join("sources.list");
        write(
            &sources,
            &format!("deb [signed-by={KEYRING}] {MIRROR} bookworm-backports main\n"),
        )?;
        let options = [
            format!("Dir::Etc::SourceList={}", sources.display()),
            "Dir::Etc::SourceParts=/nonexistent".to_string(),
            format!("Dir::State::Lists={}", apt.join("lists").display()),
            format!("Dir::Cache={}", apt.join("cache").display()),
            "Debug::NoLocking=1".to_string(),
            // The build directory belongs to us; apt's `_apt` sandbox user could not write it.
            "APT::Sandbox::User=root".to_string(),
        ];
        let mut update = Command::new("apt-get");
        update.arg("-q");
        for option in &options {
            update.args(["-o", option]);
        }
        update.arg("update");
        run_command(&mut update)?;
        let mut download = Command::new("apt-get");
        download.arg("-q").current_dir(&debs);
        for option in &options {
            download.args(["-o", option]);
        }
        download.arg("download").args(BACKPORTS_PACKAGES);
        run_command(&mut download)?;
        for entry in read_dir(&debs)? {
            run_command(Command::new("dpkg").arg("-x").arg(&entry).arg(&prefix))?;
        }
        remove_dir_all(&apt)?;
        remove_dir_all(&debs)?;
        Ok(())
    })
}

/// The wrapper of 11.1, building `target/qemu-versions/11.1` first if it is missing.
fn ensure_sid() -> Result<PathBuf, String> {
    ensure_cached("11.1", sid_wrapper, |dir| {
        let root = dir.join("root");
        ensure_debootstrap()?;
        run_command(
            Command::new("debootstrap")
                .args([
                    "--variant=minbase",
                    "--include=qemu-system-x86,qemu-system-data",
                    &format!("--keyring={KEYRING}"),
                    "sid",
                ])
                .arg(&root)
                .arg(MIRROR),
        )?;
        // Downloaded packages are not needed once installed.
        remove_dir_all(&root.join("var/cache/apt/archives"))?;
        // Where the wrapper binds this workspace (it cannot create it when run without root).
        let workspace = crate::workspace_root();
        create_dir_all(&root.join(workspace.strip_prefix("/").unwrap_or(&workspace)))?;
        Ok(())
    })
}

/// The cached wrapper of version `name`. When the cache is missing, `build` fills an empty temp
/// dir, which is renamed into place and removed again unless its wrapper then answers
/// `--version`. The wrapper (`script` of the cache directory) is rewritten whenever this code
/// generates a different one, so a cache never runs an outdated wrapper.
fn ensure_cached(
    name: &str,
    script: fn(&Path) -> String,
    build: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<PathBuf, String> {
    let root = cache_root();
    let dir = root.join(name);
    let wrapper = dir.join(WRAPPER);
    if dir.is_dir() {
        let wanted = script(&dir);
        if std::fs::read_to_string(&wrapper).ok().as_deref() != Some(wanted.as_str()) {
            write_wrapper(&wrapper, &wanted)?;
        }
        return Ok(wrapper);
    }
    require_root(name)?;
    create_dir_all(&root)?;
    remove_stale_builds(&root, name);
    let building = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if building.exists() {
        remove_dir_all(&building)?;
    }
    create_dir_all(&building)?;
    eprintln!(
        "xtask: building QEMU {name} into {} (once; cached afterwards)",
        dir.display()
    );
    let built = build(&building)
        .and_then(|()| write_wrapper(&building.join(WRAPPER), &script(&dir)))
        .and_then(|()| {
            std::fs::rename(&building, &dir).map_err(|e| {
                format!(
                    "cannot rename {} to {}: {e}",
                    building.display(),
                    dir.display()
                )
            })
        });
    if let Err(why) = built {
        if let Err(e) = std::fs::remove_dir_all(&building) {
            log::warn!("cannot remove {}: {e}", building.display());
        }
        if wrapper.exists() {
            // Another build finished first: use its cache.
            return Ok(wrapper);
        }
        return Err(format!("cannot build QEMU {name}: {why}"));
    }
    match crate::qemu::version(&wrapper) {
        Ok(version) => {
            eprintln!("xtask: built {version}");
            Ok(wrapper)
        }
        Err(why) => {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                log::warn!("cannot remove {}: {e}", dir.display());
            }
            Err(format!("QEMU {name} was built but does not run: {why}"))
        }
    }
}

/// Removes `.NAME.tmp-PID` directories whose builder process is gone.
fn remove_stale_builds(root: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!(
                "xtask: removing the unfinished build {}",
                entry.path().display()
            );
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                log::warn!("cannot remove {}: {e}", entry.path().display());
            }
        }
    }
}

/// Building a version needs root (debootstrap, and apt/dpkg writing root-owned files); the
/// error names the exact command to run otherwise.
fn require_root(name: &str) -> Result<(), String> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    Err(format!(
        "building QEMU {name} needs root (apt-get, dpkg, debootstrap); build it once with: sudo env \"PATH=$PATH\" cargo xtask qemu {name}   (running it afterwards needs no root: the wrapper then uses a user namespace)"
    ))
}

/// Installs Debian's `debootstrap` when missing (we are root here).
fn ensure_debootstrap() -> Result<(), String> {
    if Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    const INSTALL: &str = "apt-get update && apt-get install -y debootstrap";
    eprintln!("xtask: debootstrap not found, running: {INSTALL}");
    run_command(
        Command::new("sh")
            .args(["-c", INSTALL])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .map_err(|why| format!("{why}; install it with: sudo sh -c '{INSTALL}'"))
}

/// The wrapper for 10.0 cached in `dir` (unpacked in `dir/prefix`).
fn backports_wrapper(dir: &Path) -> String {
    let prefix = dir.join("prefix");
    format!(
        r#"#!/bin/sh
# QEMU 10.0 from Debian bookworm-backports, unpacked by `cargo xtask` (see xtask/src/versions.rs).
# A private mount namespace puts its own module directory over the system's (7.2's modules
# would abort it); `exec` all the way down keeps this pid and the fds we were given.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
P={prefix}
U=--mount; [ "$(id -u)" = 0 ] || U="--map-root-user --mount"
exec unshare $U --propagation private -- /bin/sh -c '
P=$1; shift
M=/usr/lib/x86_64-linux-gnu/qemu
if [ -d "$M" ]; then mount --bind "$P$M" "$M" || exit 125; fi
exec "$P/usr/bin/qemu-system-x86_64" -L "$P/usr/share/qemu" "$@"' sh "$P" "$@"
"#,
        prefix = shell_quote(prefix.as_os_str())
    )
}

/// The wrapper for 11.1 cached in `dir` (the sid root is `dir/root`).
fn sid_wrapper(dir: &Path) -> String {
    let root = dir.join("root");
    format!(
        r#"#!/bin/sh
# QEMU 11.1 from Debian sid, in a root made by debootstrap (see xtask/src/versions.rs).
# A private mount namespace binds the host's /tmp, /dev, /proc, /sys, /home, /root and this
# workspace into the root at the same paths, then chroots; `exec` all the way down keeps this
# pid and the fds we were given. Other host paths are not visible to QEMU. The working
# directory stays the same when the root has its path; otherwise it is bound at /mnt and QEMU
# starts there, so relative paths still work.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
R={root}
WS={workspace}
U=--mount; [ "$(id -u)" = 0 ] || U="--map-root-user --mount"
exec unshare $U --propagation private -- /bin/sh -c '
R=$1; WS=$2; shift 2
for d in /tmp /dev /proc /sys; do mount --rbind "$d" "$R$d" || exit 125; done
for d in /home /root "$WS"; do
  if [ -d "$d" ] && {{ [ -d "$R$d" ] || mkdir -p "$R$d" 2>/dev/null; }}; then
    mount --rbind "$d" "$R$d" || exit 125
  fi
done
W=$PWD
if [ ! -d "$R$W" ]; then mount --bind "$W" "$R/mnt" || exit 125; W=/mnt; fi
exec chroot "$R" /bin/sh -c "cd \"\$0\" && exec /usr/bin/qemu-system-x86_64 \"\$@\"" "$W" "$@"' sh "$R" "$WS" "$@"
"#,
        root = shell_quote(root.as_os_str()),
        workspace = shell_quote(crate::workspace_root().as_os_str())
    )
}

/// `text` in single quotes for sh.
pub fn shell_quote(text: &OsStr) -> String {
    format!("'{}'", text.to_string_lossy().replace('\'', r"'\''"))
}

/// Writes an executable wrapper script.
pub fn write_wrapper(path: &Path, script: &str) -> Result<(), String> {
    write(path, script)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

/// Runs a command with inherited stdio; Err names the command and its status.
fn run_command(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed: {status}"))
    }
}

fn create_dir_all(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

fn remove_dir_all(path: &Path) -> Result<(), String> {
    std::fs::remove_dir_all(path).map_err(|e| format!("cannot remove {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The entries of a directory, sorted.
fn read_dir(path: &Path) -> Result<Vec<PathBuf>, String> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| format!("cannot list {}: {e}", path.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        assert_eq!(
            Choice::parse_list("all"),
            [Choice::System, Choice::V10_0, Choice::V11_1]
        );
        assert_eq!(Choice::parse_list("11.1"), [Choice::V11_1]);
        assert_eq!(
            Choice::parse_list("/opt/qemu"),
            [Choice::Path(PathBuf::from("/opt/qemu"))]
        );
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote(OsStr::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}
