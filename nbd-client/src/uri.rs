//! NBD backing names exactly as QEMU's `block/nbd.c` accepts them in a qcow2 backing file name.
//!
//! - `nbd://HOST[:PORT][/EXPORT]` and `nbd+tcp://...`: TCP; HOST required (an IPv6 literal in
//!   brackets loses them), PORT defaults to 10809 (also when 0), no query parameters at all.
//! - `nbd+unix://[/EXPORT]?socket=PATH`: a unix socket; no host and no port, and exactly one
//!   query parameter, named `socket`.
//! - The export is the path with one leading `/` removed (`nbd://h//abs` names export `/abs`);
//!   an empty path is the default export `""`. Path and query are %-decoded; a bad escape is an
//!   error. A `user@` part and a `#fragment` are ignored, as QEMU ignores them.
//! - QEMU's older pseudo-file names are accepted too: `nbd:unix:PATH[:exportname=NAME]` and
//!   `nbd:HOST:PORT[:exportname=NAME]`.
//!
//! A name is an NBD name when its protocol prefix (the text before the first `:`, if no `/`
//! comes first) is `nbd`, `nbd+tcp` or `nbd+unix`; QEMU picks its NBD driver by the same prefix.
//! Any other `nbd+...:` prefix is refused (QEMU: unknown protocol) rather than read as a path.
//!
//! Locking model: none (pure parsing).

use std::fmt;
use std::path::PathBuf;

/// The NBD default port.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A unix socket path (relative paths are relative to the daemon's working directory, as
    /// in QEMU).
    Unix(PathBuf),
    /// A TCP host (name or address, IPv6 without brackets) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A parsed NBD backing name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server address.
    pub transport: Transport,
    /// The export name ("" is the default export).
    pub export: String,
    /// The name as written in the image (shown in messages and `info`).
    pub text: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether `name` is meant as an NBD name (by its protocol prefix, see the module docs).
pub fn is_nbd_name(name: &str) -> bool {
    match protocol_prefix(name) {
        Some(p) => p == "nbd" || p.starts_with("nbd+"),
        None => false,
    }
}

/// The text before the first `:` when no `/` precedes it (QEMU's `path_has_protocol`).
fn protocol_prefix(name: &str) -> Option<&str> {
    let colon = name.find(':')?;
    let prefix = &name[..colon];
    (!prefix.contains('/')).then_some(prefix)
}

/// Why an NBD name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriError {
    /// The name.
    pub name: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid NBD name {:?}: {}", self.name, self.reason)
    }
}

impl std::error::Error for UriError {}

/// Parses an NBD backing name (see the module docs for the accepted forms).
pub fn parse(name: &str) -> Result<NbdUri, UriError> {
    let err = |reason: &str| UriError {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let Some(scheme) = protocol_prefix(name) else {
        return Err(err("not an NBD name"));
    };
    let rest = &name[scheme.len() + 1..];
    let is_unix = match scheme {
        "nbd" | "nbd+tcp" => false,
        "nbd+unix" => true,
        _ => {
            return Err(err(
                "unknown transport (nbd, nbd+tcp and nbd+unix are known)",
            ))
        }
    };
    let Some(after) = rest.strip_prefix("//") else {
        if scheme == "nbd" {
            return parse_legacy(name, rest).map_err(|r| err(&r));
        }
        return Err(err("expected // after the scheme"));
    };
    // Fragment, then query, then authority/path.
    let after = after.split_once('#').map_or(after, |(a, _)| a);
    let (hier, query) = match after.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (after, None),
    };
    let (authority, path) = match hier.find('/') {
        Some(i) => (&hier[..i], &hier[i..]),
        None => (hier, ""),
    };
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = split_host_port(hostport).map_err(|r| err(&r))?;
    let path = percent_decode(path).map_err(|r| err(&r))?;
    let export = path.strip_prefix('/').unwrap_or(&path).to_string();
    let params: Vec<(String, String)> = match query {
        None | Some("") => Vec::new(),
        Some(q) => q
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                Ok((percent_decode(k)?, percent_decode(v)?))
            })
            .collect::<Result<_, String>>()
            .map_err(|r| err(&r))?,
    };
    let transport = if is_unix {
        if !host.is_empty() || port.is_some() {
            return Err(err(
                "nbd+unix takes no host or port (nbd+unix:///EXPORT?socket=PATH)",
            ));
        }
        match params.as_slice() {
            [(k, v)] if k == "socket" => {
                if v.is_empty() {
                    return Err(err("the socket path is empty"));
                }
                Transport::Unix(PathBuf::from(v))
            }
            [] => return Err(err("nbd+unix needs ?socket=PATH")),
            _ => {
                return Err(err(
                    "nbd+unix takes exactly one query parameter, socket=PATH",
                ))
            }
        }
    } else {
        if !params.is_empty() {
            return Err(err("nbd:// takes no query parameters"));
        }
        if host.is_empty() {
            return Err(err("nbd:// needs a host"));
        }
        Transport::Tcp {
            host,
            port: match port {
                None | Some(0) => NBD_DEFAULT_PORT,
                Some(p) => p,
            },
        }
    };
    Ok(NbdUri {
        transport,
        export,
        text: name.to_string(),
    })
}

