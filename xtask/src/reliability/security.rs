//! Figure "security": no fd of ours reaches QEMU, the private temp dir is 0700 and another
//! user cannot connect to a socket in it, a TCP monitor on a non-loopback address is refused by
//! default, and hostile values stay literal argv entries (commas doubled in option strings),
//! checked through QEMU's own answers.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use machine_core::{escape_os_value, escape_value, split_options, Error, Machine, Monitor};
use serde_json::{json, Value};

use super::{chain, sys, Figure, Settings};

/// Fds we open without close-on-exec before the launch: none may reach QEMU.
struct Decoys {
    _fds: Vec<OwnedFd>,
    targets: Vec<String>,
}

fn decoys(scratch: &Path) -> Result<Decoys, String> {
    use nix::fcntl::OFlag;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use nix::sys::stat::Mode;
    let path = scratch.join("decoy-file");
    let file = nix::fcntl::open(
        &path,
        OFlag::O_RDWR | OFlag::O_CREAT,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| format!("open decoy: {e}"))?;
    let (pipe_r, pipe_w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (sock_a, sock_b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::empty(),
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let fds = vec![file, pipe_r, pipe_w, sock_a, sock_b];
    let ours = sys::open_fds();
    let targets = fds
        .iter()
        .filter_map(|fd| {
            use std::os::fd::AsRawFd;
            ours.get(&fd.as_raw_fd()).cloned()
        })
        .collect();
    Ok(Decoys { _fds: fds, targets })
}

/// The `fd=N` values of our chardevs in the command line (the monitor's and the console's).
fn chardev_fds(vm: &Machine) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    if let Some(cmd) = vm.command_line() {
        for arg in cmd.argv() {
            let text = arg.to_string_lossy();
            if text.starts_with("socket,") {
                for part in split_options(&text) {
                    if let Some(n) = part.strip_prefix("fd=").and_then(|n| n.parse().ok()) {
                        out.insert(n);
                    }
                }
            }
        }
    }
    out
}

/// What QEMU's fd table showed.
struct FdFindings {
    /// Fds QEMU holds.
    total: usize,
    /// Of which allowed: stdio and our chardev ends.
    allowed: usize,
    /// Inherited ones that should not be there.
    extra: Vec<String>,
    /// The whole table: fd -> target.
    theirs: BTreeMap<i32, String>,
}

fn fd_check(settings: &Settings, figure: &mut Figure) {
    let result = (|| -> Result<FdFindings, String> {
        let decoys = decoys(&settings.scratch())?;
        // The control: a plain child (std's spawn, no fd allow-list) inherits the decoys, so
        // the detector below can see an inherited fd.
        let mut control = std::process::Command::new("sleep")
            .arg("10")
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot spawn sleep: {e}"))?;
        let control_fds = sys::fds_of(&control.id().to_string());
        let _ = control.kill();
        let _ = control.wait();
        let seen = decoys
            .targets
            .iter()
            .filter(|t| control_fds.values().any(|c| c == *t))
            .count();
        if seen != decoys.targets.len() {
            return Err(format!(
                "control: a plain child shows {seen} of the {} decoys; the check cannot see leaks",
                decoys.targets.len()
            ));
        }
        let mut builder = settings.none_machine();
        builder.console();
        let mut vm = builder.build();
        vm.launch().map_err(|e| format!("launch: {}", chain(&e)))?;
        let pid = vm.pid().ok_or("no pid")?;
        let theirs = sys::fds_of(&pid.to_string());
        let ours = sys::open_fds();
        let mut allowed: BTreeSet<i32> = [0, 1, 2].into();
        allowed.extend(chardev_fds(&vm));
        // An fd is inherited if it points at an object we hold too (same socket or pipe
        // inode, same file), apart from the allowed ones (stdout/stderr share our pipe).
        let our_targets: BTreeSet<&String> = ours
            .values()
            .filter(|t| !t.starts_with("anon_inode:") && t.as_str() != "/dev/null")
            .collect();
        let mut extra = Vec::new();
        for (fd, target) in &theirs {
            if allowed.contains(fd) {
                continue;
            }
            if our_targets.contains(target) || decoys.targets.contains(target) {
                extra.push(format!("fd {fd} -> {target}"));
            }
        }
        let stdin_ok = theirs.get(&0).is_some_and(|t| t == "/dev/null");
        if !stdin_ok {
            extra.push(format!("fd 0 -> {:?} (expected /dev/null)", theirs.get(&0)));
        }
        let _ = vm.kill();
        drop(decoys);
        let _ = std::fs::remove_file(settings.scratch().join("decoy-file"));
        Ok(FdFindings {
            total: theirs.len(),
            allowed: allowed.len(),
            extra,
            theirs,
        })
    })();
    match result {
        Ok(FdFindings {
            total,
            allowed,
            extra,
            theirs,
        }) => {
            figure.check(
                "extra (inherited) fds in QEMU (/proc/<pid>/fd)",
                "0",
                format!(
                    "{} (QEMU holds {total}: {allowed} allowed = stdio + monitor + console, \
                     the rest its own; 5 non-CLOEXEC decoys held by us, all 5 seen in a \
                     plain child as the control)",
                    extra.len()
                ),
                extra.is_empty(),
            );
            figure.detail("qemu_fds", json!(theirs));
            if !extra.is_empty() {
                figure.note(format!("inherited: {}", extra.join(", ")));
            }
        }
        Err(e) => figure.check("extra fds in QEMU", "0", e, false),
    }
}

fn temp_dir_check(settings: &Settings, figure: &mut Figure) {
    let result = (|| -> Result<u32, String> {
        let mut vm = settings.none_machine().build();
        let dir = vm.temp_dir().map_err(|e| chain(&e))?.to_path_buf();
        vm.launch().map_err(|e| format!("launch: {}", chain(&e)))?;
        let mode = std::fs::metadata(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .permissions()
            .mode()
            & 0o7777;
        vm.shutdown().map_err(|e| chain(&e))?;
        Ok(mode)
    })();
    match result {
        Ok(mode) => figure.check(
            "private temp dir mode",
            "0700",
            format!("{mode:04o}"),
            mode == 0o700,
        ),
        Err(e) => figure.check("private temp dir mode", "0700", e, false),
    }
}

fn tcp_check(settings: &Settings, figure: &mut Figure) {
    let mut refused = 0;
    let mut details = Vec::new();
    let addrs = [
        "0.0.0.0:0",
        "[::]:0",
        "192.0.2.1:4444",
        "[2001:db8::1]:4444",
    ];
    for addr in addrs {
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            continue;
        };
        let known = sys::known_children();
        let mut builder = settings.none_machine();
        builder.monitor(Monitor::Tcp(addr));
        let mut vm = builder.build();
        let result = vm.launch();
        let spawned = sys::children().keys().any(|pid| !known.contains_key(pid));
        match result {
            Err(Error::RemoteMonitor { .. }) if !spawned => refused += 1,
            Err(e) => details.push(format!("{addr}: {} (spawned: {spawned})", chain(&e))),
            Ok(()) => {
                details.push(format!("{addr}: launched"));
                let _ = vm.kill();
            }
        }
    }
    figure.check(
        "TCP monitor on non-loopback refused by default (before spawn)",
        format!("{}/{}", addrs.len(), addrs.len()),
        format!("{refused}/{}", addrs.len()),
        refused == addrs.len(),
    );
    // The control: loopback works.
    let mut builder = settings.none_machine();
    builder.monitor(Monitor::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))));
    let mut vm = builder.build();
    let loopback = vm
        .launch()
        .and_then(|()| vm.cmd("query-status", ()))
        .map_err(|e| chain(&e));
    let _ = vm.shutdown();
    figure.check(
        "TCP monitor on 127.0.0.1 works (control)",
        "ok",
        match &loopback {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.clone(),
        },
        loopback.is_ok(),
    );
    for d in details {
        figure.note(d);
    }
}

