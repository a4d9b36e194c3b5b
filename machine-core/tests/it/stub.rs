//! Stub QEMU binaries: small bash scripts speaking just enough QMP on the monitor fd.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use machine_core::{Machine, MachineBuilder};

/// Tests that count this process's fds take the write side; every other test the read side,
/// so no launch runs while fds are counted.
static FD_LOCK: RwLock<()> = RwLock::new(());

pub fn shared() -> RwLockReadGuard<'static, ()> {
    FD_LOCK.read().unwrap_or_else(|e| e.into_inner())
}

pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    FD_LOCK.write().unwrap_or_else(|e| e.into_inner())
}

/// Shell functions every stub starts with: `MON` is the monitor fd from
/// `-chardev socket,id=mon,fd=N`, `greet` sends the greeting, `serve_one` answers one command
/// (quit: replies and exits 0).
const PRELUDE: &str = r#"#!/bin/bash
for a in "$@"; do
  case "$a" in socket,id=mon,fd=*) MON=${a#socket,id=mon,fd=};; esac
done
greet() {
  printf '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "stub"}, "capabilities": []}}\r\n' >&$MON
}
serve_one() {
  local cmd id
  IFS= read -r -d '}' -u $MON cmd || exit 0
  id=null
  [[ $cmd =~ \"id\":([0-9]+) ]] && id=${BASH_REMATCH[1]}
  case "$cmd" in
    *'"quit"'*)
      printf '{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n' >&$MON
      printf '{"return": {}, "id": %s}\r\n' "$id" >&$MON
      [ -n "$IGNORE_QUIT" ] || exit 0 ;;
    *'"query-status"'*)
      printf '{"return": {"status": "running", "running": true}, "id": %s}\r\n' "$id" >&$MON ;;
    *)
      printf '{"return": {}, "id": %s}\r\n' "$id" >&$MON ;;
  esac
}
"#;

/// A stub script with `body` after the prelude, in its own directory.
pub struct Stub {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Stub {
    pub fn new(body: &str) -> Stub {
        let dir = tempfile::tempdir().expect("stub dir");
        let path = dir.path().join("qemu-stub");
        std::fs::write(&path, format!("{PRELUDE}\n{body}\n")).expect("write stub");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Stub { dir, path }
    }

    /// Greets, then answers commands until `quit`.
    pub fn serving() -> Stub {
        Stub::new("greet\nwhile true; do serve_one; done")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A base dir for the machine's temp dirs (counted by the tests).
    pub fn base(&self) -> PathBuf {
        let base = self.dir.path().join("base");
        std::fs::create_dir_all(&base).expect("base dir");
        base
    }

    /// A builder for this stub with short deadlines.
    pub fn builder(&self) -> MachineBuilder {
        let mut b = MachineBuilder::new(self.path());
        b.base_temp_dir(self.base())
            .greeting_timeout(Duration::from_secs(10))
            .command_timeout(Duration::from_secs(5));
        b
    }

    pub fn machine(&self) -> Machine {
        self.builder().build()
    }

    /// Entries left in the base dir.
    pub fn leftovers(&self) -> usize {
        std::fs::read_dir(self.base()).expect("ls base").count()
    }
}

/// Open fds of this process.
pub fn own_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("ls /proc/self/fd")
        .count()
}

/// Whether a process with this pid exists (zombies included).
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
