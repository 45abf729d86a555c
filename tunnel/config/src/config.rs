//! The three role configurations, read from the INI layouts: Table A (enterprise), Table B
//! (app, and the service table the enterprise fetches) and the gateway's own file.
//! Keys Ferry adds to the patent's tables are listed in `KEYS_*` and documented in
//! `deploy/tunnel/README.md`.
use crate::ini::{self, err, IniError, Section};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the customization engine writes the service table in an image.
pub const DEFAULT_SERVICE_TABLE: &str = "/etc/ferry/tunnel-services.ini";
/// The app role's SSH port when the table does not say.
pub const DEFAULT_APP_PORT: u16 = 2222;
/// The gateway's port at a clone's public edge (the seed's `remote_ssh_port`).
pub const DEFAULT_GATEWAY_PORT: u16 = 7550;
/// The SSH user the enterprise side logs in as.
pub const DEFAULT_USER: &str = "ferry";
/// Prefix of the socket path that names a UDP service in a streamlocal forward.
pub const UDP_PREFIX: &str = "ferry-udp/";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Syntax { path: String, source: IniError },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// A host (name or address) and port, as tables write them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One `[service_…]` entry of Table B: the ServiceInfo_s mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    /// The enterprise service (resolved on the enterprise side).
    pub real: HostPort,
    /// Where the cloned app server reaches it.
    pub proxy: SocketAddr,
    pub line: usize,
}

impl Service {
    /// The streamlocal path that carries this UDP service's sessions.
    pub fn udp_path(&self) -> String {
        format!("{UDP_PREFIX}{}", self.proxy)
    }
}

/// Table B: the app's `[ssh_tunnel]` section and its services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTable {
    pub listen: SocketAddr,
    pub host_key_file: Option<PathBuf>,
    pub authorized_keys_file: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub keepalive: Duration,
    /// The largest SSH channel window this side offers, in bytes (`window_kib`); each
    /// channel's window follows the path's round trip up to it.
    pub window: u32,
    pub services: Vec<Service>,
}

impl ServiceTable {
    /// The service a proxy endpoint stands for: the allow-list both sides enforce.
    pub fn find(&self, protocol: Protocol, proxy: SocketAddr) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.protocol == protocol && s.proxy == proxy)
    }

    pub fn find_udp_path(&self, path: &str) -> Option<&Service> {
        let addr: SocketAddr = path.strip_prefix(UDP_PREFIX)?.parse().ok()?;
        self.find(Protocol::Udp, addr)
    }
}

/// Table A: how the enterprise side reaches the gateway and the app server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableA {
    /// The gateway's public address (IP_CT, P_CT).
    pub gateway: HostPort,
    /// The app server's private address (IP_CA, P_CA).
    pub app: HostPort,
    /// False: dial the app server directly (no gateway in between).
    pub first_tunnel: bool,
    pub key_file: PathBuf,
    pub host_key: HostKeyPin,
    pub service_table: String,
    pub user: String,
    pub metrics_listen: Option<SocketAddr>,
    pub keepalive: Duration,
    /// The largest SSH channel window this side offers, in bytes (`window_kib`); each
    /// channel's window follows the path's round trip up to it.
    pub window: u32,
    pub connect_timeout: Duration,
    /// The enterprise services the clone may reach (`allow=host:port[/udp],…`), whatever
    /// its Table B says; none when the key is absent.
    pub allow: Vec<Allowed>,
}

/// One enterprise destination Table A allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// As the operator wrote it, lowercased.
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl TableA {
    /// Whether `service`'s real endpoint is one the enterprise allows.
    pub fn allows(&self, service: &Service) -> bool {
        self.allow.iter().any(|a| {
            a.protocol == service.protocol
                && a.port == service.real.port
                && a.host.eq_ignore_ascii_case(&service.real.host)
        })
    }
}

