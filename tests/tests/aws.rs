//! The aws provider against moto's server (PyPI `moto[server]`, started here): two real
//! Debian 12 systems replicated by the agent are imaged, boot-checked under QEMU, and
//! uploaded into EBS snapshots with the EBS direct APIs, then registered as AMIs; a
//! second image of a changed system sends only changed blocks. A clone gets its own VPC
//! with the enterprise range, instances at the enterprise addresses, an Elastic IP for
//! the public system only and an NLB target group. The app keeps a service in the
//! enterprise: the public system's image carries the tunnel gateway role, its security
//! group opens the gateway's port to the app's CIDR, and Table A dials its Elastic IP. A
//! clone launched into the operator's VPC makes only its own subnet, route table and
//! groups there, and takes only those away. Every assertion reads moto's own Describe
//! answers (through boto3), not Ferry's.
use anyhow::{bail, Context, Result};
use ferry_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WEB_UUID: &str = "7a0c5a53-8c53-4b55-8d7e-3f1c2d9e0b11";
const DB_UUID: &str = "7a0c5a53-8c53-4b55-8d7e-3f1c2d9e0b22";
const BLOCK: u64 = 512 * 1024;

fn venv() -> PathBuf {
    PathBuf::from(
        std::env::var("FERRY_MOTO_VENV").unwrap_or_else(|_| "/var/cache/ferry-tests/moto".into()),
    )
}

/// moto's server on a loopback port; stopped on drop.
struct Moto {
    url: String,
    _proc: Proc,
}

impl Moto {
    fn start(dir: &Path) -> Result<Self> {
        let port = free_port();
        let proc = Proc::spawn(
            Command::new(venv().join("bin/moto_server"))
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                // Like AWS, refuse instance types that do not exist.
                .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true"),
            &dir.join("moto.log"),
        )
        .context("moto_server (.ci/run installs it in a venv)")?;
        wait_for("moto", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(Self {
            url: format!("http://127.0.0.1:{port}"),
            _proc: proc,
        })
    }

    /// Runs a boto3 script against moto with `ec2`, `ebs` and `elb` clients; the script
    /// sets `out`, which comes back as JSON.
    fn ask(&self, script: &str) -> Result<Value> {
        let program = format!(
            "import boto3, json\n\
             kw = dict(endpoint_url={url:?}, region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n\
             ec2 = boto3.client('ec2', **kw); ebs = boto3.client('ebs', **kw); elb = boto3.client('elbv2', **kw)\n\
             def tagged(name): return [{{'Name': 'tag:ferry:clone', 'Values': [name]}}]\n\
             out = None\n{script}\nprint(json.dumps(out, default=str))\n",
            url = self.url
        );
        let out = sh(Command::new(venv().join("bin/python"))
            .arg("-c")
            .arg(program))?;
        Ok(serde_json::from_str(out.trim())?)
    }
}

/// A file of an image's root file system (the first partition, at 1 MiB), read with
/// debugfs from a raw copy; empty when there is no such file.
fn file_in_image(qcow: &str, path: &str, t: &Path) -> Result<String> {
    let raw = t.join("peek.raw");
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "raw", qcow])
        .arg(&raw))?;
    let dev = sh(Command::new("losetup")
        .args(["-r", "-f", "--show", "-o", "1048576"])
        .arg(&raw))?;
    let dev = dev.trim().to_string();
    let out = output(Command::new("debugfs").args(["-R", &format!("cat {path}"), &dev]));
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    std::fs::remove_file(&raw)?;
    Ok(String::from_utf8_lossy(&out?.stdout).into_owned())
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

