//! The QMP message types: what a client sends ([`Command`]) and what a server sends
//! ([`ServerMessage`]), with tolerant classification and compact encoding both ways.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::encode::{write_i64, write_key, write_map, write_str, write_value};
use crate::error::{Error, Result};

/// The QEMU version a server announces in its greeting.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct QemuVersion {
    /// Major version (`7` in 7.2.22).
    #[serde(default)]
    pub major: u64,
    /// Minor version (`2` in 7.2.22).
    #[serde(default)]
    pub minor: u64,
    /// Micro version (`22` in 7.2.22).
    #[serde(default)]
    pub micro: u64,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The `version` member of a greeting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Version {
    /// The numeric QEMU version.
    pub qemu: QemuVersion,
    /// The distribution's package string (for example `Debian 1:7.2+dfsg-7+deb12u16`).
    #[serde(default)]
    pub package: String,
}

/// The greeting a QMP server sends first: `{"QMP": {"version": ..., "capabilities": [...]}}`.
///
/// This struct is the inner object; [`ServerMessage::Greeting`] adds the `QMP` wrapper.
/// Decoding is tolerant: missing version numbers read as 0, a missing package as `""`,
/// capabilities that are not strings are skipped, and unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Greeting {
    /// The server's version.
    pub version: Version,
    /// The capabilities the server offers (QEMU 7.2 offers `oob`).
    #[serde(default)]
    pub capabilities: Vec<String>,
}

