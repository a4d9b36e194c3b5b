//! The command line of `qemu-machine`, declared with clap (and so also the shell completions).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit status:
  0    success (for `run`: the VM shut down cleanly)
  1    a QMP command returned an error (or a `shell` line failed)
  2    bad usage or bad input (arguments, key=value syntax, JSON)
  3    connection failure: unreachable socket, timeout, disconnect, garbage
  4    QEMU could not be launched (missing binary, bad arguments)
  N    for `run`: QEMU's own exit code when it exited on its own with N != 0; for a guest
       that wrote V to isa-debug-exit that is QEMU's (V << 1) | 1, never 0
  128+S  for `run`: QEMU was ended by signal S that we did not send
  130  for `run`: Ctrl-C (or SIGTERM...) before QEMU was up; QEMU was killed
  137  for `run`: we had to kill QEMU (SIGKILL)";

/// Run QEMU virtual machines, talk QMP to them, and watch their events.
#[derive(Debug, Parser)]
#[command(name = "qemu-machine", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Launch a VM and stay attached: console on stdout, events and lifecycle on stderr.
    ///
    /// With no QEMU arguments it boots the built-in tiny test guest. Ctrl-C or SIGTERM shuts
    /// the VM down gracefully (powerdown, quit, SIGTERM, SIGKILL, each with a deadline);
    /// a second Ctrl-C kills it at once.
    Run(RunArgs),
    /// Send one QMP command and print its reply.
    ///
    /// Usage: `qmp ADDRESS COMMAND KEY=VALUE...`. The ADDRESS (unix path or host:port)
    /// may be left out when $QMP_SOCKET is set: the first word is then the command. Values
    /// follow the shell's syntax (numbers, true/false, null, JSON, "quoted", bare strings;
    /// dotted keys nest).
    Qmp(QmpArgs),
    /// An interactive QMP shell (qmp-shell's language) on a running QEMU.
    Shell(ShellArgs),
    /// Print QMP events as they arrive, until EOF or Ctrl-C.
    Events(EventsArgs),
    /// QEMU's object model: get, set, list and tree (QEMU's qom tools).
    Qom(QomArgs),
    /// Launch QEMU with the given arguments and open the shell on it.
    Wrap(WrapArgs),
    /// Launch N copies of a VM from one thread, show each one's banner, run a QMP command on
    /// all, and shut all down on Ctrl-C (or at once with --exit-after-ready).
    ///
    /// With no QEMU arguments each copy boots the built-in tiny guest. One summary line per
    /// member at the end; the exit status is the worst member's.
    Fleet(FleetArgs),
    /// Talk to QEMU's guest agent (the commands of QEMU's `qemu-ga-client`, plus `exec`).
    ///
    /// Usage: `ga ADDRESS COMMAND [ARGS]`; ADDRESS (the agent chardev's unix path or
    /// host:port) may be left out when $QGA_CLIENT_ADDRESS is set. Commands: `cat FILE`,
    /// `fsfreeze status|freeze|thaw`, `fstrim [MINIMUM]`, `ifconfig`, `info`, `ping`,
    /// `suspend disk|ram|hybrid`, `shutdown|powerdown|halt|reboot`, `exec PROGRAM [ARGS...]`
    /// (exits with the guest command's status).
    Ga(GaArgs),
    /// Print a completion script for a shell.
    Completions(CompletionsArgs),
}

/// The accelerator choice of `run` and `wrap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// Software emulation (the fast choice for the tiny guest on nested KVM).
    Tcg,
    /// KVM only: fails when /dev/kvm cannot be used.
    Kvm,
    /// KVM when it works, else TCG.
    Auto,
}

/// How much of the exit report `run` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportMode {
    /// One line after a clean stop, the full report after an abnormal end.
    Auto,
    /// Always the full report.
    Full,
    /// Always one line.
    Short,
    /// Nothing (the exit status still says how it ended).
    None,
}

