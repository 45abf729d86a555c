//! The aws provider. Images: the boot-checked disk goes into an EBS snapshot through the
//! EBS direct APIs, sending only the 512 KiB blocks that differ from the parent snapshot
//! (the previous image of the same system), then `RegisterImage`. Clones: a VPC with the
//! enterprise range, its subnets, a private and a public security group, one instance
//! per system at its enterprise address, an Elastic IP per public system and an NLB for
//! the load balancer option; the tunnel gateway's port on the public system that carries
//! it. Launched into the operator's VPC instead (`--network`), a clone uses the subnets
//! there that have its enterprise ranges exactly and makes the rest. Every resource made
//! is tagged `ferry:clone`, and teardown finds them by tag (never the operator's VPC,
//! subnets or gateway), so a creation cut short leaves nothing behind once cleaned up.
//! Credentials, region and endpoint come from the default AWS chain.
use aws_sdk_ec2::types as ec2t;
use aws_sdk_elasticloadbalancingv2::types as elbt;
use ferry_provider::records::{
    CloneRecord, Firmware, ImageRecord, InstanceRecord, InstanceState, Visibility,
};
use ferry_provider::{holds, CloudApi, ProviderError};
use futures::StreamExt;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// The EBS direct APIs' block size.
pub const BLOCK: usize = 512 * 1024;
const TAG_CLONE: &str = "ferry:clone";
/// On everything Ferry makes, so its IAM policy can confine it to its own resources.
const TAG_MANAGED: &str = "ferry:managed";
const TAG_IMAGE: &str = "ferry:image";
/// Uploads in flight.
const PARALLEL: usize = 8;

#[derive(Debug, Clone)]
pub struct Aws {
    ec2: aws_sdk_ec2::Client,
    ebs: aws_sdk_ebs::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    instance_type: String,
    rt: tokio::runtime::Handle,
}

fn api<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> ProviderError {
    move |e| ProviderError::Api {
        call: what,
        message: e.to_string(),
    }
}

fn sdk_err<E, R>(what: &'static str) -> impl Fn(aws_sdk_ec2::error::SdkError<E, R>) -> ProviderError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    move |e| ProviderError::Api {
        call: what,
        message: format!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)),
    }
}

/// A deletion's outcome where what is gone already counts as deleted.
fn gone_is_fine<T>(r: Result<T, ProviderError>) -> Result<(), ProviderError> {
    match r {
        Err(e) if !e.to_string().contains("NotFound") => Err(e),
        _ => Ok(()),
    }
}

/// General-purpose instance types, smallest first: (name, vCPUs, GiB).
const SIZES: &[(&str, u32, u64)] = &[
    ("t3.small", 2, 2),
    ("t3.medium", 2, 4),
    ("t3.large", 2, 8),
    ("t3.xlarge", 4, 16),
    ("t3.2xlarge", 8, 32),
    ("m5.4xlarge", 16, 64),
    ("m5.8xlarge", 32, 128),
    ("m5.12xlarge", 48, 192),
    ("m5.16xlarge", 64, 256),
    ("m5.24xlarge", 96, 384),
];

/// The smallest instance type with at least the source's CPUs and memory.
pub fn instance_type_for(cpus: u32, memory_bytes: u64) -> &'static str {
    ferry_provider::size_for(SIZES, cpus, memory_bytes)
}

/// The base of the clone's load balancer and target group names: ELBv2 names hold at
/// most 32 characters, so a long clone name is replaced by its hash (the tags keep it).
pub fn elb_base(clone: &str) -> String {
    let plain = format!("ferry-{clone}");
    if plain.len() + 6 <= 32 {
        plain
    } else {
        format!("ferry-{}", &blake3::hash(clone.as_bytes()).to_hex()[..16])
    }
}

fn tag(key: &str, value: &str) -> ec2t::Tag {
    ec2t::Tag::builder().key(key).value(value).build()
}

fn elb_tag(key: &str, value: &str) -> elbt::Tag {
    elbt::Tag::builder().key(key).value(value).build()
}

fn tags(kind: ec2t::ResourceType, clone: &str) -> ec2t::TagSpecification {
    ec2t::TagSpecification::builder()
        .resource_type(kind)
        .tags(tag(TAG_CLONE, clone))
        .tags(tag(TAG_MANAGED, "true"))
        .tags(tag("Name", &format!("ferry-{clone}")))
        .build()
}

/// A clone's security groups: its private systems', and each public system's own.
#[derive(Debug)]
struct SecurityGroups {
    private: String,
    public: Vec<(String, String)>,
}

impl SecurityGroups {
    /// The group of `system` (the private one unless it is public).
    fn of(&self, system: &str) -> &str {
        self.public
            .iter()
            .find(|(s, _)| s == system)
            .map_or(self.private.as_str(), |(_, g)| g.as_str())
    }
}

/// Whether EC2 reports the instance terminated.
fn is_terminated(i: &ec2t::Instance) -> bool {
    i.state().and_then(|s| s.name()) == Some(&ec2t::InstanceStateName::Terminated)
}

fn by_clone(clone: &str) -> ec2t::Filter {
    ec2t::Filter::builder()
        .name(format!("tag:{TAG_CLONE}"))
        .values(clone)
        .build()
}

/// The smallest range holding every subnet, which the VPC gets (AWS allows /16 to /28).
pub fn vpc_cidr(subnets: &[(ipnet::Ipv4Net, std::net::Ipv4Addr)]) -> Result<String, ProviderError> {
    Ok(ferry_provider::covering_cidr(subnets, 16, "VPC")?.to_string())
}

