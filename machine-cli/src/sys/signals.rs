//! SIGINT, SIGTERM, SIGHUP and SIGQUIT for `run`, as messages on a channel instead of
//! asynchronous handlers.
//!
//! [`install`] blocks these signals in the calling thread before any other thread
//! exists, so every thread inherits the mask and none is interrupted; one small thread then
//! takes them with `sigwait` and forwards them. No signal handler runs, so there is nothing
//! async-signal-unsafe to get wrong, and no `unsafe` here. QEMU does not inherit the mask:
//! machine-core empties the signal mask of every QEMU it spawns.
//!
//! Each signal is also announced by a byte on a pipe ([`Signals::wakeup`]), which a blocking
//! wait that cannot read the channel (the launch's handshake) watches to end at once.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread;

use machine_core::mio::Waker;
use nix::sys::signal::{SigSet, Signal};

use crate::error::{Error, Result};

/// A terminating signal we received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Ctrl-C.
    Interrupt,
    /// `kill PID`.
    Terminate,
    /// The terminal went away.
    HangUp,
    /// Ctrl-\\: stop at once.
    Quit,
}

/// What [`install`] gives: the read end of the wake-up pipe.
pub struct Signals {
    wakeup: OwnedFd,
}

impl Signals {
    /// Readable once any of the signals has arrived (never drained: it stays readable).
    pub fn wakeup(&self) -> BorrowedFd<'_> {
        self.wakeup.as_fd()
    }
}

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGQUIT in this thread (and so in every thread spawned
/// after it), and starts the thread that sends each one as `wrap(Received)` on `sender` until
/// the receiver is gone, and writes a byte to the wake-up pipe. Call it first thing, before
/// anything spawns a thread.
///
/// With `waker`, each message is followed by a wake-up of that poll, so a loop waiting in
/// its `mio::Poll` (not on the channel) sees the signal at once.
pub fn install<T: Send + 'static>(
    sender: Sender<T>,
    wrap: fn(Received) -> T,
    waker: Option<Arc<Waker>>,
) -> Result<Signals> {
    use nix::fcntl::OFlag;
    // Nonblocking: a full pipe (thousands of signals nobody waits for) must not stop the
    // thread; one byte is enough to make it readable.
    let (wakeup, poke) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|errno| Error::Io {
            what: "creating the signal wake-up pipe",
            source: errno.into(),
        })?;
    let mut poke = File::from(poke);
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.add(Signal::SIGQUIT);
    set.thread_block().map_err(|errno| Error::Io {
        what: "blocking SIGINT, SIGTERM, SIGHUP and SIGQUIT",
        source: errno.into(),
    })?;
    thread::Builder::new()
        .name("signals".to_string())
        .spawn(move || loop {
            let received = match set.wait() {
                Ok(Signal::SIGINT) => Received::Interrupt,
                Ok(Signal::SIGTERM) => Received::Terminate,
                Ok(Signal::SIGHUP) => Received::HangUp,
                Ok(Signal::SIGQUIT) => Received::Quit,
                Ok(_) => continue,
                // sigwait fails only for an invalid set; stop rather than spin.
                Err(_) => return,
            };
            // A full pipe is readable already.
            let _ = poke.write(b"!");
            if sender.send(wrap(received)).is_err() {
                return;
            }
            if let Some(waker) = &waker {
                if let Err(error) = waker.wake() {
                    log::debug!("waking the loop for a signal: {error}");
                }
            }
        })
        .map_err(|source| Error::Io {
            what: "starting the signal thread",
            source,
        })?;
    Ok(Signals { wakeup })
}