/// Options of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The QEMU binary.
    #[arg(long, env = "QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Machine type (`-machine`); the tiny guest's default otherwise.
    #[arg(long, short = 'M')]
    pub machine: Option<String>,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    pub accel: Accel,
    /// Guest memory (`-m`), e.g. 64M.
    #[arg(long, short = 'm')]
    pub memory: Option<String>,
    /// Also write everything the console prints to FILE.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// Let QEMU also listen for QMP clients on ADDR (unix path or host:port), for other tools.
    /// Repeatable: QEMU serves one client per address at a time.
    #[arg(long, value_name = "ADDR")]
    pub qmp_listen: Vec<String>,
    /// Accept a `--qmp-listen` TCP address that is not loopback. QMP has no authentication:
    /// anyone who can reach the port controls the VM (and can read and write its disks).
    #[arg(long)]
    pub allow_remote_qmp: bool,
    /// Sharing our own QMP monitor with other clients.
    #[command(flatten)]
    pub share: ShareOptions,
    /// Deadline for QEMU to start and greet us.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub launch_timeout: Duration,
    /// Deadline for each step of the shutdown ladder.
    #[arg(long, value_parser = parse_duration, default_value = "5s", value_name = "DURATION")]
    pub shutdown_timeout: Duration,
    /// Shut the VM down gracefully after this long.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Text whose appearance on the console counts as the banner (the tiny guest's by default).
    #[arg(long, value_name = "TEXT")]
    pub banner: Option<String>,
    /// Shut the VM down gracefully once the banner has appeared (and --send lines are sent).
    #[arg(long)]
    pub exit_after_banner: bool,
    /// Send LINE to the console once the banner has appeared (repeatable).
    #[arg(long, value_name = "LINE")]
    pub send: Vec<String>,
    /// Print lifecycle lines, events and the exit report as JSON Lines.
    #[arg(long)]
    pub json: bool,
    /// Boot the Linux test guest (Debian's cloud kernel, busybox, QEMU's guest agent; built
    /// from Debian packages with apt on first use) on q35 under TCG: a shell on the console.
    #[arg(long, conflicts_with = "qemu_args")]
    pub linux: bool,
    /// Where the Linux test guest is cached.
    #[arg(
        long,
        env = "QEMU_MACHINE_CACHE",
        default_value = "target",
        value_name = "DIR"
    )]
    pub linux_cache: PathBuf,
    /// With --linux: the guest agent's chardev listens on this unix path, for
    /// `qemu-machine ga PATH ...`.
    #[arg(long, value_name = "PATH", requires = "linux")]
    pub agent_listen: Option<PathBuf>,
    /// How much to print when QEMU has ended: `auto` is one line after a clean stop and the
    /// full report (ladder steps, last events, QEMU's output, console tail, command line)
    /// after an abnormal end.
    #[arg(long, value_enum, default_value_t = ReportMode::Auto, value_name = "HOW")]
    pub report: ReportMode,
    /// Arguments for QEMU after `--`; none boots the built-in tiny guest.
    #[arg(last = true, value_name = "QEMU ARGS")]
    pub qemu_args: Vec<OsString>,
}

/// Options of `fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// How many machines.
    #[arg(long, short = 'n', value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub count: u32,
    /// The QEMU binary.
    #[arg(long, env = "QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Run this QMP command on every ready member: `NAME` or `NAME {JSON ARGUMENTS}`.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Shut all down once every member is ready (and --exec has run), instead of waiting for
    /// Ctrl-C.
    #[arg(long)]
    pub exit_after_ready: bool,
    /// At most this many handshakes in progress at once (default: all).
    #[arg(long, value_name = "N")]
    pub spawn_cap: Option<usize>,
    /// Deadline for each QEMU to start and greet us, and for the banners.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub launch_timeout: Duration,
    /// Deadline for the shutdown (`quit`, then SIGKILL) and for --exec's replies.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub shutdown_timeout: Duration,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Arguments for every QEMU after `--`; none boots the built-in tiny guest.
    #[arg(last = true, value_name = "QEMU ARGS")]
    pub qemu_args: Vec<OsString>,
}

