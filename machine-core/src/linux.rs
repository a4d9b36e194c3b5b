//! A Linux test guest made from Debian packages: Debian's cloud kernel and an initramfs with
//! busybox and QEMU's guest agent, built by our own code and cached.
//!
//! The tiny built-in kernel ([`crate::guest`]) cannot run the guest agent, unplug a device or
//! behave like the guests people test. This module builds one that can, from Debian's archive
//! only (`apt-get download`, then `dpkg -x`: nothing is installed on the host):
//!
//! - the kernel from the versioned package behind `linux-image-cloud-amd64`;
//! - an uncompressed "newc" initramfs written here (module `cpio`) with `busybox-static`, QEMU's
//!   guest agent (`qemu-guest-agent`) and every shared library it loads (found by reading the
//!   ELF `DT_NEEDED` entries, module `elf`), the ACPI `button` and `evdev` modules, and an init
//!   script ([`INIT_SCRIPT`]).
//!
//! The init mounts `/proc`, `/sys` and `/dev`, loads the two modules, starts busybox's `acpid`
//! (the power button runs a clean power-off: the agent is stopped, disks synced, then
//! `poweroff -f`), starts the agent on the second serial port (`qemu-ga -m isa-serial -p
//! /dev/ttyS1`; the cloud kernel has the 8250 UART built in, so no virtio module is needed),
//! waits until the agent holds that port open, prints [`READY_LINE`] and gives a shell on the
//! console (`ttyS0`) with the prompt [`PROMPT`].
//!
//! Building takes a few seconds (about 28 MB from the archive); the result is cached in
//! `CACHE/linux-guest-HASH/` (the hash covers the init script and package list, so a change
//! rebuilds). It is built in a temporary directory beside it and renamed into place, so an
//! interrupted build leaves nothing that looks complete. A missing package or a stale package
//! list gives [`crate::Error::GuestPackages`] with the exact `apt-get` command to run.
//!
//! Measured here (QEMU 7.2, TCG, `-M q35 -bios qboot.rom`): the ready line about 2.3 s after
//! exec; `system_powerdown` to `SHUTDOWN {guest: true}` about 0.16 s.
//!
//! ```no_run
//! use std::time::Duration;
//! use machine_core::linux::{LinuxGuest, READY_LINE};
//! use machine_core::console_socket::Pattern;
//! use machine_core::MachineBuilder;
//!
//! let guest = LinuxGuest::ensure("target".as_ref())?;
//! let mut builder = MachineBuilder::new("qemu-system-x86_64");
//! guest.configure(&mut builder);
//! let mut vm = builder.build();
//! vm.launch()?;
//! vm.console()?.wait_for(&Pattern::substring(READY_LINE), Duration::from_secs(60))?;
//! vm.agent()?.ping()?;
//! vm.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cpio;
mod elf;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::agent::AgentChannel;
use crate::config::MachineBuilder;
use crate::error::{Error, Result};

/// The metapackage whose dependency names the kernel package to download.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// The other packages unpacked into the initramfs: busybox, the guest agent and the libraries
/// the agent loads (their closure is checked when the initramfs is assembled).
pub const PACKAGES: &[&str] = &[
    "busybox-static",
    "qemu-guest-agent",
    "libc6",
    "libglib2.0-0",
    "libpcre2-8-0",
    "libnuma1",
    "libudev1",
    "liburing2",
];

/// The line the init prints on the console once the agent listens and the shell starts.
pub const READY_LINE: &str = "qemu-machine: guest ready";

/// The console shell's prompt.
pub const PROMPT: &str = "guest# ";

/// A file with known content ([`KNOWN_FILE_CONTENT`]), for reading through the agent.
pub const KNOWN_FILE: &str = "/etc/qemu-machine-guest";

/// The content of [`KNOWN_FILE`].
pub const KNOWN_FILE_CONTENT: &str = "qemu-machine linux test guest\n";

/// The id of the PCIe root port [`LinuxGuest::configure`] adds for hot-plugging
/// (`device_add ...,bus=hotplug0`).
pub const HOTPLUG_PORT: &str = "hotplug0";

/// What the power button runs: stop the agent, flush, power off.
pub const POWER_BUTTON_SCRIPT: &str = "#!/bin/sh
echo 'qemu-machine: power button, powering off' > /dev/console
kill $(pidof qemu-ga) 2>/dev/null
sync
poweroff -f
";

/// `/sbin/shutdown` for the agent's `guest-shutdown` (busybox has no `shutdown`): qemu-ga 7.2
/// runs `shutdown -h -P +0 MSG` (powerdown), `-h -H` (halt) or `-r` (reboot).
pub const SHUTDOWN_SCRIPT: &str = "#!/bin/sh
sync
case \" $* \" in
*' -r '*) exec reboot -f ;;
*' -H '*) exec halt -f ;;
*) exec poweroff -f ;;
esac
";

