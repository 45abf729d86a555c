//! The azure provider against the REST contract: a fake Resource Manager
//! (`tests/fixtures/azure/fake_arm.py`) serves the operations Ferry uses and checks
//! every request against the Azure REST API specs' own examples (path, api-version,
//! body keys), and upload disks are page blobs in Azurite (npm), written through the
//! SAS URL the fake hands out. Two real Debian 12 systems replicated by the agent are
//! imaged, boot-checked under QEMU, uploaded as fixed VHDs and registered as images;
//! the upload reads back bit-identical. A clone gets its own VNet with the enterprise
//! range, NICs at the enterprise addresses, a public IP on the public system only, the
//! tunnel gateway's port on it, and a Standard load balancer in front of it; a clone
//! launched into the operator's VNet makes and removes only its own subnet there.
//! Credentials go through the real client-credentials flow of the default chain.
use anyhow::{bail, Context, Result};
use ferry_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WEB_UUID: &str = "7a0c5a53-8c53-4b55-8d7e-3f1c2d9e0c11";
const DB_UUID: &str = "7a0c5a53-8c53-4b55-8d7e-3f1c2d9e0c22";
const SUB: &str = "00000000-0000-4000-8000-00000000f0e1";
const RG: &str = "ferry-test";
const TENANT: &str = "11111111-2222-4333-8444-555555555555";
const CLIENT_ID: &str = "ferry-test-app";
const CLIENT_SECRET: &str = "s3cret-never-logged-9f2c";
/// Azurite's well-known development account.
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn cache() -> PathBuf {
    PathBuf::from("/var/cache/ferry-tests")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/azure")
}

/// Azurite's blob service and the fake Resource Manager in front of it.
struct Azure {
    arm: String,
    _azurite: Proc,
    _fake: Proc,
}

impl Azure {
    fn start(dir: &Path) -> Result<Self> {
        let blob_port = free_port();
        let azurite = Proc::spawn(
            Command::new(cache().join("azurite/node_modules/.bin/azurite-blob"))
                .args(["--blobHost", "127.0.0.1", "--blobPort"])
                .arg(blob_port.to_string())
                .arg("--location")
                .arg(dir.join("azurite"))
                .args(["--skipApiVersionCheck", "--disableProductStyleUrl"]),
            &dir.join("azurite.log"),
        )
        .context("azurite (.ci/run installs it with npm)")?;
        wait_for("azurite", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", blob_port)).is_ok()
        })?;
        let port = free_port();
        let conn = format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{blob_port}/devstoreaccount1;"
        );
        let fake = Proc::spawn(
            Command::new(cache().join("azure/bin/python"))
                .arg(fixtures().join("fake_arm.py"))
                .arg("--port")
                .arg(port.to_string())
                .arg("--examples")
                .arg(fixtures().join("examples"))
                .args(["--azurite", &conn])
                .args(["--subscription", SUB, "--resource-group", RG])
                .args(["--tenant", TENANT, "--client-id", CLIENT_ID])
                .args(["--client-secret", CLIENT_SECRET]),
            &dir.join("fake_arm.log"),
        )
        .context("the fake Resource Manager (.ci/run makes its venv)")?;
        wait_for("fake arm", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(Self {
            arm: format!("http://127.0.0.1:{port}"),
            _azurite: azurite,
            _fake: fake,
        })
    }

    fn get(&self, path: &str) -> Result<Value> {
        let out = sh(Command::new("curl").args(["-sfS", &format!("{}{path}", self.arm)]))?;
        Ok(serde_json::from_str(&out)?)
    }

    /// A PUT as the operator's own tooling would make it (their VNet), with a token from
    /// the fake identity platform.
    fn put(&self, path: &str, body: &Value) -> Result<Value> {
        let tok: Value = serde_json::from_str(&sh(Command::new("curl")
            .args(["-sfS", "-X", "POST", "--data"])
            .arg(format!(
                "grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}&scope=https%3A%2F%2Fmanagement.azure.com%2F.default"
            ))
            .arg(format!("{}/{TENANT}/oauth2/v2.0/token", self.arm)))?)?;
        let out = sh(Command::new("curl")
            .args([
                "-sfS",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/json",
                "-H",
            ])
            .arg(format!("Authorization: Bearer {}", s(&tok["access_token"])))
            .arg("--data")
            .arg(body.to_string())
            .arg(format!("{}{path}", self.arm)))?;
        Ok(serde_json::from_str(&out).unwrap_or(Value::Null))
    }

    fn state(&self) -> Result<Value> {
        self.get("/_fake/state")
    }

    /// The resources of the resource group tagged with this clone.
    fn of_clone(&self, clone: &str) -> Result<Vec<Value>> {
        Ok(self.state()?["resources"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["tags"]["ferry-clone"] == clone)
            .collect())
    }
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// The SHA-256 of a qcow2 image's content, padded to whole MiB like the VHD.
fn raw_sha256(qcow: &str, dir: &Path) -> Result<(String, u64)> {
    let raw = dir.join("readback.raw");
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "raw", qcow])
        .arg(&raw))?;
    let f = std::fs::OpenOptions::new().write(true).open(&raw)?;
    let len = f.metadata()?.len().div_ceil(1 << 20) << 20;
    f.set_len(len)?;
    drop(f);
    let out = sh(Command::new("sha256sum").arg(&raw))?;
    std::fs::remove_file(&raw)?;
    Ok((out.split_whitespace().next().unwrap_or("").to_string(), len))
}