#[test]
fn aws_images_upload_changed_blocks_and_clones_get_their_own_vpc() -> Result<()> {
    let tmp = scratch("aws")?;
    let t = tmp.path();
    let moto = Moto::start(t)?;
    // The cloud manager reads the default AWS chain: endpoint, region, keys. No instance
    // metadata lookups: nothing leaves loopback.
    for (k, v) in [
        ("AWS_ENDPOINT_URL", moto.url.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        std::env::set_var(k, v);
    }
    let web = debian12_source(t, "web", WEB_UUID, "198.18.80.10")?;
    let db = debian12_source(t, "db", DB_UUID, "198.18.80.20")?;
    let mut cloud = CloudMgr::start(&t.join("cloud"))?;
    let agent = |src: &LoopFs, name: &str| -> Result<()> {
        cloud.replicate(t, &src.mnt, name)?;
        Ok(())
    };
    agent(&web, "web")?;
    agent(&db, "db")?;
    cloud.ferry_json(&[
        "app",
        "create",
        "shop",
        "--provider",
        "aws",
        "--system",
        "web:public",
        "--system",
        "db:private",
        "--load-balancer",
        "--public-port",
        "web:22",
        "--allow-from",
        "203.0.113.0/24",
        // A service that stays in the enterprise: the clone's tunnel gateway runs on the
        // public system (web), whose image carries the gateway role.
        "--service",
        "10.20.0.5:389=198.18.80.10:389",
    ])?;

    // Images: boot-checked here, then uploaded and registered.
    let images = cloud.ferry_json(&["image", "build", "shop"])?;
    let (web_img, db_img) = (&images[0], &images[1]);
    for img in [web_img, db_img] {
        assert_eq!(img["boot_check"]["root_by_uuid"], true, "{img}");
        assert!(s(&img["provider_image"]).starts_with("ami-"), "{img}");
        assert!(s(&img["provider_snapshot"]).starts_with("snap-"), "{img}");
        assert_eq!(img["parent_snapshot"], "", "{img}");
    }
    // The public system's image carries the gateway role, splicing to the app's two
    // app servers only; the private system's does not.
    let gw = file_in_image(&s(&web_img["path"]), "/etc/ferry/tunnel-gateway.ini", t)?;
    assert!(
        gw.contains("listen_port=7550")
            && gw.contains("app_servers=198.18.80.10:2222,198.18.80.20:2222"),
        "{gw}"
    );
    let unit = file_in_image(
        &s(&web_img["path"]),
        "/etc/systemd/system/ferry-tunnel-gateway.service",
        t,
    )?;
    assert!(
        unit.contains("gateway --config /etc/ferry/tunnel-gateway.ini")
            && unit.contains("User=nobody"),
        "{unit}"
    );
    let none = file_in_image(&s(&db_img["path"]), "/etc/ferry/tunnel-gateway.ini", t)?;
    assert!(none.is_empty(), "the private system got a gateway: {none}");
    let full = web_img["uploaded_bytes"].as_u64().unwrap_or(0);
    assert!(
        full > 100 * BLOCK,
        "a first image sends its whole content: {web_img}"
    );
    let seen = moto.ask(&format!(
        "i = ec2.describe_images(ImageIds=['{ami}'])['Images'][0]\n\
         sn = ec2.describe_snapshots(SnapshotIds=['{snap}'])['Snapshots'][0]\n\
         blocks = ebs.list_snapshot_blocks(SnapshotId='{snap}', MaxResults=10000)['Blocks']\n\
         out = dict(name=i['Name'], state=i['State'], size=sn['VolumeSize'], snap_state=sn['State'], blocks=len(blocks))",
        ami = s(&web_img["provider_image"]),
        snap = s(&web_img["provider_snapshot"]),
    ))?;
    assert_eq!(
        seen["name"],
        format!("ferry-{}", s(&web_img["id"])),
        "{seen}"
    );
    assert_eq!(seen["snap_state"], "completed", "{seen}");
    assert_eq!(
        seen["size"].as_u64(),
        Some(
            web_img["virtual_bytes"]
                .as_u64()
                .unwrap_or(0)
                .div_ceil(1 << 30)
        ),
        "{seen}"
    );
    assert_eq!(
        seen["blocks"].as_u64(),
        Some(full / BLOCK),
        "moto holds what was sent: {seen}"
    );

    // A changed system: one 1 MiB file. The next image starts from the copy the last
    // build customized (its initrds stay as they were), and sends only the blocks that
    // changed since the parent snapshot: at most 8 MiB (issue 20).
    let token: u64 = rand::random();
    let changed: String = (0..16_384)
        .map(|i| format!("{token:016x} {i:046}\n"))
        .collect();
    assert_eq!(changed.len(), 1 << 20);
    std::fs::write(web.mnt.join("srv/changed.txt"), &changed)?;
    agent(&web, "web")?;
    let again = cloud.ferry_json(&["image", "build", "shop"])?;
    let (inc, db_inc) = (&again[0], &again[1]);
    assert_eq!(
        inc["parent_snapshot"], web_img["provider_snapshot"],
        "{inc}"
    );
    // The system that did not change sends next to nothing.
    assert_eq!(
        db_inc["parent_snapshot"], db_img["provider_snapshot"],
        "{db_inc}"
    );
    let db_bytes = db_inc["uploaded_bytes"].as_u64().unwrap_or(u64::MAX);
    // What the cloud said about its kept copies, should a bound below fail.
    let kept_said = || -> String {
        std::fs::read_to_string(t.join("cloud.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("kept copy") || l.contains("copied whole"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        db_bytes <= 8 << 20,
        "unchanged db: {db_bytes} bytes uploaded; the cloud said:\n{}",
        kept_said()
    );
    let inc_bytes = inc["uploaded_bytes"].as_u64().unwrap_or(0);
    assert!(
        inc_bytes > 0 && inc_bytes <= 8 << 20,
        "incremental {inc_bytes} vs full {full}: more than 8 MiB for a 1 MiB change; the cloud said:\n{}",
        kept_said()
    );
    assert_eq!(
        file_in_image(&s(&inc["path"]), "/srv/changed.txt", t)?,
        changed,
        "the changed file in the next image"
    );
    // The kept copy was customized again: the gateway is still in the image.
    let gw_again = file_in_image(&s(&inc["path"]), "/etc/ferry/tunnel-gateway.ini", t)?;
    assert_eq!(gw_again, gw);
    let inc_blocks = moto.ask(&format!(
        "out = len(ebs.list_snapshot_blocks(SnapshotId='{}', MaxResults=10000)['Blocks'])",
        s(&inc["provider_snapshot"])
    ))?;
    assert_eq!(inc_blocks.as_u64(), Some(inc_bytes / BLOCK));
    println!(
        "aws upload: full {full} bytes, incremental {inc_bytes} bytes (1 MiB file changed), unchanged system {db_bytes} bytes"
    );

    // A clone: its own VPC with the enterprise range, the enterprise addresses, a public
    // address on the public system only, the load balancer's target group.
    let a = cloud.ferry_json(&["clone", "create", "shop", "--name", "a"])?;
    assert_eq!(a["state"], "running", "{a}");
    let web_id = s(&a["instances"][0]["provider_id"]);
    let db_id = s(&a["instances"][1]["provider_id"]);
    let got = moto.ask(
        "vpcs = ec2.describe_vpcs(Filters=tagged('a'))['Vpcs']\n\
         inst = [i for r in ec2.describe_instances(Filters=tagged('a'))['Reservations'] for i in r['Instances']]\n\
         tg = elb.describe_target_groups(Names=['ferry-a-80'])['TargetGroups'][0]\n\
         health = elb.describe_target_health(TargetGroupArn=tg['TargetGroupArn'])['TargetHealthDescriptions']\n\
         out = dict(cidrs=[v['CidrBlock'] for v in vpcs],\n\
           inst={i['InstanceId']: dict(ip=i['PrivateIpAddress'], public=i.get('PublicIpAddress'), image=i['ImageId'], type=i['InstanceType'], state=i['State']['Name']) for i in inst},\n\
           targets=[h['Target']['Id'] for h in health],\n\
           lbs=[l['DNSName'] for l in elb.describe_load_balancers(Names=['ferry-a'])['LoadBalancers']])"
    )?;
    assert_eq!(got["cidrs"], serde_json::json!(["198.18.80.0/24"]), "{got}");
    assert_eq!(got["inst"][&web_id]["ip"], "198.18.80.10", "{got}");
    assert_eq!(got["inst"][&db_id]["ip"], "198.18.80.20", "{got}");
    // The app's newest images.
    assert_eq!(
        got["inst"][&web_id]["image"], inc["provider_image"],
        "{got}"
    );
    assert_eq!(
        got["inst"][&db_id]["image"], db_inc["provider_image"],
        "{got}"
    );
    // Sized from the source's probe (CPUs, memory), and moto ran what Ferry reports.
    let size = s(&a["instances"][0]["size"]);
    assert!(size.starts_with("t3.") || size.starts_with("m5."), "{a}");
    assert_eq!(got["inst"][&web_id]["type"], size.as_str(), "{got}");
    assert_eq!(
        got["inst"][&web_id]["public"], a["instances"][0]["public_ip"],
        "{got}"
    );
    assert!(got["inst"][&web_id]["public"].is_string(), "{got}");
    assert!(
        got["inst"][&db_id]["public"].is_null(),
        "a private system got a public address: {got}"
    );
    assert_eq!(got["targets"], serde_json::json!([web_id]), "{got}");
    // The public system opens its declared port and the load balancer's, from the
    // declared CIDR only; the private one admits only the clone's network.
    let sg = moto.ask(
        "sgs = ec2.describe_security_groups(Filters=tagged('a'))['SecurityGroups']\n\
         inst = [i for r in ec2.describe_instances(Filters=tagged('a'))['Reservations'] for i in r['Instances']]\n\
         rules = lambda g: sorted(p['IpProtocol'] + ':' + str(p.get('FromPort', '')) + ':' + r['CidrIp'] for p in g['IpPermissions'] for r in p['IpRanges'])\n\
         byid = {g['GroupId']: rules(g) for g in sgs}\n\
         out = {i['InstanceId']: [byid.get(x['GroupId']) for x in i['SecurityGroups']] for i in inst}",
    )?;
    assert_eq!(
        sg[&web_id],
        serde_json::json!([[
            "-1::198.18.80.0/24",
            "tcp:22:203.0.113.0/24",
            "tcp:7550:203.0.113.0/24",
            "tcp:80:203.0.113.0/24"
        ]]),
        "{sg}"
    );
    // The tunnel gateway is the public system's Elastic IP, port 7550, and Table A for
    // the enterprise side dials it, then the app server at its enterprise address.
    let web_public = s(&a["instances"][0]["public_ip"]);
    assert_eq!(a["tunnel_gateway"], format!("{web_public}:7550"), "{a}");
    let conn = t.join("tunnel-a");
    sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["tunnel", "connect", "a", "--system", "db", "--out"])
        .arg(&conn))?;
    let table_a = std::fs::read_to_string(conn.join("table-a.ini"))?;
    for line in [
        format!("remote_ssh_ip={web_public}"),
        "remote_ssh_port=7550".to_string(),
        "forward_tunnel_remote_destination_ip=198.18.80.20".to_string(),
        "allow=10.20.0.5:389".to_string(),
    ] {
        assert!(
            table_a.lines().any(|l| l == line),
            "{line} not in {table_a}"
        );
    }
    assert_eq!(
        sg[&db_id],
        serde_json::json!([["-1::198.18.80.0/24"]]),
        "{sg}"
    );
    assert_eq!(a["load_balancer_ip"], got["lbs"][0], "{got}");

    let state = |id: &str| -> Result<String> {
        Ok(s(&moto.ask(&format!(
            "out = ec2.describe_instances(InstanceIds=['{id}'])['Reservations'][0]['Instances'][0]['State']['Name']"
        ))?))
    };
    assert_eq!(
        cloud.ferry_json(&["clone", "suspend", "a"])?["state"],
        "suspended"
    );
    assert_eq!(state(&web_id)?, "stopped");
    assert_eq!(
        cloud.ferry_json(&["clone", "resume", "a"])?["state"],
        "running"
    );
    assert_eq!(state(&db_id)?, "running");

    // The cloud manager restarts and reconciles clone a with what moto reports.
    cloud.restart()?;
    assert_eq!(
        cloud.ferry_json(&["clone", "show", "a"])?["state"],
        "running"
    );
    // A provider error half-way: an instance type AWS does not have, so RunInstances
    // fails after the VPC, subnets, gateway and security groups exist. The error is
    // clear, and moto lists nothing left of the clone.
    let err = cloud.ferry_fails(&[
        "clone",
        "create",
        "shop",
        "--name",
        "b",
        "--instance-type",
        "t3.bogus",
    ]);
    assert!(
        err.contains("RunInstances") && err.contains("t3.bogus"),
        "{err}"
    );
    let left = moto.ask(
        "inst = [i for r in ec2.describe_instances(Filters=tagged('b'))['Reservations'] for i in r['Instances'] if i['State']['Name'] != 'terminated']\n\
         out = dict(vpcs=len(ec2.describe_vpcs(Filters=tagged('b'))['Vpcs']), inst=len(inst),\n\
           eips=len(ec2.describe_addresses(Filters=tagged('b'))['Addresses']),\n\
           sgs=len([g for g in ec2.describe_security_groups()['SecurityGroups'] if g['GroupName'].startswith('ferry-b-')]),\n\
           lbs=len([l for l in elb.describe_load_balancers()['LoadBalancers'] if l['LoadBalancerName'] == 'ferry-b']))",
    )?;
    assert_eq!(
        left,
        serde_json::json!({"vpcs": 0, "inst": 0, "eips": 0, "sgs": 0, "lbs": 0})
    );
    assert!(cloud
        .ferry_json(&["clone", "list"])?
        .as_array()
        .is_some_and(|c| c.len() == 1));

    // Into the operator's VPC: a wider range, an internet gateway, and a subnet of
    // theirs for another range. The clone makes its subnet (and a route table through
    // their gateway) and leaves their VPC, subnet and gateway when it goes.
    let theirs = moto.ask(
        "v = ec2.create_vpc(CidrBlock='198.18.0.0/16')['Vpc']['VpcId']\n\
         g = ec2.create_internet_gateway()['InternetGateway']['InternetGatewayId']\n\
         ec2.attach_internet_gateway(InternetGatewayId=g, VpcId=v)\n\
         sn = ec2.create_subnet(VpcId=v, CidrBlock='198.18.99.0/24')['Subnet']['SubnetId']\n\
         small = ec2.create_vpc(CidrBlock='10.77.0.0/16')['Vpc']['VpcId']\n\
         out = dict(vpc=v, igw=g, subnet=sn, small=small)",
    )?;
    let err = cloud.ferry_fails(&[
        "clone",
        "create",
        "shop",
        "--name",
        "x",
        "--network",
        &s(&theirs["small"]),
    ]);
    assert!(
        err.contains("198.18.80.0/24 is outside") && err.contains("10.77.0.0/16"),
        "{err}"
    );
    let left = moto.ask(
        "out = len(ec2.describe_vpcs(Filters=tagged('x'))['Vpcs']) + len(ec2.describe_security_groups(Filters=tagged('x'))['SecurityGroups']) + len(ec2.describe_subnets(Filters=tagged('x'))['Subnets'])",
    )?;
    assert_eq!(left, serde_json::json!(0), "a refused clone left resources");
    let c = cloud.ferry_json(&[
        "clone",
        "create",
        "shop",
        "--name",
        "c",
        "--network",
        &s(&theirs["vpc"]),
    ])?;
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(c["network"], theirs["vpc"], "{c}");
    let placed = moto.ask(&format!(
        "v = '{vpc}'\n\
         inst = [i for r in ec2.describe_instances(Filters=tagged('c'))['Reservations'] for i in r['Instances']]\n\
         subs = ec2.describe_subnets(Filters=tagged('c'))['Subnets']\n\
         rts = ec2.describe_route_tables(Filters=tagged('c'))['RouteTables']\n\
         out = dict(vpcs=sorted(set(i['VpcId'] for i in inst)), ips=sorted(i['PrivateIpAddress'] for i in inst),\n\
           subs=[(x['VpcId'], x['CidrBlock']) for x in subs],\n\
           routes=[(r.get('DestinationCidrBlock'), r.get('GatewayId')) for t in rts for r in t['Routes'] if r.get('GatewayId', '').startswith('igw-')],\n\
           assoc=[a['SubnetId'] for t in rts for a in t['Associations']] == [x['SubnetId'] for x in subs])",
        vpc = s(&theirs["vpc"])
    ))?;
    assert_eq!(
        placed,
        serde_json::json!({"vpcs": [s(&theirs["vpc"])], "ips": ["198.18.80.10", "198.18.80.20"],
            "subs": [[s(&theirs["vpc"]), "198.18.80.0/24"]],
            "routes": [["0.0.0.0/0", s(&theirs["igw"])]], "assoc": true})
    );
    assert_eq!(
        cloud.ferry_json(&["clone", "terminate", "c"])?["state"],
        "terminated"
    );
    let after = moto.ask(&format!(
        "out = dict(vpc=len(ec2.describe_vpcs(VpcIds=['{vpc}'])['Vpcs']),\n\
           subnets=sorted(x['CidrBlock'] for x in ec2.describe_subnets(Filters=[{{'Name': 'vpc-id', 'Values': ['{vpc}']}}])['Subnets']),\n\
           igw=len(ec2.describe_internet_gateways(InternetGatewayIds=['{igw}'])['InternetGateways']),\n\
           sgs=[g['GroupName'] for g in ec2.describe_security_groups(Filters=[{{'Name': 'vpc-id', 'Values': ['{vpc}']}}])['SecurityGroups']],\n\
           rts=len(ec2.describe_route_tables(Filters=tagged('c'))['RouteTables']))",
        vpc = s(&theirs["vpc"]),
        igw = s(&theirs["igw"])
    ))?;
    assert_eq!(
        after,
        serde_json::json!({"vpc": 1, "subnets": ["198.18.99.0/24"], "igw": 1, "sgs": ["default"], "rts": 0}),
        "the operator's VPC keeps what was theirs, and only that"
    );

    // Terminate: nothing of clone a is left either.
    assert_eq!(
        cloud.ferry_json(&["clone", "terminate", "a"])?["state"],
        "terminated"
    );
    let left = moto.ask(
        "inst = [i for r in ec2.describe_instances(Filters=tagged('a'))['Reservations'] for i in r['Instances'] if i['State']['Name'] != 'terminated']\n\
         out = dict(vpcs=len(ec2.describe_vpcs(Filters=tagged('a'))['Vpcs']), inst=len(inst),\n\
           eips=len(ec2.describe_addresses()['Addresses']),\n\
           lbs=len(elb.describe_load_balancers()['LoadBalancers']), tgs=len(elb.describe_target_groups()['TargetGroups']))",
    )?;
    assert_eq!(
        left,
        serde_json::json!({"vpcs": 0, "inst": 0, "eips": 0, "lbs": 0, "tgs": 0})
    );

    // Deleting one image deregisters its AMI and deletes its snapshot; deleting the app
    // does so for the rest of its images.
    let out = Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["image", "delete", &s(&inc["id"])])
        .output()?;
    if !out.status.success() {
        bail!("image delete: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["app", "delete", "shop"])
        .output()?;
    if !out.status.success() {
        bail!("app delete: {}", String::from_utf8_lossy(&out.stderr));
    }
    let ours: Vec<String> = [web_img, db_img, inc, db_inc]
        .iter()
        .map(|i| s(&i["provider_snapshot"]))
        .collect();
    let left = moto.ask(&format!(
        "ours = {ours:?}\n\
         out = dict(images=[i['ImageId'] for i in ec2.describe_images(Owners=['self'])['Images'] if i['Name'].startswith('ferry-')],\n\
           snaps=[x['SnapshotId'] for x in ec2.describe_snapshots(OwnerIds=['self'])['Snapshots'] if x['SnapshotId'] in ours])"
    ))?;
    assert_eq!(left, serde_json::json!({"images": [], "snaps": []}));
    Ok(())
}
