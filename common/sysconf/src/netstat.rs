//! What netstat reads: the socket tables in /proc/net/{tcp,tcp6,udp,udp6}, parsed into
//! sockets, and a host's listening services and peers from samples of them. Shared by the
//! agent's discovery and (over SSH) the site's agentless reading of old hosts. The tables
//! come from the source host: a line that does not parse is counted and skipped.
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One row of a socket table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's state number (TCP: 1 established, 10 listen; UDP: 7 unconnected).
    pub state: u8,
    pub inode: u64,
}

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;
const UDP_UNCONNECTED: u8 = 0x07;

impl Socket {
    /// A TCP socket listening, or a UDP socket bound to a port and connected to nobody.
    pub fn listening(&self) -> bool {
        match self.proto {
            Proto::Tcp => self.state == TCP_LISTEN,
            Proto::Udp => self.state == UDP_UNCONNECTED && self.remote.port() == 0,
        }
    }

    /// A TCP connection that is up.
    pub fn established(&self) -> bool {
        self.proto == Proto::Tcp && self.state == TCP_ESTABLISHED
    }
}

/// One file's rows, and how many lines it held that were not rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub sockets: Vec<Socket>,
    pub skipped: usize,
}

/// Most rows read from one table: a busy host has thousands; a hostile file may claim
/// millions.
pub const MAX_ROWS: usize = 65_536;

/// Parses one of /proc/net/{tcp,tcp6,udp,udp6}.
pub fn parse(proto: Proto, text: &str) -> Table {
    let mut t = Table::default();
    for line in text.lines().skip(1) {
        if t.sockets.len() >= MAX_ROWS {
            t.skipped += 1;
            continue;
        }
        match parse_row(proto, line) {
            Some(s) => t.sockets.push(s),
            None if line.trim().is_empty() => {}
            None => t.skipped += 1,
        }
    }
    t
}

fn parse_row(proto: Proto, line: &str) -> Option<Socket> {
    let mut f = line.split_whitespace();
    let _slot = f.next()?.strip_suffix(':')?;
    let local = parse_addr(f.next()?)?;
    let remote = parse_addr(f.next()?)?;
    let state = u8::from_str_radix(f.next()?, 16).ok()?;
    // tx:rx queues, timer, retransmits, uid, timeout, then the inode.
    let inode = f.nth(5)?.parse().ok()?;
    Some(Socket {
        proto,
        local,
        remote,
        state,
        inode,
    })
}

/// `0100007F:0050` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word of the
/// address in the host's byte order (little-endian on the machines Ferry reads).
fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::swap_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?.to_be_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            // A v4 peer of a dual-stack socket is shown as the v4 address it is.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A service the host offers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Listener {
    pub proto: Proto,
    pub address: IpAddr,
    pub port: u16,
    /// The process that holds the socket, when it could be told (`/proc/PID/comm`).
    pub process: String,
}

/// Which way a connection went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The peer connected to one of this host's services (`port` is the service's).
    In,
    /// This host connected to the peer's service (`port` is the peer's).
    Out,
}

/// Another host this one talked to, by the service port of the pair.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Peer {
    pub address: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub direction: Direction,
    /// Connections seen, summed over the samples.
    pub count: u64,
    /// This host's process at its end, when it could be told.
    pub process: String,
}

/// Samples of a host's sockets, folded into its services and peers.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    listeners: BTreeSet<Listener>,
    peers: BTreeMap<(IpAddr, u16, Proto, Direction), (u64, String)>,
    pub samples: u32,
    pub skipped_lines: u64,
}

/// Most peers kept: a host that talks to the whole Internet still makes a bounded report.
pub const MAX_PEERS: usize = 4096;

impl Discovery {
    /// Folds in one sample: every table's rows, and the process of each socket inode.
    pub fn add(&mut self, tables: &[Table], process_of: &dyn Fn(u64) -> Option<String>) {
        self.samples += 1;
        let all: Vec<&Socket> = tables.iter().flat_map(|t| &t.sockets).collect();
        self.skipped_lines += tables.iter().map(|t| t.skipped as u64).sum::<u64>();
        let mut ports: BTreeSet<(Proto, u16)> = BTreeSet::new();
        for s in all.iter().filter(|s| s.listening()) {
            ports.insert((s.proto, s.local.port()));
            self.listeners.insert(Listener {
                proto: s.proto,
                address: s.local.ip(),
                port: s.local.port(),
                process: process_of(s.inode).unwrap_or_default(),
            });
        }
        for s in all.iter().filter(|s| s.established()) {
            let remote = s.remote.ip();
            if remote.is_loopback() || s.local.ip().is_loopback() {
                continue;
            }
            // A connection to one of our listening ports came in; any other went out.
            let (direction, port) = if ports.contains(&(s.proto, s.local.port())) {
                (Direction::In, s.local.port())
            } else {
                (Direction::Out, s.remote.port())
            };
            let key = (remote, port, s.proto, direction);
            if !self.peers.contains_key(&key) && self.peers.len() >= MAX_PEERS {
                continue;
            }
            let e = self.peers.entry(key).or_default();
            e.0 += 1;
            if e.1.is_empty() {
                e.1 = process_of(s.inode).unwrap_or_default();
            }
        }
    }

