//! Discovery: reports are taken only from a system's own agent (or its site), bounded and
//! cleaned; the graph joins both ends of a connection and names unregistered hosts; a
//! proposal follows what a system reaches.
use super::*;
use crate::discovery::DiscoveryRecord;
use crate::error::CloudError;
use ferry_sysconf::netstat::{Direction, Listener, Peer, Proto};

fn listener(port: u16, addr: &str, process: &str) -> Listener {
    Listener {
        proto: Proto::Tcp,
        address: addr.parse().unwrap(),
        port,
        process: process.into(),
    }
}

fn peer(addr: &str, port: u16, direction: Direction, count: u64) -> Peer {
    Peer {
        address: addr.parse().unwrap(),
        port,
        proto: Proto::Tcp,
        direction,
        count,
        process: String::new(),
    }
}

fn report(system: &str, listeners: Vec<Listener>, peers: Vec<Peer>) -> DiscoveryRecord {
    DiscoveryRecord {
        system: system.into(),
        samples: 3,
        window_seconds: 3,
        listeners,
        peers,
        ..Default::default()
    }
}

/// web (10.0.0.5) serves HTTP and uses db (10.0.0.6) and an LDAP server nobody
/// registered (10.0.0.7); a browser (10.0.0.99) uses web.
async fn shop(h: &Harness) {
    register(h, "web", "10.0.0.5/24").await;
    register(h, "db", "10.0.0.6/24").await;
    let web = report(
        "web",
        vec![
            listener(80, "0.0.0.0", "nginx"),
            listener(22, "0.0.0.0", "sshd"),
        ],
        vec![
            peer("10.0.0.6", 5432, Direction::Out, 4),
            peer("10.0.0.7", 389, Direction::Out, 2),
            peer("10.0.0.99", 80, Direction::In, 9),
        ],
    );
    h.cloud.report_discovery(&agent("web"), web).unwrap();
    let db = report(
        "db",
        vec![
            listener(5432, "0.0.0.0", "postgres"),
            listener(
                5433,
                "127.0.0.1",
                "x\u{1b}[31mevil\nname-that-goes-on-and-on-and-on-and-on-and-on-and-on-and-on",
            ),
        ],
        vec![peer("10.0.0.5", 5432, Direction::In, 6)],
    );
    h.cloud.report_discovery(&agent("db"), db).unwrap();
}

#[tokio::test]
async fn reports_come_only_from_the_systems_own_agent_and_are_bounded() {
    let h = harness();
    register(&h, "web", "10.0.0.5/24").await;
    let r = report("web", Vec::new(), Vec::new());
    assert!(matches!(
        h.cloud.report_discovery(&agent("db"), r.clone()),
        Err(CloudError::PermissionDenied(_))
    ));
    assert!(matches!(
        h.cloud.report_discovery(&site(), r.clone()),
        Err(CloudError::PermissionDenied(_))
    ));
    let many = report(
        "web",
        Vec::new(),
        (0..=ferry_sysconf::netstat::MAX_PEERS as u16)
            .map(|n| peer("10.0.0.9", n + 1, Direction::Out, 1))
            .collect(),
    );
    assert!(matches!(
        h.cloud.report_discovery(&agent("web"), many),
        Err(CloudError::Invalid(_))
    ));
    let zero = report(
        "web",
        Vec::new(),
        vec![peer("10.0.0.9", 0, Direction::Out, 1)],
    );
    assert!(matches!(
        h.cloud.report_discovery(&agent("web"), zero),
        Err(CloudError::Invalid(_))
    ));
    h.cloud.report_discovery(&agent("web"), r).unwrap();
}

#[tokio::test]
async fn the_graph_joins_both_ends_and_names_roles_and_unregistered_hosts() {
    let h = harness();
    shop(&h).await;
    let g = h.cloud.discovery.graph("").unwrap();
    let sys = |n: &str| g.systems.iter().find(|s| s.record.system == n).unwrap();
    assert!(sys("web").public && !sys("web").database);
    assert!(sys("db").database && !sys("db").public);
    // The hostile process name was cut to printable characters and 64 of them.
    let odd = &sys("db")
        .services
        .iter()
        .find(|s| s.listener.port == 5433)
        .unwrap()
        .listener
        .process;
    assert!(
        odd.chars().all(|c| c.is_ascii_graphic() || c == ' ') && odd.len() <= 64,
        "{odd:?}"
    );
    let e = |from: &str, to: &str, port: u16| {
        g.edges
            .iter()
            .find(|e| e.from == from && e.to == to && e.port == port)
            .cloned()
    };
    // web -> db reported by both ends counts once (the larger count).
    let wd = e("web", "db", 5432).unwrap();
    assert_eq!(
        (wd.count, wd.role, wd.to_registered),
        (6, "postgresql", true)
    );
    assert_eq!(g.edges.iter().filter(|x| x.port == 5432).count(), 1);
    let ldap = e("web", "10.0.0.7", 389).unwrap();
    assert_eq!((ldap.role, ldap.to_registered), ("ldap", false));
    let browser = e("10.0.0.99", "web", 80).unwrap();
    assert!(!browser.from_registered && browser.role == "http");
    // One system's view: it and its neighbours.
    let only_db = h.cloud.discovery.graph("db").unwrap();
    assert!(only_db.edges.iter().all(|x| x.from == "db" || x.to == "db"));
    assert!(matches!(
        h.cloud.discovery.graph("nope"),
        Err(CloudError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_proposal_follows_what_a_system_reaches() {
    let h = harness();
    shop(&h).await;
    register(&h, "batch", "10.0.0.8/24").await;
    let p = h.cloud.discovery.propose("shop", "web").unwrap();
    let systems: Vec<String> = p.systems.iter().map(|(s, v)| format!("{s}:{v}")).collect();
    assert_eq!(systems, ["web:public", "db:private"]);
    assert_eq!(p.databases, ["db"]);
    assert_eq!(p.services, ["10.0.0.7:389"]);
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("db: database (postgresql on 5432/tcp)")),
        "{:?}",
        p.notes
    );
    assert_eq!(
        p.command,
        "ferry app create shop --system web:public --system db:database --service 10.0.0.7:389"
    );
    // The proposal is what `app create` takes.
    let spec = crate::apps::AppSpec {
        name: p.name.clone(),
        systems: p.systems.clone(),
        services: p.services.clone(),
        databases: p.databases.clone(),
        ..Default::default()
    };
    assert_eq!(h.cloud.apps.create(spec).unwrap().databases, ["db"]);
    // A system without a report, or an unknown one, cannot be a start.
    let err = h
        .cloud
        .discovery
        .propose("x", "batch")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no discovery report yet"), "{err}");
    assert!(matches!(
        h.cloud.discovery.propose("x", "nope"),
        Err(CloudError::NotFound(_))
    ));
    assert!(matches!(
        h.cloud.discovery.propose("bad name", "web"),
        Err(CloudError::Invalid(_))
    ));
}
