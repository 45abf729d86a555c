//! The apps service: applications (their systems, public or private, the services that
//! stay in the enterprise, the load balancer and the provider), owned in their own tree.
use crate::error::{built_in, CloudError, Result};
use crate::replication::Replication;
use crate::state::{AppRecord, PublicPort, Records, Target, Visibility};
use std::sync::Arc;

/// What the operator asks for in `ferry app create`.
#[derive(Debug, Clone, Default)]
pub struct AppSpec {
    pub name: String,
    pub systems: Vec<(String, Visibility)>,
    pub services: Vec<String>,
    pub load_balancer: bool,
    pub load_balancer_ports: Vec<u32>,
    /// None: the manager's default provider.
    pub provider: Option<Target>,
    /// `[SYSTEM:]PORT[/udp]` the public systems open, and the CIDRs that may reach them.
    pub public_ports: Vec<String>,
    pub allow_from: Vec<String>,
    /// Which of `systems` are database servers (they must be private).
    pub databases: Vec<String>,
    /// Registered systems that stay in the enterprise: each needs a service in the table.
    pub stays: Vec<String>,
}

#[derive(Debug)]
pub struct Apps {
    apps: Records<AppRecord>,
    replication: Arc<Replication>,
    default_provider: Target,
}

/// The real endpoint and protocol of a service spec (`HOST:PORT[/udp][=PROXY]`), which
/// names it in the app's table.
pub fn service_key(spec: &str) -> String {
    spec.split('=').next().unwrap_or(spec).to_ascii_lowercase()
}

/// The app's public ports (each naming, if any, one of its public systems) and the CIDRs
/// that may reach them.
fn exposure(
    spec: &AppSpec,
    systems: &[(String, Visibility)],
) -> Result<(Vec<PublicPort>, Vec<String>)> {
    let mut ports = Vec::new();
    for p in &spec.public_ports {
        let port = PublicPort::parse(p).map_err(CloudError::Invalid)?;
        if !port.system.is_empty()
            && !systems
                .iter()
                .any(|(n, v)| *n == port.system && *v == Visibility::Public)
        {
            return Err(CloudError::Invalid(format!(
                "public port {p}: {} is not a public system of the app",
                port.system
            )));
        }
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    let mut allow = Vec::new();
    for c in &spec.allow_from {
        let net: ipnet::Ipv4Net = c.parse().map_err(|_| {
            CloudError::Invalid(format!("--allow-from {c:?}: expected an IPv4 CIDR"))
        })?;
        let net = net.trunc().to_string();
        if !allow.contains(&net) {
            allow.push(net);
        }
    }
    Ok((ports, allow))
}

/// Adds services to an app's table. A TCP service without a proxy gets the next free
/// port on 127.0.0.1 from 50100; a UDP one the same port as the real service (resolvers
/// cannot be told a port). Each is checked by the customization's own parser.
fn add_services(services: &mut Vec<String>, new: &[String]) -> Result<()> {
    let proxy_port = |spec: &str| -> Option<u16> {
        let proxy = spec.split_once('=')?.1;
        proxy.rsplit_once(':')?.1.parse().ok()
    };
    for s in new {
        if services.iter().any(|e| service_key(e) == service_key(s)) {
            return Err(CloudError::AlreadyExists(format!(
                "service {} is in the table already",
                service_key(s)
            )));
        }
        let full = if s.contains('=') {
            s.clone()
        } else {
            let (hostport, udp) = match s.rsplit_once('/') {
                Some((h, p)) if p.eq_ignore_ascii_case("udp") => (h, true),
                _ => (s.as_str(), false),
            };
            let port = hostport
                .rsplit_once(':')
                .map(|(_, p)| p)
                .unwrap_or_default();
            if udp {
                format!("{s}=127.0.0.1:{port}")
            } else {
                let used: Vec<u16> = services.iter().filter_map(|e| proxy_port(e)).collect();
                let free = (50100..=u16::MAX)
                    .find(|p| !used.contains(p))
                    .ok_or_else(|| CloudError::Invalid("no proxy port left".into()))?;
                format!("{s}=127.0.0.1:{free}")
            }
        };
        ferry_customize::Plan::from_flags(
            ferry_customize::Target::Local,
            &[],
            &[],
            std::slice::from_ref(&full),
        )
        .map_err(|e| CloudError::Invalid(e.to_string()))?;
        services.push(full);
    }
    Ok(())
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(x.clone()));
    v
}

