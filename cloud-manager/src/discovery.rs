//! Discovery (the patent's first step): each agent's report of what its host's sockets
//! showed over a window, kept per system, and what is built from them: the application
//! graph (each system's services with a guessed role, who talks to whom, and the hosts
//! that are not registered: agents to install or services to keep and tunnel), and an
//! application proposed from one system for the operator to edit.
use crate::error::{CloudError, Result};
use crate::replication::Replication;
use crate::state::{Keyed, Records, SystemRecord, Visibility};
use ferry_sysconf::netstat::{Direction, Listener, Peer, Proto, MAX_PEERS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// One system's last report.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DiscoveryRecord {
    pub system: String,
    pub reported_ms: i64,
    pub samples: u32,
    pub window_seconds: u32,
    pub skipped_lines: u64,
    pub listeners: Vec<Listener>,
    pub peers: Vec<Peer>,
}

impl Keyed for DiscoveryRecord {
    fn key(&self) -> &str {
        &self.system
    }
}

/// Most services one report may list.
pub const MAX_LISTENERS: usize = 4096;
/// Longest process name kept (Linux's comm is 15 bytes; the rest is someone's noise).
const MAX_PROCESS: usize = 64;

/// A service of a system, with its guessed role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub listener: Listener,
    pub role: &'static str,
}

/// A system in the graph.
#[derive(Debug, Clone)]
pub struct GraphSystem {
    pub record: DiscoveryRecord,
    pub services: Vec<Service>,
    pub database: bool,
    pub public: bool,
}

/// Who talks to whom: a system's name, or the address of an unregistered host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub proto: Proto,
    pub count: u64,
    pub role: &'static str,
    pub from_registered: bool,
    pub to_registered: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub systems: Vec<GraphSystem>,
    pub edges: Vec<Edge>,
}

/// An edge by its ends, port and protocol.
type EdgeKey = (String, String, u16, Proto);
/// Connections seen on an edge, and whether each end is a registered system.
type EdgeSeen = (u64, bool, bool);

/// An application proposed from discovery, not made yet.
#[derive(Debug, Clone, Default)]
pub struct Proposal {
    pub name: String,
    pub systems: Vec<(String, Visibility)>,
    /// Which of `systems` serve a database (they stay private).
    pub databases: Vec<String>,
    /// `HOST:PORT[/udp]` of the services that stay in the enterprise.
    pub services: Vec<String>,
    pub notes: Vec<String>,
    pub command: String,
}

/// The role of a service, by its port and the process that holds it.
pub fn role(port: u16, proto: Proto, process: &str) -> &'static str {
    let p = process.to_ascii_lowercase();
    let has = |names: &[&str]| names.iter().any(|n| p.starts_with(n));
    match (port, proto) {
        _ if has(&["postgres", "postmaster"]) => "postgresql",
        _ if has(&["mysqld", "mariadbd", "mariadb"]) => "mysql",
        _ if has(&["slapd", "ns-slapd"]) => "ldap",
        _ if has(&["named", "dnsmasq", "unbound", "pdns"]) => "dns",
        _ if has(&["smbd"]) => "smb",
        _ if has(&["nfsd", "rpc.nfsd"]) => "nfs",
        _ if has(&["nginx", "apache2", "httpd", "lighttpd", "caddy"]) => "http",
        (5432, Proto::Tcp) => "postgresql",
        (3306, Proto::Tcp) => "mysql",
        (1521, Proto::Tcp) => "oracle",
        (1433, Proto::Tcp) => "mssql",
        (389 | 636, Proto::Tcp) => "ldap",
        (53, _) => "dns",
        (80 | 443 | 8080 | 8443, Proto::Tcp) => "http",
        (139 | 445, Proto::Tcp) => "smb",
        (2049, _) => "nfs",
        (22, Proto::Tcp) if has(&["sshd"]) || p.is_empty() => "ssh",
        _ => "",
    }
}

fn is_database(role: &str) -> bool {
    matches!(role, "postgresql" | "mysql" | "oracle" | "mssql")
}

/// A process name from a source host, made safe to keep and show.
fn clean_process(p: &str) -> String {
    p.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_PROCESS)
        .collect()
}

