//! `qemu-machine events ADDRESS`: print QMP events as they arrive, until EOF, a count, a
//! timeout or Ctrl-C.

use std::time::{Duration, Instant};

use log::warn;
use machine_core::qmp_client;
use machine_core::qmp_proto::Event;

use crate::address::Address;
use crate::args::EventsArgs;
use crate::connect::{self, ConnectOptions};
use crate::error::{Error, Result};
use crate::output::{self, EventView};

/// How long one wait for an event lasts when no deadline is set (the loop just waits again).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

/// Whether `event` passes the `--name` filters (none: every event; names compare without case).
pub fn selected(event: &Event, names: &[String]) -> bool {
    names.is_empty() || names.iter().any(|n| n.eq_ignore_ascii_case(&event.event))
}

/// The printable view of a client event.
pub fn view(event: &Event) -> EventView<'_> {
    EventView {
        name: &event.event,
        data: event.data.as_ref(),
        seconds: event.timestamp.seconds,
        microseconds: event.timestamp.microseconds,
    }
}

/// Runs `events`. The end of the stream (QEMU quit or closed the socket) is a success.
pub fn run(args: EventsArgs) -> Result<u8> {
    let address = Address::parse(&args.address);
    let options = ConnectOptions {
        connect_timeout: args.connect_timeout,
        command_timeout: args.connect_timeout,
        skip_negotiation: args.skip_negotiation,
    };
    let mut connection = connect::connect(&address, &options)?;
    // On stderr, so stdout stays pure events; scripts may wait for it before causing events.
    output::note(&format!("qemu-machine: streaming events from {address}"));
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut printed: u64 = 0;
    loop {
        if args.count.is_some_and(|n| printed >= n) {
            break;
        }
        let wait = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => break,
            },
            None => IDLE_WAIT,
        };
        match connection.pull_event(wait) {
            Ok(Some(event)) => {
                if selected(&event, &args.name) {
                    output::emit(&view(&event).render(args.json))?;
                    printed += 1;
                }
            }
            Ok(None) => {}
            Err(qmp_client::Error::EventsLost { dropped, .. }) => {
                warn!("{dropped} events were lost: the event queue was full");
            }
            Err(error) if connect::peer_gone(&error) => {
                output::note(&format!("qemu-machine: {address} closed the connection"));
                return Ok(0);
            }
            Err(source) => {
                return Err(Error::Events {
                    address: address.to_string(),
                    source,
                })
            }
        }
    }
    connect::close(connection);
    Ok(0)
}