/// One injection case: a name and a check returning what was observed.
type Case<'a> = (String, Box<dyn Fn() -> Result<String, String> + 'a>);

/// Launches `vm`, runs `f`, ends it.
fn with_machine<T>(
    mut vm: Machine,
    f: impl FnOnce(&mut Machine) -> Result<T, String>,
) -> Result<T, String> {
    vm.launch().map_err(|e| format!("launch: {}", chain(&e)))?;
    let result = f(&mut vm);
    let _ = vm.shutdown();
    result
}

/// `-name guest=ESCAPED`: QEMU must report exactly `value` from `query-name`.
fn name_case(settings: &Settings, value: &str, raw_entry: bool) -> Result<String, String> {
    let entry = if raw_entry {
        value.to_owned()
    } else {
        format!("guest={}", escape_value(value))
    };
    let mut builder = settings.none_machine();
    builder.args(["-name", entry.as_str()]);
    let vm = builder.build();
    with_machine(vm, |vm| {
        let argv_ok = vm
            .command_line()
            .is_some_and(|c| c.argv().iter().any(|a| a.as_bytes() == entry.as_bytes()));
        if !argv_ok {
            return Err("the argv does not hold the entry as one literal element".into());
        }
        let reply = vm.cmd("query-name", ()).map_err(|e| chain(&e))?;
        if reply["name"] == json!(value) {
            Ok(format!("query-name = {:?}", value))
        } else {
            Err(format!("query-name = {reply}, expected {value:?}"))
        }
    })
}