    pub fn listeners(&self) -> Vec<Listener> {
        self.listeners.iter().cloned().collect()
    }

    pub fn peers(&self) -> Vec<Peer> {
        self.peers
            .iter()
            .map(
                |(&(address, port, proto, direction), (count, process))| Peer {
                    address,
                    port,
                    proto,
                    direction,
                    count: *count,
                    process: process.clone(),
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 20101 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20102 1 0000000000000000 100 0 0 10 0
   2: 0A0012C6:1538 0B0012C6:C350 01 00000000:00000000 00:00000000 00000000   105        0 20103 1 0000000000000000 20 4 30 10 -1
   3: 0A0012C6:D431 070012C6:0185 01 00000000:00000000 00:00000000 00000000     0        0 20104 1 0000000000000000 20 4 30 10 -1
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 30101 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000A0012C6:0050 0000000000000000FFFF00000C0012C6:D6D8 01 00000000:00000000 00:00000000 00000000     0        0 30102 1 0000000000000000 20 4 30 10 -1
";

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 40101 2 0000000000000000 0
";

    #[test]
    fn rows_of_the_four_tables_parse() {
        let t = parse(Proto::Tcp, TCP);
        assert_eq!(t.skipped, 0);
        assert_eq!(t.sockets.len(), 4);
        assert_eq!(t.sockets[0].local, "0.0.0.0:5432".parse().unwrap());
        assert!(t.sockets[0].listening());
        assert_eq!(t.sockets[1].local, "127.0.0.1:3306".parse().unwrap());
        assert_eq!(t.sockets[2].remote, "198.18.0.11:50000".parse().unwrap());
        assert!(t.sockets[2].established());
        assert_eq!(t.sockets[3].inode, 20104);
        let t6 = parse(Proto::Tcp, TCP6);
        assert_eq!(t6.sockets[0].local, "[::]:80".parse().unwrap());
        // A v4 client of a dual-stack server is its v4 address.
        assert_eq!(t6.sockets[1].remote, "198.18.0.12:55000".parse().unwrap());
        let u = parse(Proto::Udp, UDP);
        assert!(u.sockets[0].listening());
        assert_eq!(u.sockets[0].local.port(), 53);
    }

    #[test]
    fn hostile_lines_are_skipped_and_counted() {
        let text = format!(
            "header\n 0: zz:0050 00000000:0000 0A 0 0 0 0 0 1\n 1: 0100007F 00000000:0000 0A\n 2: 0100007F:0050 00000000:0000 0A 0 0 0 0 0 notanumber\n 3: 01:0050 00000000:0000 0A 0 0 0 0 0 1\n\n{}",
            TCP.lines().nth(1).unwrap()
        );
        let t = parse(Proto::Tcp, &text);
        assert_eq!((t.sockets.len(), t.skipped), (1, 4));
        let many = format!("h\n{}", "x\n".repeat(10));
        assert_eq!(parse(Proto::Udp, &many).skipped, 10);
    }

    #[test]
    fn samples_fold_into_services_and_peers_with_their_direction() {
        let tables = [
            parse(Proto::Tcp, TCP),
            parse(Proto::Tcp, TCP6),
            parse(Proto::Udp, UDP),
        ];
        let names = |inode: u64| match inode {
            20101 | 20103 => Some("postgres".to_string()),
            20104 => Some("slapd-client".to_string()),
            30101 | 30102 => Some("nginx".to_string()),
            _ => None,
        };
        let mut d = Discovery::default();
        d.add(&tables, &names);
        d.add(&tables, &names);
        assert_eq!(d.samples, 2);
        let l = d.listeners();
        assert!(l.contains(&Listener {
            proto: Proto::Tcp,
            address: "0.0.0.0".parse().unwrap(),
            port: 5432,
            process: "postgres".into()
        }));
        assert!(l.iter().any(|l| l.port == 53 && l.proto == Proto::Udp));
        let p = d.peers();
        let find = |port: u16, dir: Direction| {
            p.iter()
                .find(|x| x.port == port && x.direction == dir)
                .cloned()
        };
        let client = find(5432, Direction::In).unwrap();
        assert_eq!(client.address.to_string(), "198.18.0.11");
        assert_eq!((client.count, client.process.as_str()), (2, "postgres"));
        let ldap = find(389, Direction::Out).unwrap();
        assert_eq!(ldap.address.to_string(), "198.18.0.7");
        assert_eq!(
            find(80, Direction::In).unwrap().address.to_string(),
            "198.18.0.12"
        );
        // Loopback connections are nobody's peer.
        assert!(p.iter().all(|x| !x.address.is_loopback()));
    }
}