impl Greeting {
    /// Whether the server offers the capability `name` (for example `"oob"`).
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities
            .iter()
            .any(|capability| capability == name)
    }

    /// Reads the inner greeting object leniently (see the type docs).
    fn from_lenient(object: &Map<String, Value>) -> Greeting {
        let version = object.get("version").and_then(Value::as_object);
        let qemu = version
            .and_then(|v| v.get("qemu"))
            .and_then(Value::as_object);
        let number = |key: &str| {
            qemu.and_then(|q| q.get(key))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Greeting {
            version: Version {
                qemu: QemuVersion {
                    major: number("major"),
                    minor: number("minor"),
                    micro: number("micro"),
                },
                package: version
                    .and_then(|v| v.get("package"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            },
            capabilities: object
                .get("capabilities")
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|item| item.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// The class of a QMP error reply (`qapi/error.json`), with a fallback for classes this crate
/// does not know, so that a newer QEMU never breaks decoding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// `GenericError`: most errors.
    GenericError,
    /// `CommandNotFound`: unknown command, or a command used before capability negotiation.
    CommandNotFound,
    /// `DeviceNotActive`.
    DeviceNotActive,
    /// `DeviceNotFound`.
    DeviceNotFound,
    /// `KVMMissingCap`.
    KVMMissingCap,
    /// Any other class, kept verbatim.
    Other(String),
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
            ErrorClass::Other(name) => name,
        }
    }
}

impl From<&str> for ErrorClass {
    fn from(name: &str) -> ErrorClass {
        match name {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KVMMissingCap,
            other => ErrorClass::Other(other.to_owned()),
        }
    }
}

impl From<String> for ErrorClass {
    fn from(name: String) -> ErrorClass {
        match ErrorClass::from(name.as_str()) {
            ErrorClass::Other(_) => ErrorClass::Other(name),
            known => known,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorClass {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorClass {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        String::deserialize(deserializer).map(ErrorClass::from)
    }
}

/// The `error` member of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable description; clients must not parse it.
    pub desc: String,
}

impl ErrorInfo {
    /// A placeholder filled in while classifying (both members are known to be present).
    fn default_generic() -> ErrorInfo {
        ErrorInfo {
            class: ErrorClass::GenericError,
            desc: String::new(),
        }
    }
}

/// A success reply: `{"return": ..., "id": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReturnReply {
    /// The returned value: any JSON (`{}` when the command returns nothing).
    #[serde(rename = "return")]
    pub ret: Value,
    /// The id the command carried, echoed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// An error reply: `{"error": {"class": ..., "desc": ...}, "id": ...}`.
///
/// A server-side JSON parse error comes back without an `id` even if the command had one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The error.
    pub error: ErrorInfo,
    /// The id the command carried, echoed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// When an event happened: seconds and microseconds since the Unix epoch.
///
/// QEMU sends `-1`/`-1` when the host time is unavailable ([`Timestamp::UNAVAILABLE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The timestamp QEMU sends when it cannot read the host time, and the one this crate
    /// reports for an event whose timestamp is missing or malformed.
    pub const UNAVAILABLE: Timestamp = Timestamp {
        seconds: -1,
        microseconds: -1,
    };

    /// Whether this is [`Timestamp::UNAVAILABLE`].
    pub fn is_unavailable(&self) -> bool {
        *self == Timestamp::UNAVAILABLE
    }
}

/// An asynchronous event: `{"event": ..., "data": ..., "timestamp": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The event name, for example `SHUTDOWN`.
    pub event: String,
    /// The event's data, when it has any (usually an object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// When it happened.
    #[serde(default = "unavailable")]
    pub timestamp: Timestamp,
}

fn unavailable() -> Timestamp {
    Timestamp::UNAVAILABLE
}

impl Event {
    /// The whole event as a JSON object, as it appears on the wire.
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        map.insert("event".to_owned(), Value::String(self.event.clone()));
        if let Some(data) = &self.data {
            map.insert("data".to_owned(), data.clone());
        }
        map.insert("timestamp".to_owned(), timestamp_value(self.timestamp));
        Value::Object(map)
    }

    /// The timestamp as it appears on the wire.
    pub fn timestamp_value(&self) -> Value {
        timestamp_value(self.timestamp)
    }
}

fn timestamp_value(timestamp: Timestamp) -> Value {
    let mut map = Map::new();
    map.insert("seconds".to_owned(), Value::from(timestamp.seconds));
    map.insert(
        "microseconds".to_owned(),
        Value::from(timestamp.microseconds),
    );
    Value::Object(map)
}

fn timestamp_lenient(value: Option<&Value>) -> Timestamp {
    let object = value.and_then(Value::as_object);
    let field = |key: &str| object.and_then(|o| o.get(key)).and_then(Value::as_i64);
    match (field("seconds"), field("microseconds")) {
        (Some(seconds), Some(microseconds)) => Timestamp {
            seconds,
            microseconds,
        },
        _ => Timestamp::UNAVAILABLE,
    }
}

/// Which known shape a server message has, by its keys.
#[derive(Clone, Copy)]
enum Shape {
    Greeting,
    Return,
    Error,
    Event,
}

/// Anything a QMP server sends, classified.
///
/// Classification looks at which of the keys `QMP`, `return`, `error` and `event` are present:
/// exactly one of them must be, with the right type (`QMP` an object, `error` an object with
/// string `class` and `desc`, `event` a string). Anything else (no key, several, wrong types,
/// for example a reply with an `id` but neither `return` nor `error`) is kept whole as
/// [`ServerMessage::Unknown`] instead of failing: a newer QEMU must never break decoding.
/// Unknown extra keys in the known shapes are ignored.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The greeting (`{"QMP": ...}`).
    Greeting(Greeting),
    /// A success reply.
    Return(ReturnReply),
    /// An error reply.
    Error(ErrorReply),
    /// An event.
    Event(Event),
    /// Any other object, kept whole.
    Unknown(Map<String, Value>),
}

