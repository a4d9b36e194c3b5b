//! Machines stepped from one `mio::Poll` in the test's own thread: launch, commands, an event
//! wait and the shutdown ladder for three machines at once, with no thread for QMP or exit
//! supervision.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use machine_core::qmp_client::RequestId;
use machine_core::qmp_proto::EventFilter;
use machine_core::{EndedBy, Machine, MachineState, ShutdownLadder, Tokens};
use mio::{Events, Poll, Token};

use crate::stub::{shared, Stub};

/// Polls until `done` holds for every machine, stepping each on its events and deadlines.
fn drive(
    poll: &mut Poll,
    machines: &mut [Machine],
    deadline: Instant,
    mut done: impl FnMut(usize, &mut Machine) -> bool,
) {
    let mut events = Events::with_capacity(64);
    loop {
        let mut all = true;
        for (i, m) in machines.iter_mut().enumerate() {
            if !done(i, m) {
                all = false;
            }
        }
        if all {
            return;
        }
        let states: Vec<MachineState> = machines.iter().map(Machine::state).collect();
        assert!(
            Instant::now() < deadline,
            "machines did not get there in time: {states:?}"
        );
        let busy = machines.iter_mut().any(Machine::wants_step);
        let next = machines
            .iter()
            .filter_map(Machine::next_deadline)
            .chain([deadline])
            .min()
            .unwrap_or(deadline);
        let timeout = if busy {
            Duration::ZERO
        } else {
            next.saturating_duration_since(Instant::now())
        };
        poll.poll(&mut events, Some(timeout)).expect("poll");
        let mut woken = vec![busy; machines.len()];
        for event in events.iter() {
            woken[event.token().0 / 3] = true;
        }
        let now = Instant::now();
        for (i, m) in machines.iter_mut().enumerate() {
            if woken[i] || m.next_deadline().is_some_and(|d| d <= now) {
                m.step().expect("step");
            }
        }
    }
}

/// The three tokens of the machine numbered `i` on a shared poll.
fn tokens(i: usize) -> Tokens {
    Tokens {
        exit: Token(3 * i),
        qmp: Token(3 * i + 1),
        output: Token(3 * i + 2),
    }
}

#[test]
fn three_machines_from_one_poll_launch_command_wait_and_shut_down() {
    let _g = shared();
    let stub = Stub::serving();
    let mut poll = Poll::new().expect("poll");
    let mut machines: Vec<Machine> = (0..3).map(|_| stub.machine()).collect();
    for (i, m) in machines.iter_mut().enumerate() {
        m.launch_begin().expect("launch_begin");
        assert_eq!(m.state(), MachineState::Launching);
        m.register(poll.registry(), tokens(i)).expect("register");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    drive(&mut poll, &mut machines, deadline, |_, m| {
        m.state() == MachineState::Running
    });

    // A command on each, all in flight at once.
    let mut pending: HashMap<usize, RequestId> = HashMap::new();
    for (i, m) in machines.iter_mut().enumerate() {
        pending.insert(i, m.submit("query-status", ()).expect("submit"));
    }
    drive(&mut poll, &mut machines, deadline, |i, m| {
        match pending.get(&i) {
            None => true,
            Some(&id) => match m.take_reply(id) {
                None => false,
                Some(reply) => {
                    let reply = reply.expect("reply");
                    assert_eq!(reply["return"]["status"], "running");
                    pending.remove(&i);
                    true
                }
            },
        }
    });

    // An event wait: the stub's quit sends SHUTDOWN before its reply; the ladder's quit step
    // asks for it, and each machine's SHUTDOWN is taken from its queue as it arrives.
    for m in machines.iter_mut() {
        m.shutdown_begin(&ShutdownLadder::graceful(Duration::from_secs(10)))
            .expect("shutdown_begin");
        // Stopping, or already Exited when the stub answered the quit and exited before
        // `shutdown_begin` returned (it enters the first step at once).
        let state = m.state();
        assert!(
            matches!(state, MachineState::Stopping { .. } | MachineState::Exited),
            "{state:?}"
        );
    }
    let mut seen = [false; 3];
    drive(&mut poll, &mut machines, deadline, |i, m| {
        if !seen[i] {
            seen[i] = m.take_event(&[EventFilter::new("SHUTDOWN")]).is_some();
        }
        m.state() == MachineState::Exited
    });
    assert_eq!(seen, [true; 3], "every SHUTDOWN event was seen");
    for m in &machines {
        let report = m.exit_report().expect("report");
        assert_eq!(report.ended_by, EndedBy::Quit, "{report}");
        assert_eq!(report.steps.len(), 1, "{report}");
    }
    assert_eq!(stub.leftovers(), 0);
}

/// A stepped launch whose QEMU dies before the greeting fails through `step`, rolled back.
#[test]
fn a_stepped_launch_that_dies_fails_in_step_and_rolls_back() {
    let _g = shared();
    let stub = Stub::new("exit 3");
    let mut m = stub.machine();
    let mut poll = Poll::new().expect("poll");
    m.launch_begin().expect("launch_begin");
    m.register(poll.registry(), tokens(0)).expect("register");
    let mut events = Events::with_capacity(8);
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        assert!(Instant::now() < deadline, "no failure in time");
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .expect("poll");
        match m.step() {
            Ok(MachineState::Launching) => {}
            Ok(other) => panic!("unexpected state {other:?}"),
            Err(err) => break err,
        }
    };
    assert!(
        matches!(err, machine_core::Error::LaunchFailed { status: Some(s), .. } if s.code() == Some(3)),
        "{err:?}"
    );
    assert_eq!(m.state(), MachineState::Idle);
    assert_eq!(stub.leftovers(), 0);
}