pub struct Discovery {
    records: Records<DiscoveryRecord>,
    replication: Arc<Replication>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery").finish_non_exhaustive()
    }
}

impl Discovery {
    pub fn new(records: Records<DiscoveryRecord>, replication: Arc<Replication>) -> Self {
        Self {
            records,
            replication,
        }
    }

    /// Keeps a system's report (the caller checked who sent it). What the host says is
    /// bounded and cleaned: too many entries or a port 0 are refused, process names are
    /// cut to printable characters.
    pub fn report(&self, mut rec: DiscoveryRecord) -> Result<()> {
        ferry_common::pki::validate_name(&rec.system).map_err(CloudError::Invalid)?;
        if rec.listeners.len() > MAX_LISTENERS || rec.peers.len() > MAX_PEERS {
            return Err(CloudError::Invalid(format!(
                "a discovery report lists at most {MAX_LISTENERS} services and {MAX_PEERS} peers"
            )));
        }
        if rec.peers.iter().any(|p| p.port == 0) {
            return Err(CloudError::Invalid("a peer's port is 0".into()));
        }
        for l in &mut rec.listeners {
            l.process = clean_process(&l.process);
        }
        for p in &mut rec.peers {
            p.process = clean_process(&p.process);
        }
        rec.listeners.sort();
        rec.listeners.dedup();
        rec.reported_ms = ferry_common::now_ms();
        tracing::info!(system = %rec.system, services = rec.listeners.len(), peers = rec.peers.len(), "discovery report");
        Ok(self.records.put(&rec)?)
    }

    /// Which registered system has each address its probe names.
    fn systems_by_address(&self) -> Result<HashMap<IpAddr, String>> {
        let mut by = HashMap::new();
        for s in self.replication.all()? {
            for a in addresses(&s) {
                by.insert(a, s.name.clone());
            }
        }
        Ok(by)
    }

