//! A minimal QMP client: one connection per command to a QEMU's control socket, so a
//! local instance can be paused, resumed and asked for its state.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Runs one QMP command and returns its `return` value; errors say what QEMU said.
pub fn command(socket: &Path, execute: &str) -> Result<serde_json::Value, String> {
    let stream = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    // The greeting, then capabilities negotiation, then the command.
    read_reply(&mut reader, true)?;
    for cmd in ["qmp_capabilities", execute] {
        writer
            .write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())
            .map_err(|e| format!("qmp write: {e}"))?;
        let reply = read_reply(&mut reader, false)?;
        if cmd == execute {
            return Ok(reply);
        }
    }
    Err("qmp: no reply".into())
}

/// Reads lines until the greeting (`greeting`) or a command's reply, skipping events.
fn read_reply(
    reader: &mut BufReader<UnixStream>,
    greeting: bool,
) -> Result<serde_json::Value, String> {
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("qmp read: {e}"))?;
        if n == 0 {
            return Err("qmp: connection closed".into());
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("qmp: bad reply {line:?}: {e}"))?;
        if greeting && v.get("QMP").is_some() {
            return Ok(v);
        }
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            return Err(format!("qmp: {}", e["desc"].as_str().unwrap_or("error")));
        }
    }
}