/// Options of `ga`.
#[derive(Debug, Args)]
pub struct GaArgs {
    /// ADDRESS (may be left out when $QGA_CLIENT_ADDRESS is set), COMMAND, its arguments.
    #[arg(
        required = true,
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub words: Vec<String>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// Deadline for each agent command (and for `exec`, for the guest command to end).
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub timeout: Duration,
    /// Deadline for connecting.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub connect_timeout: Duration,
}

/// Options of `qmp`.
#[derive(Debug, Args)]
pub struct QmpArgs {
    /// ADDRESS (may be left out when $QMP_SOCKET is set), COMMAND, then KEY=VALUE words.
    #[arg(required = true, value_name = "ARGS")]
    pub words: Vec<String>,
    /// The arguments as one JSON object (instead of KEY=VALUE words).
    #[arg(long, value_name = "JSON")]
    pub args: Option<String>,
    /// Compact JSON output (the default when stdout is not a terminal).
    #[arg(long)]
    pub json: bool,
    /// Pretty JSON output even when stdout is not a terminal.
    #[arg(long, short = 'p', conflicts_with = "json")]
    pub pretty: bool,
    /// Deadline for the reply.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub timeout: Duration,
    /// Deadline for connecting and the greeting.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub connect_timeout: Duration,
    /// Skip the greeting and capabilities negotiation (for qemu-ga).
    #[arg(long, short = 'N')]
    pub skip_negotiation: bool,
}

/// Options shared by `shell` and `wrap`.
#[derive(Debug, Args)]
pub struct ShellOptions {
    /// HMP mode: lines go to the human monitor; `cpu N` selects the CPU.
    #[arg(long, short = 'H')]
    pub hmp: bool,
    /// Echo each command as sent.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Pretty-print replies.
    #[arg(long, short = 'p')]
    pub pretty: bool,
    /// Append each command and its reply to FILE, one JSON object per line.
    #[arg(long, short = 'l', value_name = "FILE")]
    pub logfile: Option<PathBuf>,
    /// Events as JSON Lines instead of human lines.
    #[arg(long)]
    pub json: bool,
    /// Deadline for each reply.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub timeout: Duration,
    /// History file (default ~/.qemu-machine_history).
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
}

/// Options of `shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// QMP server: unix path or host:port.
    #[arg(env = "QMP_SOCKET", value_name = "ADDRESS")]
    pub address: String,
    /// Skip the greeting and capabilities negotiation (for qemu-ga).
    #[arg(long, short = 'N')]
    pub skip_negotiation: bool,
    /// Deadline for connecting and the greeting.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub connect_timeout: Duration,
    /// On a terminal, show events only before each prompt and after each reply, not while
    /// typing. (While typing, several keys arriving in one read, as an unbracketed paste
    /// does, are taken in at the next key: a limit of the line editor.)
    #[arg(long)]
    pub no_live_events: bool,
    /// Shell options.
    #[command(flatten)]
    pub shell: ShellOptions,
}

/// Options of `events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// QMP server: unix path or host:port.
    #[arg(env = "QMP_SOCKET", value_name = "ADDRESS")]
    pub address: String,
    /// Only events with this name (repeatable).
    #[arg(long, value_name = "NAME")]
    pub name: Vec<String>,
    /// JSON Lines output.
    #[arg(long)]
    pub json: bool,
    /// Stop after N events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this long (exit status 0).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Deadline for connecting and the greeting.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub connect_timeout: Duration,
    /// Skip the greeting and capabilities negotiation.
    #[arg(long, short = 'N')]
    pub skip_negotiation: bool,
}

/// Options of `qom`.
#[derive(Debug, Args)]
pub struct QomArgs {
    /// QMP server: unix path or host:port, as for the other subcommands.
    #[arg(value_name = "ADDRESS")]
    pub address: Option<String>,
    /// The server address given as an option, as QEMU's qom tools take it (`-s PATH`);
    /// $QMP_SOCKET when neither is given.
    #[arg(long, short = 's', env = "QMP_SOCKET", value_name = "ADDRESS")]
    pub socket: Option<String>,
    /// Deadline for each reply.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub timeout: Duration,
    /// Deadline for connecting and the greeting.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub connect_timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub action: QomAction,
}