/// A unix monitor at an odd path: the chardev holds exactly socket/id/path with the literal
/// path, and QEMU connects to that very socket (the launch completes).
fn unix_path_case(settings: &Settings, name: &str) -> Result<String, String> {
    let dir = settings.scratch().join("mon");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join(name);
    let mut builder = settings.none_machine();
    builder.monitor(Monitor::Unix(path.clone()));
    let vm = builder.build();
    let result = with_machine(vm, |vm| {
        let chardev = vm
            .command_line()
            .and_then(|c| {
                c.argv()
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .find(|a| a.starts_with("socket,id=mon"))
            })
            .ok_or("no monitor chardev")?;
        let parts = split_options(&chardev);
        let want_path = format!("path={}", path.display());
        if parts.len() != 3 || parts[2] != want_path {
            return Err(format!("chardev parsed as {parts:?}"));
        }
        vm.cmd("query-status", ()).map_err(|e| chain(&e))?;
        Ok(format!("{chardev:?} -> 3 options, QEMU connected"))
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn injection_check(settings: &Settings, figure: &mut Figure) {
    let scratch = settings.scratch();
    let pwned = scratch.join("PWNED");
    let meta = format!(
        "$(touch {p}) `touch {p}`; touch {p} | & > < * ? ' \" \\",
        p = pwned.display()
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "unix monitor path with `,server=on,wait=off`".into(),
            Box::new(|| unix_path_case(settings, "m,server=on,wait=off.sock")),
        ),
        (
            "unix monitor path with newline, `=` and spaces".into(),
            Box::new(|| unix_path_case(settings, "m\n x=1 ,id=evil.sock")),
        ),
        (
            "comma in an option value (-name guest=)".into(),
            Box::new(|| name_case(settings, "vm,debug-threads=on", false)),
        ),
        (
            "`=` and a second key in a value".into(),
            Box::new(|| name_case(settings, "k=v,guest=evil,process=x", false)),
        ),
        (
            "spaces in a value".into(),
            Box::new(|| name_case(settings, "a b  c ", false)),
        ),
        (
            "newline in a value".into(),
            Box::new(|| name_case(settings, "line1\nline2", false)),
        ),
        (
            "leading `-` as an argv entry".into(),
            Box::new(|| name_case(settings, "-daemonize", true)),
        ),
        (
            "shell metacharacters".into(),
            Box::new(|| {
                let r = name_case(settings, &meta, false)?;
                if pwned.exists() {
                    return Err("a shell ran the value".into());
                }
                Ok(r)
            }),
        ),
        (
            "add_fd opaque with `,` and `=`".into(),
            Box::new(|| {
                let opaque = "x,set=7,opaque=evil";
                let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
                let mut builder = settings.none_machine();
                builder
                    .add_fd(&null, 3, Some(opaque), "")
                    .map_err(|e| chain(&e))?;
                let vm = builder.build();
                with_machine(vm, |vm| {
                    let sets = vm.cmd("query-fdsets", ()).map_err(|e| chain(&e))?;
                    let found = sets.as_array().into_iter().flatten().any(|set| {
                        set["fdset-id"] == json!(3)
                            && set["fds"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|fd| fd["opaque"] == json!(opaque))
                    });
                    if found {
                        Ok(format!("fdset 3 opaque = {opaque:?}"))
                    } else {
                        Err(format!("query-fdsets = {sets}"))
                    }
                })
            }),
        ),
        (
            "file path `a,file.locking=off,x=y .img` opened by QEMU".into(),
            Box::new(|| {
                let path = scratch.join("disk,file.locking=off,x=y .img");
                std::fs::write(&path, vec![0u8; 64 * 1024]).map_err(|e| e.to_string())?;
                let mut opt = OsString::from("driver=file,filename=");
                opt.push(escape_os_value(path.as_os_str()));
                opt.push(",node-name=odd0,read-only=on");
                let mut builder = settings.none_machine();
                builder.arg("-blockdev").arg(opt);
                let vm = builder.build();
                let result = with_machine(vm, |vm| {
                    let nodes = vm
                        .cmd("query-named-block-nodes", ())
                        .map_err(|e| chain(&e))?;
                    let file = nodes
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|n| n["node-name"] == json!("odd0"))
                        .map(|n| n["file"].clone())
                        .unwrap_or(Value::Null);
                    if file == json!(path.display().to_string()) {
                        Ok(format!("node odd0 file = {file}"))
                    } else {
                        Err(format!("node odd0 file = {file}"))
                    }
                });
                let _ = std::fs::remove_file(&path);
                result
            }),
        ),
        (
            "binary path with a space and `$(...)`".into(),
            Box::new(|| {
                // A shell would create PWNED2 in our working directory (QEMU's too).
                let marker = std::env::current_dir()
                    .map_err(|e| e.to_string())?
                    .join("PWNED2");
                let link: PathBuf = scratch.join("q emu;$(touch PWNED2)");
                let real = which(&settings.qemu).ok_or("qemu not found on PATH")?;
                std::os::unix::fs::symlink(&real, &link).map_err(|e| e.to_string())?;
                let mut builder = machine_core::MachineBuilder::new(&link);
                builder
                    .machine_type("none")
                    .args(["-accel", "tcg", "-nodefaults"])
                    .base_temp_dir(settings.temp_base());
                let vm = builder.build();
                let result = with_machine(vm, |vm| {
                    let argv0_ok = vm
                        .command_line()
                        .and_then(|c| c.argv().first().cloned())
                        .is_some_and(|a| a.as_bytes() == link.as_os_str().as_bytes());
                    vm.cmd("query-status", ()).map_err(|e| chain(&e))?;
                    if !argv0_ok {
                        return Err("argv[0] is not the literal path".into());
                    }
                    Ok("launched through the literal path".into())
                });
                let _ = std::fs::remove_file(&link);
                if marker.exists() {
                    return Err("a shell ran the path".into());
                }
                result
            }),
        ),
    ];
    let mut passed = 0;
    let mut results = Vec::new();
    for (name, case) in &cases {
        let outcome = case();
        if outcome.is_ok() {
            passed += 1;
        } else {
            figure.note(format!("injection case failed: {name}: {outcome:?}"));
        }
        results.push(json!({"case": name, "pass": outcome.is_ok(),
            "observed": match &outcome { Ok(s) | Err(s) => s }}));
    }
    let _ = std::fs::remove_file(&pwned);
    figure.check(
        "argv injection cases (literal argv, commas doubled, QEMU's view checked)",
        format!("{n}/{n} (>= 10)", n = cases.len()),
        format!("{passed}/{}", cases.len()),
        passed == cases.len() && cases.len() >= 10,
    );
    figure.detail("injection", json!(results));
}

/// `program` as found on PATH (or itself when it is a path).
fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// The uid of `nobody`, the second user the socket check connects as.
const NOBODY: u32 = 65534;

/// `cargo xtask connect-probe PATH` (internal): connects to the unix socket at PATH and exits
/// 0 when that works, 13 on permission denied, 1 on any other error. The security figure runs
/// it as another user.
pub fn connect_probe(args: &[String]) -> Result<(), String> {
    let [path] = args else {
        return Err("usage: cargo xtask connect-probe PATH".into());
    };
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => std::process::exit(13),
        Err(e) => Err(format!("connect {path}: {e}")),
    }
}