impl ServerMessage {
    /// Classifies a decoded JSON object (see the type docs). Never fails.
    pub fn from_object(object: Map<String, Value>) -> ServerMessage {
        // One pass over the keys decides the shape; the values are then moved out in a
        // second pass that also frees the map, as dropping it would.
        let mut shape = None;
        let mut well_typed = false;
        for (key, value) in &object {
            let (kind, typed) = match key.as_str() {
                "QMP" => (Shape::Greeting, value.is_object()),
                "return" => (Shape::Return, true),
                "error" => (
                    Shape::Error,
                    value.get("class").is_some_and(Value::is_string)
                        && value.get("desc").is_some_and(Value::is_string),
                ),
                "event" => (Shape::Event, value.is_string()),
                _ => continue,
            };
            if shape.replace(kind).is_some() {
                return ServerMessage::Unknown(object);
            }
            well_typed = typed;
        }
        let Some(shape) = shape.filter(|_| well_typed) else {
            return ServerMessage::Unknown(object);
        };
        match shape {
            Shape::Greeting => match object.get("QMP") {
                Some(Value::Object(inner)) => {
                    ServerMessage::Greeting(Greeting::from_lenient(inner))
                }
                _ => ServerMessage::Unknown(object),
            },
            Shape::Return => {
                let (mut ret, mut id) = (Value::Null, None);
                for (key, value) in object {
                    match key.as_str() {
                        "return" => ret = value,
                        "id" => id = Some(value),
                        _ => {}
                    }
                }
                ServerMessage::Return(ReturnReply { ret, id })
            }
            Shape::Error => {
                let (mut error, mut id) = (ErrorInfo::default_generic(), None);
                for (key, value) in object {
                    match (key.as_str(), value) {
                        ("error", Value::Object(info)) => {
                            for (key, value) in info {
                                match (key.as_str(), value) {
                                    ("class", Value::String(class)) => {
                                        error.class = ErrorClass::from(class)
                                    }
                                    ("desc", Value::String(desc)) => error.desc = desc,
                                    _ => {}
                                }
                            }
                        }
                        ("id", value) => id = Some(value),
                        _ => {}
                    }
                }
                ServerMessage::Error(ErrorReply { error, id })
            }
            Shape::Event => {
                let mut event = Event {
                    event: String::new(),
                    data: None,
                    timestamp: Timestamp::UNAVAILABLE,
                };
                for (key, value) in object {
                    match (key.as_str(), value) {
                        ("event", Value::String(name)) => event.event = name,
                        ("data", data) => event.data = Some(data),
                        ("timestamp", timestamp) => {
                            event.timestamp = timestamp_lenient(Some(&timestamp))
                        }
                        _ => {}
                    }
                }
                ServerMessage::Event(event)
            }
        }
    }

    /// The `id` of a reply (success, error or unknown shape); `None` for greetings and events.
    pub fn id(&self) -> Option<&Value> {
        match self {
            ServerMessage::Return(reply) => reply.id.as_ref(),
            ServerMessage::Error(reply) => reply.id.as_ref(),
            ServerMessage::Unknown(object) => object.get("id"),
            ServerMessage::Greeting(_) | ServerMessage::Event(_) => None,
        }
    }

    /// Whether this is a reply to a command: success, error, or an unknown shape with an `id`.
    pub fn is_reply(&self) -> bool {
        match self {
            ServerMessage::Return(_) | ServerMessage::Error(_) => true,
            ServerMessage::Unknown(object) => object.contains_key("id"),
            ServerMessage::Greeting(_) | ServerMessage::Event(_) => false,
        }
    }

    /// The whole message as a JSON object, as it appears on the wire.
    pub fn to_value(&self) -> Value {
        match self {
            ServerMessage::Greeting(greeting) => serde_json::json!({
                "QMP": {
                    "version": {
                        "qemu": {
                            "major": greeting.version.qemu.major,
                            "minor": greeting.version.qemu.minor,
                            "micro": greeting.version.qemu.micro,
                        },
                        "package": greeting.version.package,
                    },
                    "capabilities": greeting.capabilities,
                }
            }),
            ServerMessage::Return(reply) => {
                let mut map = Map::new();
                map.insert("return".to_owned(), reply.ret.clone());
                if let Some(id) = &reply.id {
                    map.insert("id".to_owned(), id.clone());
                }
                Value::Object(map)
            }
            ServerMessage::Error(reply) => {
                let mut map = Map::new();
                map.insert(
                    "error".to_owned(),
                    serde_json::json!({
                        "class": reply.error.class.as_str(),
                        "desc": reply.error.desc,
                    }),
                );
                if let Some(id) = &reply.id {
                    map.insert("id".to_owned(), id.clone());
                }
                Value::Object(map)
            }
            ServerMessage::Event(event) => event.to_value(),
            ServerMessage::Unknown(object) => Value::Object(object.clone()),
        }
    }

