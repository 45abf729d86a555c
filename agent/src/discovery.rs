//! Discovery on the source host: samples its socket tables (what netstat reads) and
//! which process holds each socket, over a window, and reports the services it offers
//! and the hosts it talked to once per window.
use ferry_proto::v1 as pb;
use ferry_sysconf::netstat::{self, Direction, Proto, Table};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the tables are read, and how long a report's window is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub sample: Duration,
    pub window: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            sample: Duration::from_secs(60),
            window: Duration::from_secs(600),
        }
    }
}

/// Reports every window until shutdown.
pub async fn run(
    client: crate::sender::Client,
    system: String,
    cfg: Config,
    shutdown: CancellationToken,
) {
    loop {
        let mut found = netstat::Discovery::default();
        let started = Instant::now();
        while started.elapsed() < cfg.window {
            match tokio::task::spawn_blocking(|| sample(Path::new("/proc"))).await {
                Ok((tables, owners)) => found.add(&tables, &|inode| owners.get(&inode).cloned()),
                Err(e) => tracing::warn!(error = %e, "discovery sample failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(cfg.sample) => {}
            }
        }
        let report = report(&system, &found, started.elapsed());
        match client.clone().report_discovery(report).await {
            Ok(_) => tracing::debug!(
                samples = found.samples,
                services = found.listeners().len(),
                peers = found.peers().len(),
                "discovery reported"
            ),
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::warn!(
                    "the manager takes no discovery reports (an older release): discovery stops"
                );
                return;
            }
            Err(s) => {
                tracing::warn!(error = %s.message(), "discovery report not taken; the next window brings another")
            }
        }
    }
}

/// The four socket tables under `proc` (one that is missing, as /proc/net/tcp6 without
/// IPv6, is empty) and the process of each socket inode. The agent's own sockets (its
/// link to its manager) are no part of the host's application: they are left out.
pub fn sample(proc: &Path) -> (Vec<Table>, HashMap<u64, String>) {
    let read =
        |name: &str| std::fs::read_to_string(proc.join("net").join(name)).unwrap_or_default();
    let mut tables = vec![
        netstat::parse(Proto::Tcp, &read("tcp")),
        netstat::parse(Proto::Tcp, &read("tcp6")),
        netstat::parse(Proto::Udp, &read("udp")),
        netstat::parse(Proto::Udp, &read("udp6")),
    ];
    let own = std::process::id().to_string();
    let owners = socket_owners(proc);
    let mine: std::collections::HashSet<u64> = (owners.iter())
        .filter(|(_, (pid, _))| *pid == own)
        .map(|(inode, _)| *inode)
        .collect();
    for t in &mut tables {
        t.sockets.retain(|s| !mine.contains(&s.inode));
    }
    let names = owners.into_iter().map(|(i, (_, comm))| (i, comm)).collect();
    (tables, names)
}

/// Socket inode → the process (pid, command name) that holds it (`/proc/PID/fd` links
/// read `socket:[INODE]`); processes this agent may not look into are left out.
fn socket_owners(proc: &Path) -> HashMap<u64, (String, String)> {
    let mut owners = HashMap::new();
    let Ok(pids) = std::fs::read_dir(proc) else {
        return owners;
    };
    for pid in pids.flatten() {
        let name = pid.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(pid.path().join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let comm = comm.get_or_insert_with(|| {
                std::fs::read_to_string(pid.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default()
            });
            let pid = name.to_string_lossy().into_owned();
            owners.entry(inode).or_insert_with(|| (pid, comm.clone()));
        }
    }
    owners
}

/// What goes to the manager.
fn report(system: &str, d: &netstat::Discovery, took: Duration) -> pb::DiscoveryReport {
    pb::DiscoveryReport {
        system: system.to_string(),
        listeners: (d.listeners().into_iter())
            .map(|l| pb::DiscoveredListener {
                proto: l.proto.to_string(),
                address: l.address.to_string(),
                port: l.port.into(),
                process: l.process,
            })
            .collect(),
        peers: (d.peers().into_iter())
            .map(|p| pb::DiscoveredPeer {
                address: p.address.to_string(),
                port: p.port.into(),
                proto: p.proto.to_string(),
                direction: match p.direction {
                    Direction::In => "in",
                    Direction::Out => "out",
                }
                .into(),
                count: p.count,
                process: p.process,
            })
            .collect(),
        samples: d.samples,
        window_seconds: took.as_secs().try_into().unwrap_or(u32::MAX),
        skipped_lines: d.skipped_lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_process_listening_socket_is_found_with_its_name_and_ours_is_not() {
        let ours = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut theirs = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(30)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(theirs.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let (tables, owners) = sample(Path::new("/proc"));
        let _ = theirs.kill();
        let _ = theirs.wait();
        let mut d = netstat::Discovery::default();
        d.add(&tables, &|i| owners.get(&i).cloned());
        let found = d.listeners().into_iter().find(|x| x.port == port).unwrap();
        assert!(found.process.starts_with("python3"), "{found:?}");
        let own_port = ours.local_addr().unwrap().port();
        assert!(
            d.listeners().iter().all(|x| x.port != own_port),
            "the agent's own socket was reported"
        );
        let r = report("web01", &d, Duration::from_secs(3));
        assert!(r
            .listeners
            .iter()
            .any(|x| x.port == u32::from(port) && x.proto == "tcp"));
        assert_eq!(r.samples, 1);
    }
}