/// The load balancer's ports: each 1 to 65535, once; 80 when it is asked for without.
fn load_balancer_ports(spec: &AppSpec) -> Result<Vec<u16>> {
    let mut ports = Vec::new();
    for p in &spec.load_balancer_ports {
        match u16::try_from(*p) {
            Ok(p) if p > 0 && !ports.contains(&p) => ports.push(p),
            _ => {
                return Err(CloudError::Invalid(format!(
                    "load balancer port {p}: expected 1 to 65535, once each"
                )))
            }
        }
    }
    if spec.load_balancer && ports.is_empty() {
        ports.push(80);
    }
    if !spec.load_balancer && !ports.is_empty() {
        return Err(CloudError::Invalid(
            "--lb-port needs --load-balancer".into(),
        ));
    }
    if spec.load_balancer && !spec.systems.iter().any(|(_, v)| *v == Visibility::Public) {
        return Err(CloudError::Invalid(
            "a load balancer fronts the public systems, and this app has none".into(),
        ));
    }
    Ok(ports)
}

impl Apps {
    pub fn new(
        apps: Records<AppRecord>,
        replication: Arc<Replication>,
        default_provider: Target,
    ) -> Self {
        Self {
            apps,
            replication,
            default_provider,
        }
    }

    pub fn get(&self, name: &str) -> Result<Option<AppRecord>> {
        Ok(self.apps.get(name)?)
    }

    /// The record of an app that must exist.
    pub fn require(&self, name: &str) -> Result<AppRecord> {
        self.get(name)?
            .ok_or_else(|| CloudError::NotFound(format!("no app {name:?}")))
    }

    pub fn list(&self) -> Result<Vec<AppRecord>> {
        Ok(self.apps.all()?)
    }

