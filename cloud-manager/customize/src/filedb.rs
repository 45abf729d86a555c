//! The file database: a versioned catalogue that maps (OS, version range, target) to the
//! kernel drivers an image needs and the files to add, with file content stored by
//! SHA-256. A default catalogue is built in; an operator's directory adds to it.
//!
//! Layout of a database directory: `index.toml` (same schema as the built-in one) and
//! `objects/<sha256>` for content.
use ferry_sysconf::compare_versions;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::path::{Path, PathBuf};

/// The catalogue shipped with Ferry.
const DEFAULT_INDEX: &str = include_str!("filedb-default.toml");

#[derive(Debug, thiserror::Error)]
pub enum FileDbError {
    #[error("file database {path}: {source}")]
    Syntax {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    /// An index that parses but breaks a rule of the catalogue.
    #[error("file database {path}: {message}")]
    Index { path: String, message: String },
    #[error("file database {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("file database index: {0}")]
    Encode(#[source] toml::ser::Error),
    /// An object that is unavailable or corrupt, and why.
    #[error("file database object {0}: {1}")]
    Object(String, String),
    #[error("file database object {sha256}: {source}")]
    ObjectRead {
        sha256: String,
        #[source]
        source: std::io::Error,
    },
    #[error("file database entry: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    /// Schema version; 1.
    pub version: u32,
    #[serde(default, rename = "entry")]
    pub entries: Vec<Entry>,
}

/// One rule of the catalogue.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// os-release `ID` (centos, ubuntu, ...) or family (rhel, debian, suse); "*" for any.
    pub os: String,
    /// Comma-separated bounds, e.g. ">=5, <6"; empty for every version.
    #[serde(default)]
    pub versions: String,
    /// local, aws, azure or "*".
    pub target: String,
    /// Kernel drivers the initrd must hold (module names, `-` and `_` alike).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Files to place in the tree.
    #[serde(default)]
    pub files: Vec<FileRef>,
    /// Why the rule exists, shown in reports.
    #[serde(default)]
    pub note: String,
    /// The target cannot boot this OS as it is: /boot is set aside and replaced by the
    /// /boot files of the matching entries.
    #[serde(default)]
    pub replace_boot: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    /// Absolute path in the system tree.
    pub path: String,
    pub sha256: String,
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

/// What a system needs on a target, merged over every matching rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Needs {
    pub modules: Vec<String>,
    pub files: Vec<(String, String, u32)>,
    pub notes: Vec<String>,
    pub replace_boot: bool,
}

/// The built-in catalogue plus, optionally, an operator's database directory.
#[derive(Debug, Clone)]
pub struct FileDb {
    entries: Vec<Entry>,
    /// How many of `entries` are built in (they come first).
    built_in: usize,
    dir: Option<PathBuf>,
}

fn parse(text: &str, path: &str) -> Result<Catalogue, FileDbError> {
    let c: Catalogue = toml::from_str(text).map_err(|source| FileDbError::Syntax {
        path: path.into(),
        source,
    })?;
    if c.version != 1 {
        return Err(FileDbError::Index {
            path: path.into(),
            message: format!("schema version {} is not supported (1 is)", c.version),
        });
    }
    for e in &c.entries {
        parse_bounds(&e.versions).map_err(|m| FileDbError::Index {
            path: path.into(),
            message: m,
        })?;
        for f in &e.files {
            if !f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
                return Err(FileDbError::Index {
                    path: path.into(),
                    message: format!("file path {:?} must be absolute, without ..", f.path),
                });
            }
            if f.sha256.len() != 64 || !f.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(FileDbError::Index {
                    path: path.into(),
                    message: format!("{:?} is not a SHA-256", f.sha256),
                });
            }
        }
    }
    Ok(c)
}

