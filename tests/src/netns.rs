//! Network namespaces and veth links for tests, with addresses from 198.18.0.0/15 only;
//! everything is removed on drop.
use crate::bash;
use anyhow::Result;
use std::process::Command;

/// A network namespace with its loopback up.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("ferry-{tag}-{}", std::process::id());
        bash(&format!(
            "ip netns del {name} 2>/dev/null || true
             ip netns add {name}
             ip netns exec {name} ip link set lo up"
        ))?;
        Ok(Self { name })
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// A bash script run inside the namespace; fails with its stderr.
    pub fn bash(&self, script: &str) -> Result<String> {
        crate::sh(self.cmd("bash").arg("-euc").arg(script))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = bash(&format!("ip netns del {} 2>/dev/null || true", self.name));
    }
}

/// A veth pair between two namespaces (`None` is the test's own), each end with its
/// /24 address. Returns the two interface names; they go away with their namespaces
/// (the caller deletes an end left in its own namespace).
pub fn veth(
    tag: &str,
    a: Option<&Netns>,
    a_ip: &str,
    b: Option<&Netns>,
    b_ip: &str,
) -> Result<(String, String)> {
    let id = std::process::id() % 100_000;
    let (ia, ib) = (format!("{tag}a{id}"), format!("{tag}b{id}"));
    let into = |n: Option<&Netns>, i: &str| match n {
        Some(n) => format!("ip link set {i} netns {}", n.name),
        None => String::new(),
    };
    let exec = |n: Option<&Netns>| match n {
        Some(n) => format!("ip netns exec {} ", n.name),
        None => String::new(),
    };
    bash(&format!(
        "ip link add {ia} type veth peer name {ib}
         {}
         {}
         {ea}ip addr add {a_ip}/24 dev {ia}
         {ea}ip link set {ia} up
         {eb}ip addr add {b_ip}/24 dev {ib}
         {eb}ip link set {ib} up",
        into(a, &ia),
        into(b, &ib),
        ea = exec(a),
        eb = exec(b),
    ))?;
    Ok((ia, ib))
}