/// The multiplexer on the same poll as a stepped machine, with no thread of the library's: the
/// owner hands the `MuxServer` its events and pumps it after each step, while the machine
/// keeps its own commands going and a client on another thread works through the share.
#[test]
fn a_mux_server_shares_a_stepped_machine_on_the_same_poll() {
    use machine_core::qmp_client::{Config, Connection, Mux, MuxConfig, MuxServer, ShareAddress};
    let _g = shared();
    let stub = Stub::serving();
    let mut poll = Poll::new().expect("poll");
    let mut m = stub.machine();
    m.launch().expect("launch");
    m.register(poll.registry(), tokens(0)).expect("register");
    let mux = {
        let conn = m.qmp_connection().expect("connection");
        let mut session = conn.session_mut();
        Mux::for_session(&mut session, MuxConfig::default()).expect("handshake done")
    };
    let mut server = MuxServer::bind(mux, &ShareAddress::default()).expect("bind");
    server
        .register(poll.registry(), Token(10))
        .expect("register the share");
    let path = server.path().to_owned();
    let client = std::thread::spawn(move || {
        let mut c = Connection::connect_unix(&path, &Config::default()).expect("attach");
        for _ in 0..20 {
            let status = c.execute("query-status", None).expect("through the share");
            assert_eq!(status["status"], "running");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut events = Events::with_capacity(64);
    let mut mine: Option<RequestId> = None;
    let mut own_replies = 0;
    let mut again = true;
    while !(client.is_finished() && own_replies >= 5) {
        assert!(
            Instant::now() < deadline,
            "stuck: {own_replies} own replies"
        );
        let timeout = if again || m.wants_step() {
            Duration::ZERO
        } else {
            Duration::from_millis(20)
        };
        poll.poll(&mut events, Some(timeout)).expect("poll");
        for event in events.iter() {
            if server.owns(event.token()) {
                server.handle(poll.registry(), event);
            }
        }
        m.step().expect("step");
        {
            let conn = m.qmp_connection().expect("connection");
            again = {
                let mut session = conn.session_mut();
                server.pump(poll.registry(), &mut session);
                server.wants_pump(&session)
            };
            conn.process_io().expect("write what the share forwarded");
        }
        match mine {
            None => mine = Some(m.submit("query-status", ()).expect("submit")),
            Some(id) => {
                if let Some(reply) = m.take_reply(id) {
                    assert_eq!(reply.expect("own reply")["return"]["status"], "running");
                    own_replies += 1;
                    mine = None;
                }
            }
        }
    }
    client.join().expect("client");
    assert_eq!(server.stats().commands_forwarded, 20);
    server.shutdown(poll.registry());
    drop(server);
    m.shutdown().expect("shutdown");
    assert_eq!(stub.leftovers(), 0);
}

/// A stub QEMU that runs until SIGTERM (exit 0), leaving nothing behind.
fn until_sigterm() -> Stub {
    Stub::new(
        "trap 'kill $nap 2>/dev/null; exit 0' TERM\nsleep 300 >/dev/null 2>&1 &\nnap=$!\nwait $nap\nexit 9",
    )
}

/// A machine on `stub` with a unix monitor (we listen, QEMU connects), launched with
/// `launch_begin` and registered on a fresh poll; the monitor's socket path.
fn listening(stub: &Stub, greeting_timeout: Duration) -> (Machine, std::path::PathBuf, Poll) {
    let socket = stub.base().join("mon.sock");
    let mut b = stub.builder();
    b.monitor(machine_core::Monitor::Unix(socket.clone()))
        .greeting_timeout(greeting_timeout);
    let mut m = b.build();
    let poll = Poll::new().expect("poll");
    m.launch_begin().expect("launch_begin");
    m.register(poll.registry(), tokens(0)).expect("register");
    (m, socket, poll)
}

/// With a unix monitor (QEMU connects to us), `launch_begin` returns before QEMU has
/// connected: accepting QEMU's connection, the handshake and the commands all run through
/// `step` on the owner's poll, and the listening socket's file goes once QEMU is in.
#[test]
fn a_stepped_launch_with_a_listening_monitor_accepts_in_step() {
    use machine_core::qmp_client::testing::{Action, Script};
    use machine_core::Step;
    use std::os::unix::net::UnixStream;
    let _g = shared();
    let stub = until_sigterm();
    let (m, socket, mut poll) = listening(&stub, Duration::from_secs(20));
    let mut machines = vec![m];
    // Nobody has connected: the launch is waiting in the owner's poll, not in launch_begin.
    assert_eq!(machines[0].state(), MachineState::Launching);
    assert!(socket.exists(), "the listener's socket file exists");
    let script = Script::new().on(
        "query-status",
        vec![Action::reply(
            serde_json::json!({"status": "running", "running": true}),
        )],
    );
    let server = script
        .start_on(UnixStream::connect(&socket).expect("connect as QEMU"))
        .expect("fake server");
    let deadline = Instant::now() + Duration::from_secs(20);
    drive(&mut poll, &mut machines, deadline, |_, m| {
        m.state() == MachineState::Running
    });
    assert!(!socket.exists(), "the listener's socket file is gone");
    let id = machines[0].submit("query-status", ()).expect("submit");
    let mut reply = None;
    drive(&mut poll, &mut machines, deadline, |_, m| {
        reply = reply.take().or_else(|| m.take_reply(id));
        reply.is_some()
    });
    let reply = reply.expect("reply").expect("no transport error");
    assert_eq!(reply["return"]["status"], "running");
    machines[0]
        .shutdown_begin(&ShutdownLadder::new([Step::Signal {
            signal: machine_core::Signal::SIGTERM,
            timeout: Duration::from_secs(10),
        }]))
        .expect("shutdown_begin");
    drive(&mut poll, &mut machines, deadline, |_, m| {
        m.state() == MachineState::Exited
    });
    let report = machines[0].exit_report().expect("report");
    assert_eq!(
        report.ended_by,
        EndedBy::OurSignal {
            signal: libc::SIGTERM
        },
        "{report}"
    );
    assert_eq!(
        server
            .commands()
            .iter()
            .filter(|c| c.execute == "query-status")
            .count(),
        1
    );
    assert_eq!(stub.leftovers(), 0);
}

/// A stepped launch whose QEMU never connects to the listening monitor fails through `step`
/// at the greeting deadline with the accept timeout, rolled back: QEMU killed, socket file
/// removed.
#[test]
fn a_stepped_launch_nobody_connects_to_times_out_in_step() {
    let _g = shared();
    let stub = until_sigterm();
    let (mut m, socket, mut poll) = listening(&stub, Duration::from_millis(300));
    let mut events = Events::with_capacity(8);
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        assert!(Instant::now() < deadline, "no failure in time");
        let wait = m
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        poll.poll(&mut events, wait).expect("poll");
        match m.step() {
            Ok(MachineState::Launching) => {}
            Ok(other) => panic!("unexpected state {other:?}"),
            Err(err) => break err,
        }
    };
    let machine_core::Error::LaunchFailed { cause, killed, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(*killed, "{err}");
    assert!(
        matches!(
            &**cause,
            machine_core::Error::Qmp {
                source: machine_core::qmp_client::Error::AcceptTimeout { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(m.state(), MachineState::Idle);
    assert!(!socket.exists(), "the socket file is removed");
    assert_eq!(stub.leftovers(), 0);
}

/// A stub whose console says `boot N` before the greeting and `bye` when it quits.
fn with_console() -> Stub {
    Stub::new(
        r#"for a in "$@"; do case "$a" in socket,id=console,fd=*) CON=${a#socket,id=console,fd=};; esac; done
printf 'boot %s\r\n' "$$" >&$CON
greet
while true; do
  IFS= read -r -d '}' -u $MON cmd || exit 0
  id=null
  [[ $cmd =~ \"id\":([0-9]+) ]] && id=${BASH_REMATCH[1]}
  case "$cmd" in
    *'"quit"'*)
      printf 'bye\r\n' >&$CON
      printf '{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n' >&$MON
      printf '{"return": {}, "id": %s}\r\n' "$id" >&$MON
      exit 0 ;;
    *) printf '{"return": {}, "id": %s}\r\n' "$id" >&$MON ;;
  esac
done"#,
    )
}

/// With `register_console`, the consoles of three machines are drained by `step` on the
/// owner's poll: no drain thread, what the guest wrote before the handshake is there once the
/// machine runs, and what it wrote while quitting is there after the exit.
#[test]
fn consoles_on_the_owners_poll_are_drained_by_step() {
    use machine_core::console_socket::Pattern;
    let _g = shared();
    let stub = with_console();
    let mut poll = Poll::new().expect("poll");
    let mut machines: Vec<Machine> = (0..3)
        .map(|_| {
            let mut b = stub.builder();
            b.console();
            b.build()
        })
        .collect();
    for (i, m) in machines.iter_mut().enumerate() {
        m.launch_begin().expect("launch_begin");
        m.register(poll.registry(), tokens(i)).expect("register");
        // `drive` finds the machine by `token / 3`: the console shares i's output token.
        m.register_console(poll.registry(), Token(3 * i + 2))
            .expect("register_console");
        let console = format!("{:?}", m.console().expect("console"));
        assert!(console.contains("drain_thread: false"), "{console}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let boot = Pattern::regex(r"boot \d+\r\n").expect("pattern");
    let mut booted = [false; 3];
    drive(&mut poll, &mut machines, deadline, |i, m| {
        if !booted[i] {
            // On the polling thread: look, never wait.
            booted[i] = m
                .console()
                .expect("console")
                .wait_for(&boot, Duration::ZERO)
                .is_ok();
        }
        booted[i] && m.state() == MachineState::Running
    });
    for m in machines.iter_mut() {
        m.shutdown_begin(&ShutdownLadder::graceful(Duration::from_secs(10)))
            .expect("shutdown_begin");
    }
    drive(&mut poll, &mut machines, deadline, |_, m| {
        m.state() == MachineState::Exited
    });
    for m in machines.iter_mut() {
        let rest = m.console().expect("console").read_available();
        assert_eq!(rest, b"bye\r\n", "{}", String::from_utf8_lossy(&rest));
        let report = m.exit_report().expect("report");
        assert_eq!(report.ended_by, EndedBy::Quit, "{report}");
        assert_eq!(report.console_tail.last().map(String::as_str), Some("bye"));
    }
    assert_eq!(stub.leftovers(), 0);
}

/// `deregister` gives an owner-driven console its drain thread back: blocking waits work
/// again, and nothing the guest wrote in between is lost.
#[test]
fn deregister_gives_the_console_its_thread_back() {
    use machine_core::console_socket::Pattern;
    let _g = shared();
    let stub = with_console();
    let mut b = stub.builder();
    b.console();
    let mut m = b.build();
    m.launch().expect("launch");
    let poll = Poll::new().expect("poll");
    m.register(poll.registry(), tokens(0)).expect("register");
    m.register_console(poll.registry(), Token(2))
        .expect("register_console");
    assert!(matches!(
        m.register_console(poll.registry(), Token(2)),
        Err(machine_core::Error::Console { .. })
    ));
    m.deregister(poll.registry()).expect("deregister");
    let console = format!("{:?}", m.console().expect("console"));
    assert!(console.contains("drain_thread: true"), "{console}");
    // Blocking, from the thread that owned the poll: the drain thread delivers.
    m.console()
        .expect("console")
        .wait_for(
            &Pattern::regex(r"boot \d+").expect("pattern"),
            Duration::from_secs(10),
        )
        .expect("boot line");
    let report = m.shutdown().expect("shutdown");
    assert_eq!(report.console_tail.last().map(String::as_str), Some("bye"));
    assert_eq!(stub.leftovers(), 0);
}
