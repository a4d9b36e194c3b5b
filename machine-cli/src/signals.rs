//! SIGINT, SIGTERM, SIGHUP and SIGQUIT for `run`, as messages on a channel instead of
//! asynchronous handlers.
//!
//! [`install`] blocks these signals in the calling thread before any other thread
//! exists, so every thread inherits the mask and none is interrupted; one small thread then
//! takes them with `sigwait` and forwards them. No signal handler runs, so there is nothing
//! async-signal-unsafe to get wrong, and no `unsafe` here. QEMU does not inherit the mask:
//! the standard library empties the signal mask of every child it spawns.

use std::sync::mpsc::Sender;
use std::thread;

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

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGQUIT in this thread (and so in every thread spawned after it), and
/// starts the thread that sends each one as `wrap(Received)` on `sender` until the receiver
/// is gone. Call it first thing, before anything spawns a thread.
pub fn install<T: Send + 'static>(sender: Sender<T>, wrap: fn(Received) -> T) -> Result<()> {
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
            if sender.send(wrap(received)).is_err() {
                return;
            }
        })
        .map_err(|source| Error::Io {
            what: "starting the signal thread",
            source,
        })?;
    Ok(())
}
