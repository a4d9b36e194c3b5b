//! The qtest module through its public API only, without QEMU: connecting by path to a
//! scripted peer, typed connection errors, and `QtestMachine` before and around a failed
//! launch. Real-QEMU coverage is in `cargo xtask e2e --filter qtest`.

use std::error::Error as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use machine_core::qtest::{Config, Error, IrqEdge, IrqEvent, QtestMachine, QtestProtocol};
use machine_core::MachineBuilder;

#[test]
fn connect_by_path_to_a_scripted_peer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qtest.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "outb 0x60 0x5a\n");
        writer.write_all(b"IRQ raise 1\nOK\n").unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "inb 0x60\n");
        writer.write_all(b"IRQ lower 1\nOK 0x005a\n").unwrap();
    });
    let config = Config::default().with_command_timeout(Duration::from_secs(10));
    let mut q = QtestProtocol::connect(&path, config).unwrap();
    q.outb(0x60, 0x5a).unwrap();
    assert!(q.irq_level(1));
    assert_eq!(q.inb(0x60).unwrap(), 0x5a);
    assert_eq!(
        q.irq_events(),
        vec![
            IrqEvent {
                irq: 1,
                edge: IrqEdge::Raise
            },
            IrqEvent {
                irq: 1,
                edge: IrqEdge::Lower
            },
        ]
    );
    peer.join().unwrap();
    // The peer is gone: the next command fails with Closed, not a timeout.
    assert!(matches!(q.inb(0x61), Err(Error::Closed { .. })));
}

#[test]
fn connecting_to_a_missing_socket_is_a_typed_error_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    match QtestProtocol::connect(&path, Config::default()) {
        Err(err @ Error::Connect { .. }) => {
            let Error::Connect { path: p, source } = &err else {
                unreachable!()
            };
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            let message = err.to_string();
            assert!(message.starts_with("cannot connect to qtest socket"));
            assert!(!message.ends_with('.'));
            assert!(err.source().is_some());
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

#[test]
fn qtest_machine_has_no_channel_before_launch_or_after_a_failed_one() {
    let machine = MachineBuilder::new("/nonexistent/qemu-system-x86_64")
        .args(["-nodefaults", "-S"])
        .build();
    let mut vm = QtestMachine::new(machine);
    assert!(matches!(vm.qtest(), Err(Error::NotRunning)));
    assert!(matches!(
        vm.qtest_command("endianness"),
        Err(Error::NotRunning)
    ));
    let before = vm.args().to_vec();
    assert!(vm.launch().is_err());
    // The per-launch qtest arguments are gone again; nothing runs.
    assert_eq!(vm.args(), before.as_slice());
    assert!(!vm.is_running());
    assert!(matches!(vm.qtest(), Err(Error::NotRunning)));
    assert_eq!(
        Error::NotRunning.to_string(),
        "qtest socket not available: the machine is not running"
    );
}
