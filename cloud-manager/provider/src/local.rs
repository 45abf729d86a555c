//! The local provider: each clone gets a network namespace with a bridge carrying the
//! application's enterprise subnets (so systems keep their addresses), dnsmasq handing
//! each instance its enterprise address by MAC, a veth to the host's public bridge with
//! one public address per public system (NATed to its enterprise address, as an elastic
//! IP is), and one QEMU process per system on a copy-on-write overlay of its image.
//! QEMU, dnsmasq, HAProxy and the gateway run outside the manager's cgroup (`scope`):
//! clones outlive the cloud manager, which finds them again by pid file and command line.
use super::{clone_state, mac_for, qmp, Provider, ProviderError};
use crate::records::{CloneRecord, InstanceRecord, InstanceState, Visibility};
use crate::scope::Placement;
use ferry_common::cmd::run;
use ferry_image as image;
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How often the tunnel gateway is looked for on its port, 100 ms apart.
const GATEWAY_START_POLLS: u32 = 600;

/// Settings of the local provider.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// DATA/clones: one directory per clone (overlays, consoles, pid files).
    pub dir: PathBuf,
    /// Names host resources: `PREFIX-pub` (bridge), `PREFIX-CLONE` (netns), `PREFIXvN`.
    pub prefix: String,
    /// Public addresses; the first host address is the host bridge's.
    pub public_cidr: Ipv4Net,
    pub memory_mib: u32,
    pub boot_timeout: Duration,
}

pub const DEFAULT_PREFIX: &str = "ferry";
pub const DEFAULT_PUBLIC_CIDR: &str = "198.19.0.0/16";

impl LocalConfig {
    /// Checks the prefix (interface names are at most 15 bytes) and the public range.
    pub fn new(dir: PathBuf, prefix: &str, public_cidr: &str) -> Result<Self, ProviderError> {
        if prefix.is_empty()
            || prefix.len() > 8
            || !prefix.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(ProviderError::Invalid(format!(
                "clone prefix {prefix:?}: 1 to 8 letters or digits"
            )));
        }
        let net = public_cidr
            .parse::<Ipv4Net>()
            .ok()
            .filter(|n| (8..=29).contains(&n.prefix_len()))
            .ok_or_else(|| {
                ProviderError::Invalid(format!(
                    "public range {public_cidr:?}: expected a.b.c.d/len with len 8 to 29"
                ))
            })?;
        Ok(Self {
            dir,
            prefix: prefix.to_string(),
            public_cidr: net.trunc(),
            memory_mib: 1024,
            boot_timeout: Duration::from_secs(600),
        })
    }
}

#[derive(Debug)]
pub struct Local {
    cfg: LocalConfig,
    /// Where clones' processes go: out of the manager's cgroup.
    placement: Placement,
}

/// Inside each clone's namespace: the enterprise bridge and the public side.
const BRIDGE: &str = "br0";
/// The tunnel gateway's port on its public address.
pub const GATEWAY_PORT: u16 = ferry_tunnel_config::config::DEFAULT_GATEWAY_PORT;

/// The address part of `IP:PORT` ("" when empty).
fn gateway_ip(hostport: &str) -> &str {
    hostport.rsplit_once(':').map_or("", |(ip, _)| ip)
}
const PUBLIC_IF: &str = "pub0";

fn io(path: &Path) -> impl Fn(std::io::Error) -> ProviderError + '_ {
    move |e| ProviderError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

impl Local {
    pub fn new(cfg: LocalConfig) -> Self {
        let placement = Placement::detect();
        tracing::info!(?placement, "where clones' processes run");
        Self { cfg, placement }
    }

    pub fn config(&self) -> &LocalConfig {
        &self.cfg
    }

    /// The host bridge every clone's public side hangs off.
    pub fn public_bridge(&self) -> String {
        format!("{}-pub", self.cfg.prefix)
    }

