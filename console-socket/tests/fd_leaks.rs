//! Every way a console ends, in error or not, gives back every fd it opened (socket
//! duplicates, poller, waker, log file).
//!
//! A binary of its own with a single test, so no other test opens or closes fds while this
//! one counts the entries of /proc/self/fd.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use console_socket::{Config, Console, DrainStatus, Drainer, Error, Pattern};

fn open_fds() -> BTreeSet<i32> {
    let dir = std::fs::read_dir("/proc/self/fd").unwrap();
    let mut fds: BTreeSet<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.retain(|fd| std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists());
    fds
}

fn no_leak(name: &str, scenario: impl FnOnce()) {
    let before = open_fds();
    scenario();
    let after = open_fds();
    let leaked: Vec<_> = after.difference(&before).collect();
    assert!(leaked.is_empty(), "{name} leaked fds {leaked:?}");
}

#[test]
fn no_path_leaks_an_fd() {
    let dir = tempfile::Builder::new()
        .prefix("cfd")
        .tempdir_in("/tmp")
        .unwrap();
    let path = |name: &str| -> PathBuf { dir.path().join(name) };

    no_leak("thread console: output, wait, close", || {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let config = Config::default().with_log_file(path("a.log"));
        let mut console = Console::from_unix_stream(ours, config).unwrap();
        peer.write_all(b"hello").unwrap();
        console
            .wait_for(&Pattern::substring("hello"), Duration::from_secs(10))
            .unwrap();
        console.close().unwrap();
        drop(console);
    });
    no_leak("thread console: peer gone, then drop", || {
        let (ours, peer) = UnixStream::pair().unwrap();
        let mut console = Console::from_unix_stream(ours, Config::default()).unwrap();
        drop(peer);
        let res = console.wait_for(&Pattern::substring("x"), Duration::from_secs(10));
        assert!(matches!(res, Err(Error::Closed { .. })), "{res:?}");
        drop(console);
    });
    no_leak("refused fds and configs", || {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let res = Console::from_fd(OwnedFd::from(a), Config::default());
        assert!(
            matches!(res, Err(Error::NotAStreamSocket { .. })),
            "{res:?}"
        );
        let (ours, _peer) = UnixStream::pair().unwrap();
        let bad_log = Config::default().with_log_file(path("missing-dir/x.log"));
        assert!(matches!(
            Console::from_unix_stream(ours, bad_log),
            Err(Error::LogOpen { .. })
        ));
        let (ours, _peer) = UnixStream::pair().unwrap();
        assert!(
            Console::from_unix_stream(ours, Config::default().with_buffer_capacity(0)).is_err()
        );
    });
    no_leak("connect: missing path times out", || {
        let config = Config::default().with_connect_timeout(Duration::from_millis(50));
        let res = Console::connect(&path("none.sock"), config);
        assert!(matches!(res, Err(Error::ConnectTimeout { .. })), "{res:?}");
    });
    no_leak("drainer: dropped before and after the end", || {
        let (ours, peer) = UnixStream::pair().unwrap();
        let config = Config::default().with_log_file(path("d.log"));
        let (mut drainer, console) = Drainer::from_unix_stream(ours, config).unwrap();
        drop(peer);
        assert_eq!(drainer.drain(), DrainStatus::Closed);
        drop(drainer);
        drop(console);
        let (ours, _peer) = UnixStream::pair().unwrap();
        let (drainer, console) = Drainer::from_unix_stream(ours, Config::default()).unwrap();
        drop(console);
        drop(drainer);
    });
}