/// Runs [`connect_probe`] as uid/gid `nobody`; the exit code.
fn probe_as_nobody(path: &Path) -> Result<i32, String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let status = std::process::Command::new(exe)
        .arg("connect-probe")
        .arg(path)
        .uid(NOBODY)
        .gid(NOBODY)
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("probe as uid {NOBODY}: {e}"))?;
    status
        .code()
        .ok_or_else(|| format!("probe ended by {status}"))
}

/// A socket in a machine's private temp dir cannot be reached by another user. While a machine
/// runs, a listening socket sits in its temp dir (as a monitor, console or qtest socket a
/// caller puts there would); `nobody` must get "permission denied" connecting to it. The same
/// probe must reach a socket that is open to everyone in a world-readable dir next to it, so
/// the check cannot pass because the probe itself is broken. Switching uid needs root; other
/// users get a note instead of a figure.
fn other_uid_check(settings: &Settings, figure: &mut Figure) {
    let what = "other uid connecting into the temp dir";
    if !nix::unistd::Uid::effective().is_root() {
        figure.note(format!(
            "{what}: not measured, switching to another uid needs root"
        ));
        return;
    }
    let result = (|| -> Result<(i32, i32), String> {
        // A base every user may traverse, so only the machine's own dir can stop the probe.
        let base = tempfile::Builder::new()
            .prefix("qm-uid-")
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir()
            .map_err(|e| format!("base dir: {e}"))?;
        let open_dir = base.path().join("open");
        std::fs::create_dir(&open_dir).map_err(|e| format!("open dir: {e}"))?;
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod open dir: {e}"))?;
        let open_sock = open_dir.join("open.sock");
        let _open = std::os::unix::net::UnixListener::bind(&open_sock)
            .map_err(|e| format!("bind {}: {e}", open_sock.display()))?;
        std::fs::set_permissions(&open_sock, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| format!("chmod open socket: {e}"))?;
        let mut builder = settings.none_machine();
        builder.base_temp_dir(base.path());
        let vm = builder.build();
        with_machine(vm, |vm| {
            let private = vm.temp_dir().map_err(|e| chain(&e))?.join("private.sock");
            let _private = std::os::unix::net::UnixListener::bind(&private)
                .map_err(|e| format!("bind {}: {e}", private.display()))?;
            Ok((probe_as_nobody(&open_sock)?, probe_as_nobody(&private)?))
        })
    })();
    match result {
        Ok((open, private)) => figure.check(
            what,
            "permission denied (open control socket: connects)",
            format!(
                "private: {}; control: {}",
                probe_outcome(private),
                probe_outcome(open)
            ),
            private == 13 && open == 0,
        ),
        Err(e) => figure.check(what, "permission denied", e, false),
    }
}

fn probe_outcome(code: i32) -> &'static str {
    match code {
        0 => "connected",
        13 => "permission denied",
        _ => "other error",
    }
}

/// Runs the figure.
pub fn run(settings: &Settings) -> Figure {
    let mut figure = Figure::new("security");
    fd_check(settings, &mut figure);
    temp_dir_check(settings, &mut figure);
    other_uid_check(settings, &mut figure);
    tcp_check(settings, &mut figure);
    injection_check(settings, &mut figure);
    figure
}
