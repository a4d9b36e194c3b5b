//! Connection settings: timeouts, handshake options and the event queue's bounds.

use std::time::Duration;

/// Whether to enable QMP's out-of-band capability during negotiation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OobPolicy {
    /// Enable `oob` when the greeting offers it (what QEMU's Python client does).
    #[default]
    Auto,
    /// Never enable it; `exec-oob` commands then fail on the server side.
    Off,
}

/// What happens when an event arrives and the event queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Discard the oldest queued event and count it in `events_dropped()`.
    #[default]
    DropOldest,
    /// Discard the new event, count it, and make the next event call return
    /// [`crate::Error::EventsLost`] once, so the gap is never silent.
    Error,
}

/// Settings of a connection. `Config::default()` suits QEMU; adjust with the `with_*` setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Deadline for connecting (unix path or TCP). Default 10 s.
    pub connect_timeout: Duration,
    /// Deadline for the greeting, counted from the start of the handshake. Default 30 s.
    pub greeting_timeout: Duration,
    /// Deadline for each command (and for `qmp_capabilities`). Default 30 s.
    pub command_timeout: Duration,
    /// Wait for the greeting before anything else. Default true (QEMU's guest agent: false).
    pub await_greeting: bool,
    /// Send `qmp_capabilities` after the greeting. Default true (guest agent: false).
    pub negotiate: bool,
    /// Enable `oob` when offered. Default [`OobPolicy::Auto`].
    pub oob: OobPolicy,
    /// Most events kept queued. Default 4096.
    pub event_capacity: usize,
    /// What a full event queue does. Default [`OverflowPolicy::DropOldest`].
    pub overflow: OverflowPolicy,
    /// Largest message accepted from the server, in bytes. Default 10 MiB (QEMU's own limit).
    pub max_message_size: usize,
    /// Most out-of-band (`exec-oob`) commands in flight at once, timed-out ones whose reply has
    /// not come yet included. Default 64. QMP sets no number for them (in-band ones are limited
    /// to [`MAX_IN_FLIGHT`](crate::MAX_IN_FLIGHT) by QEMU), but each pending request costs
    /// memory here and in the server: past the cap the blocking sends wait for a slot within
    /// their deadline and [`Session::send`](crate::Session::send) returns
    /// [`Error::TooManyInFlight`](crate::Error::TooManyInFlight). At least 1.
    pub max_oob_in_flight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connect_timeout: Duration::from_secs(10),
            greeting_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(30),
            await_greeting: true,
            negotiate: true,
            oob: OobPolicy::Auto,
            event_capacity: 4096,
            overflow: OverflowPolicy::DropOldest,
            max_message_size: 10 * 1024 * 1024,
            max_oob_in_flight: 64,
        }
    }
}

impl Config {
    /// Sets [`Config::max_oob_in_flight`] (0 counts as 1).
    pub fn with_max_oob_in_flight(mut self, max: usize) -> Self {
        self.max_oob_in_flight = max.max(1);
        self
    }

    /// Sets [`Config::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`Config::greeting_timeout`].
    pub fn with_greeting_timeout(mut self, timeout: Duration) -> Self {
        self.greeting_timeout = timeout;
        self
    }

    /// Sets [`Config::command_timeout`].
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets [`Config::await_greeting`].
    pub fn with_await_greeting(mut self, await_greeting: bool) -> Self {
        self.await_greeting = await_greeting;
        self
    }

    /// Sets [`Config::negotiate`].
    pub fn with_negotiate(mut self, negotiate: bool) -> Self {
        self.negotiate = negotiate;
        self
    }

    /// Sets [`Config::oob`].
    pub fn with_oob(mut self, oob: OobPolicy) -> Self {
        self.oob = oob;
        self
    }

    /// Sets [`Config::event_capacity`] (at least 1) and [`Config::overflow`].
    pub fn with_event_queue(mut self, capacity: usize, overflow: OverflowPolicy) -> Self {
        self.event_capacity = capacity.max(1);
        self.overflow = overflow;
        self
    }

    /// Sets [`Config::max_message_size`].
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }
}