    /// The apps that include `system`.
    pub fn using_system(&self, system: &str) -> Result<Vec<String>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|a| a.systems.iter().any(|(n, _)| n == system))
            .map(|a| a.name)
            .collect())
    }

    /// Records an application after checking its systems exist and its services parse;
    /// services without a proxy get one (TCP: 127.0.0.1 from port 50100 up; UDP: the
    /// same port on 127.0.0.1, since resolvers cannot name a port).
    pub fn create(&self, spec: AppSpec) -> Result<AppRecord> {
        ferry_common::pki::validate_name(&spec.name).map_err(CloudError::Invalid)?;
        if self.get(&spec.name)?.is_some() {
            return Err(CloudError::AlreadyExists(format!(
                "app {:?} exists",
                spec.name
            )));
        }
        let rec = self.record(spec, ferry_common::now_ms())?;
        self.apps.put(&rec)?;
        tracing::info!(app = %rec.name, systems = rec.systems.len(), "app created");
        Ok(rec)
    }

    /// Replaces an app's definition (its name and creation time stay); checked as a new
    /// one is. Images built before carry the old one until they are built again.
    pub fn update(&self, spec: AppSpec) -> Result<AppRecord> {
        let old = self.require(&spec.name)?;
        let rec = self.record(spec, old.created_unix_ms)?;
        self.apps.put(&rec)?;
        tracing::info!(app = %rec.name, systems = rec.systems.len(), "app changed");
        Ok(rec)
    }

    /// The record `spec` makes, or why it cannot be one.
    fn record(&self, spec: AppSpec, created_unix_ms: i64) -> Result<AppRecord> {
        if spec.systems.is_empty() {
            return Err(CloudError::Invalid(
                "an app needs at least one system to clone".into(),
            ));
        }
        let mut systems: Vec<(String, Visibility)> = Vec::new();
        for (system, visibility) in &spec.systems {
            self.replication.require(system)?;
            if systems.iter().any(|(n, _)| n == system) {
                return Err(CloudError::Invalid(format!("system {system} listed twice")));
            }
            systems.push((system.clone(), *visibility));
        }
        self.addresses_differ(&systems)?;
        for db in &spec.databases {
            match systems.iter().find(|(n, _)| n == db) {
                None => {
                    return Err(CloudError::Invalid(format!(
                        "database server {db} is not one of the app's systems"
                    )))
                }
                Some((_, Visibility::Public)) => {
                    return Err(CloudError::Invalid(format!(
                        "database server {db} must be private"
                    )))
                }
                Some(_) => {}
            }
        }
        let provider = spec.provider.unwrap_or(self.default_provider);
        built_in(provider)?;
        let mut services = Vec::new();
        add_services(&mut services, &spec.services)?;
        self.stays_are_reached(&spec.stays, &systems, &services)?;
        let load_balancer_ports = load_balancer_ports(&spec)?;
        let (public_ports, allow_from) = exposure(&spec, &systems)?;
        let rec = AppRecord {
            name: spec.name,
            systems,
            services,
            load_balancer: spec.load_balancer,
            load_balancer_ports,
            provider,
            created_unix_ms,
            public_ports,
            allow_from,
            databases: dedup(spec.databases),
            stays: dedup(spec.stays),
        };
        for w in rec.warnings() {
            tracing::warn!(app = %rec.name, "{w}");
        }
        Ok(rec)
    }

    /// Clones keep their systems' addresses, all in one network: two systems on one
    /// address cannot be cloned together (`Cloud::create_clone` checks it again, since
    /// a system's address may change after).
    fn addresses_differ(&self, systems: &[(String, Visibility)]) -> Result<()> {
        let mut seen: Vec<(std::net::Ipv4Addr, &str)> = Vec::new();
        for (name, _) in systems {
            let rec = self.replication.require(name)?;
            let Some(addr) = crate::prepare::address_of(&rec) else {
                continue;
            };
            if let Some((_, other)) = seen.iter().find(|(ip, _)| *ip == addr.ip) {
                return Err(CloudError::Invalid(format!(
                    "systems {other} and {name} have the same address {}: their clones would too",
                    addr.ip
                )));
            }
            seen.push((addr.ip, name));
        }
        Ok(())
    }

    /// A system that stays in the enterprise is registered, not also cloned, and named
    /// by a service of the table (by one of its addresses or names).
    fn stays_are_reached(
        &self,
        stays: &[String],
        systems: &[(String, Visibility)],
        services: &[String],
    ) -> Result<()> {
        for name in stays {
            let rec = self.replication.require(name)?;
            if systems.iter().any(|(n, _)| n == name) {
                return Err(CloudError::Invalid(format!(
                    "{name} cannot both stay in the enterprise and be cloned"
                )));
            }
            let mut names: Vec<String> = rec
                .probe
                .nics
                .iter()
                .flat_map(|n| {
                    n.addresses
                        .iter()
                        .map(|a| a.split('/').next().unwrap_or(a).to_string())
                })
                .collect();
            names.extend([
                rec.probe.hostname.clone(),
                rec.probe.fqdn.clone(),
                name.clone(),
            ]);
            let reached = services.iter().any(|s| {
                let key = service_key(s);
                let host = key.rsplit_once(':').map(|(h, _)| h).unwrap_or(&key);
                names
                    .iter()
                    .any(|n| !n.is_empty() && n.eq_ignore_ascii_case(host))
            });
            if !reached {
                return Err(CloudError::Invalid(format!(
                    "{name} stays in the enterprise: add a service the clones reach on it (HOST:PORT)"
                )));
            }
        }
        Ok(())
    }

    /// The operator's edit of an app's service table (`ferry tunnel services`): removes,
    /// then adds. Images built afterwards carry the new table; running clones keep the
    /// one their images have.
    pub fn edit_services(&self, app: &str, add: &[String], remove: &[String]) -> Result<AppRecord> {
        let mut app = self.require(app)?;
        for r in remove {
            let before = app.services.len();
            app.services.retain(|e| service_key(e) != service_key(r));
            if app.services.len() == before {
                return Err(CloudError::NotFound(format!(
                    "service {} is not in the table of app {}",
                    service_key(r),
                    app.name
                )));
            }
        }
        add_services(&mut app.services, add)?;
        self.apps.put(&app)?;
        tracing::info!(app = %app.name, services = app.services.len(), "service table edited");
        Ok(app)
    }

    /// Forgets an app; the caller removed its images and checked it has no clones.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.apps.remove(name)?;
        Ok(())
    }
}
