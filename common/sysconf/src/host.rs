//! A system's configuration as the agent's probe reads it, shared by the agent (which
//! makes it) and the cloud manager (which keeps it), and its wire form (`pb::Probe`).
use crate::net::Nic;
use crate::OsInfo;
use ferry_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// What the probe found out about a system.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HostInfo {
    pub hostname: String,
    pub fqdn: String,
    pub os: OsInfo,
    pub kernel: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub nics: Vec<Nic>,
    pub filesystems: Vec<FsInfo>,
    #[serde(default)]
    pub boot: BootInfo,
}

/// How the system boots, so its image can be laid out the same way.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BootInfo {
    /// `efi` or `bios` on the live host; empty for an offline tree.
    pub firmware: String,
    /// `gpt` or `dos`, of the disk that holds "/"; empty when unknown (an offline tree,
    /// a loop or device-mapper device).
    pub partition_table: String,
}

/// A local file system of the system.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FsInfo {
    pub device: String,
    /// Relative to the probed root, always starting with "/".
    pub mount_point: String,
    pub fstype: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    #[serde(default)]
    pub inodes_total: u64,
    #[serde(default)]
    pub inodes_used: u64,
    pub uuid: Option<String>,
    pub label: Option<String>,
}

impl From<HostInfo> for pb::Probe {
    fn from(h: HostInfo) -> Self {
        Self {
            hostname: h.hostname,
            fqdn: h.fqdn,
            os: Some(pb::OsInfo {
                family: h.os.family,
                id: h.os.id,
                version: h.os.version,
                pretty_name: h.os.pretty_name,
            }),
            kernel: h.kernel,
            cpus: h.cpus,
            memory_bytes: h.memory_bytes,
            nics: h
                .nics
                .into_iter()
                .map(|n| pb::Nic {
                    name: n.name,
                    mac: n.mac.unwrap_or_default(),
                    addresses: n.addresses,
                    config: n.config,
                })
                .collect(),
            filesystems: h
                .filesystems
                .into_iter()
                .map(|f| pb::ProbedFs {
                    device: f.device,
                    mount_point: f.mount_point,
                    fstype: f.fstype,
                    capacity_bytes: f.capacity_bytes,
                    used_bytes: f.used_bytes,
                    inodes_total: f.inodes_total,
                    inodes_used: f.inodes_used,
                    uuid: f.uuid.unwrap_or_default(),
                    label: f.label.unwrap_or_default(),
                })
                .collect(),
            boot: Some(pb::BootInfo {
                firmware: h.boot.firmware,
                partition_table: h.boot.partition_table,
            }),
        }
    }
}

fn some(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<pb::Probe> for HostInfo {
    fn from(p: pb::Probe) -> Self {
        let os = p.os.unwrap_or_default();
        let boot = p.boot.unwrap_or_default();
        Self {
            hostname: p.hostname,
            fqdn: p.fqdn,
            os: OsInfo {
                family: os.family,
                id: os.id,
                version: os.version,
                pretty_name: os.pretty_name,
            },
            kernel: p.kernel,
            cpus: p.cpus,
            memory_bytes: p.memory_bytes,
            nics: p
                .nics
                .into_iter()
                .map(|n| Nic {
                    name: n.name,
                    mac: some(n.mac),
                    addresses: n.addresses,
                    config: n.config,
                })
                .collect(),
            filesystems: p
                .filesystems
                .into_iter()
                .map(|f| FsInfo {
                    device: f.device,
                    mount_point: f.mount_point,
                    fstype: f.fstype,
                    capacity_bytes: f.capacity_bytes,
                    used_bytes: f.used_bytes,
                    inodes_total: f.inodes_total,
                    inodes_used: f.inodes_used,
                    uuid: some(f.uuid),
                    label: some(f.label),
                })
                .collect(),
            boot: BootInfo {
                firmware: boot.firmware,
                partition_table: boot.partition_table,
            },
        }
    }
}

impl FsInfo {
    /// Stable id of a file system: its UUID, or a digest of its mount point.
    pub fn id(&self) -> String {
        match &self.uuid {
            Some(u) if !u.is_empty() => u.to_ascii_lowercase(),
            _ => format!(
                "mnt-{}",
                &blake3::hash(self.mount_point.as_bytes()).to_hex()[..16]
            ),
        }
    }
}

impl From<&FsInfo> for pb::FileSystem {
    fn from(f: &FsInfo) -> Self {
        pb::FileSystem {
            fs_id: f.id(),
            mount_point: f.mount_point.as_bytes().to_vec(),
            fstype: f.fstype.clone(),
            capacity_bytes: f.capacity_bytes,
            used_bytes: f.used_bytes,
            inodes_total: f.inodes_total,
            inodes_used: f.inodes_used,
            uuid: f.uuid.clone().unwrap_or_default(),
            label: f.label.clone().unwrap_or_default(),
            device: f.device.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_survives_the_wire() {
        let h = HostInfo {
            hostname: "web01".into(),
            fqdn: "web01.corp".into(),
            os: OsInfo {
                family: "debian".into(),
                id: "debian".into(),
                version: "12".into(),
                pretty_name: "Debian GNU/Linux 12".into(),
            },
            kernel: "6.1.0".into(),
            cpus: 2,
            memory_bytes: 1 << 30,
            nics: vec![Nic {
                name: "eth0".into(),
                mac: Some("52:54:00:00:00:01".into()),
                addresses: vec!["10.0.0.5/24".into()],
                config: "static".into(),
            }],
            filesystems: vec![FsInfo {
                device: "/dev/vda1".into(),
                mount_point: "/".into(),
                fstype: "ext4".into(),
                uuid: Some("u".into()),
                ..Default::default()
            }],
            boot: BootInfo {
                firmware: "bios".into(),
                partition_table: "dos".into(),
            },
        };
        assert_eq!(HostInfo::from(pb::Probe::from(h.clone())), h);
    }
}
