//! The records providers act on, kept by the cloud manager's state: a built image, a
//! clone and its instances. A provider leaves each describing what exists.
use ferry_common::named_enum;
pub use ferry_common::names::Target;
pub use ferry_image::Firmware;
use serde::{Deserialize, Serialize};

named_enum! {
    /// Whether a system of an app is reachable from outside its clone.
    #[derive(Default)]
    pub enum Visibility ("visibility") {
        Public => "public",
        #[default]
        Private => "private",
    }
}

named_enum! {
    /// Where a clone stands, from its instances' states.
    #[derive(Default)]
    pub enum CloneState ("clone state") {
        #[default]
        Creating => "creating",
        Running => "running",
        Suspended => "suspended",
        Degraded => "degraded",
        Terminated => "terminated",
    }
}

named_enum! {
    /// Where an instance stands, as its provider reports it.
    #[derive(Default)]
    pub enum InstanceState ("instance state") {
        #[default]
        Pending => "pending",
        Booting => "booting",
        Running => "running",
        Suspended => "suspended",
        Stopped => "stopped",
        Failed => "failed",
        Terminated => "terminated",
        /// Alive, but its state could not be read.
        Unknown => "unknown",
    }
}

/// A built disk image.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ImageRecord {
    pub id: String,
    pub system: String,
    pub target: Target,
    pub epoch: u64,
    pub path: String,
    pub virtual_bytes: u64,
    pub disk_bytes: u64,
    pub boot_check_json: String,
    pub created_unix_ms: i64,
    #[serde(default)]
    pub app: String,
    /// The provider's image (aws: the AMI id); empty on local.
    #[serde(default)]
    pub provider_image: String,
    /// The provider's disk snapshot behind it (aws: the EBS snapshot id).
    #[serde(default)]
    pub provider_snapshot: String,
    /// The snapshot this one was made incrementally from, if any.
    #[serde(default)]
    pub parent_snapshot: String,
    /// Bytes uploaded to the provider for this image (changed blocks only).
    #[serde(default)]
    pub uploaded_bytes: u64,
    /// `bios` or `efi`; empty (older records) is bios.
    #[serde(default)]
    pub firmware: Firmware,
    /// Which boot loader starts the image, and whose it is.
    #[serde(default)]
    pub boot_loader: String,
    /// The image carries the tunnel's gateway role (a cloud clone's public system).
    #[serde(default)]
    pub tunnel_gateway: bool,
}

/// One instance of a clone: a system launched from its image.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct InstanceRecord {
    pub system: String,
    pub visibility: Visibility,
    pub hostname: String,
    pub image: String,
    pub image_path: String,
    pub state: InstanceState,
    /// The enterprise address and prefix length the system keeps.
    pub private_ip: String,
    pub prefix: u8,
    pub public_ip: String,
    pub mac: String,
    pub accel: String,
    pub accel_note: String,
    pub boot_seconds: f64,
    pub provider_id: String,
    /// The provider's image the instance runs (aws: the AMI id).
    #[serde(default)]
    pub provider_image: String,
    /// The source system's CPUs and memory, from its probe (0 when unknown).
    #[serde(default)]
    pub source_cpus: u32,
    #[serde(default)]
    pub source_memory_bytes: u64,
    /// What the instance got (aws: the instance type; local: vCPUs and memory).
    #[serde(default)]
    pub size: String,
    /// The image's firmware: `efi`, or `bios` (also when empty).
    #[serde(default)]
    pub firmware: Firmware,
}

/// A port the public systems of a clone serve beyond their network: `[SYSTEM:]PORT[/udp]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PublicPort {
    /// Empty: every public system of the app.
    pub system: String,
    pub port: u16,
    pub udp: bool,
}

impl PublicPort {
    /// `443`, `web01:8443`, `dns:53/udp`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let bad = || format!("public port {spec:?}: expected [SYSTEM:]PORT[/udp]");
        let (rest, udp) = match spec.rsplit_once('/') {
            Some((r, p)) if p.eq_ignore_ascii_case("udp") => (r, true),
            Some((r, p)) if p.eq_ignore_ascii_case("tcp") => (r, false),
            Some(_) => return Err(bad()),
            None => (spec, false),
        };
        let (system, port) = match rest.rsplit_once(':') {
            Some((sys, port)) => {
                ferry_common::pki::validate_name(sys).map_err(|_| bad())?;
                (sys.to_string(), port)
            }
            None => (String::new(), rest),
        };
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Self { system, port, udp }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for PublicPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.system.is_empty() {
            write!(f, "{}:", self.system)?;
        }
        write!(f, "{}{}", self.port, if self.udp { "/udp" } else { "" })
    }
}

/// A clone of an application: its network and instances on one provider.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CloneRecord {
    pub name: String,
    pub app: String,
    pub provider: Target,
    pub state: CloneState,
    /// Enterprise subnets, each with the gateway address the clone's network uses.
    pub subnets: Vec<(ipnet::Ipv4Net, std::net::Ipv4Addr)>,
    /// Provider resources (local: the network namespace).
    pub network: String,
    /// A small number unique among live clones (local: names the host-side veth).
    pub index: u32,
    pub instances: Vec<InstanceRecord>,
    pub load_balancer_ip: String,
    pub created_unix_ms: i64,
    pub create_seconds: f64,
    pub warnings: Vec<String>,
    /// Ports the clone's load balancer serves; empty for none.
    #[serde(default)]
    pub load_balancer_ports: Vec<u16>,
    /// The app has services that stay behind: the clone gets a tunnel gateway.
    #[serde(default)]
    pub needs_gateway: bool,
    /// aws and azure: the operator's VPC or VNet the clone was launched into (its
    /// subnets and groups are the clone's; the network stays); empty: its own network.
    #[serde(default)]
    pub existing_network: String,
    /// aws: the instance type asked for at creation; empty for the default.
    #[serde(default)]
    pub instance_type: String,
    /// The gateway's public `IP:PORT`, once it exists.
    #[serde(default)]
    pub tunnel_gateway: String,
    /// aws and azure: the public system whose image carries the tunnel gateway role;
    /// empty on local (the gateway runs in the clone's namespace) and without services.
    #[serde(default)]
    pub gateway_system: String,
    /// What the app opens on its public systems, and to whom (CIDRs; none: nobody
    /// outside the clone's network).
    #[serde(default)]
    pub public_ports: Vec<PublicPort>,
    #[serde(default)]
    pub allow_from: Vec<String>,
}

impl CloneRecord {
    /// The ports a public system serves beyond the clone's network: the app's own, the
    /// system's, the load balancer's (TCP), and the tunnel gateway's on the system that
    /// carries it.
    pub fn ports_for(&self, system: &str) -> Vec<(u16, bool)> {
        let mut out: Vec<(u16, bool)> = self
            .public_ports
            .iter()
            .filter(|p| p.system.is_empty() || p.system == system)
            .map(|p| (p.port, p.udp))
            .chain(self.load_balancer_ports.iter().map(|p| (*p, false)))
            .chain(
                (self.needs_gateway && self.gateway_system == system)
                    .then_some((ferry_tunnel_config::config::DEFAULT_GATEWAY_PORT, false)),
            )
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}