/// `allow=host:port[/udp],…`: the destinations Table A lets the tunnel reach.
fn allow_list(e: &ini::Entry) -> Result<Vec<Allowed>, IniError> {
    let mut out = Vec::new();
    for item in e.value.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let bad = || {
            err(
                e.line,
                format!("allow holds {item:?}, which is not HOST:PORT or HOST:PORT/udp"),
            )
        };
        let (hostport, protocol) = match item.rsplit_once('/') {
            Some((h, p)) if p.eq_ignore_ascii_case("udp") => (h, Protocol::Udp),
            Some((h, p)) if p.eq_ignore_ascii_case("tcp") => (h, Protocol::Tcp),
            Some(_) => return Err(bad()),
            None => (item, Protocol::Tcp),
        };
        let (h, p) = hostport.rsplit_once(':').ok_or_else(bad)?;
        let h = h.trim_start_matches('[').trim_end_matches(']');
        let entry = ini::Entry {
            key: "allow".into(),
            value: h.to_string(),
            line: e.line,
        };
        let host = host(&entry).map_err(|_| bad())?;
        let port = match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad()),
        };
        out.push(Allowed {
            host: host.to_ascii_lowercase(),
            port,
            protocol,
        });
    }
    Ok(out)
}

/// The app server's host key, pinned: either the whole public key or its SHA256 fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPin {
    Fingerprint(String),
    Key(String),
}

impl HostKeyPin {
    fn parse(s: &str, line: usize) -> Result<Self, IniError> {
        if s.starts_with("SHA256:") && s.len() > 20 {
            Ok(Self::Fingerprint(s.to_string()))
        } else if russh::keys::PublicKey::from_openssh(s).is_ok() {
            Ok(Self::Key(s.to_string()))
        } else {
            Err(err(
                line,
                "host_key must be SHA256:<fingerprint> or an OpenSSH public key line",
            ))
        }
    }

    /// The SHA256 fingerprint this pin stands for.
    pub fn fingerprint(&self) -> String {
        match self {
            Self::Fingerprint(f) => f.clone(),
            Self::Key(k) => russh::keys::PublicKey::from_openssh(k)
                .map(|k| k.fingerprint(russh::keys::HashAlg::Sha256).to_string())
                .unwrap_or_default(),
        }
    }
}

/// The gateway's file: `[gateway]` with its listen address and the clone's app servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub app_servers: Vec<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub connect_timeout: Duration,
}

/// What a configuration file turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyConfig {
    Enterprise(TableA),
    App(ServiceTable),
    Gateway(GatewayConfig),
}

impl AnyConfig {
    /// The role's name, as `ferry-tunnel` and its logs say it.
    pub fn role(&self) -> &'static str {
        match self {
            AnyConfig::Enterprise(_) => "enterprise",
            AnyConfig::App(_) => "app",
            AnyConfig::Gateway(_) => "gateway",
        }
    }
}

pub const KEYS_TABLE_A: &[&str] = &[
    "remote_ssh_ip",
    "remote_ssh_port",
    "forward_tunnel_remote_destination_ip",
    "forward_tunnel_remote_destination_port",
    "is_first_establish_forward_tunnel",
    // Ferry's additions:
    "ssh_key_file",
    "host_key",
    "service_table",
    "ssh_user",
    "metrics_listen",
    "keepalive_secs",
    "window_kib",
    "connect_timeout_secs",
    "allow",
];

pub const KEYS_SSH_TUNNEL: &[&str] = &[
    "ssh_config_file",
    "ssh_key_file",
    "reverse_tunnel_local_destination_ip",
    "reverse_tunnel_local_destination_port",
    "reverse_tunnel_remote_listening_ip",
    "reverse_tunnel_remote_listening_port",
    // Ferry's additions:
    "listen_ip",
    "listen_port",
    "host_key_file",
    "authorized_keys_file",
    "metrics_listen",
    "keepalive_secs",
    "window_kib",
];

pub const KEYS_SERVICE: &[&str] = &[
    "name",
    "protocol",
    "real_server_ip",
    "real_server_port",
    "proxy_server_ip",
    "proxy_server_port",
];

pub const KEYS_GATEWAY: &[&str] = &[
    "listen_ip",
    "listen_port",
    "app_servers",
    "metrics_listen",
    "connect_timeout_secs",
];

fn port(e: &ini::Entry) -> Result<u16, IniError> {
    match e.value.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(err(
            e.line,
            format!("{} must be a port (1-65535), found {:?}", e.key, e.value),
        )),
    }
}

