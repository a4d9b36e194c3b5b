//! The thread-safe way of holding a connection: [`Shared`], clones of one driver behind a
//! mutex.
//!
//! No hidden thread: whichever waiting caller finds the socket unattended becomes its pump (it
//! polls and reads without holding the lock, then feeds the session under the lock and wakes
//! the others); the others sleep until their reply is routed or their deadline passes. When
//! the pump's own wait is over it hands the role to the next. The pump and the command
//! methods are the very ones of [`Connection`](crate::Connection) (see `driver.rs`).

use crate::connection::Connection;
use crate::driver::Sharing;

/// A [`Connection`] shared between threads: clone it (one clone per thread) and call from
/// anywhere. Make one with [`Connection::into_shared`] or [`Shared::new`](Connection::new).
///
/// Every reply reaches the thread that sent its command (routing by id); the limit of 8 in-band
/// commands in flight (and [`Config::max_oob_in_flight`](crate::Config::max_oob_in_flight) for
/// out-of-band ones) is respected across all threads (a sender waits for a slot within its
/// deadline). Events, the sticky error and the `quit` handling behave as on an owned
/// connection. A poll failure in whichever thread drives the socket fails the session like a
/// socket error: every waiter, and every later call, gets
/// [`Error::Disconnected`](crate::Error::Disconnected) with it as the cause.
///
/// The command methods take `&mut self` like an owned connection's; a clone is cheap (one
/// `Arc`), so give each thread its own.
pub type Shared = Connection<Sharing>;

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::connection::command;
    use crate::error::Error;
    use crate::testing::Script;
    use std::time::{Duration, Instant};

    const LONG: Duration = Duration::from_secs(10);

    fn is_poll_failure(e: &Error) -> bool {
        matches!(e, Error::Disconnected { .. })
            && matches!(e.root(), Error::Io { op: "poll", source } if source.kind() == std::io::ErrorKind::InvalidInput)
    }

    /// A poll error in whichever thread drives the socket ends the session for everyone: each
    /// waiter gets `Disconnected` with the poll error as cause, slots are released, and later
    /// calls fail the same way instead of polling a broken poller again.
    #[test]
    fn a_poll_error_in_the_driving_thread_fails_the_session_for_every_waiter() {
        // "stall" is never answered.
        let (_server, stream) = Script::new().on("stall", Vec::new()).start_pair().unwrap();
        let conn = Connection::from_unix_stream(stream, &crate::Config::default()).unwrap();
        let mut shared = Shared::new(conn).unwrap();
        let a = shared.send(command("stall", None, false)).unwrap();
        let b = shared.send(command("stall", None, false)).unwrap();
        assert_eq!(shared.in_flight(), 2);
        shared.fail_next_poll(std::io::ErrorKind::InvalidInput);
        let waiters: Vec<_> = [a, b]
            .into_iter()
            .map(|id| {
                let mut shared = shared.clone();
                std::thread::spawn(move || {
                    let start = Instant::now();
                    (shared.wait_reply(id, start + LONG), start.elapsed())
                })
            })
            .collect();
        for w in waiters {
            let (res, took) = w.join().unwrap();
            match res {
                Err(e) => assert!(is_poll_failure(&e), "unexpected {e:?}"),
                Ok(m) => panic!("unexpected reply {m:?}"),
            }
            assert!(took < LONG / 2, "took {took:?}");
        }
        assert!(!shared.is_connected());
        assert_eq!(shared.in_flight(), 0);
        match shared.execute("query-status", None) {
            Err(e) => assert!(is_poll_failure(&e), "unexpected {e:?}"),
            Ok(v) => panic!("unexpected {v}"),
        }
    }
}