    /// Appends the message to `out` as QEMU writes it: compact JSON followed by CRLF.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode_compact(out);
        out.extend_from_slice(b"\r\n");
    }

    /// Appends the compact JSON object, without a line ending.
    fn encode_compact(&self, out: &mut Vec<u8>) {
        match self {
            ServerMessage::Greeting(greeting) => {
                out.extend_from_slice(b"{\"QMP\":{\"version\":{\"qemu\":{\"major\":");
                let qemu = greeting.version.qemu;
                write_u64(out, qemu.major);
                out.extend_from_slice(b",\"minor\":");
                write_u64(out, qemu.minor);
                out.extend_from_slice(b",\"micro\":");
                write_u64(out, qemu.micro);
                out.extend_from_slice(b"},\"package\":");
                write_str(out, &greeting.version.package);
                out.extend_from_slice(b"},\"capabilities\":[");
                for (index, capability) in greeting.capabilities.iter().enumerate() {
                    if index > 0 {
                        out.push(b',');
                    }
                    write_str(out, capability);
                }
                out.extend_from_slice(b"]}}");
            }
            ServerMessage::Return(reply) => {
                out.extend_from_slice(b"{\"return\":");
                write_value(out, &reply.ret);
                write_id(out, reply.id.as_ref());
                out.push(b'}');
            }
            ServerMessage::Error(reply) => {
                out.extend_from_slice(b"{\"error\":{\"class\":");
                write_str(out, reply.error.class.as_str());
                out.extend_from_slice(b",\"desc\":");
                write_str(out, &reply.error.desc);
                out.push(b'}');
                write_id(out, reply.id.as_ref());
                out.push(b'}');
            }
            ServerMessage::Event(event) => {
                out.extend_from_slice(b"{\"event\":");
                write_str(out, &event.event);
                if let Some(data) = &event.data {
                    out.extend_from_slice(b",\"data\":");
                    write_value(out, data);
                }
                out.extend_from_slice(b",\"timestamp\":{\"seconds\":");
                write_i64(out, event.timestamp.seconds);
                out.extend_from_slice(b",\"microseconds\":");
                write_i64(out, event.timestamp.microseconds);
                out.extend_from_slice(b"}}");
            }
            ServerMessage::Unknown(object) => write_map(out, object),
        }
    }
}

impl From<Greeting> for ServerMessage {
    fn from(greeting: Greeting) -> ServerMessage {
        ServerMessage::Greeting(greeting)
    }
}

impl From<ReturnReply> for ServerMessage {
    fn from(reply: ReturnReply) -> ServerMessage {
        ServerMessage::Return(reply)
    }
}

impl From<ErrorReply> for ServerMessage {
    fn from(reply: ErrorReply) -> ServerMessage {
        ServerMessage::Error(reply)
    }
}

impl From<Event> for ServerMessage {
    fn from(event: Event) -> ServerMessage {
        ServerMessage::Event(event)
    }
}

/// The deepest nesting of objects and arrays QEMU's JSON parser accepts in one message, the
/// outermost object counting as 1 (`MAX_NESTING` in QEMU's `qobject/json-streamer.c`). Deeper
/// input gets an error without an id, and QEMU's parser reads what follows out of step
/// (measured on QEMU 7.2: a command 1024 levels deep is parsed and answered with its id; at
/// 1025 the reply is an id-less "JSON nesting depth limit exceeded", and the next command is
/// lost in a "JSON parse error").
pub const MAX_NESTING: usize = 1024;

/// Levels of objects and arrays in `value`, itself included (0 for a scalar), counted without
/// recursion, so that any depth is safe to measure.
pub fn nesting(value: &Value) -> usize {
    match value {
        Value::Object(map) => map_nesting(map),
        Value::Array(items) => deepest(items.iter(), 1),
        _ => 0,
    }
}

/// [`nesting`] of an object given as its map.
fn map_nesting(map: &Map<String, Value>) -> usize {
    deepest(map.values(), 1)
}

/// The deepest level reached from `children` of a container at `level`.
fn deepest<'a>(children: impl Iterator<Item = &'a Value>, level: usize) -> usize {
    let mut deepest = level;
    let mut stack: Vec<(&Value, usize)> = children.map(|c| (c, level + 1)).collect();
    while let Some((value, level)) = stack.pop() {
        match value {
            Value::Object(m) => {
                deepest = deepest.max(level);
                stack.extend(m.values().map(|c| (c, level + 1)));
            }
            Value::Array(a) => {
                deepest = deepest.max(level);
                stack.extend(a.iter().map(|c| (c, level + 1)));
            }
            _ => {}
        }
    }
    deepest
}