impl FileDb {
    /// The built-in catalogue, and the operator's directory when given.
    pub fn open(dir: Option<&Path>) -> Result<Self, FileDbError> {
        let mut entries = parse(DEFAULT_INDEX, "built-in")?.entries;
        let built_in = entries.len();
        if let Some(d) = dir {
            let index = d.join("index.toml");
            match std::fs::read_to_string(&index) {
                Ok(t) => entries.extend(parse(&t, &index.display().to_string())?.entries),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(FileDbError::Io {
                        path: index,
                        source,
                    })
                }
            }
        }
        Ok(Self {
            entries,
            built_in,
            dir: dir.map(Path::to_path_buf),
        })
    }

    /// Every entry, built-in ones first, each with whether it is built in.
    pub fn entries(&self) -> impl Iterator<Item = (&Entry, bool)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e, i < self.built_in))
    }

    /// Size of a stored object, if present.
    pub fn object_size(&self, sha256: &str) -> Option<u64> {
        let dir = self.dir.as_ref()?;
        std::fs::metadata(dir.join("objects").join(sha256))
            .ok()
            .map(|m| m.len())
    }

    /// Adds an operator entry to the database at `dir`: the content of each file is
    /// stored by hash first, then the index is rewritten (temp file, fsync, rename).
    /// Returns the new entry's position among all entries.
    pub fn add(
        dir: &Path,
        mut entry: Entry,
        contents: Vec<(String, u32, Vec<u8>)>,
    ) -> Result<usize, FileDbError> {
        let invalid = |m: String| FileDbError::Invalid(m);
        if entry.os.trim().is_empty() {
            return Err(invalid(
                "os is required (an os-release ID, a family, or *)".into(),
            ));
        }
        if !["local", "aws", "azure", "*"].contains(&entry.target.as_str()) {
            return Err(invalid(format!(
                "target {:?} is not local, aws, azure or *",
                entry.target
            )));
        }
        parse_bounds(&entry.versions).map_err(invalid)?;
        let objects = dir.join("objects");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FileDbError::Io { path, source }
        };
        std::fs::create_dir_all(&objects).map_err(io(&objects))?;
        for (path, mode, data) in contents {
            if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                return Err(invalid(format!(
                    "file path {path:?} must be absolute, without .."
                )));
            }
            let sha = hex::encode(sha2::Sha256::digest(&data));
            let object = objects.join(&sha);
            write_atomic(&object, &data).map_err(io(&object))?;
            entry.files.push(FileRef {
                path,
                sha256: sha,
                mode,
            });
        }
        let index = dir.join("index.toml");
        let mut cat = match std::fs::read_to_string(&index) {
            Ok(t) => parse(&t, &index.display().to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Catalogue {
                version: 1,
                entries: Vec::new(),
            },
            Err(e) => return Err(io(&index)(e)),
        };
        cat.entries.push(entry);
        let text = toml::to_string(&cat).map_err(FileDbError::Encode)?;
        // The written index must read back exactly as the rules say.
        parse(&text, &index.display().to_string())?;
        write_atomic(&index, text.as_bytes()).map_err(io(&index))?;
        let built_in = parse(DEFAULT_INDEX, "built-in")?.entries.len();
        Ok(built_in + cat.entries.len() - 1)
    }

    /// Everything the rules say for this OS on this target.
    pub fn lookup(&self, os_id: &str, family: &str, version: &str, target: &str) -> Needs {
        let mut needs = Needs::default();
        for e in &self.entries {
            let os_ok = e.os == "*" || e.os == os_id || e.os == family;
            let target_ok = e.target == "*" || e.target == target;
            if !(os_ok && target_ok && version_matches(version, &e.versions)) {
                continue;
            }
            for m in &e.modules {
                let m = m.replace('-', "_");
                if !needs.modules.contains(&m) {
                    needs.modules.push(m);
                }
            }
            for f in &e.files {
                needs.files.retain(|(p, _, _)| p != &f.path);
                needs.files.push((f.path.clone(), f.sha256.clone(), f.mode));
            }
            if !e.note.is_empty() {
                needs.notes.push(e.note.clone());
            }
            needs.replace_boot |= e.replace_boot;
        }
        needs
    }

    /// Content of an object, checked against its name.
    pub fn object(&self, sha256: &str) -> Result<Vec<u8>, FileDbError> {
        let dir = self.dir.as_ref().ok_or_else(|| {
            FileDbError::Object(sha256.into(), "no file database directory given".into())
        })?;
        let data = std::fs::read(dir.join("objects").join(sha256)).map_err(|source| {
            FileDbError::ObjectRead {
                sha256: sha256.into(),
                source,
            }
        })?;
        let got = hex::encode(sha2::Sha256::digest(&data));
        if got != sha256 {
            return Err(FileDbError::Object(
                sha256.into(),
                format!("content hashes to {got}; the object is corrupt"),
            ));
        }
        Ok(data)
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn parse_bounds(spec: &str) -> Result<Vec<(&str, &str)>, String> {
    let mut out = Vec::new();
    for b in spec.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        let op = [">=", "<=", ">", "<", "="]
            .into_iter()
            .find(|op| b.starts_with(op))
            .ok_or_else(|| format!("version bound {b:?} needs one of >= <= > < ="))?;
        let v = b[op.len()..].trim();
        if v.is_empty() {
            return Err(format!("version bound {b:?} has no version"));
        }
        // A release as os-release gives it (12, 22.04, 7.9.2009, 15-SP4): anything else
        // would compare in ways nobody meant.
        let release = v.starts_with(|c: char| c.is_ascii_digit())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !release {
            return Err(format!(
                "version bound {b:?}: {v:?} is not a release number (e.g. 12, 22.04, 7.9)"
            ));
        }
        out.push((op, v));
    }
    Ok(out)
}