fn ip(e: &ini::Entry) -> Result<IpAddr, IniError> {
    e.value.parse().map_err(|_| {
        err(
            e.line,
            format!("{} must be an IP address, found {:?}", e.key, e.value),
        )
    })
}

/// A host name or address: letters, digits, dots, dashes, underscores, or an IPv6 literal.
fn host(e: &ini::Entry) -> Result<String, IniError> {
    let v = e.value.as_str();
    let ok = !v.is_empty()
        && v.len() <= 253
        && (v.parse::<IpAddr>().is_ok()
            || v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
    if ok {
        Ok(v.to_string())
    } else {
        Err(err(
            e.line,
            format!("{} must be a host name or address, found {v:?}", e.key),
        ))
    }
}

fn boolean(e: &ini::Entry) -> Result<bool, IniError> {
    match e.value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(err(
            e.line,
            format!("{} must be True or False, found {:?}", e.key, e.value),
        )),
    }
}

fn secs(e: &ini::Entry, max: u64) -> Result<Duration, IniError> {
    match e.value.parse::<u64>() {
        Ok(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
        _ => Err(err(
            e.line,
            format!("{} must be 1-{max} seconds, found {:?}", e.key, e.value),
        )),
    }
}

/// The largest channel window a side offers unless its table says otherwise. A channel's
/// window starts at 256 KiB and grows only while more than half of it arrives within a
/// round trip of the path (the tunnel's `window` module), so this cap matters on long paths:
/// one connection moves at most a window per round trip, 16 MiB is 160 MB/s at 100 ms.
pub const DEFAULT_WINDOW: u32 = 16 * 1024 * 1024;
const WINDOW_KIB: std::ops::RangeInclusive<u32> = 64..=65_536;

/// `window_kib`: 64 KiB to 64 MiB, in bytes.
fn window(e: &ini::Entry) -> Result<u32, IniError> {
    match e.value.parse::<u32>() {
        Ok(k) if WINDOW_KIB.contains(&k) => Ok(k * 1024),
        _ => Err(err(
            e.line,
            format!(
                "{} must be {}-{} KiB, found {:?}",
                e.key,
                WINDOW_KIB.start(),
                WINDOW_KIB.end(),
                e.value
            ),
        )),
    }
}

fn sock(e: &ini::Entry) -> Result<SocketAddr, IniError> {
    e.value.parse().map_err(|_| {
        err(
            e.line,
            format!("{} must be IP:PORT, found {:?}", e.key, e.value),
        )
    })
}

fn path(e: &ini::Entry) -> Result<PathBuf, IniError> {
    if e.value.starts_with('/') && !e.value.contains('\0') {
        Ok(PathBuf::from(&e.value))
    } else {
        Err(err(
            e.line,
            format!("{} must be an absolute path, found {:?}", e.key, e.value),
        ))
    }
}

fn opt<T>(
    s: &Section,
    key: &str,
    f: impl Fn(&ini::Entry) -> Result<T, IniError>,
) -> Result<Option<T>, IniError> {
    s.get(key).map(f).transpose()
}

/// Parses a service table (Table B).
pub fn parse_table_b(text: &str) -> Result<ServiceTable, IniError> {
    let sections = ini::parse(text)?;
    let mut table = ServiceTable {
        listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_APP_PORT)),
        host_key_file: None,
        authorized_keys_file: None,
        metrics_listen: None,
        keepalive: Duration::from_secs(10),
        window: DEFAULT_WINDOW,
        services: Vec::new(),
    };
    for s in &sections {
        if s.name == "ssh_tunnel" {
            s.only(KEYS_SSH_TUNNEL)?;
            let lip = opt(s, "listen_ip", ip)?.unwrap_or(table.listen.ip());
            let lport = opt(s, "listen_port", port)?.unwrap_or(DEFAULT_APP_PORT);
            table.listen = SocketAddr::new(lip, lport);
            table.host_key_file = opt(s, "host_key_file", path)?;
            table.authorized_keys_file = opt(s, "authorized_keys_file", path)?;
            table.metrics_listen = opt(s, "metrics_listen", sock)?;
            if let Some(k) = opt(s, "keepalive_secs", |e| secs(e, 3600))? {
                table.keepalive = k;
            }
            table.window = opt(s, "window_kib", window)?.unwrap_or(DEFAULT_WINDOW);
            // The seed's reverse-tunnel keys are accepted and checked for form only:
            // Ferry carries services over the one SSH connection instead.
            for k in [
                "reverse_tunnel_local_destination_port",
                "reverse_tunnel_remote_listening_port",
            ] {
                opt(s, k, port)?;
            }
            for k in [
                "reverse_tunnel_local_destination_ip",
                "reverse_tunnel_remote_listening_ip",
            ] {
                opt(s, k, ip)?;
            }
        } else if let Some(rest) = s.name.strip_prefix("service_") {
            s.only(KEYS_SERVICE)?;
            let proto = s.require("protocol")?;
            let protocol = match proto.value.to_ascii_uppercase().as_str() {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => {
                    return Err(err(
                        proto.line,
                        format!("protocol must be TCP or UDP, found {other:?}"),
                    ))
                }
            };
            let service = Service {
                name: s
                    .get("name")
                    .map(|e| e.value.clone())
                    .unwrap_or_else(|| rest.to_string()),
                protocol,
                real: HostPort {
                    host: host(s.require("real_server_ip")?)?,
                    port: port(s.require("real_server_port")?)?,
                },
                proxy: SocketAddr::new(
                    ip(s.require("proxy_server_ip")?)?,
                    port(s.require("proxy_server_port")?)?,
                ),
                line: s.line,
            };
            if let Some(other) = table.find(protocol, service.proxy) {
                return Err(err(
                    s.line,
                    format!(
                        "{} {} is already the proxy of service {} (line {})",
                        protocol.as_str(),
                        service.proxy,
                        other.name,
                        other.line
                    ),
                ));
            }
            table.services.push(service);
        } else {
            return Err(err(
                s.line.max(1),
                format!(
                    "unexpected section [{}] in a service table (expected [ssh_tunnel] or [service_…])",
                    s.name
                ),
            ));
        }
    }
    Ok(table)
}

