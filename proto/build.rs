//! Generates the ferry.v1 code with the vendored protoc, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/ferry.proto");
    let serde = "#[derive(serde::Serialize)]";
    // The descriptors the servers' reflection service hands out (grpcurl lists them).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_build::configure()
        .file_descriptor_set_path(out.join("ferry_descriptor.bin"))
        // Chunk bytes are shared, not copied, as frames are queued, retried and decoded.
        .bytes(["ferry.v1.ChunkFrame.zdata"])
        .type_attribute("ferry.v1.FsStatus", serde)
        .type_attribute("ferry.v1.AgentHosts", serde)
        .type_attribute("ferry.v1.AgentHost", serde)
        .type_attribute("ferry.v1.HostFacts", serde)
        .type_attribute("ferry.v1.TokenInfo", serde)
        .type_attribute("ferry.v1.SiteInfo", serde)
        .type_attribute("ferry.v1.Revocation", serde)
        .type_attribute("ferry.v1.DeadLetter", serde)
        .type_attribute("ferry.v1.SystemStatus", serde)
        .type_attribute("ferry.v1.Counters", serde)
        .type_attribute("ferry.v1.SyncStatusResponse", serde)
        .type_attribute("ferry.v1.ListSystemsResponse", serde)
        .type_attribute("ferry.v1.FileDbEntry", serde)
        .type_attribute("ferry.v1.ImageInfo", serde)
        .type_attribute("ferry.v1.AppInfo", serde)
        .type_attribute("ferry.v1.AppSystem", serde)
        .type_attribute("ferry.v1.CloneInfo", serde)
        .type_attribute("ferry.v1.InstanceInfo", serde)
        .type_attribute("ferry.v1.FileDbFile", serde)
        .type_attribute("ferry.v1.Probe", serde)
        .type_attribute("ferry.v1.OsInfo", serde)
        .type_attribute("ferry.v1.Nic", serde)
        .type_attribute("ferry.v1.ProbedFs", serde)
        .type_attribute("ferry.v1.BootInfo", serde)
        .type_attribute("ferry.v1.ComponentVersion", serde)
        .type_attribute("ferry.v1.SetReplicationResponse", serde)
        .type_attribute("ferry.v1.ReplicaPathResponse", serde)
        .type_attribute("ferry.v1.ResizeReplicaResponse", serde)
        .type_attribute("ferry.v1.DeleteAppResponse", serde)
        .type_attribute("ferry.v1.PrepareSystemResponse", serde)
        .type_attribute("ferry.v1.ListImagesResponse", serde)
        .type_attribute("ferry.v1.JobStep", serde)
        .type_attribute("ferry.v1.GraphService", serde)
        .type_attribute("ferry.v1.DiscoveredSystem", serde)
        .type_attribute("ferry.v1.GraphEdge", serde)
        .type_attribute("ferry.v1.DiscoverResponse", serde)
        .type_attribute("ferry.v1.JobLine", serde)
        .type_attribute("ferry.v1.ConsoleLoginResponse", serde)
        .field_attribute("ferry.v1.FileDbFile.content", "#[serde(skip)]")
        // Enum fields print by their short names (`public`, `in-sync`), not numbers.
        .field_attribute(
            "ferry.v1.InstanceInfo.visibility",
            r#"#[serde(serialize_with = "crate::serialize_short::<crate::v1::Visibility, _>")]"#,
        )
        .field_attribute(
            "ferry.v1.InstanceInfo.state",
            r#"#[serde(serialize_with = "crate::serialize_short::<crate::v1::InstanceState, _>")]"#,
        )
        .field_attribute(
            "ferry.v1.CloneInfo.provider",
            r#"#[serde(serialize_with = "crate::serialize_short::<crate::v1::Target, _>")]"#,
        )
        .field_attribute(
            "ferry.v1.CloneInfo.state",
            r#"#[serde(serialize_with = "crate::serialize_short::<crate::v1::CloneState, _>")]"#,
        )
        .field_attribute(
            "ferry.v1.AppSystem.visibility",
            r#"#[serde(serialize_with = "crate::serialize_short::<crate::v1::Visibility, _>")]"#,
        )
        .field_attribute(
            "ferry.v1.AppInfo.provider",
            r#"#[serde(serialize_with = "crate::serialize_short::<crate::v1::Target, _>")]"#,
        )
        .field_attribute(
            "ferry.v1.ImageInfo.target",
            r#"#[serde(serialize_with = "crate::serialize_short::<crate::v1::Target, _>")]"#,
        )
        .field_attribute(
            "ferry.v1.ImageInfo.firmware",
            r#"#[serde(serialize_with = "crate::serialize_short::<crate::v1::Firmware, _>")]"#,
        )
        .field_attribute(
            "ferry.v1.SystemStatus.state",
            r#"#[serde(serialize_with = "crate::serialize_short::<crate::v1::SystemState, _>")]"#,
        )
        .compile_protos(&["proto/ferry.proto"], &["proto"])?;
    Ok(())
}
