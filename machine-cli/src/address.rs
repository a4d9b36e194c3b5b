//! QMP server addresses as users type them: a unix socket path or `host:port`.

use std::fmt;
use std::path::PathBuf;

/// Where a QMP server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl Address {
    /// Reads an address, as qmp-shell does: `host:port` when the text after the last `:` is a
    /// port number and the text has no `/`; otherwise a unix path. The prefixes `unix:` and
    /// `tcp:` force either reading (`unix:./a:1` is a path).
    pub fn parse(text: &str) -> Address {
        if let Some(path) = text.strip_prefix("unix:") {
            return Address::Unix(PathBuf::from(path));
        }
        if let Some(addr) = text.strip_prefix("tcp:") {
            return Address::Tcp(addr.to_string());
        }
        if !text.contains('/') {
            if let Some((host, port)) = text.rsplit_once(':') {
                if !host.is_empty() && port.parse::<u16>().is_ok() {
                    return Address::Tcp(text.to_string());
                }
            }
        }
        Address::Unix(PathBuf::from(text))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "{}", path.display()),
            Address::Tcp(addr) => f.write_str(addr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let unix = |p: &str| Address::Unix(PathBuf::from(p));
        let tcp = |a: &str| Address::Tcp(a.to_string());
        assert_eq!(Address::parse("/tmp/qmp.sock"), unix("/tmp/qmp.sock"));
        assert_eq!(Address::parse("qmp.sock"), unix("qmp.sock"));
        assert_eq!(Address::parse("localhost:4444"), tcp("localhost:4444"));
        assert_eq!(Address::parse("127.0.0.1:4444"), tcp("127.0.0.1:4444"));
        assert_eq!(Address::parse("[::1]:4444"), tcp("[::1]:4444"));
        assert_eq!(Address::parse("./dir:1/sock"), unix("./dir:1/sock"));
        assert_eq!(Address::parse("a:b"), unix("a:b"));
        assert_eq!(Address::parse(":4444"), unix(":4444"));
        assert_eq!(Address::parse("host:99999"), unix("host:99999"));
        assert_eq!(Address::parse("unix:h:1"), unix("h:1"));
        assert_eq!(Address::parse("tcp:h:1"), tcp("h:1"));
        assert_eq!(tcp("h:1").to_string(), "h:1");
        assert_eq!(unix("/a b").to_string(), "/a b");
    }
}