/// The blocks of a raw disk that must be sent: those that differ from the parent's
/// (by BLAKE3), or without a parent those that are not all zero. Returns each block's
/// hash (for the next image's comparison) and the indexes to send.
pub fn changed_blocks(
    raw: &Path,
    parent: Option<&[[u8; 32]]>,
) -> std::io::Result<(Vec<[u8; 32]>, Vec<usize>)> {
    let mut f = std::fs::File::open(raw)?;
    let mut buf = vec![0u8; BLOCK];
    let zero = *blake3::hash(&vec![0u8; BLOCK]).as_bytes();
    let (mut hashes, mut send) = (Vec::new(), Vec::new());
    loop {
        let mut n = 0;
        while n < BLOCK {
            let r = f.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        buf[n..].fill(0);
        let h = *blake3::hash(&buf).as_bytes();
        let i = hashes.len();
        let differs = match parent {
            Some(p) => p.get(i).copied().unwrap_or(zero) != h,
            None => h != zero,
        };
        if differs {
            send.push(i);
        }
        hashes.push(h);
        if n < BLOCK {
            break;
        }
    }
    Ok((hashes, send))
}

fn read_hashes(path: &Path) -> Option<Vec<[u8; 32]>> {
    let bytes = std::fs::read(path).ok()?;
    Some(
        bytes
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect(),
    )
}

impl Aws {
    /// Loads the default AWS configuration (environment, profile, instance role).
    pub async fn load() -> Self {
        use aws_smithy_http_client::tls;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .load()
            .await;
        tracing::info!(region = ?conf.region(), "aws provider configured from the default chain");
        Self {
            ec2: aws_sdk_ec2::Client::new(&conf),
            ebs: aws_sdk_ebs::Client::new(&conf),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&conf),
            instance_type: std::env::var("FERRY_AWS_INSTANCE_TYPE")
                .unwrap_or_else(|_| "t3.small".into()),
            rt: tokio::runtime::Handle::current(),
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Uploads `img`'s disk into an EBS snapshot (incrementally from `parent` when it has
    /// one of the same size) and registers an AMI. Fills the record's provider fields.
    pub fn register_image(
        &self,
        img: &mut ImageRecord,
        parent: Option<&ImageRecord>,
    ) -> Result<(), ProviderError> {
        let qcow = Path::new(&img.path);
        let raw = qcow.with_extension("raw");
        ferry_common::cmd::run(
            std::process::Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(qcow)
                .arg(&raw),
        )?;
        let r = self.block_on(self.upload_and_register(img, parent, &raw));
        let _ = std::fs::remove_file(&raw);
        r
    }

    async fn upload_and_register(
        &self,
        img: &mut ImageRecord,
        parent: Option<&ImageRecord>,
        raw: &Path,
    ) -> Result<(), ProviderError> {
        let gib = img.virtual_bytes.div_ceil(1 << 30).max(1);
        let parent = parent.filter(|p| {
            !p.provider_snapshot.is_empty() && p.virtual_bytes.div_ceil(1 << 30).max(1) <= gib
        });
        let parent_hashes =
            parent.and_then(|p| read_hashes(&Path::new(&p.path).with_extension("blocks")));
        // Without the parent's block list, send everything (as a first image).
        let parent = parent.filter(|_| parent_hashes.is_some());
        let (hashes, send) =
            changed_blocks(raw, parent_hashes.as_deref()).map_err(|e| ProviderError::Io {
                path: raw.display().to_string(),
                source: e,
            })?;
        let started = self
            .ebs
            .start_snapshot()
            .volume_size(gib as i64)
            .set_parent_snapshot_id(parent.map(|p| p.provider_snapshot.clone()))
            .description(format!("ferry image {}", img.id))
            .tags(
                aws_sdk_ebs::types::Tag::builder()
                    .key(TAG_IMAGE)
                    .value(&img.id)
                    .build(),
            )
            .tags(
                aws_sdk_ebs::types::Tag::builder()
                    .key(TAG_MANAGED)
                    .value("true")
                    .build(),
            )
            .timeout(60)
            .send()
            .await
            .map_err(|e| ProviderError::Api {
                call: "StartSnapshot",
                message: format!("{}", aws_sdk_ebs::error::DisplayErrorContext(&e)),
            })?;
        let snapshot = started.snapshot_id().unwrap_or_default().to_string();
        let sent = futures::stream::iter(send.iter().copied())
            .map(|i| self.put_block(&snapshot, raw, i))
            .buffer_unordered(PARALLEL)
            .collect::<Vec<_>>()
            .await;
        if let Some(e) = sent.into_iter().find_map(Result::err) {
            // An unfinished snapshot is of no use: AWS deletes it after its timeout, and
            // it is never registered.
            self.discard_snapshot(&snapshot).await;
            return Err(e);
        }
        self.ebs
            .complete_snapshot()
            .snapshot_id(&snapshot)
            .changed_blocks_count(send.len() as i32)
            .send()
            .await
            .map_err(|e| ProviderError::Api {
                call: "CompleteSnapshot",
                message: format!("{}", aws_sdk_ebs::error::DisplayErrorContext(&e)),
            })?;
        let ami = self.register_ami(img, &snapshot).await?;
        let blocks_path = Path::new(&img.path).with_extension("blocks");
        std::fs::write(&blocks_path, hashes.concat()).map_err(|e| ProviderError::Io {
            path: blocks_path.display().to_string(),
            source: e,
        })?;
        img.provider_image = ami;
        img.provider_snapshot = snapshot;
        img.parent_snapshot = parent
            .map(|p| p.provider_snapshot.clone())
            .unwrap_or_default();
        img.uploaded_bytes = (send.len() * BLOCK) as u64;
        tracing::info!(image = %img.id, ami = %img.provider_image, snapshot = %img.provider_snapshot,
            blocks = send.len(), of = hashes.len(), parent = %img.parent_snapshot, "image registered on aws");
        Ok(())
    }

    /// Registers an AMI booting from `snapshot`; the snapshot is deleted if that fails.
    async fn register_ami(
        &self,
        img: &ImageRecord,
        snapshot: &str,
    ) -> Result<String, ProviderError> {
        let registered = self
            .ec2
            .register_image()
            .name(format!("ferry-{}", img.id))
            .description(format!("ferry image {} (system {})", img.id, img.system))
            .tag_specifications(
                ec2t::TagSpecification::builder()
                    .resource_type(ec2t::ResourceType::Image)
                    .tags(tag(TAG_IMAGE, &img.id))
                    .tags(tag(TAG_MANAGED, "true"))
                    .build(),
            )
            .architecture(ec2t::ArchitectureValues::X8664)
            .virtualization_type("hvm")
            .root_device_name("/dev/xvda")
            .ena_support(true)
            .boot_mode(if img.firmware == Firmware::Efi {
                ec2t::BootModeValues::Uefi
            } else {
                ec2t::BootModeValues::LegacyBios
            })
            .block_device_mappings(
                ec2t::BlockDeviceMapping::builder()
                    .device_name("/dev/xvda")
                    .ebs(
                        ec2t::EbsBlockDevice::builder()
                            .snapshot_id(snapshot)
                            .volume_type(ec2t::VolumeType::Gp3)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await;
        match registered {
            Ok(r) => Ok(r.image_id().unwrap_or_default().to_string()),
            Err(e) => {
                self.discard_snapshot(snapshot).await;
                Err(sdk_err("RegisterImage")(e))
            }
        }
    }

    /// Deletes a snapshot that will never be registered; failing to is left to AWS.
    async fn discard_snapshot(&self, snapshot: &str) {
        let _ = self
            .ec2
            .delete_snapshot()
            .snapshot_id(snapshot)
            .send()
            .await;
    }

    async fn put_block(
        &self,
        snapshot: &str,
        raw: &Path,
        index: usize,
    ) -> Result<(), ProviderError> {
        let mut data = vec![0u8; BLOCK];
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(raw).map_err(|e| ProviderError::Io {
                path: raw.display().to_string(),
                source: e,
            })?;
            let mut n = 0;
            while n < BLOCK {
                match f.read_at(&mut data[n..], (index * BLOCK + n) as u64) {
                    Ok(0) => break,
                    Ok(r) => n += r,
                    Err(e) => {
                        return Err(ProviderError::Io {
                            path: raw.display().to_string(),
                            source: e,
                        })
                    }
                }
            }
        }
        use base64::Engine;
        use sha2::Digest;
        let checksum =
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&data));
        self.ebs
            .put_snapshot_block()
            .snapshot_id(snapshot)
            .block_index(index as i32)
            .data_length(BLOCK as i32)
            .checksum(checksum)
            .checksum_algorithm(aws_sdk_ebs::types::ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .block_data(aws_sdk_ebs::primitives::ByteStream::from(data))
            .send()
            .await
            .map_err(|e| ProviderError::Api {
                call: "PutSnapshotBlock",
                message: format!("{}", aws_sdk_ebs::error::DisplayErrorContext(&e)),
            })?;
        Ok(())
    }

    /// Deregisters an image's AMI and deletes its snapshot; what is gone already is fine.
    pub fn deregister_image(&self, img: &ImageRecord) -> Result<(), ProviderError> {
        self.block_on(async {
            if !img.provider_image.is_empty() {
                gone_is_fine(
                    self.ec2
                        .deregister_image()
                        .image_id(&img.provider_image)
                        .send()
                        .await
                        .map_err(sdk_err("DeregisterImage")),
                )?;
            }
            if !img.provider_snapshot.is_empty() {
                gone_is_fine(
                    self.ec2
                        .delete_snapshot()
                        .snapshot_id(&img.provider_snapshot)
                        .send()
                        .await
                        .map_err(sdk_err("DeleteSnapshot")),
                )?;
            }
            Ok(())
        })
    }

    async fn create_async(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        let name = rec.name.clone();
        let cidr = vpc_cidr(&rec.subnets)?;
        let own = rec.existing_network.is_empty();
        let vpc = if !own {
            self.existing_vpc(&rec.existing_network, &rec.subnets)
                .await?
        } else {
            self.ec2
                .create_vpc()
                .cidr_block(&cidr)
                .tag_specifications(tags(ec2t::ResourceType::Vpc, &name))
                .send()
                .await
                .map_err(sdk_err("CreateVpc"))?
                .vpc()
                .and_then(|v| v.vpc_id())
                .unwrap_or_default()
                .to_string()
        };
        rec.network = vpc.clone();
        let mut subnet_of = Vec::new();
        // The operator's own subnets, used where one has an enterprise range exactly.
        let mut theirs = Vec::new();
        for (sn, _) in &rec.subnets {
            if !own {
                if let Some(id) = self.existing_subnet(&name, &vpc, sn).await? {
                    theirs.push(id.clone());
                    subnet_of.push((*sn, id));
                    continue;
                }
            }
            let id = self
                .ec2
                .create_subnet()
                .vpc_id(&vpc)
                .cidr_block(sn.to_string())
                .tag_specifications(tags(ec2t::ResourceType::Subnet, &name))
                .send()
                .await
                .map_err(sdk_err("CreateSubnet"))?
                .subnet()
                .and_then(|s| s.subnet_id())
                .unwrap_or_default()
                .to_string();
            subnet_of.push((*sn, id));
        }
        let public = rec
            .instances
            .iter()
            .any(|i| i.visibility == Visibility::Public);
        if public && own {
            self.route_to_internet(&name, &vpc).await?;
        } else if public {
            let made: Vec<String> = subnet_of
                .iter()
                .map(|(_, id)| id.clone())
                .filter(|id| !theirs.contains(id))
                .collect();
            self.route_made_subnets(&name, &vpc, &made).await?;
            for inst in rec
                .instances
                .iter()
                .filter(|i| i.visibility == Visibility::Public)
            {
                if let Some((_, id)) = subnet_of
                    .iter()
                    .find(|(net, id)| holds(net, &inst.private_ip) && theirs.contains(id))
                {
                    rec.warnings.push(format!(
                        "public system {} is in your subnet {id}: its route table decides whether the internet reaches it",
                        inst.system
                    ));
                }
            }
        }
        let groups = self.create_security_groups(rec, &vpc, &cidr).await?;
        if public && rec.allow_from.is_empty() {
            rec.warnings.push(
                "the public systems accept nothing from outside the clone's network: the app names no --allow-from".into(),
            );
        }
        for inst in rec.instances.iter_mut() {
            let subnet = rec
                .subnets
                .iter()
                .zip(&subnet_of)
                .find(|((net, _), _)| holds(net, &inst.private_ip))
                .map(|(_, (_, id))| id.clone())
                .unwrap_or_default();
            self.run_instance(&name, &rec.instance_type, &subnet, &groups, inst)
                .await?;
        }
        ferry_provider::wait_states(self, rec, &[InstanceState::Running]).await?;
        for inst in rec
            .instances
            .iter_mut()
            .filter(|i| i.visibility == Visibility::Public)
        {
            let eip = self
                .ec2
                .allocate_address()
                .domain(ec2t::DomainType::Vpc)
                .tag_specifications(tags(ec2t::ResourceType::ElasticIp, &name))
                .send()
                .await
                .map_err(sdk_err("AllocateAddress"))?;
            self.ec2
                .associate_address()
                .set_allocation_id(eip.allocation_id().map(str::to_string))
                .instance_id(&inst.provider_id)
                .send()
                .await
                .map_err(sdk_err("AssociateAddress"))?;
            inst.public_ip = eip.public_ip().unwrap_or_default().to_string();
        }
        if !rec.load_balancer_ports.is_empty() {
            self.create_load_balancer(rec, &vpc, &subnet_of).await?;
        }
        Ok(())
    }

    /// The operator's VPC, which must hold every enterprise subnet in one of its ranges.
    async fn existing_vpc(
        &self,
        vpc: &str,
        subnets: &[(ipnet::Ipv4Net, std::net::Ipv4Addr)],
    ) -> Result<String, ProviderError> {
        let found = self
            .ec2
            .describe_vpcs()
            .vpc_ids(vpc)
            .send()
            .await
            .map_err(sdk_err("DescribeVpcs"))?;
        let v = found.vpcs().first().ok_or_else(|| {
            ProviderError::Invalid(format!("no VPC {vpc} in this account and region"))
        })?;
        let ranges: Vec<ipnet::Ipv4Net> = v
            .cidr_block_association_set()
            .iter()
            .filter(|a| {
                a.cidr_block_state()
                    .and_then(|s| s.state())
                    .is_none_or(|s| *s == ec2t::VpcCidrBlockStateCode::Associated)
            })
            .filter_map(|a| a.cidr_block()?.parse().ok())
            .chain(v.cidr_block().and_then(|c| c.parse().ok()))
            .collect();
        for (sn, _) in subnets {
            if !ranges.iter().any(|r| r.contains(sn)) {
                let have: Vec<String> = ranges.iter().map(ToString::to_string).collect();
                return Err(ProviderError::Invalid(format!(
                    "the enterprise subnet {sn} is outside {vpc} ({}): add it to the VPC as a CIDR block, or launch without --network",
                    have.join(", ")
                )));
            }
        }
        Ok(vpc.to_string())
    }

    /// The operator's subnet of exactly `net` in `vpc`, if there is one; one that
    /// another clone made is refused (two clones at the same addresses in one VPC).
    async fn existing_subnet(
        &self,
        name: &str,
        vpc: &str,
        net: &ipnet::Ipv4Net,
    ) -> Result<Option<String>, ProviderError> {
        let found = self
            .ec2
            .describe_subnets()
            .filters(ec2t::Filter::builder().name("vpc-id").values(vpc).build())
            .filters(
                ec2t::Filter::builder()
                    .name("cidr-block")
                    .values(net.to_string())
                    .build(),
            )
            .send()
            .await
            .map_err(sdk_err("DescribeSubnets"))?;
        let Some(sub) = found.subnets().first() else {
            return Ok(None);
        };
        let id = sub.subnet_id().unwrap_or_default().to_string();
        if let Some(other) = sub
            .tags()
            .iter()
            .find(|t| t.key() == Some(TAG_CLONE))
            .and_then(|t| t.value())
            .filter(|o| *o != name)
        {
            return Err(ProviderError::Invalid(format!(
                "subnet {id} ({net}) in {vpc} is clone {other}'s: two clones at the same addresses cannot share a VPC"
            )));
        }
        Ok(Some(id))
    }

    /// In the operator's VPC: the subnets the clone made get a route table of their own
    /// with the default route through the VPC's internet gateway (its main table and
    /// its gateway stay as they are).
    async fn route_made_subnets(
        &self,
        name: &str,
        vpc: &str,
        made: &[String],
    ) -> Result<(), ProviderError> {
        if made.is_empty() {
            return Ok(());
        }
        let igw = self
            .internet_gateways(vpc)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                ProviderError::Invalid(format!(
                    "{vpc} has no internet gateway, so its public systems could not be reached: attach one, or launch without --network"
                ))
            })?;
        let rt = self
            .ec2
            .create_route_table()
            .vpc_id(vpc)
            .tag_specifications(tags(ec2t::ResourceType::RouteTable, name))
            .send()
            .await
            .map_err(sdk_err("CreateRouteTable"))?
            .route_table()
            .and_then(|t| t.route_table_id())
            .unwrap_or_default()
            .to_string();
        self.ec2
            .create_route()
            .route_table_id(&rt)
            .destination_cidr_block("0.0.0.0/0")
            .gateway_id(&igw)
            .send()
            .await
            .map_err(sdk_err("CreateRoute"))?;
        for subnet in made {
            self.ec2
                .associate_route_table()
                .route_table_id(&rt)
                .subnet_id(subnet)
                .send()
                .await
                .map_err(sdk_err("AssociateRouteTable"))?;
        }
        Ok(())
    }

    /// The internet gateways attached to a VPC.
    async fn internet_gateways(&self, vpc: &str) -> Result<Vec<String>, ProviderError> {
        let igws = self
            .ec2
            .describe_internet_gateways()
            .filters(
                ec2t::Filter::builder()
                    .name("attachment.vpc-id")
                    .values(vpc)
                    .build(),
            )
            .send()
            .await
            .map_err(sdk_err("DescribeInternetGateways"))?;
        Ok(igws
            .internet_gateways()
            .iter()
            .filter_map(|g| g.internet_gateway_id().map(str::to_string))
            .collect())
    }

    /// An internet gateway for the VPC, and the default route through it.
    async fn route_to_internet(&self, name: &str, vpc: &str) -> Result<(), ProviderError> {
        let igw = self
            .ec2
            .create_internet_gateway()
            .tag_specifications(tags(ec2t::ResourceType::InternetGateway, name))
            .send()
            .await
            .map_err(sdk_err("CreateInternetGateway"))?
            .internet_gateway()
            .and_then(|g| g.internet_gateway_id())
            .unwrap_or_default()
            .to_string();
        self.ec2
            .attach_internet_gateway()
            .internet_gateway_id(&igw)
            .vpc_id(vpc)
            .send()
            .await
            .map_err(sdk_err("AttachInternetGateway"))?;
        let tables = self
            .ec2
            .describe_route_tables()
            .filters(ec2t::Filter::builder().name("vpc-id").values(vpc).build())
            .send()
            .await
            .map_err(sdk_err("DescribeRouteTables"))?;
        if let Some(rt) = tables
            .route_tables()
            .first()
            .and_then(|t| t.route_table_id())
        {
            self.ec2
                .create_route()
                .route_table_id(rt)
                .destination_cidr_block("0.0.0.0/0")
                .gateway_id(&igw)
                .send()
                .await
                .map_err(sdk_err("CreateRoute"))?;
        }
        Ok(())
    }

    /// The clone's security groups: one for its private systems (the clone's network
    /// only), and one per public system that also opens that system's ports (the app's,
    /// its own, the load balancer's) to the app's `allow_from` CIDRs, and nothing else.
    async fn create_security_groups(
        &self,
        rec: &CloneRecord,
        vpc: &str,
        cidr: &str,
    ) -> Result<SecurityGroups, ProviderError> {
        let name = &rec.name;
        let private = self
            .security_group(name, vpc, "private", "private systems", &[(cidr, None)])
            .await?;
        let mut public = Vec::new();
        for inst in rec
            .instances
            .iter()
            .filter(|i| i.visibility == Visibility::Public)
        {
            let mut rules: Vec<(&str, Option<(u16, bool)>)> = vec![(cidr, None)];
            for port in rec.ports_for(&inst.system) {
                for from in &rec.allow_from {
                    rules.push((from.as_str(), Some(port)));
                }
            }
            let kind = format!("public-{}", inst.system);
            let what = format!("public system {}", inst.system);
            let gid = self.security_group(name, vpc, &kind, &what, &rules).await?;
            public.push((inst.system.clone(), gid));
        }
        Ok(SecurityGroups { private, public })
    }

    /// One security group admitting each rule's traffic: from a CIDR, every protocol
    /// (`None`) or one port, TCP or UDP.
    async fn security_group(
        &self,
        name: &str,
        vpc: &str,
        kind: &str,
        what: &str,
        rules: &[(&str, Option<(u16, bool)>)],
    ) -> Result<String, ProviderError> {
        let gid = self
            .ec2
            .create_security_group()
            .group_name(format!("ferry-{name}-{kind}"))
            .description(format!("ferry clone {name}: {what}"))
            .vpc_id(vpc)
            .tag_specifications(tags(ec2t::ResourceType::SecurityGroup, name))
            .send()
            .await
            .map_err(sdk_err("CreateSecurityGroup"))?
            .group_id()
            .unwrap_or_default()
            .to_string();
        let perms = rules.iter().map(|(from, port)| {
            let range = ec2t::IpRange::builder().cidr_ip(*from).build();
            let perm = ec2t::IpPermission::builder().ip_ranges(range);
            match port {
                None => perm.ip_protocol("-1"),
                Some((p, udp)) => perm
                    .ip_protocol(if *udp { "udp" } else { "tcp" })
                    .from_port(i32::from(*p))
                    .to_port(i32::from(*p)),
            }
            .build()
        });
        self.ec2
            .authorize_security_group_ingress()
            .group_id(&gid)
            .set_ip_permissions(Some(perms.collect()))
            .send()
            .await
            .map_err(sdk_err("AuthorizeSecurityGroupIngress"))?;
        Ok(gid)
    }

    /// One system's instance in `subnet`, sized as asked or from its source.
    async fn run_instance(
        &self,
        name: &str,
        instance_type: &str,
        subnet: &str,
        groups: &SecurityGroups,
        inst: &mut InstanceRecord,
    ) -> Result<(), ProviderError> {
        inst.size = if !instance_type.is_empty() {
            instance_type.to_string()
        } else if inst.source_cpus > 0 && inst.source_memory_bytes > 0 {
            instance_type_for(inst.source_cpus, inst.source_memory_bytes).to_string()
        } else {
            self.instance_type.clone()
        };
        let group = groups.of(&inst.system);
        let run = self
            .ec2
            .run_instances()
            .image_id(&inst.provider_image)
            .instance_type(ec2t::InstanceType::from(inst.size.as_str()))
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet)
            .private_ip_address(&inst.private_ip)
            .security_group_ids(group)
            .tag_specifications(tags(ec2t::ResourceType::Instance, name))
            .send()
            .await
            .map_err(|e| ProviderError::Instance {
                system: inst.system.clone(),
                message: sdk_err("RunInstances")(e).to_string(),
            })?;
        inst.provider_id = run
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .unwrap_or_default()
            .to_string();
        inst.accel = "aws".into();
        inst.mac.clear();
        Ok(())
    }

    async fn create_load_balancer(
        &self,
        rec: &mut CloneRecord,
        vpc: &str,
        subnets: &[(ipnet::Ipv4Net, String)],
    ) -> Result<(), ProviderError> {
        let lb = self
            .elb
            .create_load_balancer()
            .name(elb_base(&rec.name))
            .r#type(elbt::LoadBalancerTypeEnum::Network)
            .scheme(elbt::LoadBalancerSchemeEnum::InternetFacing)
            .set_subnets(Some(subnets.iter().map(|(_, id)| id.clone()).collect()))
            .tags(elb_tag(TAG_CLONE, &rec.name))
            .tags(elb_tag(TAG_MANAGED, "true"))
            .send()
            .await
            .map_err(api("CreateLoadBalancer"))?;
        let lb = lb
            .load_balancers()
            .first()
            .cloned()
            .unwrap_or_else(|| elbt::LoadBalancer::builder().build());
        let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
        for port in rec.load_balancer_ports.clone() {
            let tg = self
                .elb
                .create_target_group()
                .name(format!("{}-{port}", elb_base(&rec.name)))
                .protocol(elbt::ProtocolEnum::Tcp)
                .port(i32::from(port))
                .vpc_id(vpc)
                .target_type(elbt::TargetTypeEnum::Instance)
                .tags(elb_tag(TAG_CLONE, &rec.name))
                .tags(elb_tag(TAG_MANAGED, "true"))
                .send()
                .await
                .map_err(api("CreateTargetGroup"))?;
            let tg_arn = tg
                .target_groups()
                .first()
                .and_then(|t| t.target_group_arn())
                .unwrap_or_default()
                .to_string();
            let mut reg = self.elb.register_targets().target_group_arn(&tg_arn);
            for i in rec
                .instances
                .iter()
                .filter(|i| i.visibility == Visibility::Public)
            {
                reg = reg.targets(
                    elbt::TargetDescription::builder()
                        .id(&i.provider_id)
                        .port(i32::from(port))
                        .build(),
                );
            }
            reg.send().await.map_err(api("RegisterTargets"))?;
            self.elb
                .create_listener()
                .load_balancer_arn(&lb_arn)
                .protocol(elbt::ProtocolEnum::Tcp)
                .port(i32::from(port))
                .default_actions(
                    elbt::Action::builder()
                        .r#type(elbt::ActionTypeEnum::Forward)
                        .target_group_arn(&tg_arn)
                        .build(),
                )
                .send()
                .await
                .map_err(api("CreateListener"))?;
        }
        rec.load_balancer_ip = lb.dns_name().unwrap_or_default().to_string();
        Ok(())
    }

    /// Each instance's state by its id (`stopped` when the provider no longer has it).
    async fn instance_states(
        &self,
        rec: &CloneRecord,
    ) -> Result<Vec<InstanceState>, ProviderError> {
        let ids: Vec<String> = rec
            .instances
            .iter()
            .map(|i| i.provider_id.clone())
            .filter(|i| !i.is_empty())
            .collect();
        let mut found = std::collections::HashMap::new();
        if !ids.is_empty() {
            let d = self
                .ec2
                .describe_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
                .map_err(sdk_err("DescribeInstances"))?;
            for i in d.reservations().iter().flat_map(|r| r.instances()) {
                let state = match i.state().and_then(|s| s.name()) {
                    Some(ec2t::InstanceStateName::Running) => InstanceState::Running,
                    Some(ec2t::InstanceStateName::Pending) => InstanceState::Booting,
                    Some(ec2t::InstanceStateName::Stopped | ec2t::InstanceStateName::Stopping) => {
                        InstanceState::Suspended
                    }
                    _ => InstanceState::Stopped,
                };
                found.insert(i.instance_id().unwrap_or_default().to_string(), state);
            }
        }
        Ok(rec
            .instances
            .iter()
            .map(|i| {
                found
                    .get(&i.provider_id)
                    .copied()
                    .unwrap_or(InstanceState::Stopped)
            })
            .collect())
    }

    /// Starts (resume) or stops (suspend) every instance.
    async fn start_stop(&self, rec: &CloneRecord, on: bool) -> Result<(), ProviderError> {
        let ids: Vec<String> = rec
            .instances
            .iter()
            .map(|i| i.provider_id.clone())
            .collect();
        if on {
            self.ec2
                .start_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
                .map_err(sdk_err("StartInstances"))?;
        } else {
            self.ec2
                .stop_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
                .map_err(sdk_err("StopInstances"))?;
        }
        Ok(())
    }

    async fn terminate_async(&self, name: &str) -> Result<(), ProviderError> {
        self.delete_load_balancer(name).await?;
        self.release_addresses(name).await?;
        self.terminate_instances(name).await?;
        self.delete_tagged(name).await?;
        let vpcs = self
            .ec2
            .describe_vpcs()
            .filters(by_clone(name))
            .send()
            .await
            .map_err(sdk_err("DescribeVpcs"))?;
        for vpc in vpcs.vpcs() {
            self.delete_vpc(vpc.vpc_id().unwrap_or_default()).await?;
        }
        Ok(())
    }

    /// The load balancer and its target groups, by name.
    async fn delete_load_balancer(&self, name: &str) -> Result<(), ProviderError> {
        if let Ok(lbs) = self
            .elb
            .describe_load_balancers()
            .names(elb_base(name))
            .send()
            .await
        {
            for lb in lbs.load_balancers() {
                let arn = lb.load_balancer_arn().unwrap_or_default();
                self.elb
                    .delete_load_balancer()
                    .load_balancer_arn(arn)
                    .send()
                    .await
                    .map_err(api("DeleteLoadBalancer"))?;
            }
        }
        if let Ok(tgs) = self.elb.describe_target_groups().send().await {
            for tg in tgs.target_groups() {
                let n = tg.target_group_name().unwrap_or_default();
                if n.strip_prefix(&format!("{}-", elb_base(name)))
                    .is_some_and(|p| p.parse::<u16>().is_ok())
                {
                    self.elb
                        .delete_target_group()
                        .target_group_arn(tg.target_group_arn().unwrap_or_default())
                        .send()
                        .await
                        .map_err(api("DeleteTargetGroup"))?;
                }
            }
        }
        Ok(())
    }

    /// The clone's elastic IPs, detached first.
    async fn release_addresses(&self, name: &str) -> Result<(), ProviderError> {
        let addrs = self
            .ec2
            .describe_addresses()
            .filters(by_clone(name))
            .send()
            .await
            .map_err(sdk_err("DescribeAddresses"))?;
        for a in addrs.addresses() {
            if let Some(assoc) = a.association_id() {
                self.ec2
                    .disassociate_address()
                    .association_id(assoc)
                    .send()
                    .await
                    .map_err(sdk_err("DisassociateAddress"))?;
            }
            self.ec2
                .release_address()
                .set_allocation_id(a.allocation_id().map(str::to_string))
                .send()
                .await
                .map_err(sdk_err("ReleaseAddress"))?;
        }
        Ok(())
    }

    /// Terminates the clone's instances and waits (up to ten minutes) until they are.
    async fn terminate_instances(&self, name: &str) -> Result<(), ProviderError> {
        let insts = self
            .ec2
            .describe_instances()
            .filters(by_clone(name))
            .send()
            .await
            .map_err(sdk_err("DescribeInstances"))?;
        let live: Vec<String> = insts
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| !is_terminated(i))
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        self.ec2
            .terminate_instances()
            .set_instance_ids(Some(live.clone()))
            .send()
            .await
            .map_err(sdk_err("TerminateInstances"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            let d = self
                .ec2
                .describe_instances()
                .set_instance_ids(Some(live.clone()))
                .send()
                .await
                .map_err(sdk_err("DescribeInstances"))?;
            let done = d
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .all(is_terminated);
            if done || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(())
    }

    /// What the clone made in any VPC, by its tag: security groups, route tables and
    /// subnets. In the operator's VPC this is all of the clone; in its own VPC, what
    /// `delete_vpc` would otherwise find.
    async fn delete_tagged(&self, name: &str) -> Result<(), ProviderError> {
        self.delete_security_groups(by_clone(name)).await?;
        let rts = self
            .ec2
            .describe_route_tables()
            .filters(by_clone(name))
            .send()
            .await
            .map_err(sdk_err("DescribeRouteTables"))?;
        for rt in rts.route_tables() {
            for a in rt.associations().iter().filter(|a| a.main() != Some(true)) {
                self.ec2
                    .disassociate_route_table()
                    .set_association_id(a.route_table_association_id().map(str::to_string))
                    .send()
                    .await
                    .map_err(sdk_err("DisassociateRouteTable"))?;
            }
            self.ec2
                .delete_route_table()
                .set_route_table_id(rt.route_table_id().map(str::to_string))
                .send()
                .await
                .map_err(sdk_err("DeleteRouteTable"))?;
        }
        self.delete_subnets(by_clone(name)).await
    }

    /// One VPC of the clone with its security groups, internet gateways and subnets.
    async fn delete_vpc(&self, vpc_id: &str) -> Result<(), ProviderError> {
        let in_vpc = ec2t::Filter::builder()
            .name("vpc-id")
            .values(vpc_id)
            .build();
        self.delete_security_groups(in_vpc.clone()).await?;
        for id in self.internet_gateways(vpc_id).await? {
            let id = id.as_str();
            self.ec2
                .detach_internet_gateway()
                .internet_gateway_id(id)
                .vpc_id(vpc_id)
                .send()
                .await
                .map_err(sdk_err("DetachInternetGateway"))?;
            self.ec2
                .delete_internet_gateway()
                .internet_gateway_id(id)
                .send()
                .await
                .map_err(sdk_err("DeleteInternetGateway"))?;
        }
        self.delete_subnets(in_vpc).await?;
        self.ec2
            .delete_vpc()
            .vpc_id(vpc_id)
            .send()
            .await
            .map_err(sdk_err("DeleteVpc"))?;
        Ok(())
    }

    /// The security groups `filter` selects, but a VPC's default group (AWS deletes it
    /// with its VPC, and refuses to before).
    async fn delete_security_groups(&self, filter: ec2t::Filter) -> Result<(), ProviderError> {
        let sgs = self
            .ec2
            .describe_security_groups()
            .filters(filter)
            .send()
            .await
            .map_err(sdk_err("DescribeSecurityGroups"))?;
        for g in sgs
            .security_groups()
            .iter()
            .filter(|g| g.group_name() != Some("default"))
        {
            self.ec2
                .delete_security_group()
                .set_group_id(g.group_id().map(str::to_string))
                .send()
                .await
                .map_err(sdk_err("DeleteSecurityGroup"))?;
        }
        Ok(())
    }

    /// The subnets `filter` selects.
    async fn delete_subnets(&self, filter: ec2t::Filter) -> Result<(), ProviderError> {
        let subnets = self
            .ec2
            .describe_subnets()
            .filters(filter)
            .send()
            .await
            .map_err(sdk_err("DescribeSubnets"))?;
        for s in subnets.subnets() {
            self.ec2
                .delete_subnet()
                .set_subnet_id(s.subnet_id().map(str::to_string))
                .send()
                .await
                .map_err(sdk_err("DeleteSubnet"))?;
        }
        Ok(())
    }
}