/// The `qom` actions.
#[derive(Debug, Subcommand)]
pub enum QomAction {
    /// Print a property: `qom get /machine.type` (an object value prints as key: value lines).
    Get {
        /// PATH.PROPERTY
        property: String,
    },
    /// Set a property: `qom set /machine/peripheral/net0.link false`. VALUE is typed as in
    /// the shell (numbers, true/false, null, JSON, "quoted" or bare strings).
    Set {
        /// PATH.PROPERTY
        property: String,
        /// The value.
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// List an object's properties: children end with `/`, links start with `@`.
    List {
        /// The object path.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Print the objects under PATH with their properties and values.
    Tree {
        /// The object path.
        #[arg(default_value = "/")]
        path: String,
    },
}

/// Options of `wrap`.
#[derive(Debug, Args)]
pub struct WrapArgs {
    /// The QEMU binary.
    #[arg(long, env = "QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Deadline for QEMU to start and greet us.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub launch_timeout: Duration,
    /// Shell options.
    #[command(flatten)]
    pub shell: ShellOptions,
    /// On a terminal, show events only before each prompt and after each reply, not while
    /// typing (as `shell --no-live-events`).
    #[arg(long)]
    pub no_live_events: bool,
    /// Sharing the QMP monitor with other clients.
    #[command(flatten)]
    pub share: ShareOptions,
    /// QEMU's arguments.
    #[arg(last = true, required = true, value_name = "QEMU ARGS")]
    pub qemu_args: Vec<OsString>,
}

/// Sharing the monitor we own with other QMP clients (`run` and `wrap`).
#[derive(Debug, Args)]
pub struct ShareOptions {
    /// Let other QMP clients (qmp-shell, `qemu-machine shell`, monitoring tools) attach to
    /// our own monitor through a unix socket at PATH, all at once, while we keep using it.
    /// An existing PATH is replaced only if it is a stale socket.
    #[arg(long, value_name = "PATH")]
    pub share_qmp: Option<PathBuf>,
    /// Also accept them on this loopback TCP address (host:port; port 0 picks one).
    #[arg(long, value_name = "HOST:PORT", requires = "share_qmp")]
    pub share_qmp_tcp: Option<std::net::SocketAddr>,
    /// Let a shared client's `quit` end QEMU (refused by default).
    #[arg(long, requires = "share_qmp")]
    pub share_allow_quit: bool,
}

impl ShareOptions {
    /// The address and settings for `MachineBuilder::share_qmp`, when sharing was asked for.
    pub fn sharing(
        &self,
    ) -> Option<(
        machine_core::qmp_client::ShareAddress,
        machine_core::qmp_client::MuxConfig,
    )> {
        use machine_core::qmp_client::{MuxConfig, QuitPolicy, ShareAddress};
        let path = self.share_qmp.as_ref()?;
        let mut address = ShareAddress::unix(path);
        if let Some(tcp) = self.share_qmp_tcp {
            address = address.with_tcp(tcp);
        }
        let quit = if self.share_allow_quit {
            QuitPolicy::Allow
        } else {
            QuitPolicy::Refuse
        };
        Some((address, MuxConfig::default().with_quit(quit)))
    }
}

/// Options of `completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Reads a duration: `1.5s`, `500ms`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (try 500ms, 2s, 1.5m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "us" => 0.000_001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit `{other}` in `{text}` (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn qmp_words_and_flags_mix() {
        let cli = Cli::try_parse_from([
            "qemu-machine",
            "qmp",
            "/tmp/s",
            "query-status",
            "--json",
            "a.b=1",
        ])
        .unwrap();
        match cli.command {
            Command::Qmp(q) => {
                assert_eq!(q.words, ["/tmp/s", "query-status", "a.b=1"]);
                assert!(q.json);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn run_takes_qemu_args_after_double_dash() {
        let cli =
            Cli::try_parse_from(["qemu-machine", "run", "--accel", "auto", "--", "-M", "none"])
                .unwrap();
        match cli.command {
            Command::Run(r) => {
                assert_eq!(r.accel, Accel::Auto);
                assert_eq!(r.qemu_args, ["-M", "none"]);
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