/// The initramfs's `/init`.
pub const INIT_SCRIPT: &str = "#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /lib/modules/evdev.ko
insmod /lib/modules/button.ko
acpid -l /var/log/acpid.log
qemu-ga -m isa-serial -p /dev/ttyS1 -l /var/log/qemu-ga.log &
agent=$!
while ! ls -l /proc/$agent/fd 2>/dev/null | grep -q ttyS1; do usleep 5000; done
echo 'qemu-machine: guest ready'
export PS1='guest# '
exec setsid cttyhack sh
";

/// The kernel command line.
pub const KERNEL_COMMAND_LINE: &str = "console=ttyS0 quiet";

/// Where QEMU's Debian package puts qboot, the fastest firmware for `-kernel` on q35.
const QBOOT_ROM: &str = crate::guest::QBOOT_ROM;

/// A built Linux test guest: a kernel and an initramfs in a cache directory.
#[derive(Clone, Debug)]
pub struct LinuxGuest {
    dir: PathBuf,
}

impl LinuxGuest {
    /// The guest cached under `cache`, built first when missing (see the module docs).
    pub fn ensure(cache: &Path) -> Result<LinuxGuest> {
        LinuxGuest::ensure_with(cache, build)
    }

    /// [`LinuxGuest::ensure`] with the build step given (tests fail it on purpose).
    fn ensure_with(cache: &Path, build: fn(&Path) -> Result<PathBuf>) -> Result<LinuxGuest> {
        let dir = cache.join(format!("linux-guest-{:016x}", recipe_hash()));
        let guest = LinuxGuest { dir };
        if guest.kernel().is_file() && guest.initrd().is_file() {
            return Ok(guest);
        }
        std::fs::create_dir_all(cache).map_err(build_err("create", cache))?;
        let work = tempfile::Builder::new()
            .prefix(".linux-guest-build-")
            .tempdir_in(cache)
            .map_err(build_err("create a build directory in", cache))?;
        log::info!("building the Linux test guest in {}", guest.dir.display());
        let out = build(work.path())?;
        match std::fs::rename(&out, &guest.dir) {
            Ok(()) => {}
            // Another process finished the same build first: theirs is as good.
            Err(_) if guest.kernel().is_file() && guest.initrd().is_file() => {}
            Err(err) => return Err(build_err("rename into place", &guest.dir)(err)),
        }
        Ok(guest)
    }

    /// The directory holding the kernel and the initramfs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kernel image (`vmlinuz`).
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The initramfs (`initrd.cpio`, uncompressed newc).
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.cpio")
    }

    /// The QEMU arguments that boot this guest: `-accel tcg` (a stock kernel is unusable under
    /// this host's nested KVM), qboot, 256 MiB, the kernel, initramfs and command line, and
    /// a hotplug-capable PCIe root port ([`HOTPLUG_PORT`]). Machine type, console and agent
    /// channel are set by [`LinuxGuest::configure`].
    pub fn qemu_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["-accel", "tcg", "-bios", QBOOT_ROM, "-m", "256"]
            .map(OsString::from)
            .to_vec();
        args.push("-kernel".into());
        args.push(self.kernel().into());
        args.push("-initrd".into());
        args.push(self.initrd().into());
        args.push("-append".into());
        args.push(KERNEL_COMMAND_LINE.into());
        args.push("-device".into());
        args.push(format!("pcie-root-port,id={HOTPLUG_PORT},chassis=1,slot=1").into());
        args
    }

    /// Sets up `builder` to boot this guest: `-M q35`, [`LinuxGuest::qemu_args`], the console
    /// on the first serial port (`ttyS0`) and the agent channel on the second
    /// ([`AgentChannel::IsaSerial`], `ttyS1`).
    pub fn configure<'b>(&self, builder: &'b mut MachineBuilder) -> &'b mut MachineBuilder {
        builder
            .machine_type("q35")
            .console()
            .guest_agent(AgentChannel::IsaSerial)
            .args(self.qemu_args())
    }
}

fn build_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::GuestBuild { step, path, source }
}