#[test]
fn azure_images_upload_as_vhd_and_clones_get_their_own_vnet() -> Result<()> {
    let tmp = scratch("azure")?;
    let t = tmp.path();
    let az = Azure::start(t)?;
    // The default chain's environment credential, against the fake identity platform:
    // nothing leaves loopback.
    for (k, v) in [
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_CLIENT_ID", CLIENT_ID),
        ("AZURE_CLIENT_SECRET", CLIENT_SECRET),
        ("AZURE_AUTHORITY_HOST", az.arm.as_str()),
    ] {
        std::env::set_var(k, v);
    }
    let web = debian12_source(t, "web", WEB_UUID, "198.18.90.10")?;
    let db = debian12_source(t, "db", DB_UUID, "198.18.90.20")?;
    let arm = az.arm.clone();
    let mut cloud = CloudMgr::start_args(
        &t.join("cloud"),
        &[
            "--provider",
            "azure",
            "--azure-subscription",
            SUB,
            "--azure-resource-group",
            RG,
            "--azure-location",
            "westeurope",
            "--azure-endpoint",
            &arm,
        ],
    )?;
    for (src, name) in [(&web, "web"), (&db, "db")] {
        cloud.replicate(t, &src.mnt, name)?;
    }
    // No --provider: the serve default (azure) applies.
    let app = cloud.ferry_json(&[
        "app",
        "create",
        "shop",
        "--system",
        "web:public",
        "--system",
        "db:private",
        "--load-balancer",
        "--public-port",
        "web:22",
        "--allow-from",
        "203.0.113.0/24",
        // A service that stays in the enterprise: the tunnel gateway runs on web.
        "--service",
        "10.20.0.5:389=198.18.90.10:389",
    ])?;
    assert_eq!(app["provider"], "azure", "{app}");

    // Images: boot-checked here, uploaded into a managed disk, registered.
    let images = cloud.ferry_json(&["image", "build", "shop"])?;
    for img in images.as_array().context("images")? {
        assert_eq!(img["boot_check"]["root_by_uuid"], true, "{img}");
        let name = format!("ferry-image-{}", s(&img["id"]));
        assert_eq!(
            s(&img["provider_image"]),
            format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/images/{name}"),
        );
        // Read back from Azurite: the data part is the image, bit for bit, and the
        // footer says fixed VHD of that size.
        let blob = az.get(&format!("/_fake/blob/{name}"))?;
        let (sha, len) = raw_sha256(&s(&img["path"]), t)?;
        assert_eq!(blob["data_sha256"], sha.as_str(), "{blob}");
        assert_eq!(blob["size"].as_u64(), Some(len + 512), "{blob}");
        assert_eq!(blob["footer_cookie"], "conectix", "{blob}");
        assert_eq!(blob["footer_disk_type"], 2, "fixed: {blob}");
        assert_eq!(blob["footer_current_size"].as_u64(), Some(len), "{blob}");
        // Zero ranges are not sent.
        let sent = img["uploaded_bytes"].as_u64().unwrap_or(0);
        assert!(sent > 0 && sent < len, "sent {sent} of {len}");
        println!("azure upload: {sent} of {len} bytes");
    }
    // The image points at its upload disk, whose access was revoked first (the fake
    // refuses an image on a disk still uploading).
    let st = az.state()?;
    let of_type = |name: &str, kind: &str| -> Value {
        st["resources"]
            .as_array()
            .and_then(|r| {
                r.iter()
                    .find(|r| r["name"] == name && r["type"] == kind)
                    .cloned()
            })
            .unwrap_or(Value::Null)
    };
    let web_name = format!("ferry-image-{}", s(&images[0]["id"]));
    let image = of_type(&web_name, "Microsoft.Compute/images");
    let disk = of_type(&web_name, "Microsoft.Compute/disks");
    let os_disk = &image["properties"]["storageProfile"]["osDisk"];
    assert_eq!(os_disk["managedDisk"]["id"], disk["id"], "{image}");
    assert_eq!(os_disk["managedDisk"]["id"], images[0]["provider_snapshot"]);
    assert_eq!(os_disk["osState"], "Specialized", "{image}");
    assert_eq!(disk["properties"]["diskState"], "Unattached", "{disk}");

    // A build killed mid-upload leaves an upload disk that no record names (and that
    // would cost money forever); the restarted cloud manager removes it, closing its
    // upload first as Azure requires.
    std::fs::write(web.mnt.join("etc/motd"), "changed after the first image\n")?;
    cloud.replicate(t, &web.mnt, "web")?;
    let grants = |az: &Azure| -> Result<usize> {
        Ok(az.state()?["log"]
            .as_array()
            .map(|l| l.iter().filter(|e| e["op"] == "Disks_GrantAccess").count())
            .unwrap_or(0))
    };
    let before = grants(&az)?;
    let mut build = Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args([
            "image", "build", "web", "--target", "azure", "--output", "json",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_for("the upload to start", Duration::from_secs(600), || {
        grants(&az).is_ok_and(|n| n > before)
    })?;
    cloud.restart()?;
    let _ = build.wait();
    let known: Vec<String> = cloud
        .ferry_json(&["image", "list"])?
        .as_array()
        .context("images")?
        .iter()
        .map(|i| format!("ferry-image-{}", s(&i["id"])))
        .collect();
    assert_eq!(known.len(), 2, "the cut build left no record: {known:?}");
    // Nor any file: only the recorded images' files are left on the manager's disk.
    for e in std::fs::read_dir(t.join("cloud/images"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            known
                .iter()
                .any(|k| name.starts_with(&format!("{}.", &k["ferry-image-".len()..]))),
            "{name} was left by the cut build"
        );
    }
    let st = az.state()?;
    let disks: Vec<String> = st["resources"]
        .as_array()
        .context("resources")?
        .iter()
        .filter(|r| r["type"] == "Microsoft.Compute/disks")
        .map(|r| s(&r["name"]))
        .collect();
    let mut sorted = known.clone();
    sorted.sort();
    let mut disks_sorted = disks.clone();
    disks_sorted.sort();
    assert_eq!(disks_sorted, sorted, "only recorded images keep disks");
    let orphan_deleted = st["log"].as_array().is_some_and(|l| {
        l.iter().any(|e| {
            e["op"] == "Disks_Delete"
                && e["status"] == 202
                && !known.iter().any(|k| s(&e["path"]).ends_with(k.as_str()))
        })
    });
    assert!(orphan_deleted, "the orphan disk was deleted: {st}");

    // A clone: its own VNet with the enterprise range, NICs at the enterprise
    // addresses, a public IP on the public system only.
    let a = cloud.ferry_json(&["clone", "create", "shop", "--name", "a"])?;
    assert_eq!(a["state"], "running", "{a}");
    let inst = |c: &Value, sys: &str| -> Value {
        c["instances"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["system"] == sys).cloned())
            .unwrap_or(Value::Null)
    };
    let (web_i, db_i) = (inst(&a, "web"), inst(&a, "db"));
    assert_eq!(web_i["private_ip"], "198.18.90.10", "{a}");
    assert_eq!(db_i["private_ip"], "198.18.90.20", "{a}");
    assert!(s(&web_i["public_ip"]).starts_with("198.18.250."), "{a}");
    assert_eq!(db_i["public_ip"], "", "{a}");
    assert_eq!(
        a["tunnel_gateway"],
        format!("{}:7550", s(&web_i["public_ip"])),
        "{a}"
    );
    let st = az.state()?;
    let res = |name: &str| -> Value {
        st["resources"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let vnet = res("ferry-a-vnet");
    assert_eq!(
        vnet["properties"]["addressSpace"]["addressPrefixes"],
        serde_json::json!(["198.18.90.0/24"]),
        "{vnet}"
    );
    for (sys, ip) in [("web", "198.18.90.10"), ("db", "198.18.90.20")] {
        let nic = res(&format!("ferry-a-{sys}-nic"));
        let conf = &nic["properties"]["ipConfigurations"][0]["properties"];
        assert_eq!(conf["privateIPAddress"], ip, "{nic}");
        assert_eq!(conf["privateIPAllocationMethod"], "Static", "{nic}");
        assert_eq!(
            conf["publicIPAddress"].is_object(),
            sys == "web",
            "a public IP on the public system only: {nic}"
        );
        let vm = res(&format!("ferry-a-{sys}"));
        assert_eq!(
            vm["properties"]["hardwareProfile"]["vmSize"],
            inst(&a, sys)["size"],
            "{vm}"
        );
        assert_eq!(
            vm["properties"]["storageProfile"]["osDisk"]["createOption"], "Attach",
            "{vm}"
        );
        assert_eq!(s(&inst(&a, sys)["provider_id"]), s(&vm["id"]));
    }
    assert_eq!(
        res("ferry-a-web-ip")["properties"]["ipAddress"],
        web_i["public_ip"]
    );
    assert!(res("ferry-a-db-ip").is_null());
    // The public NSG opens the web system's declared port and the load balancer's, from
    // the declared CIDR, to that system alone; nothing else comes in from outside.
    let rules: Vec<String> = res("ferry-a-public")["properties"]["securityRules"]
        .as_array()
        .context("public nsg rules")?
        .iter()
        .map(|r| {
            let p = &r["properties"];
            format!(
                "{} {} {}->{}:{}",
                s(&p["access"]),
                s(&p["protocol"]),
                s(&p["sourceAddressPrefix"]),
                s(&p["destinationAddressPrefix"]),
                s(&p["destinationPortRange"])
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            "Allow Tcp 203.0.113.0/24->198.18.90.10:22",
            "Allow Tcp 203.0.113.0/24->198.18.90.10:80",
            "Allow Tcp 203.0.113.0/24->198.18.90.10:7550"
        ],
        "{rules:?}"
    );
    // The load balancer: Standard, its own public IP (the clone's load balancer
    // address), the public system alone as its backend, a probe and rule for port 80.
    let lb = res("ferry-a.lb");
    assert_eq!(lb["sku"]["name"], "Standard", "{lb}");
    let p = &lb["properties"];
    let fe_ip = s(&p["frontendIPConfigurations"][0]["properties"]["publicIPAddress"]["id"]);
    assert!(fe_ip.ends_with("/publicIPAddresses/ferry-a.lb-ip"), "{lb}");
    assert_eq!(
        a["load_balancer_ip"],
        res("ferry-a.lb-ip")["properties"]["ipAddress"],
        "{a}"
    );
    let backends: Vec<String> = p["backendAddressPools"][0]["properties"]
        ["loadBalancerBackendAddresses"]
        .as_array()
        .context("backend addresses")?
        .iter()
        .map(|b| format!("{}={}", s(&b["name"]), s(&b["properties"]["ipAddress"])))
        .collect();
    assert_eq!(backends, ["web=198.18.90.10"], "{lb}");
    let rule = &p["loadBalancingRules"][0]["properties"];
    assert_eq!(
        (
            rule["frontendPort"].as_u64(),
            rule["backendPort"].as_u64(),
            s(&rule["protocol"])
        ),
        (Some(80), Some(80), "Tcp".to_string()),
        "{lb}"
    );
    assert!(s(&rule["probe"]["id"]).ends_with("/probes/tcp-80"), "{lb}");
    assert_eq!(
        p["probes"][0]["properties"]["port"].as_u64(),
        Some(80),
        "{lb}"
    );
    let private = res("ferry-a-private");
    assert!(private.is_object(), "no private nsg");
    assert_eq!(
        private["properties"]["securityRules"]
            .as_array()
            .map_or(0, Vec::len),
        0,
        "{private}"
    );

    // Suspend deallocates, resume starts; a restarted manager reconciles.
    let power = |sys: &str| -> Result<String> {
        let st = az.state()?;
        Ok(st["resources"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == format!("ferry-a-{sys}")))
            .map(|r| s(&r["power"]))
            .unwrap_or_default())
    };
    assert_eq!(
        cloud.ferry_json(&["clone", "suspend", "a"])?["state"],
        "suspended"
    );
    assert_eq!(power("web")?, "deallocated");
    assert_eq!(
        cloud.ferry_json(&["clone", "resume", "a"])?["state"],
        "running"
    );
    assert_eq!(power("db")?, "running");
    cloud.restart()?;
    assert_eq!(
        cloud.ferry_json(&["clone", "show", "a"])?["state"],
        "running"
    );

    // A provider error half-way: a VM size the region does not offer, refused after
    // the network, the NICs and the disk copies exist. The error is clear and nothing
    // of the clone is left.
    let err = cloud.ferry_fails(&[
        "clone",
        "create",
        "shop",
        "--name",
        "b",
        "--instance-type",
        "Standard_Bogus",
    ]);
    assert!(
        err.contains("VirtualMachines_CreateOrUpdate") && err.contains("Standard_Bogus"),
        "{err}"
    );
    assert_eq!(az.of_clone("b")?, Vec::<Value>::new());
    assert!(az.state()?["log"].as_array().is_some_and(|l| l
        .iter()
        .any(|e| e["op"] == "VirtualMachines_CreateOrUpdate" && e["status"] == 400)));

    // Terminate: nothing of clone a is left.
    assert_eq!(
        cloud.ferry_json(&["clone", "terminate", "a"])?["state"],
        "terminated"
    );
    assert_eq!(az.of_clone("a")?, Vec::<Value>::new());

    // Into the operator's VNet (by its id): a wider space and a subnet of theirs for
    // another range. The clone makes its own subnet there and removes only that.
    let vnet_path = format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/virtualNetworks/corp"
    );
    az.put(
        &format!("{vnet_path}?api-version=2024-03-01"),
        &serde_json::json!({"location": "westeurope", "properties": {
            "addressSpace": {"addressPrefixes": ["198.18.0.0/16"]},
            "subnets": [{"name": "theirs", "properties": {"addressPrefix": "198.18.99.0/24"}}]}}),
    )?;
    az.put(
        &format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/virtualNetworks/small?api-version=2024-03-01"),
        &serde_json::json!({"location": "westeurope", "properties": {
            "addressSpace": {"addressPrefixes": ["10.77.0.0/16"]}}}),
    )?;
    let fails_into = |net: &str| {
        cloud.ferry_fails(&["clone", "create", "shop", "--name", "x", "--network", net])
    };
    let err = fails_into("small");
    assert!(
        err.contains("198.18.90.0/24 is outside VNet small"),
        "{err}"
    );
    let err = fails_into("../corp");
    assert!(err.contains("--network"), "{err}");
    assert_eq!(
        az.of_clone("x")?,
        Vec::<Value>::new(),
        "a refused clone left resources"
    );
    let c = cloud.ferry_json(&[
        "clone",
        "create",
        "shop",
        "--name",
        "c",
        "--network",
        &vnet_path,
    ])?;
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(c["network"], vnet_path.as_str(), "{c}");
    let corp = |st: &Value| -> Value {
        st["resources"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == "corp").cloned())
            .unwrap_or(Value::Null)
    };
    let subnet_names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v["properties"]["subnets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{}={}", s(&x["name"]), s(&x["properties"]["addressPrefix"])))
            .collect();
        n.sort();
        n
    };
    let st = az.state()?;
    assert_eq!(
        subnet_names(&corp(&st)),
        ["ferry-c-0=198.18.90.0/24", "theirs=198.18.99.0/24"],
        "{}",
        corp(&st)
    );
    let nic = st["resources"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "ferry-c-web-nic").cloned())
        .unwrap_or(Value::Null);
    assert_eq!(
        s(&nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"]),
        format!("{vnet_path}/subnets/ferry-c-0"),
        "{nic}"
    );
    assert!(
        st["resources"]
            .as_array()
            .is_some_and(|r| !r.iter().any(|r| r["name"] == "ferry-c-vnet")),
        "a VNet of its own was made"
    );
    assert_eq!(
        cloud.ferry_json(&["clone", "terminate", "c"])?["state"],
        "terminated"
    );
    assert_eq!(az.of_clone("c")?, Vec::<Value>::new());
    let st = az.state()?;
    assert_eq!(
        subnet_names(&corp(&st)),
        ["theirs=198.18.99.0/24"],
        "{}",
        corp(&st)
    );

    // Deleting the app removes its images and upload disks: the resource group holds
    // only the operator's own VNets, through ARM's own listing.
    let out = Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["app", "delete", "shop"])
        .output()?;
    if !out.status.success() {
        bail!("app delete: {}", String::from_utf8_lossy(&out.stderr));
    }
    let token = sh(Command::new("curl").args([
        "-sfS",
        "-d",
        &format!("grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}&scope=x"),
        &format!("{arm}/{TENANT}/oauth2/v2.0/token"),
    ]))?;
    let token: Value = serde_json::from_str(&token)?;
    let listed = sh(Command::new("curl").args([
        "-sfS",
        "-H",
        &format!("Authorization: Bearer {}", s(&token["access_token"])),
        &format!("{arm}/subscriptions/{SUB}/resourceGroups/{RG}/resources?api-version=2021-04-01"),
    ]))?;
    let listed: Value = serde_json::from_str(&listed)?;
    let mut left: Vec<String> = listed["value"]
        .as_array()
        .context("listing")?
        .iter()
        .map(|r| s(&r["name"]))
        .collect();
    left.sort();
    assert_eq!(left, ["corp", "small"], "{listed}");

    // Every request kept to the specs' examples, and the secrets stayed out of the log.
    let st = az.state()?;
    assert_eq!(st["violations"], serde_json::json!([]), "{st}");
    let ops: std::collections::BTreeSet<String> = st["log"]
        .as_array()
        .context("log")?
        .iter()
        .filter_map(|e| e["op"].as_str().map(str::to_string))
        .collect();
    for op in [
        "token",
        "Disks_CreateOrUpdate",
        "Disks_GrantAccess",
        "Disks_RevokeAccess",
        "Images_CreateOrUpdate",
        "VirtualNetworks_CreateOrUpdate",
        "NetworkSecurityGroups_CreateOrUpdate",
        "PublicIPAddresses_CreateOrUpdate",
        "NetworkInterfaces_CreateOrUpdate",
        "VirtualMachines_CreateOrUpdate",
        "VirtualMachines_Deallocate",
        "VirtualMachines_Start",
        "VirtualMachines_InstanceView",
        "VirtualMachines_Delete",
        "Images_Delete",
        "Disks_Delete",
        "LoadBalancers_CreateOrUpdate",
        "LoadBalancers_Delete",
        "VirtualNetworks_Get",
        "Subnets_CreateOrUpdate",
        "Subnets_Delete",
    ] {
        assert!(ops.contains(op), "{op} was never called: {ops:?}");
    }
    let log = std::fs::read_to_string(t.join("cloud.log"))?;
    assert!(!log.contains(CLIENT_SECRET), "the client secret is logged");
    assert!(!log.contains("sig="), "a SAS signature is logged");
    Ok(())
}