fn parse_table_a(s: &Section) -> Result<TableA, IniError> {
    s.only(KEYS_TABLE_A)?;
    let first_tunnel = opt(s, "is_first_establish_forward_tunnel", boolean)?.unwrap_or(true);
    let app = HostPort {
        host: host(s.require("forward_tunnel_remote_destination_ip")?)?,
        port: port(s.require("forward_tunnel_remote_destination_port")?)?,
    };
    let gateway = if first_tunnel {
        HostPort {
            host: host(s.require("remote_ssh_ip")?)?,
            port: port(s.require("remote_ssh_port")?)?,
        }
    } else {
        app.clone()
    };
    let key = s.require("host_key")?;
    Ok(TableA {
        gateway,
        app,
        first_tunnel,
        key_file: path(s.require("ssh_key_file")?)?,
        host_key: HostKeyPin::parse(&key.value, key.line)?,
        service_table: match s.get("service_table") {
            Some(e) => path(e)?.to_string_lossy().into_owned(),
            None => DEFAULT_SERVICE_TABLE.to_string(),
        },
        user: s
            .get("ssh_user")
            .map(|e| e.value.clone())
            .unwrap_or_else(|| DEFAULT_USER.to_string()),
        metrics_listen: opt(s, "metrics_listen", sock)?,
        keepalive: opt(s, "keepalive_secs", |e| secs(e, 3600))?.unwrap_or(Duration::from_secs(10)),
        window: opt(s, "window_kib", window)?.unwrap_or(DEFAULT_WINDOW),
        connect_timeout: opt(s, "connect_timeout_secs", |e| secs(e, 600))?
            .unwrap_or(Duration::from_secs(10)),
        allow: opt(s, "allow", allow_list)?.unwrap_or_default(),
    })
}

