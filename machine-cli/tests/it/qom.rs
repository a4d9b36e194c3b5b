//! `qemu-machine qom`: get, set, list and tree against the fake server.

use machine_core::qmp_client::testing::{Action, Script};
use serde_json::{json, Value};

use crate::util::{run, serve};

/// A tiny object tree: `/` has child `machine` (type q35) and a link; `machine` has `type`,
/// a `realized` flag and an unreadable property.
fn object_model() -> Script {
    Script::new()
        .on_fn("qom-list", |cmd| {
            let args = cmd.arguments.clone().unwrap_or_default();
            match args.get("path").and_then(Value::as_str) {
                Some("/") => vec![Action::reply(json!([
                    {"name": "type", "type": "string"},
                    {"name": "machine", "type": "child<q35-machine>"},
                    {"name": "boot", "type": "link<device>"}
                ]))],
                Some("/machine") => vec![Action::reply(json!([
                    {"name": "type", "type": "string"},
                    {"name": "realized", "type": "bool"},
                    {"name": "secret", "type": "string"}
                ]))],
                _ => vec![Action::error("DeviceNotFound", "Device not found")],
            }
        })
        .on_fn("qom-get", |cmd| {
            let args = cmd.arguments.clone().unwrap_or_default();
            let path = args.get("path").and_then(Value::as_str).unwrap_or("");
            let prop = args.get("property").and_then(Value::as_str).unwrap_or("");
            match (path, prop) {
                ("/", "type") => vec![Action::reply(json!("container"))],
                ("/machine", "type") => vec![Action::reply(json!("q35-machine"))],
                ("/machine", "realized") => vec![Action::reply(json!(true))],
                ("/machine", "rtc-time") => {
                    vec![Action::reply(json!({"tm_year": 126, "tm_mon": 10}))]
                }
                _ => vec![Action::error("GenericError", "Property cannot be read")],
            }
        })
        .on("qom-set", vec![Action::reply(json!({}))])
}

#[test]
fn get_prints_plain_values_and_objects_as_lines() {
    let s = serve(object_model());
    let r = run(&["qom", "-s", s.addr(), "get", "/machine.type"], "", &[]);
    r.expect_code(0);
    assert_eq!(r.stdout, "q35-machine\n");
    let s = serve(object_model());
    let r = run(
        &["qom", "get", "/machine.rtc-time"],
        "",
        &[("QMP_SOCKET", s.addr())],
    );
    r.expect_code(0);
    assert_eq!(r.stdout, "tm_mon: 10\ntm_year: 126\n");
}

#[test]
fn set_sends_a_typed_value() {
    let s = serve(object_model());
    let r = run(
        &["qom", "-s", s.addr(), "set", "/machine.realized", "false"],
        "",
        &[],
    );
    r.expect_code(0);
    let s2 = serve(object_model());
    let r = run(
        &["qom", "-s", s2.addr(), "set", "/machine.n", "-3"],
        "",
        &[],
    );
    r.expect_code(0);
    let args = |s: &crate::util::Served| {
        Value::Object(
            s.server
                .commands()
                .last()
                .unwrap()
                .arguments
                .clone()
                .unwrap(),
        )
    };
    assert_eq!(
        args(&s),
        json!({"path": "/machine", "property": "realized", "value": false})
    );
    assert_eq!(
        args(&s2),
        json!({"path": "/machine", "property": "n", "value": -3})
    );
}

#[test]
fn list_marks_children_and_links() {
    let s = serve(object_model());
    let r = run(&["qom", "-s", s.addr(), "list"], "", &[]);
    r.expect_code(0);
    assert_eq!(r.stdout, "type\nmachine/\n@boot/\n");
}

#[test]
fn tree_walks_children_and_survives_unreadable_properties() {
    let s = serve(object_model());
    let r = run(&["qom", "-s", s.addr(), "tree"], "", &[]);
    r.expect_code(0);
    assert_eq!(
        r.stdout,
        "/\n  type: container (string)\n  boot: <EXCEPTION: Property cannot be read> (link<device>)\n\
         \n/machine\n  type: q35-machine (string)\n  realized: true (bool)\n  \
         secret: <EXCEPTION: Property cannot be read> (string)\n"
    );
}

#[test]
fn errors_are_typed() {
    let s = serve(object_model());
    let r = run(&["qom", "-s", s.addr(), "list", "/nowhere"], "", &[]);
    r.expect_code(1);
    assert!(r.stderr.contains("DeviceNotFound"), "{}", r.stderr);
    let r = run(
        &["qom", "-s", "/nonexistent.sock", "get", "machine"],
        "",
        &[],
    );
    r.expect_code(2);
    assert!(r.stderr.contains("PATH.PROPERTY"), "{}", r.stderr);
    let r = run(&["qom", "get", "/machine.type"], "", &[]);
    r.expect_code(2);
}

/// The address is positional as for every other subcommand; `-s` (QEMU's qom tools) and
/// $QMP_SOCKET still work.
#[test]
fn the_address_is_positional_like_elsewhere() {
    let s = serve(object_model());
    let r = run(&["qom", s.addr(), "get", "/machine.type"], "", &[]);
    r.expect_code(0);
    assert_eq!(r.stdout, "q35-machine\n");
    let r = run(&["qom", "get", "/machine.type"], "", &[]);
    r.expect_code(2);
    assert!(r.stderr.contains("no QMP server address"), "{}", r.stderr);
}
