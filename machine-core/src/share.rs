//! Sharing a running machine's QMP monitor: other QMP clients attach through a
//! [`qmp_client::MuxServer`] while the machine keeps using the same connection.
//!
//! The multiplexer is driven by a small loop over a `mio::Poll` of its own (its sockets, the
//! monitor's socket, and a waker that the session rings whenever another thread relays
//! something). The loop runs on a thread of its own here, like `console_socket::Console` runs
//! a `Drainer`, so that blocking callers keep clients served while they wait or sit idle. An
//! owner that steps the machine on its own poll ([`crate::Machine::register`],
//! [`crate::Machine::step`]) can serve a `MuxServer` on that same poll instead, with no thread:
//! make it with `Mux::for_session` on the machine's connection, hand it the events of its
//! tokens, and pump it with the connection's session after each step (the stepping tests show
//! the loop).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use qmp_client::{ClientInfo, MuxServer, MuxStats, Shared};

use crate::error::{Error, Result};

const QMP: Token = Token(0);
const WAKE: Token = Token(1);
const SERVER: Token = Token(16);

/// How long the loop sleeps at most while another thread reads the monitor: input that thread
/// left unread raises no new readiness event here.
const BUSY_RECHECK: Duration = Duration::from_millis(5);

/// Where a shared monitor listens and what it has done so far.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SharingInfo {
    /// The unix socket clients connect to.
    pub path: PathBuf,
    /// The loopback TCP address, when one was asked for.
    pub tcp: Option<std::net::SocketAddr>,
}

/// The running multiplexer of a machine: stops (closing every client) when dropped.
#[derive(Debug)]
pub(crate) struct Sharing {
    info: SharingInfo,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    state: Arc<Mutex<Published>>,
}

/// What the loop publishes for the machine.
#[derive(Debug, Default, Clone)]
struct Published {
    quit_by: Option<ClientInfo>,
    stats: MuxStats,
}

impl Sharing {
    /// Starts the loop over `server` for the machine's connection `qmp`.
    pub(crate) fn start(mut qmp: Shared, mut server: MuxServer) -> Result<Sharing> {
        let io = |source: std::io::Error| Error::Share {
            path: server.path().to_owned(),
            source: Box::new(qmp_client::Error::Io { op: "poll", source }),
        };
        let poll = Poll::new().map_err(io)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).map_err(io)?);
        let raw = qmp.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&raw), QMP, Interest::READABLE)
            .map_err(io)?;
        let path = server.path().to_owned();
        server
            .register(poll.registry(), SERVER)
            .map_err(|source| Error::Share {
                path: path.clone(),
                source: Box::new(source),
            })?;
        // Whoever feeds the session (this loop, or the machine's thread in a blocking call)
        // wakes the loop when something is relayed.
        let ring = Arc::clone(&waker);
        let waker_set = qmp.step_relay(|session| {
            session.set_relay_waker(Box::new(move || {
                let _ = ring.wake();
            }))
        });
        waker_set.map_err(|source| Error::Share {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let info = SharingInfo {
            path,
            tcp: server.tcp_addr(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(Published::default()));
        let thread = {
            let stop = Arc::clone(&stop);
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name("qmp-share".into())
                .spawn(move || run(poll, qmp, server, &stop, &state))
                .map_err(|source| Error::Share {
                    path: info.path.clone(),
                    source: Box::new(qmp_client::Error::Io {
                        op: "spawn",
                        source,
                    }),
                })?
        };
        log::info!("sharing the QMP monitor on {}", info.path.display());
        Ok(Sharing {
            info,
            stop,
            waker,
            thread: Some(thread),
            state,
        })
    }

    pub(crate) fn info(&self) -> &SharingInfo {
        &self.info
    }

    /// The client whose `quit` was forwarded, if any.
    pub(crate) fn quit_by(&self) -> Option<ClientInfo> {
        self.lock().quit_by.clone()
    }

    /// The multiplexer's counters so far.
    pub(crate) fn stats(&self) -> MuxStats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Published> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the loop: every client is closed, the socket file and its directory removed.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::warn!("the QMP sharing thread panicked");
            }
        }
    }
}

impl Drop for Sharing {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    mut poll: Poll,
    mut qmp: Shared,
    mut server: MuxServer,
    stop: &AtomicBool,
    state: &Mutex<Published>,
) {
    let mut events = Events::with_capacity(64);
    let mut busy = false;
    let mut again = true;
    while !stop.load(Ordering::SeqCst) {
        let timeout = if again {
            Some(Duration::ZERO)
        } else if busy {
            Some(BUSY_RECHECK)
        } else {
            None
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                log::warn!("the shared QMP monitor's poll failed: {e}");
                break;
            }
        }
        for event in events.iter() {
            if server.owns(event.token()) {
                server.handle(poll.registry(), event);
            }
        }
        let registry = poll.registry();
        let step = qmp.step_relay(|session| {
            server.pump(registry, session);
            server.wants_pump(session)
        });
        // An error: QEMU's side is gone. The multiplexer has closed its clients (or is writing
        // their last bytes); keep going until they are gone.
        let (wants, read) = step.unwrap_or((false, true));
        busy = !read;
        again = wants;
        let upstream_closed = server.mux().upstream_closed();
        {
            let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
            st.quit_by = server.mux().quit_by().cloned();
            st.stats = server.stats();
        }
        if upstream_closed && server.mux().client_count() == 0 {
            break;
        }
    }
    server.shutdown(poll.registry());
    let raw = qmp.as_raw_fd();
    let _ = poll.registry().deregister(&mut SourceFd(&raw));
}