/// FNV-1a over everything that decides the initramfs's content, so a change rebuilds.
fn recipe_hash() -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let parts = [
        "1",
        INIT_SCRIPT,
        POWER_BUTTON_SCRIPT,
        SHUTDOWN_SCRIPT,
        KNOWN_FILE_CONTENT,
        KERNEL_META_PACKAGE,
    ];
    for part in parts.iter().chain(PACKAGES) {
        for byte in part.bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Downloads, unpacks and assembles in `work`; returns the finished output directory.
fn build(work: &Path) -> Result<PathBuf> {
    let kernel_package = kernel_package()?;
    let debs = work.join("debs");
    std::fs::create_dir(&debs).map_err(build_err("create", &debs))?;
    let mut packages: Vec<&str> = vec![&kernel_package];
    packages.extend(PACKAGES);
    run_tool(
        Command::new("apt-get")
            .arg("download")
            .args(&packages)
            .current_dir(&debs),
        &format!("apt-get download {}", packages.join(" ")),
    )?;
    let root = work.join("root");
    let entries = std::fs::read_dir(&debs).map_err(build_err("list", &debs))?;
    for entry in entries {
        let path = entry.map_err(build_err("list", &debs))?.path();
        run_tool(
            Command::new("dpkg").arg("-x").arg(&path).arg(&root),
            &format!("dpkg -x {} {}", path.display(), root.display()),
        )?;
    }
    let out = work.join("out");
    std::fs::create_dir(&out).map_err(build_err("create", &out))?;
    let version = kernel_version(&root)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    std::fs::copy(&vmlinuz, out.join("vmlinuz")).map_err(build_err("copy", &vmlinuz))?;
    let initrd = initramfs(&root, &version)?;
    let initrd_path = out.join("initrd.cpio");
    std::fs::write(&initrd_path, initrd).map_err(build_err("write", &initrd_path))?;
    Ok(out)
}

/// The versioned kernel package behind [`KERNEL_META_PACKAGE`] (`apt-cache depends`).
fn kernel_package() -> Result<String> {
    let what = format!("apt-cache depends {KERNEL_META_PACKAGE}");
    let output = run_tool(
        Command::new("apt-cache")
            .arg("depends")
            .arg(KERNEL_META_PACKAGE),
        &what,
    )?;
    String::from_utf8_lossy(&output)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|dep| dep.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or_else(|| Error::GuestPackages {
            what: format!("`{what}` names no linux-image package"),
            fix: "apt-get update".into(),
        })
}

/// Runs an apt or dpkg tool; returns its stdout, or the error with the command to fix it.
fn run_tool(command: &mut Command, what: &str) -> Result<Vec<u8>> {
    let output = command.output().map_err(|err| Error::GuestPackages {
        what: format!("cannot run `{what}`: {err}"),
        fix: "run on Debian with apt and dpkg (apt-get install apt dpkg)".into(),
    })?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.starts_with("W: "))
        .unwrap_or("")
        .trim();
    let fix = if what.starts_with("apt") {
        // A stale or missing package list is the usual cause; the command then works again.
        format!("apt-get update && {what}")
    } else {
        what.to_owned()
    };
    Err(Error::GuestPackages {
        what: format!("`{what}` failed ({}): {last}", output.status),
        fix,
    })
}

/// The version in `boot/vmlinuz-VERSION` of the unpacked kernel package.
fn kernel_version(root: &Path) -> Result<String> {
    let boot = root.join("boot");
    let entries = std::fs::read_dir(&boot).map_err(build_err("list", &boot))?;
    for entry in entries.flatten() {
        if let Some(version) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            return Ok(version.to_owned());
        }
    }
    Err(Error::GuestPackages {
        what: format!("no vmlinuz-* in {}", boot.display()),
        fix: format!("apt-get update && apt-get download {KERNEL_META_PACKAGE}"),
    })
}

/// Library directories of the unpacked packages, searched in this order.
const LIB_DIRS: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64"];

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(build_err("read", path))
}

/// Assembles the initramfs from the unpacked packages in `root`.
fn initramfs(root: &Path, version: &str) -> Result<Vec<u8>> {
    let mut archive = cpio::Archive::default();
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "lib",
        "lib/x86_64-linux-gnu",
        "lib/modules",
        "lib64",
        "etc",
        "etc/acpi",
        "etc/acpi/PWRF",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var",
        "var/log",
    ] {
        archive.dir(dir);
    }
    archive.symlink("var/run", "../run");
    archive.file("bin/busybox", 0o755, &read(&root.join("bin/busybox"))?);
    archive.symlink("bin/sh", "busybox");
    archive.file("init", 0o755, INIT_SCRIPT.as_bytes());
    archive.file("sbin/shutdown", 0o755, SHUTDOWN_SCRIPT.as_bytes());
    // busybox acpid runs CONFDIR/ACTION: the power button's action is PWRF/00000080.
    archive.file(
        "etc/acpi/PWRF/00000080",
        0o755,
        POWER_BUTTON_SCRIPT.as_bytes(),
    );
    archive.file(
        KNOWN_FILE.trim_start_matches('/'),
        0o644,
        KNOWN_FILE_CONTENT.as_bytes(),
    );
    let modules = root.join("lib/modules").join(version).join("kernel");
    for module in ["drivers/input/evdev.ko", "drivers/acpi/button.ko"] {
        let path = modules.join(module);
        let name = module.rsplit('/').next().unwrap_or(module);
        archive.file(&format!("lib/modules/{name}"), 0o644, &read(&path)?);
    }
    let agent = read(&root.join("usr/sbin/qemu-ga"))?;
    for (name, data) in library_closure(root, &agent)? {
        archive.file(&format!("lib/x86_64-linux-gnu/{name}"), 0o755, &data);
    }
    archive.file("usr/sbin/qemu-ga", 0o755, &agent);
    archive.symlink(
        "lib64/ld-linux-x86-64.so.2",
        "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    );
    Ok(archive.finish())
}