fn write_u64(out: &mut Vec<u8>, number: u64) {
    write_value(out, &Value::from(number));
}

fn write_id(out: &mut Vec<u8>, id: Option<&Value>) {
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        write_value(out, id);
    }
}

/// A command a client sends: `{"execute": name, "arguments": {...}, "id": ...}`, or
/// `exec-oob` instead of `execute` for an out-of-band command.
///
/// ```
/// use qmp_proto::Command;
/// use serde_json::json;
///
/// let mut args = serde_json::Map::new();
/// args.insert("device".into(), json!("virtio0"));
/// let cmd = Command::new("eject").with_arguments(args).with_id(7);
/// let mut out = Vec::new();
/// cmd.encode_into(&mut out);
/// assert_eq!(out, br#"{"execute":"eject","arguments":{"device":"virtio0"},"id":7}"#);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The command name.
    pub execute: String,
    /// The arguments; `None` and an empty map are both sent as no `arguments` at all.
    pub arguments: Option<Map<String, Value>>,
    /// The id, echoed in the reply; any JSON value (small integers are the cheapest to send).
    pub id: Option<Value>,
    /// Whether to send it out of band (`exec-oob`); needs the `oob` capability.
    pub oob: bool,
}

impl Command {
    /// A command with no arguments, no id, in band.
    pub fn new(name: impl Into<String>) -> Command {
        Command {
            execute: name.into(),
            arguments: None,
            id: None,
            oob: false,
        }
    }

    /// Sets the arguments.
    pub fn with_arguments(mut self, arguments: Map<String, Value>) -> Command {
        self.arguments = Some(arguments);
        self
    }

    /// Sets the id.
    pub fn with_id(mut self, id: impl Into<Value>) -> Command {
        self.id = Some(id.into());
        self
    }

    /// Sets whether the command goes out of band.
    pub fn with_oob(mut self, oob: bool) -> Command {
        self.oob = oob;
        self
    }

    /// Appends the command to `out` as the fewest bytes QEMU accepts: compact JSON, no empty
    /// `arguments`, no trailing newline (a newline after `quit` turns QEMU's clean EOF into a
    /// connection reset, and each byte costs QEMU 7.2 a system call).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if self.oob {
            b"{\"exec-oob\":"
        } else {
            b"{\"execute\":"
        });
        write_str(out, &self.execute);
        if let Some(arguments) = self.arguments.as_ref().filter(|a| !a.is_empty()) {
            out.push(b',');
            write_key(out, "arguments");
            write_map(out, arguments);
        }
        write_id(out, self.id.as_ref());
        out.push(b'}');
    }

    /// Levels of objects and arrays in the encoded command, the command object itself counting
    /// as 1 (so its `arguments` object is level 2). QEMU refuses a command deeper than
    /// [`MAX_NESTING`]: check before sending, as its refusal carries no id.
    pub fn nesting(&self) -> usize {
        let arguments = self
            .arguments
            .as_ref()
            .filter(|a| !a.is_empty())
            .map_or(0, map_nesting);
        1 + arguments.max(self.id.as_ref().map_or(0, nesting))
    }

    /// The encoded command as a new buffer (see [`Command::encode_into`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.execute.len());
        self.encode_into(&mut out);
        out
    }

    /// Reads a command from a decoded JSON object, as a server does.
    ///
    /// Like QEMU, it is strict: exactly one of `execute` and `exec-oob` (a string), `arguments`
    /// an object when present, and no other keys; `id` may be any JSON value.
    pub fn from_object(mut object: Map<String, Value>) -> Result<Command> {
        let invalid = |reason: String| Err(Error::InvalidCommand { reason });
        let (key, oob) = match (
            object.contains_key("execute"),
            object.contains_key("exec-oob"),
        ) {
            (true, false) => ("execute", false),
            (false, true) => ("exec-oob", true),
            (true, true) => return invalid("both 'execute' and 'exec-oob' are present".into()),
            (false, false) => return invalid("'execute' is missing".into()),
        };
        let execute = match object.remove(key) {
            Some(Value::String(name)) => name,
            _ => return invalid(format!("'{key}' must be a string")),
        };
        let arguments = match object.remove("arguments") {
            None => None,
            Some(Value::Object(arguments)) => Some(arguments),
            Some(_) => return invalid("'arguments' must be an object".into()),
        };
        let id = object.remove("id");
        if let Some(extra) = object.keys().next() {
            return invalid(format!("unexpected member '{extra}'"));
        }
        Ok(Command {
            execute,
            arguments,
            id,
            oob,
        })
    }

    /// The command as a JSON object, as [`Command::encode_into`] writes it.
    pub fn to_object(&self) -> Map<String, Value> {
        let mut object = Map::new();
        let key = if self.oob { "exec-oob" } else { "execute" };
        object.insert(key.to_owned(), Value::String(self.execute.clone()));
        if let Some(arguments) = self.arguments.as_ref().filter(|a| !a.is_empty()) {
            object.insert("arguments".to_owned(), Value::Object(arguments.clone()));
        }
        if let Some(id) = &self.id {
            object.insert("id".to_owned(), id.clone());
        }
        object
    }
}