    fn bridge_ip(&self) -> Ipv4Addr {
        let net = self.cfg.public_cidr;
        net.hosts().next().unwrap_or(net.network())
    }

    pub fn netns(&self, clone: &str) -> String {
        format!("{}-{clone}", self.cfg.prefix)
    }

    fn host_veth(&self, index: u32) -> String {
        format!("{}v{index}", self.cfg.prefix)
    }

    pub fn clone_dir(&self, clone: &str) -> PathBuf {
        self.cfg.dir.join(clone)
    }

    /// `ip netns exec NS PROGRAM`.
    fn in_ns(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// `ip netns exec NS PROGRAM` for one of the clone's long-lived processes (`what`),
    /// placed outside the manager's cgroup so that it outlives the manager.
    fn daemon_in_ns(&self, rec: &CloneRecord, what: &str, program: &str) -> Command {
        let mut c = self.placement.command(&self.netns(&rec.name), what, "ip");
        c.args(["netns", "exec", &rec.network, program]);
        c
    }

    /// The mark QEMU carries on its command line, so a pid is never mistaken for another
    /// process after a reboot reused it.
    fn marker(&self, clone: &str, system: &str) -> String {
        format!("ferry:{}:{system}", self.netns(clone))
    }

    /// The process in `pid_file` if it is alive and its command line holds `marker`.
    fn live_pid(pid_file: &Path, marker: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        cmdline.contains(marker).then_some(pid)
    }

    /// Kills a daemon found by pid file and marker, and waits until it is gone.
    fn kill(pid_file: &Path, marker: &str) {
        let Some(pid) = Self::live_pid(pid_file, marker) else {
            return;
        };
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(pid_file);
    }

    /// Public addresses for the public systems and a free index, avoiding other clones'.
    fn allocate(&self, rec: &mut CloneRecord, others: &[CloneRecord]) -> Result<(), ProviderError> {
        let taken: Vec<String> = others
            .iter()
            .flat_map(|c| {
                c.instances.iter().map(|i| i.public_ip.clone()).chain([
                    c.load_balancer_ip.clone(),
                    gateway_ip(&c.tunnel_gateway).to_string(),
                ])
            })
            .filter(|s| !s.is_empty())
            .collect();
        let net = self.cfg.public_cidr;
        let mut free = net
            .hosts()
            .skip(1)
            .map(|ip| ip.to_string())
            .filter(|ip| !taken.contains(ip));
        for inst in rec
            .instances
            .iter_mut()
            .filter(|i| i.visibility == Visibility::Public)
        {
            inst.public_ip = free.next().ok_or_else(|| {
                ProviderError::Exhausted(format!("no public address left in {net}"))
            })?;
        }
        if !rec.load_balancer_ports.is_empty() {
            rec.load_balancer_ip = free.next().ok_or_else(|| {
                ProviderError::Exhausted(format!(
                    "no public address left in {net} for the load balancer"
                ))
            })?;
        }
        if rec.needs_gateway {
            let ip = free.next().ok_or_else(|| {
                ProviderError::Exhausted(format!(
                    "no public address left in {net} for the tunnel gateway"
                ))
            })?;
            rec.tunnel_gateway = format!("{ip}:{GATEWAY_PORT}");
        }
        rec.index = (1..100_000)
            .find(|n| !others.iter().any(|c| c.index == *n))
            .ok_or_else(|| ProviderError::Exhausted("no clone index left".into()))?;
        rec.network = self.netns(&rec.name);
        Ok(())
    }

    /// The host's public bridge, made once.
    fn ensure_public_bridge(&self) -> Result<(), ProviderError> {
        let br = self.public_bridge();
        if Path::new("/sys/class/net").join(&br).exists() {
            return Ok(());
        }
        run(Command::new("ip").args(["link", "add", &br, "type", "bridge"]))?;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/{}", self.bridge_ip(), self.cfg.public_cidr.prefix_len()),
            "dev",
            &br,
        ]))?;
        run(Command::new("ip").args(["link", "set", &br, "up"]))?;
        Ok(())
    }

    /// The NAT and forwarding rules: a public address reaches only its own system, a
    /// private system is reachable only from inside the clone.
    fn nft_rules(rec: &CloneRecord) -> String {
        let public: Vec<&InstanceRecord> = rec
            .instances
            .iter()
            .filter(|i| !i.public_ip.is_empty())
            .collect();
        let mut pre = String::new();
        let mut post = String::new();
        let mut fwd = String::new();
        for i in &public {
            pre += &format!(
                "    iifname \"{PUBLIC_IF}\" ip daddr {} dnat to {}\n",
                i.public_ip, i.private_ip
            );
            post += &format!(
                "    oifname \"{PUBLIC_IF}\" ip saddr {} snat to {}\n",
                i.private_ip, i.public_ip
            );
            fwd += &format!(
                "    iifname \"{PUBLIC_IF}\" oifname \"{BRIDGE}\" ip daddr {} ct status dnat accept\n    iifname \"{BRIDGE}\" oifname \"{PUBLIC_IF}\" ip saddr {} accept\n",
                i.private_ip, i.private_ip
            );
        }
        format!(
            "table ip ferry {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{pre}  }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{post}  }}\n  chain forward {{\n    type filter hook forward priority filter; policy drop;\n    ct state established,related accept\n    iifname \"{BRIDGE}\" oifname \"{BRIDGE}\" accept\n{fwd}  }}\n}}\n"
        )
    }

    /// The namespace, bridge, router addresses, DHCP, public side and rules.
    fn create_network(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        let ns = &rec.network;
        let dir = self.clone_dir(&rec.name);
        run(Command::new("ip").args(["netns", "add", ns]))?;
        let ip_n = |args: &[&str]| -> Result<String, ProviderError> {
            Ok(run(Command::new("ip").args(["-n", ns]).args(args))?)
        };
        ip_n(&["link", "set", "lo", "up"])?;
        ip_n(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip_n(&["link", "set", BRIDGE, "up"])?;
        for (net, gw) in &rec.subnets {
            let len = net.prefix_len();
            ip_n(&["addr", "add", &format!("{gw}/{len}"), "dev", BRIDGE])?;
        }
        run(self
            .in_ns(ns, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]))?;
        self.ensure_public_bridge()?;
        let veth = self.host_veth(rec.index);
        run(Command::new("ip").args([
            "link", "add", &veth, "type", "veth", "peer", "name", PUBLIC_IF, "netns", ns,
        ]))?;
        run(Command::new("ip").args([
            "link",
            "set",
            &veth,
            "master",
            &self.public_bridge(),
            "up",
        ]))?;
        ip_n(&["link", "set", PUBLIC_IF, "up"])?;
        let len = self.cfg.public_cidr.prefix_len();
        for ip in rec
            .instances
            .iter()
            .map(|i| &i.public_ip)
            .map(String::as_str)
            .chain([
                rec.load_balancer_ip.as_str(),
                gateway_ip(&rec.tunnel_gateway),
            ])
            .filter(|ip| !ip.is_empty())
        {
            ip_n(&["addr", "add", &format!("{ip}/{len}"), "dev", PUBLIC_IF])?;
        }
        let rules = dir.join("nft.conf");
        std::fs::write(&rules, Self::nft_rules(rec)).map_err(io(&rules))?;
        run(self.in_ns(ns, "nft").arg("-f").arg(&rules))?;
        // DHCP hands each MAC its enterprise address and name; the router is the
        // bridge's address in that subnet. DNS stays off: /etc/hosts names the systems.
        let mut dnsmasq = self.daemon_in_ns(rec, "dnsmasq", "dnsmasq");
        dnsmasq
            .args(["--conf-file=/dev/null", "--port=0", "--bind-interfaces"])
            .arg(format!("--interface={BRIDGE}"))
            .args([
                "--except-interface=lo",
                "--dhcp-authoritative",
                "--log-dhcp",
            ])
            .args(["--user=root", "--group=root"])
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .arg(format!(
                "--log-facility={}",
                dir.join("dnsmasq.log").display()
            ));
        for (net, _) in &rec.subnets {
            let (base, mask) = (net.network(), net.netmask());
            dnsmasq.arg(format!("--dhcp-range={base},static,{mask},12h"));
        }
        for i in &rec.instances {
            dnsmasq.arg(format!(
                "--dhcp-host={},{},{},infinite",
                i.mac, i.private_ip, i.hostname
            ));
        }
        run(&mut dnsmasq)?;
        self.start_edge(rec)?;
        Ok(())
    }

    /// The daemons at the clone's public edge that are not running: the tunnel gateway
    /// and the load balancer.
    fn start_edge(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        let dir = self.clone_dir(&rec.name);
        let mark = dir.display().to_string();
        if rec.needs_gateway && Self::live_pid(&dir.join("gateway.pid"), &mark).is_none() {
            self.start_gateway(rec)?;
        }
        if !rec.load_balancer_ports.is_empty()
            && Self::live_pid(&dir.join("haproxy.pid"), &mark).is_none()
        {
            self.start_load_balancer(rec)?;
        }
        Ok(())
    }

    /// HAProxy's configuration: each port balanced round-robin over the public systems,
    /// with health checks so a stopped instance is skipped.
    fn haproxy_cfg(rec: &CloneRecord, dir: &Path) -> String {
        let mut c = format!(
            "# Written by ferry-cloud for clone {}\nglobal\n  daemon\n  pidfile {}\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n",
            rec.name,
            dir.join("haproxy.pid").display()
        );
        for port in &rec.load_balancer_ports {
            c += &format!(
                "\nfrontend port_{port}\n  bind {}:{port}\n  default_backend public_{port}\n\nbackend public_{port}\n  balance roundrobin\n",
                rec.load_balancer_ip
            );
            for i in rec
                .instances
                .iter()
                .filter(|i| i.visibility == Visibility::Public)
            {
                c += &format!(
                    "  server {} {}:{port} check inter 2s fall 2 rise 1\n",
                    i.system, i.private_ip
                );
            }
        }
        c
    }

    fn start_load_balancer(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        let dir = self.clone_dir(&rec.name);
        let conf = dir.join("haproxy.cfg");
        std::fs::write(&conf, Self::haproxy_cfg(rec, &dir)).map_err(io(&conf))?;
        run(self
            .in_ns(&rec.network, "haproxy")
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&conf))?;
        run(self
            .daemon_in_ns(rec, "haproxy", "haproxy")
            .arg("-f")
            .arg(&conf))?;
        Ok(())
    }

    /// The clone's tunnel gateway (`ferry-tunnel gateway`) on its public address, allowed
    /// to reach only this clone's app servers.
    fn start_gateway(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        let dir = self.clone_dir(&rec.name);
        let binary = ferry_tunnel_config::tunnel_binary().ok_or_else(|| {
            ProviderError::Invalid("no ferry-tunnel binary beside ferry-cloud".into())
        })?;
        let (ip, port) = rec
            .tunnel_gateway
            .rsplit_once(':')
            .ok_or_else(|| ProviderError::Invalid("no gateway address allocated".into()))?;
        let servers: Vec<String> = rec
            .instances
            .iter()
            .map(|i| {
                format!(
                    "{}:{}",
                    i.private_ip,
                    ferry_tunnel_config::config::DEFAULT_APP_PORT
                )
            })
            .collect();
        let conf = dir.join("gateway.ini");
        std::fs::write(
            &conf,
            format!(
                "# Written by ferry-cloud for clone {}\n[gateway]\nlisten_ip={ip}\nlisten_port={port}\napp_servers={}\n",
                rec.name,
                servers.join(",")
            ),
        )
        .map_err(io(&conf))?;
        let log_path = dir.join("gateway.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        let err_log = log.try_clone().map_err(io(&log_path))?;
        let mut cmd = self.daemon_in_ns(rec, "gateway", &binary.display().to_string());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .args(["gateway", "--config"])
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .map_err(io(&binary))?;
        let pid_file = dir.join("gateway.pid");
        std::fs::write(&pid_file, child.id().to_string()).map_err(io(&pid_file))?;
        // Under TCG the host's cores are busy with the clones' instances: the gateway gets
        // time to start. Liveness comes from the child itself, not /proc/PID/cmdline, which
        // reads empty while `ip netns exec` execs the gateway.
        let mut exited = None;
        for _ in 0..GATEWAY_START_POLLS {
            let up = run(self
                .in_ns(&rec.network, "ss")
                .args(["-Htln", &format!("src {ip}")]))
            .is_ok_and(|o| o.contains(&format!(":{port}")));
            if up {
                // The gateway outlives this process like the instances do; it is found
                // again by its pid file and configuration path.
                drop(child);
                return Ok(());
            }
            exited = child.try_wait().map_err(io(&binary))?;
            if exited.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if exited.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        Err(ProviderError::Invalid(format!(
            "the tunnel gateway did not start: {} ({})",
            match exited {
                Some(status) => format!("it exited with {status}"),
                None => format!("not listening on {ip}:{port} after 60 s"),
            },
            log.trim()
        )))
    }

    /// Where an instance's serial console is logged.
    pub fn console_log(&self, clone: &str, system: &str) -> PathBuf {
        self.clone_dir(clone).join(format!("{system}.console.log"))
    }

    fn paths(&self, clone: &str, system: &str) -> InstancePaths {
        let d = self.clone_dir(clone);
        InstancePaths {
            overlay: d.join(format!("{system}.qcow2")),
            pid: d.join(format!("{system}.pid")),
            qmp: d.join(format!("{system}.qmp")),
            console: self.console_log(clone, system),
        }
    }

    /// The tap name of the n-th instance (inside the clone's namespace).
    fn tap(n: usize) -> String {
        format!("tap{n}")
    }

    /// Starts one instance's QEMU (daemonized) and returns its pid.
    fn start_qemu(&self, rec: &CloneRecord, n: usize, accel: &str) -> Result<i32, ProviderError> {
        let inst = &rec.instances[n];
        let p = self.paths(&rec.name, &inst.system);
        let ns = &rec.network;
        let tap = Self::tap(n);
        // A tap left from an earlier run of this instance is reused.
        let _ =
            run(Command::new("ip").args(["-n", ns, "tuntap", "add", "dev", &tap, "mode", "tap"]));
        run(Command::new("ip").args(["-n", ns, "link", "set", &tap, "master", BRIDGE, "up"]))?;
        let _ = std::fs::remove_file(&p.console);
        let _ = std::fs::remove_file(&p.qmp);
        let mut cmd = self.daemon_in_ns(rec, &inst.system, "qemu-system-x86_64");
        cmd.arg("-name")
            .arg(self.marker(&rec.name, &inst.system))
            .args(image::accel_args(accel))
            .args(firmware_of(inst).qemu_args())
            .args(["-m", &self.cfg.memory_mib.to_string(), "-smp", "1"])
            .args(["-display", "none", "-daemonize"])
            .arg("-pidfile")
            .arg(&p.pid)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", p.qmp.display()))
            .arg("-serial")
            .arg(format!("file:{}", p.console.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2",
                p.overlay.display()
            ))
            .arg("-netdev")
            .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={}", inst.mac));
        run(&mut cmd).map_err(|e| ProviderError::Instance {
            system: inst.system.clone(),
            message: e.to_string(),
        })?;
        Self::live_pid(&p.pid, &self.marker(&rec.name, &inst.system)).ok_or_else(|| {
            ProviderError::Instance {
                system: inst.system.clone(),
                message: "qemu started but its pid file names no live process".into(),
            }
        })
    }

    /// Starts an instance and waits for its login prompt; a KVM failure is retried under
    /// TCG (and remembered). Returns (accel, note, seconds, pid).
    fn boot(
        &self,
        rec: &CloneRecord,
        n: usize,
        cancel: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<(String, String, f64, i32), ProviderError> {
        let inst = &rec.instances[n];
        let p = self.paths(&rec.name, &inst.system);
        let marker = self.marker(&rec.name, &inst.system);
        let (accels, mut note) = image::accel_order();
        let mut last = None;
        for accel in accels {
            let pid = match self.start_qemu(rec, n, accel) {
                Ok(pid) => pid,
                Err(e) if accel == "kvm" => {
                    note = Some(format!("kvm: {e}"));
                    image::remember_kvm_failure(&e.to_string());
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let waited = image::wait_for_login(&p.console, accel, self.cfg.boot_timeout, || {
                if cancel.is_some_and(|c| c.is_cancelled()) {
                    return Some("cancelled".to_string());
                }
                Self::live_pid(&p.pid, &marker)
                    .is_none()
                    .then(|| "the process is gone".to_string())
            });
            if cancel.is_some_and(|c| c.is_cancelled()) {
                Self::kill(&p.pid, &marker);
                return Err(ProviderError::Cancelled);
            }
            match waited {
                Ok(secs) => return Ok((accel.into(), note.unwrap_or_default(), secs, pid)),
                Err(reason) => {
                    let err = ProviderError::Boot {
                        system: inst.system.clone(),
                        accel: accel.into(),
                        reason: reason.clone(),
                        console: image::console_tail(&p.console, 30),
                    };
                    Self::kill(&p.pid, &marker);
                    if accel != "kvm" || !image::kvm_fault(&reason) {
                        return Err(err);
                    }
                    tracing::warn!(system = %inst.system, %reason, "kvm failed; retrying under tcg");
                    note = Some(format!("kvm: {reason}"));
                    image::remember_kvm_failure(&reason);
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| ProviderError::Invalid("no accelerator to try".into())))
    }

    /// Boots the given instances in parallel and records what each did.
    /// `ctx`: the creation's, whose cancel stops the waiting and whose log hears of each
    /// instance.
    fn boot_all(
        &self,
        rec: &mut CloneRecord,
        which: &[usize],
        ctx: Option<&crate::Ctx<'_>>,
    ) -> Result<(), ProviderError> {
        let snapshot = rec.clone();
        let cancel = ctx.map(|c| c.cancel);
        let results: Vec<(usize, Result<_, ProviderError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = which
                .iter()
                .map(|&n| {
                    let snap = &snapshot;
                    (n, s.spawn(move || self.boot(snap, n, cancel)))
                })
                .collect();
            handles
                .into_iter()
                .map(|(n, h)| {
                    (
                        n,
                        h.join().unwrap_or_else(|_| {
                            Err(ProviderError::Invalid("boot thread panicked".into()))
                        }),
                    )
                })
                .collect()
        });
        let mut first_err = None;
        for (n, r) in results {
            let inst = &mut rec.instances[n];
            match r {
                Ok((accel, note, secs, pid)) => {
                    if let Some(ctx) = ctx {
                        (ctx.note)(&format!(
                            "instance {} reached userspace in {secs:.0} s ({accel})",
                            inst.system
                        ));
                    }
                    inst.accel = accel;
                    inst.accel_note = note;
                    inst.boot_seconds = secs;
                    inst.size = format!("1 vCPU, {} MiB", self.cfg.memory_mib);
                    inst.provider_id = pid.to_string();
                    inst.state = InstanceState::Running;
                }
                Err(e) => {
                    inst.state = InstanceState::Failed;
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn create_inner(
        &self,
        rec: &mut CloneRecord,
        ctx: &crate::Ctx<'_>,
    ) -> Result<(), ProviderError> {
        let dir = self.clone_dir(&rec.name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        ctx.check()?;
        self.create_network(rec)?;
        (ctx.note)(&format!("network {} made", rec.network));
        for inst in &rec.instances {
            ctx.check()?;
            let p = self.paths(&rec.name, &inst.system);
            // A copy-on-write overlay: the clone writes there, the image stays as built.
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&inst.image_path)
                .arg(&p.overlay))
            .map_err(|e| ProviderError::Instance {
                system: inst.system.clone(),
                message: e.to_string(),
            })?;
        }
        let all: Vec<usize> = (0..rec.instances.len()).collect();
        self.boot_all(rec, &all, Some(ctx))?;
        ctx.check()
    }

    /// The state of one instance from its process and QMP.
    fn observe_instance(&self, rec: &CloneRecord, inst: &InstanceRecord) -> InstanceState {
        let p = self.paths(&rec.name, &inst.system);
        if Self::live_pid(&p.pid, &self.marker(&rec.name, &inst.system)).is_none() {
            return InstanceState::Stopped;
        }
        match qmp::command(&p.qmp, "query-status") {
            Ok(v) => match v["status"].as_str() {
                Some("running") => InstanceState::Running,
                Some("paused") => InstanceState::Suspended,
                // shutdown, guest-panicked, internal-error, io-error, ...
                Some(_) => InstanceState::Failed,
                None => InstanceState::Unknown,
            },
            Err(e) => {
                tracing::warn!(system = %inst.system, error = %e, "qmp query failed");
                InstanceState::Unknown
            }
        }
    }

    fn qmp_all(
        &self,
        rec: &mut CloneRecord,
        cmd: &str,
        state: InstanceState,
    ) -> Result<(), ProviderError> {
        for inst in rec.instances.iter_mut() {
            let p = self.paths(&rec.name, &inst.system);
            qmp::command(&p.qmp, cmd).map_err(|message| ProviderError::Instance {
                system: inst.system.clone(),
                message,
            })?;
            inst.state = state;
        }
        Ok(())
    }
}

struct InstancePaths {
    overlay: PathBuf,
    pid: PathBuf,
    qmp: PathBuf,
    console: PathBuf,
}

impl Provider for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn console_log(&self, clone: &str, system: &str) -> Option<PathBuf> {
        Some(Local::console_log(self, clone, system))
    }

    fn create(
        &self,
        rec: &mut CloneRecord,
        others: &[CloneRecord],
        ctx: &crate::Ctx<'_>,
    ) -> Result<(), ProviderError> {
        for inst in rec.instances.iter_mut() {
            inst.mac = mac_for(&rec.name, &inst.system);
            inst.state = InstanceState::Booting;
        }
        self.allocate(rec, others)?;
        // Its network and index are known from here: a restart finds what they name.
        (ctx.save)(rec);
        if Path::new("/run/netns").join(&rec.network).exists() {
            return Err(ProviderError::Invalid(format!(
                "network namespace {} exists already: another clone of that name is running",
                rec.network
            )));
        }
        let made = self.create_inner(rec, ctx);
        crate::settle(self, rec, made)
    }

    fn suspend(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        self.qmp_all(rec, "stop", InstanceState::Suspended)?;
        rec.state = clone_state(&rec.instances);
        Ok(())
    }

    fn resume(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        self.observe(rec)?;
        let mut stopped = Vec::new();
        for (n, inst) in rec.instances.clone().iter().enumerate() {
            match inst.state {
                InstanceState::Suspended => {
                    let p = self.paths(&rec.name, &inst.system);
                    qmp::command(&p.qmp, "cont").map_err(|message| ProviderError::Instance {
                        system: inst.system.clone(),
                        message,
                    })?;
                    rec.instances[n].state = InstanceState::Running;
                }
                InstanceState::Stopped | InstanceState::Failed => stopped.push(n),
                _ => {}
            }
        }
        if !stopped.is_empty() {
            if !Path::new("/run/netns").join(&rec.network).exists() {
                return Err(ProviderError::Invalid(format!(
                    "the clone's network {} is gone; terminate the clone and create it again",
                    rec.network
                )));
            }
            self.boot_all(rec, &stopped, None)?;
        }
        self.start_edge(rec)?;
        rec.state = clone_state(&rec.instances);
        Ok(())
    }

    fn terminate(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        let dir = self.clone_dir(&rec.name);
        for inst in &rec.instances {
            let p = self.paths(&rec.name, &inst.system);
            Self::kill(&p.pid, &self.marker(&rec.name, &inst.system));
        }
        Self::kill(&dir.join("dnsmasq.pid"), &dir.display().to_string());
        Self::kill(&dir.join("gateway.pid"), &dir.display().to_string());
        Self::kill(&dir.join("haproxy.pid"), &dir.display().to_string());
        self.placement.remove(&self.netns(&rec.name));
        // Named from the clone, not from the record: a creation cut short by a crash was
        // stored before its network was named.
        let ns = self.netns(&rec.name);
        // The host end of the veth first: deleting it takes its peer along at once. A
        // namespace deleted first takes its links down in the background, so the host
        // end could vanish between a look and its delete, and the bridge keep a port.
        let veth = self.host_veth(rec.index);
        let present = || Path::new("/sys/class/net").join(&veth).exists();
        if rec.index > 0 && present() {
            if let Err(e) = run(Command::new("ip").args(["link", "del", &veth])) {
                if present() {
                    return Err(e.into());
                }
            }
        }
        if Path::new("/run/netns").join(&ns).exists() {
            run(Command::new("ip").args(["netns", "del", &ns]))?;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir)(e)),
        }
        // The host bridge goes with the last clone.
        let br = self.public_bridge();
        let ports = Path::new("/sys/class/net").join(&br).join("brif");
        if std::fs::read_dir(&ports).is_ok_and(|mut d| d.next().is_none()) {
            run(Command::new("ip").args(["link", "del", &br]))?;
        }
        Ok(())
    }

    fn observe(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        let states: Vec<InstanceState> = rec
            .instances
            .iter()
            .map(|i| self.observe_instance(rec, i))
            .collect();
        for (inst, s) in rec.instances.iter_mut().zip(states) {
            inst.state = s;
            if inst.state == InstanceState::Stopped {
                inst.provider_id.clear();
            }
        }
        rec.state = clone_state(&rec.instances);
        Ok(())
    }
}

/// The firmware an instance boots with, from its image.
fn firmware_of(inst: &InstanceRecord) -> image::Firmware {
    if inst.firmware == image::Firmware::Efi {
        image::Firmware::Efi
    } else {
        image::Firmware::Bios
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses_reach_only_their_own_system() {
        let rec = CloneRecord {
            instances: vec![
                InstanceRecord {
                    system: "web".into(),
                    private_ip: "198.18.70.10".into(),
                    public_ip: "198.19.0.2".into(),
                    ..Default::default()
                },
                InstanceRecord {
                    system: "db".into(),
                    private_ip: "198.18.70.20".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let r = Local::nft_rules(&rec);
        assert!(
            r.contains("ip daddr 198.19.0.2 dnat to 198.18.70.10"),
            "{r}"
        );
        assert!(!r.contains("198.18.70.20"), "{r}");
        assert!(r.contains("policy drop"), "{r}");
        assert!(LocalConfig::new("/x".into(), "a-b", DEFAULT_PUBLIC_CIDR).is_err());
        assert!(LocalConfig::new("/x".into(), "ferry", "198.19.0.0/31").is_err());
        let c = LocalConfig::new("/x".into(), "ferry", "198.19.4.7/16").unwrap();
        assert_eq!(c.public_cidr.to_string(), "198.19.0.0/16");
    }
}