fn parse_gateway(s: &Section) -> Result<GatewayConfig, IniError> {
    s.only(KEYS_GATEWAY)?;
    let servers = s.require("app_servers")?;
    let mut app_servers = Vec::new();
    for item in servers
        .value
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
    {
        app_servers.push(item.parse().map_err(|_| {
            err(
                servers.line,
                format!("app_servers holds {item:?}, which is not IP:PORT"),
            )
        })?);
    }
    if app_servers.is_empty() {
        return Err(err(servers.line, "app_servers is empty"));
    }
    Ok(GatewayConfig {
        listen: SocketAddr::new(
            opt(s, "listen_ip", ip)?.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            opt(s, "listen_port", port)?.unwrap_or(7550),
        ),
        app_servers,
        metrics_listen: opt(s, "metrics_listen", sock)?,
        connect_timeout: opt(s, "connect_timeout_secs", |e| secs(e, 600))?
            .unwrap_or(Duration::from_secs(10)),
    })
}

/// Recognizes the file by its sections: `[gateway]`, Table B's sections, or Table A's keys.
pub fn parse_any(text: &str) -> Result<AnyConfig, IniError> {
    let sections = ini::parse(text)?;
    if let Some(g) = sections.iter().find(|s| s.name == "gateway") {
        if let Some(other) = sections.iter().find(|s| s.name != "gateway") {
            return Err(err(
                other.line.max(1),
                "a gateway file holds only the [gateway] section",
            ));
        }
        return parse_gateway(g).map(AnyConfig::Gateway);
    }
    if sections
        .iter()
        .any(|s| s.name == "ssh_tunnel" || s.name.starts_with("service_"))
    {
        return parse_table_b(text).map(AnyConfig::App);
    }
    match sections.as_slice() {
        [s] if s.name.is_empty() => parse_table_a(s).map(AnyConfig::Enterprise),
        [] => Err(err(1, "the file is empty")),
        [s, ..] => Err(err(
            s.line.max(1),
            "not a tunnel file: expected Table A keys, Table B sections or [gateway]",
        )),
    }
}

/// Reads and parses a file; errors carry the path and the line.
pub fn load(path: &Path) -> Result<AnyConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_any(&text).map_err(|source| ConfigError::Syntax {
        path: path.display().to_string(),
        source,
    })
}

