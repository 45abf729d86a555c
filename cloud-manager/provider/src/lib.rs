//! Providers run clones: a network carrying the application's enterprise subnets and one
//! instance per system, launched from its image. `local` (QEMU in a network namespace per
//! clone) is the embedded default; the trait is what aws and azure (crates of their own,
//! `ferry-provider-aws` and `ferry-provider-azure`) implement too.
pub mod local;
pub mod qmp;
pub mod records;
pub mod scope;

use ipnet::Ipv4Net;
use records::{CloneRecord, CloneState, InstanceRecord, InstanceState};
use std::net::Ipv4Addr;

/// The providers' settings, from `ferry-cloud serve`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The provider of apps created without `--provider`.
    pub default: records::Target,
    pub local: local::LocalConfig,
    /// Present when the azure provider is configured.
    pub azure: Option<AzureConfig>,
}

/// Where the provider works: `[azure]` in the config file or the `--azure-*` flags.
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    pub subscription_id: String,
    pub resource_group: String,
    pub location: String,
    /// The Resource Manager endpoint; the public cloud's when empty.
    #[serde(default)]
    pub endpoint: String,
}

impl AzureConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in [
            ("subscription_id", &self.subscription_id),
            ("resource_group", &self.resource_group),
            ("location", &self.location),
        ] {
            if v.is_empty() {
                return Err(format!("azure {key} is required"));
            }
            if !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.()".contains(c))
            {
                return Err(format!("azure {key} {v:?} has characters ARM names refuse"));
            }
        }
        if !self.endpoint.is_empty() {
            url::Url::parse(&self.endpoint)
                .map_err(|e| format!("azure endpoint {:?}: {e}", self.endpoint))?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Command(#[from] ferry_common::cmd::CommandError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("instance {system} did not reach userspace ({accel}): {reason}\n--- console (last lines) ---\n{console}")]
    Boot {
        system: String,
        accel: String,
        reason: String,
        console: String,
    },
    #[error("instance {system}: {message}")]
    Instance { system: String, message: String },
    #[error("provider {0} is not in this build (the ferry-cloud-manager feature of that name); use local")]
    Unavailable(String),
    #[error("{call}: {message}")]
    Api { call: &'static str, message: String },
    #[error("cancelled by the operator")]
    Cancelled,
}

/// What a clone's creation may use of the job that runs it: whether the operator
/// cancelled it (checked between steps and while instances boot; what was made is then
/// removed), a place to save the record as it grows (so a restart finds what exists),
/// and a line for the job's log.
pub struct Ctx<'a> {
    pub cancel: &'a tokio_util::sync::CancellationToken,
    pub save: &'a (dyn Fn(&CloneRecord) + Sync),
    pub note: &'a (dyn Fn(&str) + Sync),
}

impl Ctx<'_> {
    /// `Err(Cancelled)` once the operator cancelled.
    pub fn check(&self) -> Result<(), ProviderError> {
        if self.cancel.is_cancelled() {
            Err(ProviderError::Cancelled)
        } else {
            Ok(())
        }
    }
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// What every provider does with a clone. Calls block; the caller runs them off the
/// async runtime. Each leaves the record describing what exists.
pub trait Provider: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Creates the clone's network and instances (the record names the systems, images
    /// and enterprise addresses) and waits until every instance reached userspace. On
    /// error, a cancel included, everything this call created is removed again.
    fn create(
        &self,
        rec: &mut CloneRecord,
        others: &[CloneRecord],
        ctx: &Ctx<'_>,
    ) -> Result<(), ProviderError>;
    /// Stops the instances' CPUs; their memory and disks stay.
    fn suspend(&self, rec: &mut CloneRecord) -> Result<(), ProviderError>;
    /// Continues suspended instances and starts stopped ones again.
    fn resume(&self, rec: &mut CloneRecord) -> Result<(), ProviderError>;
    /// Removes every resource of the clone; resources already gone are not an error.
    fn terminate(&self, rec: &CloneRecord) -> Result<(), ProviderError>;
    /// Sets each instance's state from what the provider has.
    fn observe(&self, rec: &mut CloneRecord) -> Result<(), ProviderError>;
    /// Where an instance's serial console is logged on this host, if it is.
    fn console_log(&self, _clone: &str, _system: &str) -> Option<std::path::PathBuf> {
        None
    }
}

