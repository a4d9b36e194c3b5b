//! `qemu-machine qom get|set|list|tree`: QEMU's object model over QMP, as QEMU's `qom` tools
//! do it (`qom-get`, `qom-set`, `qom-list`, `qom-tree`), on the same connection options.
//!
//! Differences from QEMU's tools: `set` sends a typed value (`42`, `true`, JSON, or a string,
//! as in the shell) rather than always a string, so integer and boolean properties can be set;
//! TCP addresses work; errors are typed with a non-zero exit status.

use serde_json::{Map, Value};

use machine_core::qmp_client::Connection;

use crate::address::Address;
use crate::args::{QomAction, QomArgs};
use crate::connect::{self, ConnectOptions};
use crate::error::{Error, Result};
use crate::lang;
use crate::output;

/// Runs `qom`.
pub fn run(args: QomArgs) -> Result<u8> {
    let address = match args.address.as_ref().or(args.socket.as_ref()) {
        Some(text) => Address::parse(text),
        None => return Err(Error::MissingAddress),
    };
    let options = ConnectOptions {
        connect_timeout: args.connect_timeout,
        command_timeout: args.timeout,
        skip_negotiation: false,
    };
    // Check the arguments before connecting.
    let plan = match &args.action {
        QomAction::Get { property } => Plan::Get(split_property(property)?),
        QomAction::Set { property, value } => {
            let (path, name) = split_property(property)?;
            Plan::Set(path, name, lang::parse_value("value", value)?)
        }
        QomAction::List { path } => Plan::List(path.clone()),
        QomAction::Tree { path } => Plan::Tree(path.clone()),
    };
    let mut qmp = connect::connect(&address, &options)?;
    let result = match plan {
        Plan::Get((path, name)) => get(&mut qmp, &path, &name),
        Plan::Set(path, name, value) => set(&mut qmp, &path, &name, value),
        Plan::List(path) => list(&mut qmp, &path),
        Plan::Tree(path) => tree(&mut qmp, &path),
    };
    connect::close(qmp);
    result.map(|()| 0)
}

enum Plan {
    Get((String, String)),
    Set(String, String, Value),
    List(String),
    Tree(String),
}

/// Splits `PATH.PROPERTY` at the last dot (object paths have none after the last `/`).
fn split_property(text: &str) -> Result<(String, String)> {
    match text.rsplit_once('.') {
        Some((path, name)) if !path.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((path.to_string(), name.to_string()))
        }
        _ => Err(Error::BadQomProperty {
            text: text.to_string(),
        }),
    }
}

fn execute(qmp: &mut Connection, command: &str, arguments: Map<String, Value>) -> Result<Value> {
    qmp.execute(command, Some(arguments))
        .map_err(|e| Error::from_qmp(command, e))
}

fn object(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn get(qmp: &mut Connection, path: &str, name: &str) -> Result<()> {
    let value = execute(
        qmp,
        "qom-get",
        object(&[("path", Value::from(path)), ("property", Value::from(name))]),
    )?;
    match value {
        Value::Object(map) => {
            for (key, value) in &map {
                output::emit(&format!("{key}: {}", scalar(value)))?;
            }
            Ok(())
        }
        other => output::emit(&scalar(&other)),
    }
}

fn set(qmp: &mut Connection, path: &str, name: &str, value: Value) -> Result<()> {
    execute(
        qmp,
        "qom-set",
        object(&[
            ("path", Value::from(path)),
            ("property", Value::from(name)),
            ("value", value),
        ]),
    )?;
    Ok(())
}

/// One entry of `qom-list`.
struct Property {
    name: String,
    kind: String,
}

impl Property {
    fn is_child(&self) -> bool {
        self.kind.starts_with("child<")
    }

    fn is_link(&self) -> bool {
        self.kind.starts_with("link<")
    }
}

fn properties(qmp: &mut Connection, path: &str) -> Result<Vec<Property>> {
    let listed = execute(qmp, "qom-list", object(&[("path", Value::from(path))]))?;
    Ok(listed
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| Property {
                    name: text(item, "name"),
                    kind: text(item, "type"),
                })
                .collect()
        })
        .unwrap_or_default())
}

fn text(item: &Value, key: &str) -> String {
    item.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// `qom-list PATH`: children as `name/`, links as `@name/`, other properties by name.
fn list(qmp: &mut Connection, path: &str) -> Result<()> {
    for property in properties(qmp, path)? {
        let line = if property.is_child() {
            format!("{}/", property.name)
        } else if property.is_link() {
            format!("@{}/", property.name)
        } else {
            property.name
        };
        output::emit(&line)?;
    }
    Ok(())
}

/// `qom-tree PATH`: every object under PATH with its properties and values. A property whose
/// value cannot be read prints `<EXCEPTION: ...>` and the walk goes on.
fn tree(qmp: &mut Connection, path: &str) -> Result<()> {
    let mut stack = vec![path.to_string()];
    let mut first = true;
    while let Some(path) = stack.pop() {
        if !first {
            output::emit("")?;
        }
        first = false;
        output::emit(&path)?;
        let props = properties(qmp, &path)?;
        let mut children = Vec::new();
        for property in &props {
            if property.is_child() {
                children.push(join(&path, &property.name));
                continue;
            }
            let shown = match qmp.execute(
                "qom-get",
                Some(object(&[
                    ("path", Value::from(path.as_str())),
                    ("property", Value::from(property.name.as_str())),
                ])),
            ) {
                Ok(value) => scalar(&value),
                Err(error) => match Error::from_qmp("qom-get", error) {
                    Error::Command { desc, .. } => format!("<EXCEPTION: {desc}>"),
                    transport => return Err(transport),
                },
            };
            output::emit(&format!("  {}: {shown} ({})", property.name, property.kind))?;
        }
        // Depth first, in listing order.
        stack.extend(children.into_iter().rev());
    }
    Ok(())
}

fn join(path: &str, name: &str) -> String {
    if path.ends_with('/') {
        format!("{path}{name}")
    } else {
        format!("{path}/{name}")
    }
}

/// A value for people: strings without quotes, anything else as compact JSON.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_paths() {
        assert_eq!(
            split_property("/machine.type").unwrap(),
            ("/machine".to_string(), "type".to_string())
        );
        assert_eq!(
            split_property("/machine/unattached/device[0].realized").unwrap(),
            (
                "/machine/unattached/device[0]".to_string(),
                "realized".to_string()
            )
        );
        for bad in ["/machine", "type", ".type", "/machine.", "/a.b/c"] {
            assert!(
                matches!(split_property(bad), Err(Error::BadQomProperty { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn paths_and_values() {
        assert_eq!(join("/", "machine"), "/machine");
        assert_eq!(join("/machine", "peripheral"), "/machine/peripheral");
        assert_eq!(scalar(&Value::from("q35")), "q35");
        assert_eq!(scalar(&serde_json::json!([1, 2])), "[1,2]");
    }
}