impl CloudApi for Aws {
    fn cloud(&self) -> &'static str {
        "aws"
    }

    fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    async fn launch(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        self.create_async(rec).await
    }

    async fn power(&self, rec: &CloneRecord, on: bool) -> Result<(), ProviderError> {
        self.start_stop(rec, on).await
    }

    async fn teardown(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        self.terminate_async(&rec.name).await
    }

    async fn states(&self, rec: &CloneRecord) -> Result<Vec<InstanceState>, ProviderError> {
        self.instance_states(rec).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vpc_covers_every_subnet() {
        let s = |v: &[&str]| -> Vec<(ipnet::Ipv4Net, std::net::Ipv4Addr)> {
            v.iter()
                .map(|c| (c.parse().unwrap(), std::net::Ipv4Addr::UNSPECIFIED))
                .collect()
        };
        assert_eq!(vpc_cidr(&s(&["198.18.70.0/24"])).unwrap(), "198.18.70.0/24");
        assert_eq!(
            vpc_cidr(&s(&["198.18.70.0/24", "198.18.71.0/24"])).unwrap(),
            "198.18.70.0/23"
        );
        assert!(vpc_cidr(&s(&["10.0.0.0/24", "11.0.0.0/24"])).is_err());
        assert_eq!(elb_base("a"), "ferry-a");
        assert_eq!(instance_type_for(1, 512 << 20), "t3.small");
        assert_eq!(instance_type_for(2, 3 << 30), "t3.medium");
        assert_eq!(instance_type_for(4, 24 << 30), "t3.2xlarge");
        assert_eq!(instance_type_for(6, 1 << 30), "t3.2xlarge");
        assert_eq!(instance_type_for(500, 1 << 40), "m5.24xlarge");
        let long = elb_base(&"x".repeat(40));
        assert!(long.len() + 6 <= 32 && long != elb_base(&"y".repeat(40)));
    }

    #[test]
    fn only_changed_blocks_are_sent() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        let mut data = vec![0u8; BLOCK * 4];
        data[BLOCK] = 1;
        std::fs::write(&raw, &data).unwrap();
        let (h1, send1) = changed_blocks(&raw, None).unwrap();
        assert_eq!((h1.len(), send1), (4, vec![1]));
        data[3 * BLOCK + 7] = 9;
        data[BLOCK] = 0;
        std::fs::write(&raw, &data).unwrap();
        let (_, send2) = changed_blocks(&raw, Some(&h1)).unwrap();
        assert_eq!(send2, vec![1, 3], "a block that became zero is sent too");
    }
}
