//! A real PostgreSQL (Debian's) for tests: initdb, start on a socket directory and
//! optional TCP address, optionally inside a network namespace; stopped on drop.
use crate::{bash, sh};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn pg_bin(name: &str) -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("postgresql is not installed (.ci/run installs it)")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    versions.sort();
    Ok(versions.pop().context("no postgresql version")?.join(name))
}

/// Runs a PostgreSQL program as the postgres user, inside `netns` when given.
pub fn as_postgres(netns: Option<&str>, program: &Path) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "runuser"]);
            c
        }
        None => Command::new("runuser"),
    };
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

/// Creates a cluster in `data` (owned by postgres) that trusts local connections.
pub fn initdb(data: &Path) -> Result<()> {
    bash(&format!(
        "mkdir -p {d} && chown -R postgres {d}",
        d = data.display()
    ))?;
    sh(as_postgres(None, &pg_bin("initdb")?)
        .arg("-D")
        .arg(data)
        .args(["-A", "trust", "-U", "postgres"]))?;
    Ok(())
}

/// A running server; `listen` is its TCP address list ("" for the socket only).
pub struct Pg {
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub netns: Option<String>,
}

impl Pg {
    pub fn start(data: &Path, sock: &Path, port: u16) -> Result<Self> {
        Self::start_in(None, data, sock, port, "")
    }

    pub fn start_in(
        netns: Option<&str>,
        data: &Path,
        sock: &Path,
        port: u16,
        listen: &str,
    ) -> Result<Self> {
        bash(&format!(
            "mkdir -p {s} && chown postgres {s}",
            s = sock.display()
        ))?;
        sh(as_postgres(netns, &pg_bin("pg_ctl")?)
            .arg("-D")
            .arg(data)
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses={listen}",
                sock.display()
            ))
            .arg("-l")
            .arg(sock.join("postgres.log"))
            .args(["-w", "-t", "120", "start"]))?;
        Ok(Self {
            data: data.to_path_buf(),
            sock: sock.to_path_buf(),
            port,
            netns: netns.map(str::to_string),
        })
    }

    pub fn sql(&self, q: &str) -> Result<String> {
        Ok(sh(as_postgres(self.netns.as_deref(), &pg_bin("psql")?)
            .arg("-h")
            .arg(&self.sock)
            .args(["-p", &self.port.to_string(), "-Atc", q, "postgres"]))?
        .trim()
        .to_string())
    }

    pub fn pgbench(&self) -> Result<Command> {
        let mut c = as_postgres(self.netns.as_deref(), &pg_bin("pgbench")?);
        c.arg("-h")
            .arg(&self.sock)
            .args(["-p", &self.port.to_string()]);
        Ok(c)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Ok(ctl) = pg_bin("pg_ctl") {
            let _ = as_postgres(None, &ctl)
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
}