/// Every library `program` loads, directly or through another library, with its bytes; the
/// dynamic loader included. A library found in no unpacked package is an error naming it.
fn library_closure(root: &Path, program: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let not_elf = |what: &str| Error::GuestPackages {
        what: format!("{what} is not a 64-bit ELF file"),
        fix: "apt-get update".into(),
    };
    let mut todo: Vec<String> = elf::needed_libraries(program).ok_or_else(|| not_elf("qemu-ga"))?;
    todo.push("ld-linux-x86-64.so.2".into());
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let path = LIB_DIRS
            .iter()
            .map(|dir| root.join(dir).join(&name))
            .find(|p| p.exists())
            .ok_or_else(|| Error::GuestPackages {
                what: format!(
                    "the guest agent needs {name}, which none of the packages {} provides",
                    PACKAGES.join(", ")
                ),
                fix: format!("apt-file search {name} (then add that package to PACKAGES)"),
            })?;
        let data = read(&path)?;
        todo.extend(elf::needed_libraries(&data).ok_or_else(|| not_elf(&name))?);
        found.push((name, data));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_script_prints_the_ready_line_and_prompt() {
        assert!(INIT_SCRIPT.contains(&format!("echo '{READY_LINE}'")));
        assert!(INIT_SCRIPT.contains(&format!("PS1='{PROMPT}'")));
        assert!(INIT_SCRIPT.contains("-p /dev/ttyS1"));
    }

    #[test]
    fn a_missing_library_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exe = std::fs::read("/proc/self/exe").expect("own executable");
        let err = library_closure(dir.path(), &exe).expect_err("no libraries in an empty root");
        let text = err.to_string();
        assert!(text.contains("which none of the packages"), "{text}");
        assert!(matches!(err, Error::GuestPackages { .. }));
    }

    #[test]
    fn a_failed_build_leaves_nothing_in_the_cache() {
        let cache = tempfile::tempdir().expect("temp dir");
        let half_built = |work: &Path| -> Result<PathBuf> {
            let out = work.join("out");
            std::fs::create_dir(&out).map_err(build_err("create", &out))?;
            std::fs::write(out.join("vmlinuz"), b"half").map_err(build_err("write", &out))?;
            Err(Error::GuestPackages {
                what: "no such package".into(),
                fix: "apt-get update".into(),
            })
        };
        let err = LinuxGuest::ensure_with(cache.path(), half_built).expect_err("build fails");
        assert!(matches!(err, Error::GuestPackages { .. }));
        let left: Vec<_> = std::fs::read_dir(cache.path())
            .expect("list cache")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        // A complete build is renamed into place and found the next time without building.
        let complete = |work: &Path| -> Result<PathBuf> {
            let out = work.join("out");
            std::fs::create_dir(&out).map_err(build_err("create", &out))?;
            for name in ["vmlinuz", "initrd.cpio"] {
                std::fs::write(out.join(name), b"x").map_err(build_err("write", &out))?;
            }
            Ok(out)
        };
        let guest = LinuxGuest::ensure_with(cache.path(), complete).expect("built");
        assert!(guest.kernel().is_file() && guest.initrd().is_file());
        let again = LinuxGuest::ensure_with(cache.path(), |_| panic!("rebuilt")).expect("cached");
        assert_eq!(again.dir(), guest.dir());
        let entries = std::fs::read_dir(cache.path()).expect("list cache").count();
        assert_eq!(entries, 1, "only the finished guest directory");
    }

    #[test]
    fn a_failing_tool_gives_the_command_to_run() {
        let err = run_tool(
            Command::new("apt-get").args(["download", "no-such-package-qemu-machine"]),
            "apt-get download no-such-package-qemu-machine",
        )
        .expect_err("no such package");
        match err {
            Error::GuestPackages { fix, .. } => assert_eq!(
                fix,
                "apt-get update && apt-get download no-such-package-qemu-machine"
            ),
            other => panic!("unexpected {other:?}"),
        }
    }
}
