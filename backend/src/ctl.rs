//! `snapblk ctl SOCKET COMMAND [key=value | key:=JSON ...]`: the command-line client of the
//! control socket. Prints the command's `return` value as JSON and exits 0, or prints the error
//! class and description and exits 1 (2 when the daemon cannot be reached or answers nonsense).
//!
//! Locking model: none; one connection, one request, one reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Map, Value};

/// Arguments of `snapblk ctl`.
#[derive(Clone, Debug, Args)]
pub struct CtlArgs {
    /// The daemon's --control-socket.
    #[arg(value_name = "SOCKET")]
    pub socket: PathBuf,
    /// The command (query-status, query-stats, flush, set-cache-mode, snapshot,
    /// query-snapshots).
    #[arg(value_name = "COMMAND")]
    pub command: String,
    /// Arguments: `key=value` (a string) or `key:=JSON` (any JSON value).
    #[arg(value_name = "ARG")]
    pub args: Vec<String>,
    /// Seconds to wait for the reply (a snapshot flushes the cache first).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub timeout: u64,
}

/// Why a command could not be run.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// A `key=value` argument is malformed.
    #[error("bad argument {0:?}: expected key=value or key:=JSON")]
    BadArgument(String),
    /// The socket could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The daemon answered something that is not the protocol.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    /// The command failed.
    #[error("{class}: {desc}")]
    Command {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
}

/// Parses `key=value` / `key:=JSON` arguments into an object.
pub fn parse_arguments(args: &[String]) -> Result<Map<String, Value>, CtlError> {
    let mut m = Map::new();
    for a in args {
        let (key, value) = if let Some((k, v)) = a.split_once(":=") {
            let v: Value = serde_json::from_str(v).map_err(|_| CtlError::BadArgument(a.clone()))?;
            (k, v)
        } else if let Some((k, v)) = a.split_once('=') {
            (k, Value::String(v.to_string()))
        } else {
            return Err(CtlError::BadArgument(a.clone()));
        };
        if key.is_empty() {
            return Err(CtlError::BadArgument(a.clone()));
        }
        m.insert(key.to_string(), value);
    }
    Ok(m)
}

/// Sends one command to the control socket at `socket` and returns its `return` value.
pub fn call(
    socket: &Path,
    command: &str,
    arguments: Map<String, Value>,
    timeout: Duration,
) -> Result<Value, CtlError> {
    let io = |source| CtlError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io)?;
    let greeting: Value =
        serde_json::from_str(&line).map_err(|_| CtlError::Protocol(line.trim().to_string()))?;
    if let Some(e) = greeting.get("error") {
        return Err(command_error(e));
    }
    if greeting.get("snapblk").is_none() {
        return Err(CtlError::Protocol(line.trim().to_string()));
    }
    let mut req = json!({"execute": command, "arguments": arguments}).to_string();
    req.push('\n');
    (&stream).write_all(req.as_bytes()).map_err(io)?;
    line.clear();
    reader.read_line(&mut line).map_err(io)?;
    let reply: Value =
        serde_json::from_str(&line).map_err(|_| CtlError::Protocol(line.trim().to_string()))?;
    if let Some(v) = reply.get("return") {
        return Ok(v.clone());
    }
    match reply.get("error") {
        Some(e) => Err(command_error(e)),
        None => Err(CtlError::Protocol(line.trim().to_string())),
    }
}

fn command_error(e: &Value) -> CtlError {
    CtlError::Command {
        class: e["class"].as_str().unwrap_or("GenericError").to_string(),
        desc: e["desc"].as_str().unwrap_or("").to_string(),
    }
}

/// `snapblk ctl`.
pub fn ctl(args: &CtlArgs) -> ExitCode {
    let arguments = match parse_arguments(&args.args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("snapblk ctl: {e}");
            return ExitCode::from(2);
        }
    };
    match call(
        &args.socket,
        &args.command,
        arguments,
        Duration::from_secs(args.timeout.max(1)),
    ) {
        Ok(v) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
            );
            ExitCode::SUCCESS
        }
        Err(e @ CtlError::Command { .. }) => {
            eprintln!("snapblk ctl: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("snapblk ctl: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_strings_or_json() {
        let m = parse_arguments(&[
            "overlay=/tmp/a=b.qcow2".into(),
            "n:=3".into(),
            "flag:=true".into(),
        ])
        .unwrap();
        assert_eq!(m["overlay"], "/tmp/a=b.qcow2");
        assert_eq!(m["n"], 3);
        assert_eq!(m["flag"], true);
        assert!(parse_arguments(&["novalue".into()]).is_err());
        assert!(parse_arguments(&["=x".into()]).is_err());
        assert!(parse_arguments(&["n:={".into()]).is_err());
    }
}