/// `host[:port]` of an authority; IPv6 literals in brackets.
fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .ok_or_else(|| "unterminated [ in the host".to_string())?;
        match tail {
            "" => (h, None),
            t => (
                h,
                Some(t.strip_prefix(':').ok_or("junk after the ] of the host")?),
            ),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("bad port {p:?} (0 to 65535)"))?,
        ),
    };
    Ok((percent_decode(host)?, port))
}

/// QEMU's pseudo-file names after `nbd:`: `unix:PATH[:exportname=X]` or `HOST:PORT[:exportname=X]`.
fn parse_legacy(name: &str, rest: &str) -> Result<NbdUri, String> {
    const EN: &str = ":exportname=";
    let (spec, export) = match rest.find(EN) {
        Some(i) => (&rest[..i], rest[i + EN.len()..].to_string()),
        None => (rest, String::new()),
    };
    let transport = if let Some(path) = spec.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("the socket path is empty".into());
        }
        Transport::Unix(PathBuf::from(path))
    } else {
        let (host, port) = split_host_port(spec)?;
        if host.is_empty() {
            return Err("nbd:HOST:PORT needs a host".into());
        }
        Transport::Tcp {
            host,
            port: port.ok_or("nbd:HOST:PORT needs a port")?,
        }
    };
    Ok(NbdUri {
        transport,
        export,
        text: name.to_string(),
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a %-escape decodes to invalid UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(s: &str) -> (PathBuf, String) {
        match parse(s).unwrap() {
            NbdUri {
                transport: Transport::Unix(p),
                export,
                ..
            } => (p, export),
            other => panic!("{other:?}"),
        }
    }

    fn tcp(s: &str) -> (String, u16, String) {
        match parse(s).unwrap() {
            NbdUri {
                transport: Transport::Tcp { host, port },
                export,
                ..
            } => (host, port, export),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn uri_forms_qemu_accepts_parse_to_the_same_server_and_export() {
        assert_eq!(
            unix("nbd+unix:///base?socket=/run/b.sock"),
            ("/run/b.sock".into(), "base".into())
        );
        assert_eq!(unix("nbd+unix://?socket=s"), ("s".into(), "".into()));
        assert_eq!(
            unix("nbd+unix:///?socket=%2Ftmp%2Fx"),
            ("/tmp/x".into(), "".into())
        );
        assert_eq!(
            tcp("nbd://example.org/exp"),
            ("example.org".into(), NBD_DEFAULT_PORT, "exp".into())
        );
        assert_eq!(tcp("nbd+tcp://h:1234"), ("h".into(), 1234, "".into()));
        assert_eq!(
            tcp("nbd://h:0/e"),
            ("h".into(), NBD_DEFAULT_PORT, "e".into())
        );
        assert_eq!(tcp("nbd://[::1]:99/e"), ("::1".into(), 99, "e".into()));
        assert_eq!(
            tcp("nbd://h//abs/path"),
            ("h".into(), NBD_DEFAULT_PORT, "/abs/path".into())
        );
        assert_eq!(
            tcp("nbd://h/a%20b#frag"),
            ("h".into(), NBD_DEFAULT_PORT, "a b".into())
        );
        assert_eq!(unix("nbd:unix:/s:exportname=x"), ("/s".into(), "x".into()));
        assert_eq!(tcp("nbd:h:77"), ("h".into(), 77, "".into()));
    }

    #[test]
    fn uri_forms_qemu_refuses_are_refused_with_a_reason() {
        for bad in [
            "nbd+unix:///e",               // no socket
            "nbd+unix://host/e?socket=/s", // host with unix
            "nbd+unix://:5/e?socket=/s",   // port with unix
            "nbd+unix:///e?socket=/s&x=1", // two params
            "nbd+unix:///e?sock=/s",       // wrong param
            "nbd+unix:///e?socket=",       // empty socket
            "nbd:///e",                    // no host
            "nbd://h/e?socket=/s",         // query with tcp
            "nbd://h:99999/e",             // port out of range
            "nbd://h/%zz",                 // bad escape
            "nbd+ssh://h/e",               // unknown transport
            "nbd:",                        // legacy without server
            "nbd:h",                       // legacy without port
        ] {
            assert!(is_nbd_name(bad), "{bad}");
            let e = parse(bad).unwrap_err();
            assert!(!e.to_string().is_empty(), "{bad}");
        }
    }

    #[test]
    fn host_file_names_are_not_nbd_names() {
        for name in [
            "base.raw",
            "/x/nbd://y",
            "./nbd:x",
            "dir/nbd+unix:x",
            "nbdx:y",
            "nbd",
        ] {
            assert!(!is_nbd_name(name), "{name}");
        }
    }
}