/// Whether `version` lies within every bound of `spec`.
pub fn version_matches(version: &str, spec: &str) -> bool {
    use std::cmp::Ordering::*;
    let Ok(bounds) = parse_bounds(spec) else {
        return false;
    };
    bounds.into_iter().all(|(op, v)| {
        let o = compare_versions(version, v);
        match op {
            ">=" => o != Less,
            "<=" => o != Greater,
            ">" => o == Greater,
            "<" => o == Less,
            _ => o == Equal,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tell_releases_apart() {
        assert!(version_matches("5.3", ">=5, <5.5"));
        assert!(!version_matches("5.6", ">=5, <5.5"));
        assert!(version_matches("6.10", ">=6, <7"));
        assert!(version_matches("12.04", "<14.04"));
        assert!(!version_matches("22.04", "<14.04"));
        assert!(version_matches("9.3", ""));
        assert!(compare_versions("5.10", "5.9").is_gt());
        for bad in [
            ">>>5",
            ">=x",
            "=",
            "banana",
            ">=5, <",
            "<=1 2",
            ">=$(reboot)",
        ] {
            assert!(parse_bounds(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_bounds(">=15-SP4, <22.04").is_ok());
    }

    #[test]
    fn default_catalogue_answers_for_every_target() {
        let db = FileDb::open(None).unwrap();
        let local = db.lookup("debian", "debian", "12", "local");
        assert!(
            local.modules.contains(&"virtio_blk".to_string()),
            "{local:?}"
        );
        let aws = db.lookup("rhel", "rhel", "9.3", "aws");
        assert!(
            aws.modules.contains(&"ena".to_string()) && aws.modules.contains(&"nvme".to_string())
        );
        let azure = db.lookup("sles", "suse", "15.5", "azure");
        assert!(azure.modules.contains(&"hv_storvsc".to_string()));
        let old = db.lookup("centos", "rhel", "5.3", "aws");
        assert!(old.modules.contains(&"xen_blkfront".to_string()), "{old:?}");
        assert!(
            !old.modules.contains(&"ena".to_string()),
            "CentOS 5 has no ENA driver"
        );
    }

    #[test]
    fn operator_entries_add_to_the_built_in_ones_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("objects")).unwrap();
        let body = b"#!/bin/sh\n";
        let sum = hex::encode(sha2::Sha256::digest(body));
        std::fs::write(dir.path().join("objects").join(&sum), body).unwrap();
        std::fs::write(
            dir.path().join("index.toml"),
            format!(
                "version = 1\n[[entry]]\nos = \"centos\"\nversions = \">=5, <6\"\ntarget = \"aws\"\nfiles = [{{ path = \"/sbin/x\", sha256 = \"{sum}\", mode = 0o755 }}]\n"
            ),
        )
        .unwrap();
        let db = FileDb::open(Some(dir.path())).unwrap();
        let n = db.lookup("centos", "rhel", "5.6", "aws");
        assert_eq!(n.files, vec![("/sbin/x".to_string(), sum.clone(), 0o755)]);
        assert_eq!(db.object(&sum).unwrap(), body);
        std::fs::write(dir.path().join("objects").join(&sum), b"tampered").unwrap();
        assert!(db.object(&sum).unwrap_err().to_string().contains("corrupt"));
        for bad in [
            "version = 2\n",
            "version = 1\n[[entry]]\nos = \"x\"\ntarget = \"aws\"\nversions = \"~5\"\n",
            "version = 1\n[[entry]]\nos = \"x\"\ntarget = \"aws\"\nfiles = [{ path = \"../etc\", sha256 = \"00\" }]\n",
            "version = 1\nbogus = 1\n",
        ] {
            std::fs::write(dir.path().join("index.toml"), bad).unwrap();
            assert!(FileDb::open(Some(dir.path())).is_err(), "{bad}");
        }
    }
}