    /// The graph of every report, or of `system` and its neighbours.
    pub fn graph(&self, system: &str) -> Result<Graph> {
        let registered = self.systems_by_address()?;
        let names: BTreeSet<String> = self
            .replication
            .all()?
            .into_iter()
            .map(|s| s.name)
            .collect();
        let reports = self.records.all()?;
        if !system.is_empty() && !reports.iter().any(|r| r.system == system) {
            return Err(CloudError::NotFound(if names.contains(system) {
                format!("system {system} has sent no discovery report yet (its agent reports every 10 minutes)")
            } else {
                format!("no system named {system:?}")
            }));
        }
        let name_of = |ip: &IpAddr| registered.get(ip).cloned();
        // Both ends may report one connection: keyed so it counts once, by the larger.
        let mut edges: BTreeMap<EdgeKey, EdgeSeen> = BTreeMap::new();
        let mut systems = Vec::new();
        for r in &reports {
            let services: Vec<Service> = r
                .listeners
                .iter()
                .map(|l| Service {
                    role: role(l.port, l.proto, &l.process),
                    listener: l.clone(),
                })
                .collect();
            let database = services.iter().any(|s| is_database(s.role));
            let public = services
                .iter()
                .any(|s| s.role == "http" && !s.listener.address.is_loopback());
            for p in &r.peers {
                let other = name_of(&p.address);
                let other_name = other.clone().unwrap_or_else(|| p.address.to_string());
                let (from, to, from_reg, to_reg) = match p.direction {
                    Direction::Out => (r.system.clone(), other_name, true, other.is_some()),
                    Direction::In => (other_name, r.system.clone(), other.is_some(), true),
                };
                let e = edges
                    .entry((from, to, p.port, p.proto))
                    .or_insert((0, from_reg, to_reg));
                e.0 = e.0.max(p.count);
            }
            systems.push(GraphSystem {
                record: r.clone(),
                services,
                database,
                public,
            });
        }
        let role_of = |to: &str, port: u16, proto: Proto| -> &'static str {
            // The process at the serving end, when that end reported.
            let process = systems
                .iter()
                .filter(|s| s.record.system == to)
                .flat_map(|s| &s.services)
                .find(|s| s.listener.port == port && s.listener.proto == proto)
                .map(|s| s.listener.process.as_str())
                .unwrap_or("");
            role(port, proto, process)
        };
        let mut edges: Vec<Edge> = edges
            .into_iter()
            .map(|((from, to, port, proto), (count, fr, tr))| Edge {
                role: role_of(&to, port, proto),
                from,
                to,
                port,
                proto,
                count,
                from_registered: fr,
                to_registered: tr,
            })
            .collect();
        if !system.is_empty() {
            edges.retain(|e| e.from == system || e.to == system);
            let near: BTreeSet<&str> = edges
                .iter()
                .flat_map(|e| [e.from.as_str(), e.to.as_str()])
                .chain([system])
                .collect();
            systems.retain(|s| near.contains(s.record.system.as_str()));
        }
        Ok(Graph { systems, edges })
    }

    /// An application of `from` and every registered system it reaches (following the
    /// connections it and they open), public where they serve HTTP beyond loopback;
    /// the unregistered servers they use become services to tunnel.
    pub fn propose(&self, name: &str, from: &str) -> Result<Proposal> {
        ferry_common::pki::validate_name(name).map_err(CloudError::Invalid)?;
        let graph = self.graph("")?;
        if !graph.systems.iter().any(|s| s.record.system == from) {
            self.replication.require(from)?;
            return Err(CloudError::NotFound(format!(
                "system {from} has sent no discovery report yet (its agent reports every 10 minutes)"
            )));
        }
        let mut members = vec![from.to_string()];
        let mut i = 0;
        while i < members.len() {
            let cur = members[i].clone();
            for e in graph
                .edges
                .iter()
                .filter(|e| e.from == cur && e.to_registered)
            {
                if !members.contains(&e.to) {
                    members.push(e.to.clone());
                }
            }
            i += 1;
        }
        let mut p = Proposal {
            name: name.to_string(),
            ..Default::default()
        };
        for m in &members {
            let sys = graph.systems.iter().find(|s| &s.record.system == m);
            let database = sys.is_some_and(|s| s.services.iter().any(|x| is_database(x.role)));
            let public = sys.is_some_and(|s| s.public) && !database;
            if database {
                p.databases.push(m.clone());
            }
            p.systems.push((
                m.clone(),
                if public {
                    Visibility::Public
                } else {
                    Visibility::Private
                },
            ));
            match sys {
                None => p.notes.push(format!(
                    "{m}: reached from the app but has sent no discovery report: its own connections are not followed"
                )),
                Some(s) => {
                    if public {
                        p.notes.push(format!("{m}: public, it serves HTTP beyond loopback"));
                    }
                    for svc in s.services.iter().filter(|x| is_database(x.role)) {
                        p.notes.push(format!(
                            "{m}: database ({} on {}/{})",
                            svc.role, svc.listener.port, svc.listener.proto
                        ));
                    }
                }
            }
        }
        let mut tunneled = BTreeSet::new();
        for e in graph
            .edges
            .iter()
            .filter(|e| members.contains(&e.from) && !e.to_registered)
        {
            let spec = match e.proto {
                Proto::Tcp => format!("{}:{}", e.to, e.port),
                Proto::Udp => format!("{}:{}/udp", e.to, e.port),
            };
            if tunneled.insert(spec.clone()) {
                let role = if e.role.is_empty() { "unknown" } else { e.role };
                p.notes.push(format!(
                    "{spec}: {role} service of an unregistered host that {} uses: kept in the enterprise and tunneled (or install an agent on it)",
                    e.from
                ));
                p.services.push(spec);
            }
        }
        let mut cmd = format!("ferry app create {name}");
        for (s, v) in &p.systems {
            if p.databases.contains(s) {
                cmd += &format!(" --system {s}:database");
            } else {
                cmd += &format!(" --system {s}:{v}");
            }
        }
        for s in &p.services {
            cmd += &format!(" --service {s}");
        }
        p.command = cmd;
        Ok(p)
    }
}

/// The addresses a system's probe names on its interfaces.
fn addresses(s: &SystemRecord) -> Vec<IpAddr> {
    s.probe
        .nics
        .iter()
        .flat_map(|n| &n.addresses)
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}