/// What `ferry-tunnel check` prints: everything the file was understood to say.
pub fn describe(c: &AnyConfig) -> String {
    let mut o = String::new();
    match c {
        AnyConfig::Enterprise(a) => {
            let _ = writeln!(o, "role: enterprise (Table A)");
            if a.first_tunnel {
                let _ = writeln!(o, "first tunnel: gateway {}", a.gateway);
            } else {
                let _ = writeln!(o, "first tunnel: none, dial the app server directly");
            }
            let _ = writeln!(o, "app server: {}", a.app);
            let _ = writeln!(o, "ssh user: {}", a.user);
            let _ = writeln!(o, "client key: {}", a.key_file.display());
            let _ = writeln!(o, "pinned host key: {}", a.host_key.fingerprint());
            let _ = writeln!(o, "service table (fetched by sftp): {}", a.service_table);
            let _ = writeln!(o, "keepalive: {}s", a.keepalive.as_secs());
            let _ = writeln!(o, "channel window: {} KiB", a.window / 1024);
            if let Some(m) = a.metrics_listen {
                let _ = writeln!(o, "metrics: http://{m}/metrics");
            }
        }
        AnyConfig::App(t) => {
            let _ = writeln!(o, "role: app (Table B)");
            let _ = writeln!(o, "ssh listen: {}", t.listen);
            if let Some(p) = &t.host_key_file {
                let _ = writeln!(o, "host key: {}", p.display());
            }
            if let Some(p) = &t.authorized_keys_file {
                let _ = writeln!(o, "authorized keys: {}", p.display());
            }
            if let Some(m) = t.metrics_listen {
                let _ = writeln!(o, "metrics: http://{m}/metrics");
            }
            let _ = writeln!(o, "channel window: {} KiB", t.window / 1024);
            let _ = writeln!(o, "services: {}", t.services.len());
            for s in &t.services {
                let _ = writeln!(
                    o,
                    "service {} (line {}): {} proxy {} -> real {}",
                    s.name,
                    s.line,
                    s.protocol.as_str(),
                    s.proxy,
                    s.real
                );
            }
        }
        AnyConfig::Gateway(g) => {
            let _ = writeln!(o, "role: gateway");
            let _ = writeln!(o, "listen: {}", g.listen);
            for a in &g.app_servers {
                let _ = writeln!(o, "app server allowed: {a}");
            }
            if let Some(m) = g.metrics_listen {
                let _ = writeln!(o, "metrics: http://{m}/metrics");
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Table B as the seed prints it (with its wrapped key path joined).
    const SEED_B: &str = "[ssh_tunnel]
ssh_config_file=/opt/denali/etc/ssh.config
ssh_key_file=/opt/denali/etc/remotenetworkservice_ssh_key
reverse_tunnel_local_destination_ip=127.0.0.1
reverse_tunnel_local_destination_port=50000
reverse_tunnel_remote_listening_ip=127.0.0.1
reverse_tunnel_remote_listening_port=50000
[service_ldap_junkang-wordpress-web1_389]
name=ldap_junkang-wordpress-web1_389
protocol=TCP
real_server_ip=junkang-wordpress-web1
real_server_port=389
proxy_server_port=50101
proxy_server_ip=127.0.0.1
[service_ldap_127.0.0.1_389]
name=ldap_127.0.0.1_389
protocol=TCP
real_server_ip=127.0.0.1
real_server_port=389
proxy_server_port=50100
proxy_server_ip=127.0.0.1
[service_192.168.1.1_53]
name=192.168.1.1_53
protocol=UDP
real_server_ip=192.168.1.1
real_server_port=53
proxy_server_port=53
proxy_server_ip=127.0.0.1
";

    const SEED_A: &str = "remote_ssh_ip=192.168.1.171
remote_ssh_port=7550
forward_tunnel_remote_destination_ip=192.168.1.51
forward_tunnel_remote_destination_port=22
is_first_establish_forward_tunnel=True
";

    #[test]
    fn seed_table_b_is_understood() {
        let t = parse_table_b(SEED_B).unwrap();
        assert_eq!(t.services.len(), 3);
        let dns = &t.services[2];
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.proxy, "127.0.0.1:53".parse().unwrap());
        assert_eq!(dns.real.to_string(), "192.168.1.1:53");
        assert_eq!(t.services[0].real.host, "junkang-wordpress-web1");
        assert_eq!(
            t.find(Protocol::Tcp, "127.0.0.1:50100".parse().unwrap())
                .unwrap()
                .name,
            "ldap_127.0.0.1_389"
        );
        assert!(t
            .find(Protocol::Udp, "127.0.0.1:50100".parse().unwrap())
            .is_none());
        assert_eq!(t.find_udp_path(&dns.udp_path()).unwrap().name, dns.name);
    }

    #[test]
    fn seed_table_a_needs_only_the_key_and_pin_ferry_adds() {
        let e = parse_any(SEED_A).unwrap_err();
        assert!(e.msg.contains("host_key"), "{e}");
        let full = format!(
            "{SEED_A}ssh_key_file=/etc/ferry/tunnel/client_key\nhost_key=SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
        );
        let AnyConfig::Enterprise(a) = parse_any(&full).unwrap() else {
            panic!("not table a")
        };
        assert_eq!(a.gateway.to_string(), "192.168.1.171:7550");
        assert_eq!(a.app.to_string(), "192.168.1.51:22");
        assert!(a.first_tunnel);
        assert_eq!(a.service_table, DEFAULT_SERVICE_TABLE);
        assert!(describe(&AnyConfig::Enterprise(a)).contains("gateway 192.168.1.171:7550"));
    }

    #[test]
    fn table_a_allows_only_the_destinations_it_lists() {
        let base = format!(
            "{SEED_A}ssh_key_file=/k\nhost_key=SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
        );
        let AnyConfig::Enterprise(none) = parse_any(&base).unwrap() else {
            panic!("not table a")
        };
        let svc = |host: &str, port: u16, protocol: Protocol| Service {
            name: "s".into(),
            protocol,
            real: HostPort {
                host: host.into(),
                port,
            },
            proxy: "127.0.0.1:1".parse().unwrap(),
            line: 1,
        };
        assert!(
            !none.allows(&svc("db.corp", 5432, Protocol::Tcp)),
            "nothing without allow="
        );
        let text = format!("{base}allow=DB.corp:5432, 10.0.0.2:53/udp,[fd00::1]:389\n");
        let AnyConfig::Enterprise(a) = parse_any(&text).unwrap() else {
            panic!("not table a")
        };
        assert!(a.allows(&svc("db.corp", 5432, Protocol::Tcp)));
        assert!(a.allows(&svc("10.0.0.2", 53, Protocol::Udp)));
        assert!(a.allows(&svc("fd00::1", 389, Protocol::Tcp)));
        for (h, p, proto) in [
            ("db.corp", 5433, Protocol::Tcp),
            ("db.corp", 5432, Protocol::Udp),
            ("10.0.0.2", 53, Protocol::Tcp),
            ("evil.corp", 5432, Protocol::Tcp),
        ] {
            assert!(!a.allows(&svc(h, p, proto)), "{h}:{p}");
        }
        for bad in ["db.corp", "db.corp:0", "db.corp:5432/sctp", "a b:1"] {
            let e = parse_any(&format!("{base}allow={bad}\n")).unwrap_err();
            assert!(e.msg.contains("allow holds"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_largest_channel_window_is_16_mib_unless_a_table_says_otherwise() {
        let a = format!(
            "{SEED_A}ssh_key_file=/k\nhost_key=SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
        );
        let AnyConfig::Enterprise(plain) = parse_any(&a).unwrap() else {
            panic!("not table a")
        };
        assert_eq!(plain.window, 16 << 20);
        let AnyConfig::Enterprise(wide) = parse_any(&format!("{a}window_kib=1024\n")).unwrap()
        else {
            panic!("not table a")
        };
        assert_eq!(wide.window, 1 << 20);
        assert_eq!(parse_table_b(SEED_B).unwrap().window, 16 << 20);
        let b = SEED_B.replacen("[ssh_tunnel]\n", "[ssh_tunnel]\nwindow_kib=64\n", 1);
        assert_eq!(parse_table_b(&b).unwrap().window, 64 << 10);
        for bad in ["0", "63", "65537", "1M", "-1", ""] {
            let e = parse_any(&format!("{a}window_kib={bad}\n")).unwrap_err();
            assert!(
                e.msg.contains("window_kib must be 64-65536 KiB"),
                "{bad}: {e}"
            );
            let b = SEED_B.replacen(
                "[ssh_tunnel]\n",
                &format!("[ssh_tunnel]\nwindow_kib={bad}\n"),
                1,
            );
            let e = parse_table_b(&b).unwrap_err();
            assert!(
                e.msg.contains("window_kib must be 64-65536 KiB"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn bad_values_name_their_line() {
        let cases = [
            (SEED_B.replace("protocol=UDP", "protocol=SCTP"), 24),
            (
                SEED_B.replace("proxy_server_port=50101", "proxy_server_port=0"),
                13,
            ),
            (
                SEED_B.replace("proxy_server_port=50101", "proxy_server_port=50100"),
                15,
            ),
            (
                SEED_B.replace("real_server_ip=127.0.0.1", "real_server_ip=a b"),
                18,
            ),
            (SEED_B.replace("name=192.168.1.1_53", "nmae=x"), 23),
            (
                SEED_B.replace(
                    "proxy_server_ip=127.0.0.1\n[service_192",
                    "proxy_server_ip=localhost\n[service_192",
                ),
                21,
            ),
        ];
        for (text, line) in cases {
            let e = parse_any(&text).unwrap_err();
            assert_eq!(e.line, line, "{e}");
        }
    }

    #[test]
    fn gateway_file() {
        let AnyConfig::Gateway(g) = parse_any(
            "[gateway]\nlisten_port=7550\napp_servers=198.18.20.2:2222, 198.18.20.3:2222\n",
        )
        .unwrap() else {
            panic!("not a gateway")
        };
        assert_eq!(g.app_servers.len(), 2);
        assert_eq!(g.listen.port(), 7550);
        assert_eq!(
            parse_any("[gateway]\napp_servers=db:22\n")
                .unwrap_err()
                .line,
            2
        );
    }
}