/// The top-level members that classification looks at.
enum Member {
    Qmp,
    Return,
    Error,
    Event,
    Id,
    Data,
    Timestamp,
    Other,
}

impl<'de> Deserialize<'de> for Member {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Member, D::Error> {
        struct MemberVisitor;
        impl serde::de::Visitor<'_> for MemberVisitor {
            type Value = Member;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> std::result::Result<Member, E> {
                Ok(match key {
                    "QMP" => Member::Qmp,
                    "return" => Member::Return,
                    "error" => Member::Error,
                    "event" => Member::Event,
                    "id" => Member::Id,
                    "data" => Member::Data,
                    "timestamp" => Member::Timestamp,
                    _ => Member::Other,
                })
            }
        }
        deserializer.deserialize_str(MemberVisitor)
    }
}

/// An event's `timestamp` read straight from the text, as [`timestamp_lenient`] reads it from
/// a [`Value`]. Anything but an object is refused, so that the caller falls back.
struct TimestampMember(Timestamp);

impl<'de> Deserialize<'de> for TimestampMember {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<TimestampMember, D::Error> {
        struct TimestampVisitor;
        impl<'de> serde::de::Visitor<'de> for TimestampVisitor {
            type Value = TimestampMember;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a timestamp object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<TimestampMember, A::Error> {
                let (mut seconds, mut microseconds) = (None, None);
                while let Some(key) = map.next_key::<TimestampKey>()? {
                    // Every value is read as a `Value`, so that the text is validated exactly
                    // as a whole-object parse validates it (numbers out of range, escapes).
                    let value = map.next_value::<Value>()?;
                    match key {
                        TimestampKey::Seconds => seconds = Some(value),
                        TimestampKey::Microseconds => microseconds = Some(value),
                        TimestampKey::Other => {}
                    }
                }
                let field = |value: Option<Value>| value.as_ref().and_then(Value::as_i64);
                Ok(TimestampMember(
                    match (field(seconds), field(microseconds)) {
                        (Some(seconds), Some(microseconds)) => Timestamp {
                            seconds,
                            microseconds,
                        },
                        _ => Timestamp::UNAVAILABLE,
                    },
                ))
            }
        }
        deserializer.deserialize_any(TimestampVisitor)
    }
}

/// The members of a timestamp.
enum TimestampKey {
    Seconds,
    Microseconds,
    Other,
}

