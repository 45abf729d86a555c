//! Generated gRPC types and services of Ferry's `ferry.v1` protocol.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The `ferry.v1` package.
pub mod v1 {
    tonic::include_proto!("ferry.v1");
}

/// The `ferry.v1` descriptors, for the servers' reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ferry_descriptor");

/// Largest gRPC message any Ferry service accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The wire's enums by the short names people and files use (`public`, `in-sync`):
/// how the CLI prints and parses them and how the services' own enums meet them.
pub trait ShortName: Sized + Copy {
    /// The short name; empty for the unspecified value.
    fn short(self) -> &'static str;
    fn from_short(name: &str) -> Option<Self>;
}

macro_rules! short_names {
    ($($t:ident { $($v:ident => $n:literal),* $(,)? })*) => {$(
        impl ShortName for v1::$t {
            fn short(self) -> &'static str {
                match self {
                    v1::$t::Unspecified => "",
                    $(v1::$t::$v => $n,)*
                }
            }
            fn from_short(name: &str) -> Option<Self> {
                match name {
                    $($n => Some(v1::$t::$v),)*
                    _ => None,
                }
            }
        }
    )*};
}

short_names! {
    Target { Local => "local", Aws => "aws", Azure => "azure" }
    Visibility { Public => "public", Private => "private" }
    Firmware { Bios => "bios", Efi => "efi" }
    SystemState {
        Registered => "registered",
        Scanning => "scanning",
        InitialSync => "initial-sync",
        InSync => "in-sync",
    }
    CloneState {
        Creating => "creating",
        Running => "running",
        Suspended => "suspended",
        Degraded => "degraded",
        Terminated => "terminated",
    }
    InstanceState {
        Pending => "pending",
        Booting => "booting",
        Running => "running",
        Suspended => "suspended",
        Stopped => "stopped",
        Failed => "failed",
        Terminated => "terminated",
    }
    JobState {
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
}

/// The short name of an enum field's value (`unknown` for a value this build lacks).
pub fn short_name<E: ShortName + TryFrom<i32>>(v: i32) -> &'static str {
    E::try_from(v).map_or("unknown", |e| e.short())
}

/// Serializes an enum field by its short name, for JSON output.
pub fn serialize_short<E: ShortName + TryFrom<i32>, S: serde::Serializer>(
    v: &i32,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(short_name::<E>(*v))
}