/// A provider whose clones live behind a cloud's API (aws, azure): creation, power and
/// teardown are API calls, and each instance's state is what the API reports. The
/// `Provider` impl below runs them on the runtime and does the waiting for both.
#[allow(async_fn_in_trait)] // the futures are run with block_on, never spawned
pub trait CloudApi: Send + Sync + std::fmt::Debug {
    fn cloud(&self) -> &'static str;
    fn runtime(&self) -> &tokio::runtime::Handle;
    /// Makes the clone's network and instances, and waits until they run.
    async fn launch(&self, rec: &mut CloneRecord) -> Result<(), ProviderError>;
    /// Asks every instance to start (`on`) or stop; `wait_states` waits for it.
    async fn power(&self, rec: &CloneRecord, on: bool) -> Result<(), ProviderError>;
    /// Removes everything of the clone; what is gone already is not an error.
    async fn teardown(&self, rec: &CloneRecord) -> Result<(), ProviderError>;
    /// Each instance's state, in the record's order.
    async fn states(&self, rec: &CloneRecord) -> Result<Vec<InstanceState>, ProviderError>;
}

/// Polls a cloud until every instance is in one of `want` (15 minutes at most),
/// keeping the record's instance states current.
pub async fn wait_states<P: CloudApi + ?Sized>(
    p: &P,
    rec: &mut CloneRecord,
    want: &[InstanceState],
) -> Result<(), ProviderError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(900);
    loop {
        let states = p.states(rec).await?;
        for (i, s) in rec.instances.iter_mut().zip(&states) {
            i.state = *s;
        }
        if states.iter().all(|s| want.contains(s)) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ProviderError::Invalid(format!(
                "instances did not reach {want:?} within 15 minutes: {states:?}"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// Starts or stops a clone's instances and waits until all of them are there.
async fn switch<P: CloudApi + ?Sized>(
    p: &P,
    rec: &mut CloneRecord,
    on: bool,
) -> Result<(), ProviderError> {
    p.power(rec, on).await?;
    let want = if on {
        InstanceState::Running
    } else {
        InstanceState::Suspended
    };
    wait_states(p, rec, &[want]).await?;
    rec.state = clone_state(&rec.instances);
    Ok(())
}

impl<T: CloudApi> Provider for T {
    fn name(&self) -> &'static str {
        self.cloud()
    }

    fn create(
        &self,
        rec: &mut CloneRecord,
        _others: &[CloneRecord],
        ctx: &Ctx<'_>,
    ) -> Result<(), ProviderError> {
        ctx.check()?;
        if rec.needs_gateway && rec.gateway_system.is_empty() {
            return Err(ProviderError::Invalid(format!(
                "clone {}: its tunnel gateway needs a public system on {}",
                rec.name,
                self.cloud()
            )));
        }
        let made = self.runtime().block_on(self.launch(rec));
        (ctx.save)(rec);
        // A cancel during the launch is honoured when it returns: what it made goes.
        let made = made.and_then(|()| ctx.check());
        settle(self, rec, made)?;
        if rec.needs_gateway {
            // The gateway role runs on that system's image; the enterprise side dials
            // its public address (its security group or NSG opens the port, from the
            // app's allow_from alone).
            let ip = rec
                .instances
                .iter()
                .find(|i| i.system == rec.gateway_system)
                .map(|i| i.public_ip.clone())
                .unwrap_or_default();
            if ip.is_empty() {
                rec.warnings.push(format!(
                    "system {} got no public address: the tunnel gateway cannot be reached",
                    rec.gateway_system
                ));
            } else {
                rec.tunnel_gateway =
                    format!("{ip}:{}", ferry_tunnel_config::config::DEFAULT_GATEWAY_PORT);
            }
        }
        Ok(())
    }

    fn suspend(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        self.runtime().block_on(switch(self, rec, false))
    }

    fn resume(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        self.runtime().block_on(switch(self, rec, true))
    }

    fn terminate(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        self.runtime().block_on(self.teardown(rec))
    }

    fn observe(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        let states = self.runtime().block_on(self.states(rec))?;
        for (i, s) in rec.instances.iter_mut().zip(states) {
            i.state = s;
        }
        rec.state = clone_state(&rec.instances);
        Ok(())
    }
}

/// Finishes a creation: on error, everything of the clone is removed before the error
/// is returned (a failed cleanup is logged; the error that matters is the first);
/// on success, the clone's state follows its instances'.
pub fn settle(
    provider: &dyn Provider,
    rec: &mut CloneRecord,
    made: Result<(), ProviderError>,
) -> Result<(), ProviderError> {
    if let Err(e) = made {
        tracing::warn!(clone = %rec.name, provider = provider.name(), error = %e, "clone creation failed; removing what was made");
        if let Err(e2) = provider.terminate(rec) {
            tracing::error!(clone = %rec.name, error = %e2, "cleanup after a failed creation failed");
        }
        return Err(e);
    }
    rec.state = clone_state(&rec.instances);
    Ok(())
}

/// The clone's state from its instances' states.
pub fn clone_state(instances: &[InstanceRecord]) -> CloneState {
    let all = |s| !instances.is_empty() && instances.iter().all(|i| i.state == s);
    if all(InstanceState::Running) {
        CloneState::Running
    } else if all(InstanceState::Suspended) {
        CloneState::Suspended
    } else {
        CloneState::Degraded
    }
}

/// The smallest of `sizes` (name, vCPUs, GiB; smallest first) that holds the source's
/// CPUs and memory (right-sizing, as the source ran); the largest when it is bigger still.
pub fn size_for(sizes: &[(&'static str, u32, u64)], cpus: u32, memory_bytes: u64) -> &'static str {
    sizes
        .iter()
        .find(|(_, c, gib)| *c >= cpus && gib << 30 >= memory_bytes)
        .or(sizes.last())
        .map_or("", |(n, _, _)| *n)
}

/// The smallest range holding every subnet: what a clone's VPC or VNet gets. Ranges
/// wider than `/widest` are refused, naming the `what`.
pub fn covering_cidr(
    subnets: &[(Ipv4Net, Ipv4Addr)],
    widest: u8,
    what: &str,
) -> Result<Ipv4Net, ProviderError> {
    let Some(&(mut cover, _)) = subnets.first() else {
        return Err(ProviderError::Invalid("no subnets".into()));
    };
    for (n, _) in subnets {
        while !cover.contains(n) {
            cover = cover.supernet().ok_or_else(|| {
                ProviderError::Invalid(format!("no range covers {cover} and {n}"))
            })?;
        }
    }
    if cover.prefix_len() < widest {
        return Err(ProviderError::Invalid(format!(
            "the systems' subnets span a /{}, wider than a {what}'s /{widest}",
            cover.prefix_len()
        )));
    }
    Ok(cover)
}

/// Whether `ip` (an address as records keep it) is in `net`.
pub fn holds(net: &Ipv4Net, ip: &str) -> bool {
    ip.parse::<Ipv4Addr>().is_ok_and(|ip| net.contains(&ip))
}

/// The enterprise subnets of the instances, each with the first host address no system
/// uses (the clone network's router, DHCP server and tunnel gateway side).
pub fn subnets(instances: &[InstanceRecord]) -> Result<Vec<(Ipv4Net, Ipv4Addr)>, ProviderError> {
    let mut out: Vec<(Ipv4Net, Ipv4Addr)> = Vec::new();
    let used: Vec<Ipv4Addr> = instances
        .iter()
        .filter_map(|i| i.private_ip.parse().ok())
        .collect();
    for i in instances {
        let ip: Ipv4Addr = i.private_ip.parse().map_err(|_| {
            ProviderError::Invalid(format!(
                "system {}: no IPv4 enterprise address known (its probe lists none)",
                i.system
            ))
        })?;
        if i.prefix == 0 || i.prefix > 30 {
            return Err(ProviderError::Invalid(format!(
                "system {}: prefix /{} leaves no room for a router",
                i.system, i.prefix
            )));
        }
        let net = Ipv4Net::new(ip, i.prefix)
            .map_err(|e| ProviderError::Invalid(format!("system {}: {e}", i.system)))?
            .trunc();
        if out.iter().any(|(c, _)| *c == net) {
            continue;
        }
        let gw = net.hosts().find(|h| !used.contains(h)).ok_or_else(|| {
            ProviderError::Exhausted(format!("subnet {net} has no free address for a router"))
        })?;
        out.push((net, gw));
    }
    for (a, _) in &out {
        for (b, _) in &out {
            if a != b && (a.contains(b) || b.contains(a)) {
                return Err(ProviderError::Invalid(format!(
                    "subnets {a} and {b} overlap: the systems' probes disagree on prefixes"
                )));
            }
        }
    }
    Ok(out)
}

/// A stable locally administered MAC for an instance of a clone.
pub fn mac_for(clone: &str, system: &str) -> String {
    let h = blake3::hash(format!("{clone}/{system}").as_bytes());
    let b = h.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(system: &str, ip: &str, prefix: u8) -> InstanceRecord {
        InstanceRecord {
            system: system.into(),
            private_ip: ip.into(),
            prefix,
            ..Default::default()
        }
    }

    #[test]
    fn routers_take_the_first_address_no_system_uses() {
        let s = subnets(&[
            inst("web", "198.18.70.1", 24),
            inst("db", "198.18.70.20", 24),
            inst("ldap", "198.18.71.9", 24),
        ])
        .unwrap();
        let as_text: Vec<(String, String)> = s
            .iter()
            .map(|(n, gw)| (n.to_string(), gw.to_string()))
            .collect();
        assert_eq!(
            as_text,
            [
                ("198.18.70.0/24".to_string(), "198.18.70.2".to_string()),
                ("198.18.71.0/24".to_string(), "198.18.71.1".to_string())
            ]
        );
        assert!(subnets(&[inst("a", "10.0.0.1", 24), inst("b", "10.0.0.9", 16)]).is_err());
        assert!(subnets(&[inst("a", "", 24)]).is_err());
        assert!(subnets(&[inst("a", "10.0.0.1", 31)]).is_err());
        assert_ne!(mac_for("a", "web"), mac_for("b", "web"));
    }
}
