//! Enums named by short lowercase words (`public`, `in-sync`), as records, files and
//! the command line spell them; and `Target`, where a system runs.

/// A name that is none of an enum's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {name:?} (one of: {expected})")]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
    pub expected: &'static str,
}

/// An enum whose variants have short names: serde, `Display` and `FromStr` use them.
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$m:meta])*
        $vis:vis enum $t:ident ($kind:literal) {
            $($(#[$vm:meta])* $v:ident => $n:literal),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        $vis enum $t {
            $($(#[$vm])* #[serde(rename = $n)] $v,)*
        }

        impl $t {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $n,)*
                }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $t {
            type Err = $crate::names::UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($n => Ok($t::$v),)*
                    _ => Err($crate::names::UnknownName {
                        kind: $kind,
                        name: s.to_string(),
                        expected: concat!($($n, " "),*).trim_ascii_end(),
                    }),
                }
            }
        }
    };
}

named_enum! {
    /// Where a system runs: the embedded provider (QEMU on this host) or a cloud.
    #[derive(Default)]
    pub enum Target ("target") {
        #[default]
        Local => "local",
        Aws => "aws",
        Azure => "azure",
    }
}

impl Target {
    /// The serial console the target's boot log goes to.
    pub fn console(self) -> &'static str {
        match self {
            Target::Local | Target::Aws => "ttyS0,115200",
            Target::Azure => "ttyS0,115200n8",
        }
    }

    /// Kernel arguments a guest needs on this target. Under QEMU (KVM, or TCG on a busy
    /// host) the early IO-APIC timer check can miss its ticks and panic the kernel
    /// ("IO-APIC + timer doesn't work!"), so the check is skipped, as QEMU cloud images
    /// do.
    pub fn kernel_args(self) -> &'static [&'static str] {
        match self {
            Target::Local => &["no_timer_check"],
            Target::Aws | Target::Azure => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_an_unknown_one_lists_the_known() {
        for t in [Target::Local, Target::Aws, Target::Azure] {
            assert_eq!(t.as_str().parse::<Target>().unwrap(), t);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
        }
        let e = "gcp".parse::<Target>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown target \"gcp\" (one of: local aws azure)"
        );
    }
}