impl<'de> Deserialize<'de> for TimestampKey {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<TimestampKey, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = TimestampKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: serde::de::Error>(
                self,
                key: &str,
            ) -> std::result::Result<TimestampKey, E> {
                Ok(match key {
                    "seconds" => TimestampKey::Seconds,
                    "microseconds" => TimestampKey::Microseconds,
                    _ => TimestampKey::Other,
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A server message read straight from the text when it has one of the known shapes, without
/// building the whole object first; `None` when it has none (the caller then parses the whole
/// object and classifies it with [`ServerMessage::from_object`], which keeps it as
/// [`ServerMessage::Unknown`]). When it is `Some`, it is what `from_object` gives for the
/// same text. An error (including a value that is not an object, or a `timestamp` that is not
/// one) also means: take the general way, which reports the right error.
pub(crate) struct KnownMessage(pub(crate) Option<ServerMessage>);

impl<'de> Deserialize<'de> for KnownMessage {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<KnownMessage, D::Error> {
        deserializer.deserialize_map(KnownVisitor)
    }
}

struct KnownVisitor;

impl<'de> serde::de::Visitor<'de> for KnownVisitor {
    type Value = KnownMessage;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a QMP server message")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<KnownMessage, A::Error> {
        // Each member the classification needs, the last occurrence winning as in a `Map`.
        let (mut qmp, mut ret, mut error, mut event) = (None, None, None, None);
        let (mut id, mut data, mut timestamp) = (None, None, None);
        while let Some(key) = map.next_key::<Member>()? {
            match key {
                Member::Qmp => qmp = Some(map.next_value::<Value>()?),
                Member::Return => ret = Some(map.next_value::<Value>()?),
                Member::Error => error = Some(map.next_value::<Value>()?),
                Member::Event => event = Some(map.next_value::<Value>()?),
                Member::Id => id = Some(map.next_value::<Value>()?),
                Member::Data => data = Some(map.next_value::<Value>()?),
                Member::Timestamp => timestamp = Some(map.next_value::<TimestampMember>()?.0),
                // Read as a `Value` so the text is validated as a whole-object parse would.
                Member::Other => drop(map.next_value::<Value>()?),
            }
        }
        let present = [
            qmp.is_some(),
            ret.is_some(),
            error.is_some(),
            event.is_some(),
        ];
        if present.iter().filter(|&&p| p).count() != 1 {
            return Ok(KnownMessage(None));
        }
        let message = if let Some(Value::Object(inner)) = qmp {
            Some(ServerMessage::Greeting(Greeting::from_lenient(&inner)))
        } else if let Some(ret) = ret {
            Some(ServerMessage::Return(ReturnReply { ret, id }))
        } else if let Some(Value::Object(info)) = error {
            let (mut class, mut desc) = (None, None);
            for (key, value) in info {
                match (key.as_str(), value) {
                    ("class", Value::String(name)) => class = Some(ErrorClass::from(name)),
                    ("desc", Value::String(text)) => desc = Some(text),
                    _ => {}
                }
            }
            match (class, desc) {
                (Some(class), Some(desc)) => Some(ServerMessage::Error(ErrorReply {
                    error: ErrorInfo { class, desc },
                    id,
                })),
                _ => None,
            }
        } else if let Some(Value::String(name)) = event {
            Some(ServerMessage::Event(Event {
                event: name,
                data,
                timestamp: timestamp.unwrap_or(Timestamp::UNAVAILABLE),
            }))
        } else {
            None
        };
        Ok(KnownMessage(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A command `depth` levels deep through its arguments (arrays under `a`).
    fn deep_command(depth: usize) -> Command {
        let mut value = json!([]);
        for _ in 0..depth - 3 {
            value = Value::Array(vec![value]);
        }
        let mut arguments = Map::new();
        arguments.insert("a".into(), value);
        Command::new("x").with_arguments(arguments).with_id(1)
    }

    #[test]
    fn nesting_counts_as_qemu_does_and_matches_the_decoders_limit() {
        assert_eq!(Command::new("x").nesting(), 1);
        assert_eq!(Command::new("x").with_arguments(Map::new()).nesting(), 1);
        let mut flat = Map::new();
        flat.insert("k".into(), json!(1));
        assert_eq!(Command::new("x").with_arguments(flat).nesting(), 2);
        assert_eq!(
            Command::new("x").with_id(json!([[1], {"k": {}}])).nesting(),
            4
        );
        assert_eq!(
            (
                nesting(&json!(1)),
                nesting(&json!({})),
                nesting(&json!([[]]))
            ),
            (0, 1, 2)
        );
        // Our decoder refuses what QEMU's parser refuses: the two counts agree at the limit.
        for depth in [3, MAX_NESTING - 1, MAX_NESTING, MAX_NESTING + 1, 5000] {
            let command = deep_command(depth);
            assert_eq!(command.nesting(), depth);
            let mut decoder = crate::Decoder::new();
            decoder.feed(&command.to_bytes());
            let decoded = decoder.next_object();
            assert_eq!(
                matches!(decoded, Some(Ok(_))),
                depth <= MAX_NESTING,
                "depth {depth}: {decoded:?}"
            );
        }
    }
}
